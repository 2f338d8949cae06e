"""Evaluation through lm-eval's own evaluator and task registry; with fastlm.py (the harness's lm-eval
model class) and answer.py (the `<task>@answer` log-likelihood task), the only module that imports lm_eval.

Tasks are lm-eval task names: its registered benchmarks, or YAMLs under tasks/ (added to lm-eval's
TaskManager through `include_path`). With a mirror, each task's registered YAML is loaded and its
dataset source rewritten to the mirror's jsonl files (splits the mirror lacks become null); lm-eval
does not merge a dict with the registered YAML of the same name, so the whole config is passed.
That uses lm_eval.tasks._yaml_loader.load_yaml (private): lm-eval's version range is kept narrow
and tests/test_evaluate.py covers it.

Two of lm-eval's own costs are removed without changing what it computes (measured on the general
suite, 19,965 documents, with a model that answers instantly: 74 s of lm-eval's time -> 22 s on this
2-core machine; scripts/bench_eval.py checks per-document agreement with stock lm-eval); the patches
themselves are in harness/lm_eval_patches.py:
- `cached_templates`: lm_eval.utils.apply_template compiles a task's Jinja template anew for every
  document and field (~76,000 compilations for the suite, 70% of the time); inside the block each
  distinct template is compiled once, in lm-eval's own Environment, and rendered as before.
- `eval_task`: a Task is built once per process and data version and its evaluation documents are
  read once; lm-eval otherwise re-runs process_docs and decodes every Arrow row on each of its three
  passes per evaluation, and rebuilds the tasks for every model (a compare evaluates several).
"""

from __future__ import annotations

import difflib
import logging
import math
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from harness import context, corpus, lm_eval_patches
from harness.config import TASKS_DIR, HarnessError
from harness.data import mirror_file

ANSWER_SUFFIX, ANSWER_METRIC = "@answer", "bits_per_byte"  # harness.answer's, here without importing lm_eval
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
# On CUDA the harness backend scores up to this many multiple-choice requests per batch (a small
# model leaves the GPU idle at lm-eval's usual 8-64; it halves the batch on out-of-memory), and lets a
# batch's shortest prefix be half its longest: more padding, fewer forward passes. Each forward pass
# costs Python and kernel launches per layer, ~2.4x more with 4-bit layers and LoRA adapters. On an
# H200, scoring the six-task suite's 67,110 requests took 27.1 s instead of 32.5 s (fp32 SmolLM2) and
# 31.5 s instead of 51.8 s (NF4 base + LoRA) against 512 requests and 3/4. CPUs pay for padding in
# arithmetic: they keep lm-eval's batch size and 3/4.
GPU_MC_BATCH = 2048
# Memory a generation batch may take on CUDA (KV cache and prefill activations, fastlm's estimate):
# as many prompts per batch as fit, all 541 of IFEval's for SmolLM2 at 256 new tokens. Generation's
# decoding steps cost per step, not per prompt, on a GPU (see HarnessLM.generate_until).
GPU_GEN_MEMORY = 24 * 2**30
GPU_PREFIX_RATIO = 0.5


# A memo, not a setting: the tasks this process has named so far, so that one TaskManager indexes
# the registry directories of all of them (each new name costs one rebuild, not one per call).
_NEEDED: frozenset[str] = frozenset()


def need_tasks(names) -> None:
    """The tasks this process will use: task_manager() then indexes only their directories of lm-eval's
    registry (besides tasks/ and --include-path, indexed whole). lm-eval's TaskManager otherwise parses
    all ~14,000 registry YAMLs at construction: 14 s on the 2-core machine, in the parent of a
    compare and again in each parallel job, before any work."""
    global _NEEDED
    _NEEDED = _NEEDED | frozenset(base_task(n) for n in names)


def _own_paths() -> list[str]:
    """Task directories indexed whole: the project's tasks/ and the run's --include-path (its context:
    task YAMLs and their `!function` hooks, which run Python, load only from directories the user
    names; lm-eval's own registry is trusted as installed)."""
    return [str(TASKS_DIR), *context.current().include_paths]


