"""Evaluation through lm-eval's own evaluator and task registry; with fastlm.py (the harness's lm-eval
model class), the only module that imports lm_eval.

Tasks are lm-eval task names: its registered benchmarks, or YAMLs under tasks/ (added to lm-eval's
TaskManager through `include_path`). With a mirror, each task's registered YAML is loaded and its
dataset source rewritten to the mirror's jsonl files (splits the mirror lacks become null); lm-eval
does not merge a dict with the registered YAML of the same name, so the whole config is passed.
That uses lm_eval.tasks._yaml_loader.load_yaml (private): lm-eval's version range is kept narrow
and tests/test_evaluate.py covers it.

Two of lm-eval's own costs are removed without changing what it computes (measured on the general
suite, 19,965 documents, with a model that answers instantly: 74 s of lm-eval's time -> 22 s on this
2-core machine; scripts/bench_eval.py checks per-document agreement with stock lm-eval):
- `cached_templates`: lm_eval.utils.apply_template compiles a task's Jinja template anew for every
  document and field (~76,000 compilations for the suite, 70% of the time); inside the block each
  distinct template is compiled once, in lm-eval's own Environment, and rendered as before.
- `eval_task`: a Task is built once per process and data version and its evaluation documents are
  read once; lm-eval otherwise re-runs process_docs and decodes every Arrow row on each of its three
  passes per evaluation, and rebuilds the tasks for every model (a compare evaluates several).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import time
import zlib
from functools import lru_cache
from pathlib import Path

from harness.config import TASKS_DIR, HarnessError
from harness.data import mirror_file

SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
# On CUDA the harness backend scores up to this many multiple-choice requests per batch (a small
# model leaves the GPU idle at lm-eval's usual 8-64; it halves the batch on out-of-memory), and lets a
# batch's shortest prefix be half its longest: more padding, fewer forward passes. Each forward pass
# costs Python and kernel launches per layer, ~2.4x more with 4-bit layers and LoRA adapters. On an
# H200, scoring the six-task suite's 67,110 requests took 27.1 s instead of 32.5 s (fp32 SmolLM2) and
# 31.5 s instead of 51.8 s (NF4 base + LoRA) against 512 requests and 3/4. CPUs pay for padding in
# arithmetic: they keep lm-eval's batch size and 3/4.
GPU_MC_BATCH = 2048
GPU_PREFIX_RATIO = 0.5


_EXTRA_INCLUDE: tuple[str, ...] = ()


def set_include_paths(paths: tuple[str, ...] | list[str]) -> None:
    """Task YAMLs (and their `!function` hooks, which run Python) load only from tasks/ and
    directories the user names with --include-path; lm-eval's own registry is trusted as installed."""
    global _EXTRA_INCLUDE
    resolved = []
    for p in paths:
        d = Path(p).expanduser()
        if not d.is_dir():
            raise HarnessError(f"--include-path {p}: not a directory")
        resolved.append(str(d.resolve()))
    if tuple(resolved) != _EXTRA_INCLUDE:
        _EXTRA_INCLUDE = tuple(resolved)
        task_manager.cache_clear()
        _TASKS.clear()


_NEEDED: frozenset[str] = frozenset()


def need_tasks(names) -> None:
    """The tasks this process will use: task_manager() then indexes only their directories of lm-eval's
    registry (besides tasks/ and --include-path, indexed whole). lm-eval's TaskManager otherwise parses
    all ~14,000 registry YAMLs at construction: 14 s on the 2-core machine, in the parent of a
    compare and again in each parallel job, before any work."""
    global _NEEDED
    if not frozenset(names) <= _NEEDED:
        _NEEDED = _NEEDED | frozenset(names)
        task_manager.cache_clear()


def _own_paths() -> list[str]:
    """Task directories indexed whole: the project's tasks/ and --include-path."""
    return [str(TASKS_DIR), *_EXTRA_INCLUDE]


@lru_cache(maxsize=None)
def task_manager():
    from lm_eval.tasks import TaskManager

    own = _own_paths()
    dirs = _registry_dirs(_NEEDED)
    if dirs is None:
        return TaskManager(include_path=own)
    # Registry first, then ours: the same precedence (a later path overrides) as the whole index.
    return TaskManager(include_path=[*dirs, *own], include_defaults=False)


