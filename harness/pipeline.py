"""The compare pipeline, top to bottom: check, resolve, evaluate the base, train and evaluate each
arm, report.

    harness compare --task finance --methods full,qlora --profile quick

Stages exchange data only through files of the run directory (results/<task>/<run-id>/): the
resolved config, one JSON per evaluated arm with its per-document records beside it, then the
report. Weights go to the git-ignored work directory (work/<task>/<run-id>/<arm>/). An arm whose
record exists with the same inputs is not redone, so re-running a run id picks up where it stopped.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from harness import baselines, evaluate, models, provenance, report, resources, train
from harness.config import METHODS, PROJECT_ROOT, HarnessError, SuiteConfig, TaskConfig, load_suite, load_task, to_dict
from harness.data import mirror_dir
from harness.io import environment, write_json, write_samples


@dataclass(frozen=True)
class CompareSpec:
    task: str = "finance"
    model: str = models.DEFAULT_MODEL
    methods: tuple[str, ...] = ("full", "qlora")
    profile: str | None = None  # None: quick on CPU, full on GPU
    mirror: str | None = None
    run_id: str | None = None
    results_dir: Path = PROJECT_ROOT / "results"
    work_dir: Path = PROJECT_ROOT / "work"
    overrides: tuple[str, ...] = ()
    baselines_dir: Path = field(default_factory=baselines.default_dir)
    refresh_baseline: bool = False  # evaluate the references even when the baseline cache has them


@dataclass(frozen=True)
class Arm:
    """One fine-tuned variant: a method plus task-config overrides (a sweep's grid point)."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()


def log(msg: str) -> None:
    print(f"[harness {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _profile_key(profile) -> dict:
    """The profile as it enters an arm's input hash (without the evaluation backend, see `common`)."""
    return {k: v for k, v in to_dict(profile).items() if k != "eval_backend"}


def plan(spec: CompareSpec, arms: list[Arm]) -> dict:
    """Everything that can be checked before a weight is loaded (torchtune: fail before the GPU)."""
    task: TaskConfig = load_task(spec.task, list(spec.overrides))
    suite: SuiteConfig = load_suite(task.suite)
    arm_tasks = {}
    for arm in arms:
        if arm.method not in METHODS:
            raise HarnessError(f"--methods: unknown method '{arm.method}'; valid: {', '.join(METHODS)}")
        if arm.method not in task.methods:
            raise HarnessError(f"--methods: '{arm.method}' has no settings under methods: in the task file of {task.name}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=,-]{0,150}", arm.name) or arm.name == "base":
            raise HarnessError(f"arm name {arm.name!r}: use letters, digits and . _ = , - only")
        arm_tasks[arm.name] = load_task(spec.task, [*spec.overrides, *arm.overrides])  # each must be valid
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise HarnessError(f"--methods: listed twice in {','.join(names)}")
    profile_name = spec.profile or ("full" if models.device_kind() == "cuda" else "quick")
    if profile_name not in task.profiles:
        raise HarnessError(f"--profile {profile_name}: not defined under profiles: of task {task.name}")
    mirror = mirror_dir(spec.mirror)
    ppl = [suite.perplexity.task] if suite.perplexity else []
    evaluate.check_tasks([t.task for t in suite.tasks] + [t.task for t in task.in_domain] + [task.train.format_task] + ppl)
    run_id = spec.run_id or f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{profile_name}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", run_id):
        raise HarnessError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' only")
    run_dir = Path(spec.results_dir) / task.name / run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise HarnessError(f"results directory {run_dir}: not writable ({e.strerror})") from None
    return {"task": task, "arm_tasks": arm_tasks, "suite": suite, "profile_name": profile_name,
            "profile": task.profiles[profile_name],
            "mirror": mirror, "run_id": run_id, "run_dir": run_dir,
            "work_dir": Path(spec.work_dir) / task.name / run_id}


def compare(spec: CompareSpec, arms: list[Arm] | None = None) -> Path:
    """Run the whole comparison; returns the run directory (report.md inside).

    `arms` defaults to one arm per method; `harness sweep` passes one per grid point."""
    arms = arms if arms is not None else [Arm(m, m) for m in spec.methods]
    p = plan(spec, arms)
    task, suite, profile, mirror, run_dir = p["task"], p["suite"], p["profile"], p["mirror"], p["run_dir"]
    log(f"run {p['run_id']}: task {task.name}, suite {suite.name}, arms {','.join(a.name for a in arms)}, "
        f"profile {p['profile_name']} (limit {profile.limit}, train examples {profile.train_examples})")

    t0 = time.perf_counter()
    resolved = models.resolve_model(spec.model)
    log(f"model {resolved.name}: {resolved.detail}")

    suite_tasks = [t.task for t in suite.tasks]
    domain_tasks = [t.task for t in task.in_domain]
    eval_tasks = suite_tasks + [t for t in domain_tasks if t not in suite_tasks]
    config = {
        "run_id": p["run_id"], "task": to_dict(task), "suite": to_dict(suite), "methods": [a.name for a in arms],
        "arms": {a.name: {"method": a.method, "overrides": list(a.overrides)} for a in arms},
        "profile": {"name": p["profile_name"], **to_dict(profile)},
        "model": {**resolved.to_dict(), "content_sha256": baselines.model_sha256(resolved.path)},
        "datasets": provenance.datasets(to_dict(task.train), eval_tasks + ([suite.perplexity.task] if suite.perplexity else []),
                                        mirror=mirror),
        "mirror": str(mirror) if mirror else None, "overrides": list(spec.overrides),
        "device": models.device_kind(), "environment": environment(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _keep_train_data(run_dir / "config.json", config)
    write_json(run_dir / "config.json", config)
    eval_kw = dict(mirror=mirror, limit=profile.limit, batch_size=profile.eval_batch_size,
                   num_fewshot=suite.num_fewshot, seed=task.training.seed, backend=profile.eval_backend)
    ppl_kw = None
    if suite.perplexity is not None:  # its own batch size: rolling windows of full context are memory-hungry
        ppl_kw = dict(mirror=mirror, limit=profile.perplexity_limit, batch_size=suite.perplexity.batch_size,
                      num_fewshot=0, seed=task.training.seed, backend=profile.eval_backend)
    # The backend is left out of the input hashes: both give the same per-document results.
    common = {"model": resolved.path, "tasks": eval_tasks,
              "eval": {k: v for k, v in eval_kw.items() if k not in ("mirror", "backend")},
              "perplexity": [suite.perplexity and suite.perplexity.task, ppl_kw and ppl_kw["limit"]]}

    def run_eval(name: str, model, tasks: list[str], with_ppl: bool) -> tuple[dict | None, dict | None, dict]:
        """lm-eval on `tasks` (one evaluator call) and, if asked, the perplexity task; and what the
        whole evaluation cost (resources.measure: time, peak RSS / GPU memory, model footprint)."""
        tokenizer = models.load_tokenizer(resolved.path)
        ev = ppl = None
        with resources.measure() as measured:
            if tasks:
                log(f"{name}: evaluating {len(tasks)} tasks")
                ev = evaluate.evaluate(model, tokenizer, tasks, **eval_kw)
                log(f"{name}: evaluated in {ev['seconds']:.0f}s")
            if with_ppl:
                pv = evaluate.evaluate(model, tokenizer, [suite.perplexity.task], **ppl_kw)
                ppl = {**pv["results"][suite.perplexity.task], "n": pv["n"][suite.perplexity.task],
                       "seconds": pv["seconds"], "task": suite.perplexity.task,
                       "samples": pv["samples"][suite.perplexity.task], "version": pv["versions"][suite.perplexity.task]}
                log(f"{name}: {suite.perplexity.task} word perplexity {ppl.get('word_perplexity', float('nan')):.2f} "
                    f"({ppl['n']} documents, {pv['seconds']:.0f}s)")
        return ev, ppl, {**measured.result, "model_footprint_bytes": resources.footprint_bytes(model)}

    def evaluate_arm(name: str, model, inputs: str, train_stats: dict | None) -> None:
        ev, ppl, used = run_eval(name, model, eval_tasks, ppl_kw is not None)
        _record(run_dir, name, inputs, ev, train_stats=train_stats, perplexity=_drop_samples(ppl), eval_resources=used)

    def evaluate_reference(name: str, inputs: str, quant: dict | None) -> None:
        """An untrained reference model (the base, the 4-bit base): evaluated once per inputs, and
        only on the tasks the baseline cache does not already hold for this exact model and setup."""
        if _done(run_dir, name, inputs):
            log(f"{name}: evaluation recorded for these inputs, reused")
            return
        keys = _baseline_keys(quant)
        hits = {} if spec.refresh_baseline else {
            t: e for t, k in keys.items() if (e := baselines.lookup(spec.baselines_dir, k)) is not None}
        missing = [t for t in eval_tasks if t not in hits]
        want_ppl = ppl_kw is not None and suite.perplexity.task not in hits
        ev = ppl = used = None  # used stays None when every task came from the baseline cache
        if missing or want_ppl:
            model = models.load_base(resolved.path, quant=quant)
            ev, ppl, used = run_eval(name, model, missing, want_ppl)
            del model
            gc.collect()
            _free_gpu()
            _store_baselines(name, keys, ev, ppl)
        ev, ppl, reused = _merge_baselines(ev, ppl, hits)
        if reused["tasks"]:
            log(f"{name}: baseline reused for {len(reused['tasks'])} of {len(keys)} tasks from {spec.baselines_dir} "
                f"(saved about {reused['saved_seconds']:.0f}s of evaluation)")
        _record(run_dir, name, inputs, ev, train_stats=None, perplexity=ppl, baseline=reused, eval_resources=used)

    def _baseline_keys(quant: dict | None) -> dict[str, dict]:
        model_sha = baselines.model_sha256(resolved.path)
        common_key = dict(model_sha=model_sha, seed=task.training.seed, quant=quant, device=models.device_kind(),
                          dtype=str(models.train_dtype()).removeprefix("torch."))
        keys = {t: baselines.key(task=t, task_sha=baselines.task_sha256(t, mirror), limit=profile.limit,
                                 num_fewshot=suite.num_fewshot, **common_key) for t in eval_tasks}
        if ppl_kw is not None:
            t = suite.perplexity.task
            keys[t] = baselines.key(task=t, task_sha=baselines.task_sha256(t, mirror), limit=ppl_kw["limit"],
                                    num_fewshot=0, **common_key)
        return keys

    def _store_baselines(name: str, keys: dict, ev: dict | None, ppl: dict | None) -> None:
        source = {"run_id": p["run_id"], "reference": name, "model": resolved.name}
        total = sum(ev["n"].values()) if ev else 0
        for t in (ev["results"] if ev else {}):
            baselines.store(spec.baselines_dir, keys[t], results=ev["results"][t], n=ev["n"][t],
                            version=ev["versions"][t], samples=ev["samples"][t],
                            seconds=ev["seconds"] * ev["n"][t] / max(total, 1), source=source)
        if ppl is not None:
            results = {k: v for k, v in ppl.items() if k not in ("n", "seconds", "task", "samples", "version")}
            baselines.store(spec.baselines_dir, keys[ppl["task"]], results=results, n=ppl["n"],
                            version=ppl["version"], samples=ppl["samples"], seconds=ppl["seconds"], source=source)

    def _merge_baselines(ev: dict | None, ppl: dict | None, hits: dict) -> tuple[dict, dict | None, dict]:
        """Fresh results plus cached ones, in the shape of one evaluation of every task."""
        ev = ev or {"results": {}, "n": {}, "samples": {}, "versions": {}, "seconds": 0.0}
        reused = {"tasks": sorted(hits), "saved_seconds": round(sum(e["seconds"] for e in hits.values()), 1),
                  "files": sorted(Path(e["file"]).name for e in hits.values())}
        for t in eval_tasks:
            if t in hits:
                e = hits[t]
                ev["results"][t], ev["n"][t], ev["versions"][t] = e["results"], e["n"], e["version"]
                ev["samples"][t] = baselines.samples_of(e)
        ev = {**ev, **{k: {t: ev[k][t] for t in eval_tasks} for k in ("results", "n", "samples", "versions")}}
        if ppl_kw is not None and ppl is None:
            e = hits[suite.perplexity.task]
            ppl = {**e["results"], "n": e["n"], "seconds": 0.0, "task": suite.perplexity.task}
        return ev, _drop_samples(ppl), reused

    # Base: the untouched model.
    evaluate_reference("base", _hash(common), None)
    # The 4-bit base without adapter: QLoRA's own starting point, to separate quantization from training.
    if profile.quant_reference and any(a.method == "qlora" for a in arms):
        evaluate_reference(report.NF4_REFERENCE, _hash({**common, "quant": task.quant}), task.quant)

    # Arms: same examples for all (unless an arm's overrides change the data); each trained, saved to
    # the work dir, then evaluated.
    examples_cache: dict[str, tuple[list, dict]] = {}
    for arm in arms:
        arm_task = p["arm_tasks"][arm.name]
        inputs = _hash({**common, "method": arm.method, "task": to_dict(arm_task), "profile": _profile_key(profile)})
        if _done(run_dir, arm.name, inputs):
            log(f"{arm.name}: training and evaluation recorded for these inputs, reused")
            continue
        data_key = _hash([to_dict(arm_task.train), arm_task.training.seed, arm_task.training.max_length,
                          profile.train_examples])
        if data_key not in examples_cache:
            tokenizer = models.load_tokenizer(resolved.path)
            examples_cache[data_key] = train.training_examples(arm_task, profile, tokenizer, mirror=mirror)
            record = examples_cache[data_key][1]
            config["train_data"] = record
            write_json(run_dir / "config.json", config)
            log(f"training data: {record['examples']} examples, {record['tokens']} tokens")
        examples = examples_cache[data_key][0]
        log(f"{arm.name}: training ({arm.method}{', ' + ' '.join(arm.overrides) if arm.overrides else ''})")
        result = train.run(arm.method, task=arm_task, profile=profile, model_path=resolved.path, examples=examples,
                           out_dir=p["work_dir"] / arm.name)
        s = result.stats
        log(f"{arm.name}: {s['steps']} steps in {s['seconds']:.0f}s, loss {s['train_loss']:.4f}, "
            f"{s['trainable_params']:,} trainable ({s['trainable_pct']:.2f}%)")
        evaluate_arm(arm.name, result.model, inputs, s)
        del result
        gc.collect()
        _free_gpu()

    config["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    config["wall_seconds"] = time.perf_counter() - t0
    write_json(run_dir / "config.json", config)
    out = report.run(run_dir)
    log(f"report: {out}")
    return run_dir


def _keep_train_data(path: Path, config: dict) -> None:
    """A resumed run whose arms are all reused tokenizes nothing: keep the record of the data they trained on."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    same = all(previous.get(k) == config[k] for k in ("task", "profile", "model"))
    if same and previous.get("train_data"):
        config["train_data"] = previous["train_data"]


def _done(run_dir: Path, arm: str, inputs: str) -> bool:
    path = run_dir / "arms" / f"{arm}.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("inputs") == inputs
    except json.JSONDecodeError:
        return False


def _drop_samples(ppl: dict | None) -> dict | None:
    return None if ppl is None else {k: v for k, v in ppl.items() if k not in ("samples", "version")}


def _record(run_dir: Path, arm: str, inputs: str, ev: dict, *, train_stats: dict | None,
            perplexity: dict | None = None, baseline: dict | None = None, eval_resources: dict | None = None) -> None:
    """Per-document records first, the arm's JSON last: the JSON's presence means the arm is done."""
    write_samples(run_dir / "samples" / f"{arm}.csv", ev["samples"])
    record = {"arm": arm, "inputs": inputs, "results": ev["results"], "n": ev["n"], "versions": ev["versions"],
              "eval_seconds": ev["seconds"], "train": train_stats, "perplexity": perplexity,
              "eval_resources": eval_resources}
    if baseline is not None:
        record["baseline"] = baseline
    write_json(run_dir / "arms" / f"{arm}.json", record)


def _free_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