def task_manager():
    """lm-eval's TaskManager for the current run's task directories and the tasks named so far."""
    return _task_manager(tuple(_own_paths()), _NEEDED)


@lru_cache(maxsize=4)
def _task_manager(own: tuple[str, ...], needed: frozenset[str]):
    from lm_eval.tasks import TaskManager

    dirs = _registry_dirs(needed)
    if dirs is None:
        return TaskManager(include_path=list(own))
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
    for name in [base_task(n) for n in names]:
        if name not in index:
            from lm_eval.tasks import TaskManager

            every = TaskManager(include_path=_own_paths()).task_index  # the whole registry, for suggestions
            near = difflib.get_close_matches(name, list(every), n=3)
            raise HarnessError(f"unknown lm-eval task '{name}'" + (f"; did you mean: {', '.join(near)}?" if near else ""))


def task_config(name: str, *, mirror: Path | None) -> str | dict:
    """The task as lm-eval should load it: its name, or (with a mirror) its rewritten config; a derived
    `<task>@answer` always as a config (harness/answer.py)."""
    need_tasks([name])
    if is_answer(name):
        return _answer_config(name, mirror=mirror)
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


def _answer_config(name: str, *, mirror: Path | None) -> dict:
    """`<task>@answer`: the generate_until task's config, scoring its reference answer's likelihood."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from harness import answer

    base = base_task(name)
    cfg = task_config(base, mirror=mirror)
    if isinstance(cfg, str):
        cfg = load_yaml(task_manager().task_index[base].yaml_path, resolve_func=True)
    if cfg.get("output_type") != "generate_until":
        raise HarnessError(f"task {name}: {answer.SUFFIX} scores a generate_until task's reference answer; "
                           f"{base} is {cfg.get('output_type') or 'not a configured task'}")
    return answer.derive(cfg, name)


def is_answer(name: str) -> bool:
    return name.endswith(ANSWER_SUFFIX)


def base_task(name: str) -> str:
    """The registered task a name stands for: `gsm8k@answer` -> gsm8k."""
    return name[: -len(ANSWER_SUFFIX)] if is_answer(name) else name


def answer_task(name: str) -> str:
    return name + ANSWER_SUFFIX


def task_source(name: str, *, mirror: Path | None) -> dict:
    """The dataset, config and split lm-eval scores for a task (its test split, else validation)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    name = base_task(name)  # the same documents
    need_tasks([name])
    cfg = load_yaml(task_manager().task_index[name].yaml_path, resolve_func=True)
    dataset, config = cfg.get("dataset_path"), cfg.get("dataset_name")
    for key in ("test_split", "validation_split"):
        split = cfg.get(key)
        if split and (mirror is None or mirror_file(mirror, dataset, config, split).exists()):
            return {"dataset": dataset, "config": config, "split": split}
    task_config(name, mirror=mirror)  # names the dataset and where the mirror was searched
    raise HarnessError(f"task {name}: no test or validation split of {dataset} ({config or 'default'}) found")


def scoring(tasks: list[str], dataset: str, config: str | None, split: str, *, mirror: Path | None) -> str | None:
    """The first of `tasks` that scores this dataset split (training or replay data must not be one), or None."""
    for name in tasks:
        src = task_source(name, mirror=mirror)
        if (src["dataset"], src["config"] or None, src["split"]) == (dataset, config or None, split):
            return name
    return None


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
    key = (name, str(mirror), tuple(_own_paths()), stamp)
    if key not in _TASKS:
        task = _build_task(name, config)
        lm_eval_patches.read_docs_once(task)
        lm_eval_patches.guard_overflow(task)
        import copy

        task._harness_dump = copy.deepcopy(task.dump_config())
        task._harness_defaults = {"num_fewshot": task.config.num_fewshot,
                                  "generation_kwargs": copy.deepcopy(task.config.generation_kwargs)}
        _TASKS[key] = task
    return _TASKS[key]