def _registry_dirs(names: frozenset[str]) -> list[str] | None:
    """The registry directories holding these tasks, or None for the whole registry: when no task
    is named, or one is a group, a tag or a Python-class task (those reach into other directories).
    Names the registry lacks are tasks/ or --include-path tasks (or unknown: check_tasks says)."""
    if not names:
        return None
    registry = _registry_map()
    dirs = set()
    for name in names:
        kind, directory = registry.get(name, (None, None))
        if kind is None:
            continue
        if kind != "TASK":
            return None
        dirs.add(directory)
    return sorted(dirs)


@lru_cache(maxsize=1)
def _registry_map() -> dict[str, list[str]]:
    """lm-eval's own registry as {name: [kind, directory of its YAML]}, built once per installation
    (the whole index, once) and kept as JSON in the harness cache."""
    import json

    import lm_eval
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    from harness.io import write_json
    from harness.models import cache_dir

    root = Path(lm_eval.tasks.__file__).parent
    stamp = {"lm_eval": lm_eval.__version__, "root": str(root), "mtime_ns": root.stat().st_mtime_ns}
    path = cache_dir() / "lm-eval-registry.json"
    try:
        data = json.loads(path.read_text())
        if data["stamp"] == stamp:
            return data["tasks"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    index = TaskManager(include_defaults=True).task_index
    tasks = {name: [e.kind.name, e.yaml_path and str(Path(e.yaml_path).parent)] for name, e in index.items()}
    try:
        write_json(path, {"stamp": stamp, "tasks": tasks})
    except OSError:  # a read-only cache: index again next time
        pass
    return tasks


def check_tasks(names: list[str]) -> None:
    """Fail before any weights load when a task name does not resolve."""
    need_tasks(names)
    index = task_manager().task_index
    for name in names:
        if name not in index:
            from lm_eval.tasks import TaskManager

            every = TaskManager(include_path=_own_paths()).task_index  # the whole registry, for suggestions
            near = difflib.get_close_matches(name, list(every), n=3)
            raise HarnessError(f"unknown lm-eval task '{name}'" + (f"; did you mean: {', '.join(near)}?" if near else ""))


def task_config(name: str, *, mirror: Path | None) -> str | dict:
    """The task as lm-eval should load it: its name, or (with a mirror) its rewritten config."""
    need_tasks([name])
    if mirror is None:
        return name
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(task_manager().task_index[name].yaml_path, resolve_func=True)
    dataset, config = cfg.get("dataset_path"), cfg.get("dataset_name")
    files = {}
    for key in SPLIT_KEYS:
        split = cfg.get(key)
        if split is None:
            continue
        path = mirror_file(mirror, dataset, config, split)
        if path.exists():
            files[split] = str(path)
        else:
            cfg[key] = None  # the mirror lacks this split (e.g. few-shot `train`)
    if not files:
        raise HarnessError(
            f"task {name}: dataset {dataset} ({config or 'default'}) is not in the mirror, "
            f"looked under {mirror / dataset / (config or 'default')}"
        )
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    cfg.pop("tag", None)  # the rewritten task is standalone
    return cfg


def task_source(name: str, *, mirror: Path | None) -> dict:
    """The dataset, config and split lm-eval scores for a task (its test split, else validation)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    need_tasks([name])
    cfg = load_yaml(task_manager().task_index[name].yaml_path, resolve_func=True)
    dataset, config = cfg.get("dataset_path"), cfg.get("dataset_name")
    for key in ("test_split", "validation_split"):
        split = cfg.get(key)
        if split and (mirror is None or mirror_file(mirror, dataset, config, split).exists()):
            return {"dataset": dataset, "config": config, "split": split}
    task_config(name, mirror=mirror)  # names the dataset and where the mirror was searched
    raise HarnessError(f"task {name}: no test or validation split of {dataset} ({config or 'default'}) found")


def load_task_object(name: str, *, mirror: Path | None):
    """An lm-eval Task (its dataset loaded), e.g. to format training examples with its prompt."""
    return _build_task(name, task_config(name, mirror=mirror))


_TASKS: dict[tuple, object] = {}


def eval_task(name: str, *, mirror: Path | None):
    """The Task to evaluate `name` with: built once per process (and per version of its data files),
    its evaluation documents read once into a list that lm-eval's passes then iterate."""
    config = task_config(name, mirror=mirror)
    files = config.get("dataset_kwargs", {}).get("data_files", {}) if isinstance(config, dict) else {}
    stamp = tuple(sorted((split, path, *_stat(path)) for split, path in files.items()))
    key = (name, str(mirror), _EXTRA_INCLUDE, stamp)
    if key not in _TASKS:
        task = _build_task(name, config)
        docs = list(task.eval_docs)
        # eval_docs calls test_docs() (else validation_docs()); an instance attribute answers first.
        setattr(task, "test_docs" if task.has_test_docs() else "validation_docs", lambda: docs)
        _TASKS[key] = task
    return _TASKS[key]


def _stat(path: str) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def cached_templates():
    """Within the block, lm-eval compiles each distinct Jinja template once (see the module doc)."""
    import lm_eval.utils as lm_utils

    original = lm_utils.apply_template
    if original is _apply_template:  # already inside a block
        yield
        return
    lm_utils.apply_template = _apply_template
    try:
        yield
    finally:
        lm_utils.apply_template = original


@lru_cache(maxsize=1024)
def _compiled(template: str):
    import lm_eval.utils as lm_utils

    return lm_utils.env.from_string(template)


def _apply_template(template: str, doc: dict) -> str:
    return _compiled(template).render(**doc)


def _build_task(name: str, config):
    try:
        built = task_manager().load_task_or_group([config])
    except Exception as e:  # lm-eval/datasets raise many types for data that does not fit the task
        cause = e.__cause__ or e
        raise HarnessError(f"task {name}: lm-eval could not load its data ({type(cause).__name__}: "
                           f"{' '.join(str(cause).split())[:300]})") from None
    return built[name]


def doc_count(name: str, mirror: Path | None) -> int:
    return len(eval_task(name, mirror=mirror).eval_docs)


def subsample(tasks: list[str], limit: int, *, mirror: Path | None, seed: int) -> dict[str, list[int]]:
    """A seeded random subset of `limit` documents per task, as lm-eval's `samples` argument.

    lm-eval's own `limit` takes the first N documents, and some splits are sorted (the financial
    tweets' validation split is ordered by label: its first 30 are all 'bearish')."""
    import numpy as np

    out = {}
    for task in tasks:
        n = doc_count(task, mirror)
        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])  # per task: stable across suites
        out[task] = sorted(int(x) for x in rng.choice(n, size=min(limit, n), replace=False))
    return out