def _stat(path: str) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_mtime_ns, st.st_size


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


def subsample(tasks: list[str], limit: int | dict, *, mirror: Path | None, seed: int) -> dict[str, list[int]]:
    """A seeded random subset of `limit` documents per task (an int, or {task: int or None}), as
    lm-eval's `samples` argument.

    lm-eval's own `limit` takes the first N documents, and some splits are sorted (the financial
    tweets' validation split is ordered by label: its first 30 are all 'bearish')."""
    import numpy as np

    out = {}
    for task in tasks:
        n = doc_count(task, mirror)
        k = limit.get(task) if isinstance(limit, dict) else limit
        if k is None:
            out[task] = list(range(n))
            continue
        # Per task, stable across suites; `<task>@answer` draws the same documents as its task.
        rng = np.random.default_rng([seed, zlib.crc32(base_task(task).encode())])
        out[task] = sorted(int(x) for x in rng.choice(n, size=min(k, n), replace=False))
    return out


# ---------------------------------------------------------------- what a task or group is


def expand(name: str) -> dict:
    """A suite entry as lm-eval defines it: a task, or a group / tag with its subtasks.

    Returns {"kind": "task"|"group", "leaves": [task names, in order], "groups": {group: {"children":
    [...], "aggregate": [{"metric", "filter_list", "weight_by_size"}] or None}}}. Read from the registry's
    YAMLs, not by building the group: building would load every subtask's dataset (from the hub),
    while here each subtask is evaluated on its own, through the mirror when there is one."""
    from lm_eval.tasks._yaml_loader import load_yaml

    need_tasks([name])
    if is_answer(name):
        check_tasks([name])
        return {"kind": "task", "leaves": [name], "groups": {}}
    groups: dict[str, dict] = {}
    leaves: list[str] = []

    def walk(n: str, path: tuple[str, ...]) -> None:
        if n in path:
            raise HarnessError(f"group {path[0]}: contains itself through {' -> '.join((*path, n))}")
        need_tasks([n])  # a group's children may live in other registry directories
        entry = task_manager().task_index.get(n)
        if entry is None:
            check_tasks([n])  # names it, with suggestions
            raise HarnessError(f"task {n}: not found in lm-eval's registry")
        kind = entry.kind.name
        if kind in ("TASK", "PY_TASK"):
            if n not in leaves:
                leaves.append(n)
            return
        if kind == "TAG":
            children, aggregate = sorted(entry.tags), None
        elif kind == "GROUP":
            cfg = load_yaml(entry.yaml_path, resolve_func=False)
            children = []
            for item in cfg.get("task") or []:
                if not isinstance(item, str):
                    raise HarnessError(f"group {n} ({entry.yaml_path}): lists an inline task config; the harness "
                                       "evaluates groups whose subtasks are registered task names")
                children.append(item)
            aggregate = [{"metric": a["metric"], "filter_list": _as_list(a.get("filter_list", ["none"])),
                          "weight_by_size": bool(a.get("weight_by_size", True))}
                         for a in cfg.get("aggregate_metric_list") or []]
        else:
            raise HarnessError(f"task {n}: lm-eval registers it as {kind.lower()}; not evaluable")
        if not children:
            raise HarnessError(f"group {n}: has no subtasks")
        groups[n] = {"children": children, "aggregate": aggregate}
        for c in children:
            walk(c, (*path, n))

    walk(name, ())
    return {"kind": "task" if not groups else "group", "leaves": leaves, "groups": groups}


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# Aggregations whose per-document values are numbers whose mean is the aggregate ("mean"; brier_score:
# the mean of each document's squared error), or (value, weight) pairs whose weighted mean is (bits per
# byte, instruction-level accuracy). The corpus-level ones (F1, BLEU, perplexity, ...): harness/corpus.py.
MEAN_AGGREGATIONS = ("mean", "nanmean", "brier_score")  # nanmean: a NaN document is left out
WEIGHTED_AGGREGATIONS = ("bits_per_byte", "agg_inst_level_acc")
LN2 = math.log(2)


def aggregation_name(fn) -> str:
    """The name lm-eval registered an aggregation function under (`f1` for its `f1_score`, `chrf++` for
    `chrfpp`); a task's own function (`!function`) by its Python name."""
    from lm_eval.api.registry import AGGREGATION_REGISTRY

    def ident(f):  # lm-eval's registry may hold another object of the same function: compare by definition
        return getattr(f, "__module__", None), getattr(f, "__qualname__", None)

    for name, registered in AGGREGATION_REGISTRY.items():
        if registered is fn or ident(registered) == ident(fn):
            return name
    return getattr(fn, "__name__", str(fn))


def task_info(name: str, *, mirror: Path | None) -> dict:
    """What a (leaf) task logs: output type, metrics with their direction and aggregation, filters,
    few-shot default and generation settings; from the built Task, so the checks see what lm-eval runs."""
    task = eval_task(name, mirror=mirror)
    aggs = {metric: aggregation_name(fn) for metric, fn in task.aggregation().items()}
    return {"output_type": task.OUTPUT_TYPE, "higher_is_better": dict(task.higher_is_better()),
            "aggregation": aggs, "filters": [f.name for f in getattr(task, "_filters", [])] or ["none"],
            "num_fewshot": task.config.num_fewshot,
            "generation_kwargs": dict(task.config.generation_kwargs or {}) if task.OUTPUT_TYPE == "generate_until" else None}


def split_metric(key: str) -> tuple[str, str]:
    """`exact_match,strict-match` -> (exact_match, strict-match); `acc` -> (acc, none)."""
    metric, _, filt = key.partition(",")
    return metric, filt or "none"


def record_key(metric: str, filt: str) -> str:
    """How a per-document record names a metric: lm-eval's `metric,filter`, with `,none` dropped."""
    return metric if filt == "none" else f"{metric},{filt}"


def check_metric(name: str, key: str, info: dict, *, where: str) -> None:
    """The counted metric must be one this task logs per document, as a number the paired statistics can use."""
    metric, filt = split_metric(key)
    if metric == "bits_per_byte" and info["output_type"] == "loglikelihood_rolling":
        pass
    elif metric not in info["higher_is_better"]:
        raise HarnessError(f"{where}: task {name} logs no metric '{metric}'; it logs "
                           f"{', '.join(sorted(info['higher_is_better']))}")
    if filt not in info["filters"]:
        raise HarnessError(f"{where}: task {name} has no filter '{filt}' (metric '{key}'); its filters: "
                           f"{', '.join(info['filters'])} (write metric,filter, e.g. {metric},{info['filters'][0]})")
    agg = info["aggregation"].get(metric)
    if agg is not None and agg not in MEAN_AGGREGATIONS + WEIGHTED_AGGREGATIONS + corpus.AGGREGATIONS:
        raise HarnessError(f"{where}: task {name}'s metric '{metric}' is aggregated by '{agg}', a function the harness "
                           f"cannot pair per document (it pairs {', '.join(MEAN_AGGREGATIONS + corpus.AGGREGATIONS)} "
                           "and weighted means); count another metric")