def formatter(name: str, *, mirror: Path | None):
    """doc -> (context, continuation) exactly as lm-eval scores the correct answer of `name`.

    Training examples go through the same doc_to_text / doc_to_choice / doc_to_target (and
    process_docs) as evaluation, so the fine-tuned arms learn the very prompt they are tested on."""
    task = eval_task(name, mirror=mirror)  # the same Task object evaluation uses
    if task.OUTPUT_TYPE != "multiple_choice":
        raise HarnessError(f"train.format_task {name}: must be a multiple_choice task, is {task.OUTPUT_TYPE}")
    delimiter = task.config.target_delimiter

    def fmt(doc: dict) -> tuple[str, str]:
        with cached_templates():
            choices = task.doc_to_choice(doc)
            target = task.doc_to_target(doc)
            text = task.doc_to_text(doc)
        if not isinstance(target, int) or not 0 <= target < len(choices):
            raise HarnessError(f"task {name}: label {target!r} is outside the choices {choices}")
        return text, delimiter + choices[target]

    process = task.config.process_docs if callable(task.config.process_docs) else None
    return fmt, process


def make_lm(model, tokenizer, *, batch_size: int, backend: str = "auto"):
    """The lm-eval model object: harness.fastlm.HarnessLM, or lm-eval's stock HFLM ("hf")."""
    from lm_eval.models.huggingface import HFLM

    on_gpu = next(model.parameters()).device.type == "cuda"
    if backend == "auto":  # faster on both (2-core CPU, quick profile's suite: 81 s vs 114 s)
        backend = "harness"
    if backend == "hf":
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if backend != "harness":
        raise HarnessError(f"eval backend: must be auto, harness or hf, got {backend!r}")
    from harness.fastlm import HarnessLM

    if on_gpu:
        return HarnessLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                         mc_batch_size=max(batch_size, GPU_MC_BATCH), mc_prefix_ratio=GPU_PREFIX_RATIO)
    return HarnessLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, mc_batch_size=batch_size)