def formatter(name: str, *, mirror: Path | None):
    """doc -> (context, continuation) exactly as lm-eval scores (multiple choice) or targets
    (generate_until) the correct answer of `name`.

    Training examples go through the same doc_to_text / doc_to_choice / doc_to_target (and
    process_docs) as evaluation, so the fine-tuned arms learn the very prompt they are tested on.
    A free-text task (generate_until) trains on prompt + target_delimiter + doc_to_target."""
    task = eval_task(name, mirror=mirror)  # the same Task object evaluation uses
    if task.OUTPUT_TYPE not in ("multiple_choice", "generate_until"):
        raise HarnessError(f"train.format_task {name}: must be a multiple_choice or generate_until task, "
                           f"is {task.OUTPUT_TYPE}")
    delimiter = task.config.target_delimiter

    def fmt(doc: dict) -> tuple[str, str]:
        with lm_eval_patches.cached_templates():
            text = task.doc_to_text(doc)
            target = task.doc_to_target(doc)
            choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
        if choices is None:  # free text: the target is the answer
            if isinstance(target, list):
                target = target[0] if target else None
            if target is None or (isinstance(target, str) and not target.strip()):
                raise HarnessError(f"task {name}: doc_to_target gives no answer text ({target!r}); a free-text "
                                   "format task needs one per training row")
            return text, delimiter + str(target)
        if isinstance(target, str) and target in choices:  # lm-eval accepts the label word itself
            target = choices.index(target)
        if not isinstance(target, int) or not 0 <= target < len(choices):
            raise HarnessError(f"task {name}: label {target!r} is outside the choices {choices}")
        return text, delimiter + choices[target]

    process = task.config.process_docs if callable(task.config.process_docs) else None
    return fmt, process


def make_lm(model, tokenizer, *, batch_size: int, backend: str = "auto"):
    """The lm-eval model object: harness.fastlm.HarnessLM, or lm-eval's stock HFLM ("hf"); inside a
    distributed launch, set up for lm-eval's own data parallelism (`_data_parallel`)."""
    return _data_parallel(_make_lm(model, tokenizer, batch_size=batch_size, backend=backend))


def _data_parallel(lm):
    """Under a launch of several processes (harness/distributed.py), each holding the model: lm-eval's
    data-parallel path, as `accelerate launch -m lm_eval --model hf` sets it up. HFLM skips that setup
    for a model passed in as an object; these are the attributes its own path sets (rank, world size,
    the accelerator it gathers through). lm-eval then gives each rank every world-size-th document and
    gathers the per-document results on rank 0."""
    world = context.world()[1]
    if world > 1:
        from accelerate import Accelerator

        lm.accelerator = Accelerator(cpu=lm.device.type == "cpu")  # gloo on CPU (the tests), NCCL on GPUs
        lm._rank, lm._world_size = lm.accelerator.process_index, world
    return lm


def _make_lm(model, tokenizer, *, batch_size: int, backend: str = "auto"):
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
                         mc_batch_size=max(batch_size, GPU_MC_BATCH), mc_prefix_ratio=GPU_PREFIX_RATIO,
                         gen_memory_bytes=GPU_GEN_MEMORY)
    return HarnessLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, mc_batch_size=batch_size)


@dataclass(frozen=True)
class TaskRun:
    """One leaf task as a run evaluates it: few-shot count, chat template, generation cap, documents."""

    task: str
    num_fewshot: int = 0
    chat_template: bool = False
    max_gen_toks: int | None = None  # generate_until only: caps the task's own max_gen_toks
    limit: int | None = None  # a seeded random subset of this many documents; None: all
    system_instruction: str | None = None  # lm-eval's system_instruction
    fewshot_as_multiturn: bool | None = None  # lm-eval's; None: its default

    def prompt_settings(self) -> tuple:
        """What one simple_evaluate call shares: chat template, system prompt, few-shot turns."""
        return self.chat_template, self.system_instruction, self.fewshot_as_multiturn