def evaluate(model, tokenizer, tasks: list[str], *, mirror: Path | None, limit: int | None,
             batch_size: int, num_fewshot: int = 0, seed: int = 0, backend: str = "auto",
             raw: bool = False) -> dict:
    """Run lm-eval's simple_evaluate on an in-memory model (plain, PeftModel, or over a 4-bit base),
    all tasks in one call.

    Returns {"results": {task: {metric: value, metric_stderr: ...}}, "n": {task: docs},
    "samples": {task: [per-document records]}, "configs": ..., "seconds": wall time}; with `raw`,
    also "raw": {task: {doc_id: [(loglik, is_greedy) per choice]}} (see `agreement`)."""
    from lm_eval import simple_evaluate

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = make_lm(model, tokenizer, batch_size=batch_size, backend=backend)
    start = time.perf_counter()
    samples = subsample(tasks, limit, mirror=mirror, seed=seed) if limit is not None else None
    with cached_templates():
        out = simple_evaluate(
            model=lm,
            tasks=[eval_task(t, mirror=mirror) for t in tasks],
            num_fewshot=num_fewshot,
            samples=samples,
            log_samples=True,
            task_manager=task_manager(),
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    seconds = time.perf_counter() - start
    results, samples = {}, {}
    for task in tasks:
        metrics = out["results"][task]
        results[task] = {k.replace(",none", ""): _num(v) for k, v in metrics.items() if "," in k}
        samples[task] = [_compact(s) for s in out["samples"].get(task, [])]
    extra = {"raw": raw_responses(out)} if raw else {}
    return {**extra,
        "results": results,
        "n": {t: out["n-samples"][t]["effective"] for t in tasks},
        "samples": samples,
        "versions": {t: out["versions"].get(t) for t in tasks},
        "lm_eval_version": out.get("lm_eval_version"),
        "seconds": seconds,
    }


def raw_responses(out: dict) -> dict:
    """{task: {doc_id: [(loglik, is_greedy) per choice]}} from simple_evaluate's logged samples."""
    return {task: {s["doc_id"]: [(float(r[0]), bool(r[1])) for r in s["filtered_resps"]] for s in rows
                   if all(isinstance(r, (list, tuple)) for r in s["filtered_resps"])}
            for task, rows in out["samples"].items()}


def agreement(ref: dict, got: dict) -> dict:
    """Per-document agreement of two raw_responses: same choice picked, same greedy flags, |Δ loglik|."""
    docs = same_pred = 0
    same_greedy, max_diff = True, 0.0
    for task, rows in ref.items():
        if set(rows) != set(got.get(task, {})):
            raise HarnessError(f"agreement: task {task} has different documents in the two runs")
        for doc_id, a in rows.items():
            b = got[task][doc_id]
            docs += 1
            same_pred += _argmax(a) == _argmax(b)
            same_greedy &= [g for _, g in a] == [g for _, g in b]
            max_diff = max(max_diff, *(abs(x - y) for (x, _), (y, _) in zip(a, b, strict=True)))
    return {"documents": docs, "same_pred": same_pred, "same_greedy": same_greedy, "max_abs_diff": max_diff}


def _argmax(resps) -> int:
    return max(range(len(resps)), key=lambda i: resps[i][0])


def _num(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return v if isinstance(v, (int, float)) else None


def _compact(sample: dict) -> dict:
    """The per-document record kept for paired statistics: ids, target, prediction, metrics."""
    rec = {"doc_id": sample["doc_id"], "doc_hash": sample.get("doc_hash"), "target": sample.get("target")}
    resps = sample.get("filtered_resps") or []
    if resps and isinstance(resps[0], (list, tuple)) and len(resps[0]) == 2 and isinstance(resps[0][1], bool):
        lls = [float(r[0]) for r in resps]
        rec["pred"] = max(range(len(lls)), key=lls.__getitem__)
    for m in sample.get("metrics", []):
        v = sample.get(m)
        if isinstance(v, (int, float)):
            rec[m] = float(v)
    return rec