def evaluate(model, tokenizer, tasks: list[str] | list[TaskRun], *, mirror: Path | None, limit: int | None = None,
             batch_size: int, num_fewshot: int = 0, seed: int = 0, backend: str = "auto",
             raw: bool = False) -> dict:
    """Run lm-eval's simple_evaluate on an in-memory model (plain, PeftModel, or over a 4-bit base):
    one call per prompt setting (chat template, system prompt, few-shot turns), every task of it in it.

    `tasks` are TaskRun entries, or names (then `limit` and `num_fewshot` apply to all).
    Returns {"results": {task: {metric: value, metric_stderr: ...}}, "n": {task: docs},
    "samples": {task: [per-document records, one per document, every filter's metrics in it]},
    "seconds": wall time}; with `raw`, also "raw": {task: {doc_id: [(loglik, is_greedy) per choice]}}.
    In a data-parallel launch (harness/distributed.py) every rank evaluates its share and rank 0
    returns the whole; the other ranks return None."""
    from lm_eval import simple_evaluate

    runs = [t if isinstance(t, TaskRun) else TaskRun(t, num_fewshot=num_fewshot, limit=limit) for t in tasks]
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = make_lm(model, tokenizer, batch_size=batch_size, backend=backend)
    start = time.perf_counter()
    results, samples, n, versions, raw_out, version = {}, {}, {}, {}, {}, None
    settings = sorted({r.prompt_settings() for r in runs}, key=lambda k: (k[0], k[1] or "", str(k[2])))
    for chat, system, multiturn in settings:
        group = [r for r in runs if r.prompt_settings() == (chat, system, multiturn)]
        names = [r.task for r in group]
        selected = subsample(names, {r.task: r.limit for r in group}, mirror=mirror, seed=seed)
        objects = [_configured(r, mirror) for r in group]
        seed_checks(seed)
        with lm_eval_patches.cached_templates():
            out = simple_evaluate(
                model=lm,
                tasks=objects,
                num_fewshot=None,  # each Task carries its own (set by _configured)
                samples=selected,
                log_samples=True,
                apply_chat_template=chat,
                system_instruction=system,
                **({} if multiturn is None else {"fewshot_as_multiturn": multiturn}),
                task_manager=task_manager(),
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            )
        if out is None:  # a rank other than 0 of a data-parallel launch: rank 0 has the results
            continue
        for r, task in zip(group, objects, strict=True):
            metrics = out["results"][r.task]
            results[r.task] = {k.replace(",none", ""): _num(v) for k, v in metrics.items() if "," in k}
            samples[r.task] = records(out["samples"].get(r.task, []), task)
            n[r.task] = out["n-samples"][r.task]["effective"]
            versions[r.task] = out["versions"].get(r.task)
        version = out.get("lm_eval_version")
        if raw:
            raw_out.update(raw_responses(out))
    seconds = time.perf_counter() - start
    if not results and runs:
        return None
    order = [r.task for r in runs]
    extra = {"raw": raw_out} if raw else {}
    if lm.world_size > 1:  # lm-eval sharded the documents over these processes
        extra["processes"] = lm.world_size
    return {**extra,
        "results": {t: results[t] for t in order},
        "n": {t: n[t] for t in order},
        "samples": {t: samples[t] for t in order},
        "versions": {t: versions[t] for t in order},
        "lm_eval_version": version,
        "seconds": seconds,
    }


def seed_checks(seed: int) -> None:
    """Seed the randomness inside lm-eval's metric code. IFEval's language checks call langdetect,
    which samples n-grams at random per call: the same response, checked twice, was detected as
    'no', 'sl', 'it' or 'es'. On the H200, identical texts for all 541 IFEval prompts then scored
    prompt-level strict 17.56 in one run and 17.19 in another. Seeded, a response gets one verdict,
    so a paired Δ compares texts rather than draws. (Only when the task's code has imported it.)"""
    import sys

    detector = sys.modules.get("langdetect")
    if detector is not None:
        detector.DetectorFactory.seed = seed


def _configured(run: TaskRun, mirror: Path | None):
    """The cached Task, set for this run: few-shot count and generation cap are set on every call
    (the Task object is shared by every evaluation of the process; its own settings are kept aside)."""
    task = eval_task(run.task, mirror=mirror)
    task.set_config(key="num_fewshot", value=run.num_fewshot)
    if task.OUTPUT_TYPE == "generate_until":
        gen = dict(task._harness_defaults["generation_kwargs"] or {})
        if run.max_gen_toks is not None:
            gen["max_gen_toks"] = min(run.max_gen_toks, gen.get("max_gen_toks", run.max_gen_toks))
        task.set_config(key="generation_kwargs", value=gen)
    return task


def records(samples: list[dict], task) -> list[dict]:
    """lm-eval's logged samples (one per document and filter) as one record per document: ids, the
    chosen answer and number of choices (multiple choice), and every metric as `metric[,filter]`.
    A metric whose aggregate is a weighted mean keeps its per-document weight under `<key>:w`:
    perplexity tasks give bits_per_byte (value = -loglik / (bytes ln 2), weight = bytes), IFEval's
    instruction-level accuracies the fraction of instructions followed (weight = instructions).
    A corpus-level metric (F1, BLEU, perplexity, ...) keeps `<key>:s` = [aggregation, the document's
    statistics] (harness/corpus.py), and no value of its own."""
    aggs = {m: aggregation_name(fn) for m, fn in task.aggregation().items()}
    by_doc: dict[int, dict] = {}
    for s in samples:
        rec = by_doc.setdefault(s["doc_id"], {"doc_id": s["doc_id"], "doc_hash": s.get("doc_hash"),
                                               "target": s.get("target")})
        filt = s.get("filter", "none")
        resps = s.get("filtered_resps") or []
        if resps and isinstance(resps[0], (list, tuple)) and len(resps[0]) == 2 and isinstance(resps[0][1], bool):
            lls = [float(r[0]) for r in resps]
            if len(lls) > 1:  # multiple choice (a single loglikelihood request has no choice to make)
                rec["pred"] = max(range(len(lls)), key=lls.__getitem__)
                rec["n_choices"] = len(lls)
        for m in s.get("metrics", []):
            _put(rec, record_key(m, filt), s.get(m), aggs.get(m, ""))
    return [by_doc[d] for d in sorted(by_doc)]


def _put(rec: dict, key: str, v, agg: str) -> None:
    if (isinstance(v, bool) or isinstance(v, (int, float))) and agg not in corpus.AGGREGATIONS:
        if not (isinstance(v, float) and math.isnan(v)):
            rec[key] = float(v)
        return
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, bool) for x in v):  # instruction-level
        rec[key], rec[f"{key}:w"] = sum(v) / len(v), float(len(v))
        return
    if agg == "bits_per_byte" and isinstance(v, (list, tuple)) and len(v) == 2:
        loglik, weight = float(v[0]), float(v[1])
        if weight > 0:  # the drift measure, paired per document
            rec[key], rec[f"{key}:w"] = -loglik / (weight * LN2), weight
        return
    if agg == "brier_score" and isinstance(v, (list, tuple)) and len(v) == 2:  # lm-eval: mean over documents
        gold, probs = v
        rec[key] = float(sum((p - (i == gold)) ** 2 for i, p in enumerate(probs)))
        return
    if agg in corpus.AGGREGATIONS:  # F1, BLEU, perplexity, ...: statistics to sum over resampled documents
        rec[f"{key}:s"] = [agg, corpus.doc_stats(agg, v)]


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


def kl_documents(name: str, *, mirror: Path | None, limit: int | None, seed: int) -> list[tuple[int, str]]:
    """(doc_id, text) of a task's evaluation documents for the KL drift measure (harness/drift.py): the
    text a perplexity task scores (doc_to_target: the whole page), else the prompt (doc_to_text), on the
    same seeded subset of documents as the evaluation."""
    task = eval_task(name, mirror=mirror)
    docs = task.eval_docs
    ids = subsample([name], limit, mirror=mirror, seed=seed)[name]  # limit None: every document
    out = []
    with lm_eval_patches.cached_templates():
        for i in ids:
            doc = docs[i]
            text = task.doc_to_target(doc) if task.OUTPUT_TYPE == "loglikelihood_rolling" else task.doc_to_text(doc)
            if isinstance(text, list):
                text = text[0] if text else ""
            out.append((i, str(text)))
    return out
