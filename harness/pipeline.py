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
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness import evaluate, models, report, train
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


def log(msg: str) -> None:
    print(f"[harness {datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(spec: CompareSpec) -> dict:
    """Everything that can be checked before a weight is loaded (torchtune: fail before the GPU)."""
    task: TaskConfig = load_task(spec.task, list(spec.overrides))
    suite: SuiteConfig = load_suite(task.suite)
    for m in spec.methods:
        if m not in METHODS:
            raise HarnessError(f"--methods: unknown method '{m}'; valid: {', '.join(METHODS)}")
        if m not in task.methods:
            raise HarnessError(f"--methods: '{m}' has no settings under methods: in the task file of {task.name}")
    if len(set(spec.methods)) != len(spec.methods):
        raise HarnessError(f"--methods: listed twice in {','.join(spec.methods)}")
    profile_name = spec.profile or ("full" if models.device_kind() == "cuda" else "quick")
    if profile_name not in task.profiles:
        raise HarnessError(f"--profile {profile_name}: not defined under profiles: of task {task.name}")
    mirror = mirror_dir(spec.mirror)
    evaluate.check_tasks([t.task for t in suite.tasks] + [t.task for t in task.in_domain] + [task.train.format_task])
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
    return {"task": task, "suite": suite, "profile_name": profile_name, "profile": task.profiles[profile_name],
            "mirror": mirror, "run_id": run_id, "run_dir": run_dir,
            "work_dir": Path(spec.work_dir) / task.name / run_id}


def compare(spec: CompareSpec) -> Path:
    """Run the whole comparison; returns the run directory (report.md inside)."""
    p = plan(spec)
    task, suite, profile, mirror, run_dir = p["task"], p["suite"], p["profile"], p["mirror"], p["run_dir"]
    log(f"run {p['run_id']}: task {task.name}, suite {suite.name}, methods {','.join(spec.methods)}, "
        f"profile {p['profile_name']} (limit {profile.limit}, train examples {profile.train_examples})")

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    resolved = models.resolve_model(spec.model)
    timings["resolve_model"] = time.perf_counter() - t0
    log(f"model {resolved.name}: {resolved.detail}")

    suite_tasks = [t.task for t in suite.tasks]
    domain_tasks = [t.task for t in task.in_domain]
    eval_tasks = suite_tasks + [t for t in domain_tasks if t not in suite_tasks]
    config = {
        "run_id": p["run_id"], "task": to_dict(task), "suite": to_dict(suite), "methods": list(spec.methods),
        "profile": {"name": p["profile_name"], **to_dict(profile)}, "model": resolved.to_dict(),
        "mirror": str(mirror) if mirror else None, "overrides": list(spec.overrides),
        "device": models.device_kind(), "environment": environment(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(run_dir / "config.json", config)
    eval_kw = dict(mirror=mirror, limit=profile.limit, batch_size=profile.eval_batch_size,
                   num_fewshot=suite.num_fewshot, seed=task.training.seed)
    common = {"model": resolved.path, "tasks": eval_tasks, "eval": {k: v for k, v in eval_kw.items() if k != "mirror"}}

    # Base: the untouched model, evaluated once.
    inputs = _hash(common)
    if _done(run_dir, "base", inputs):
        log("base: evaluation recorded for these inputs, reused")
    else:
        log(f"base: evaluating {len(eval_tasks)} tasks")
        tokenizer = models.load_tokenizer(resolved.path)
        model = models.load_base(resolved.path)
        ev = evaluate.evaluate(model, tokenizer, eval_tasks, **eval_kw)
        _record(run_dir, "base", inputs, ev, train_stats=None)
        log(f"base: evaluated in {ev['seconds']:.0f}s")
        del model
        gc.collect()

    # Arms: same examples for all; each trained, saved to the work dir, then evaluated.
    examples = None
    for method in spec.methods:
        inputs = _hash({**common, "method": method, "task": to_dict(task), "profile": to_dict(profile)})
        if _done(run_dir, method, inputs):
            log(f"{method}: training and evaluation recorded for these inputs, reused")
            continue
        if examples is None:
            tokenizer = models.load_tokenizer(resolved.path)
            examples, data_record = train.training_examples(task, profile, tokenizer, mirror=mirror)
            config["train_data"] = data_record
            write_json(run_dir / "config.json", config)
            log(f"training data: {data_record['examples']} examples, {data_record['tokens']} tokens")
        log(f"{method}: training")
        result = train.run(method, task=task, profile=profile, model_path=resolved.path, examples=examples,
                           out_dir=p["work_dir"] / method)
        s = result.stats
        log(f"{method}: {s['steps']} steps in {s['seconds']:.0f}s, loss {s['train_loss']:.4f}, "
            f"{s['trainable_params']:,} trainable ({s['trainable_pct']:.2f}%)")
        log(f"{method}: evaluating")
        ev = evaluate.evaluate(result.model, models.load_tokenizer(resolved.path), eval_tasks, **eval_kw)
        _record(run_dir, method, inputs, ev, train_stats=s)
        log(f"{method}: evaluated in {ev['seconds']:.0f}s")
        del result
        gc.collect()
        _free_gpu()

    config["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    config["timings"] = {**timings, "total": time.perf_counter() - t0}
    write_json(run_dir / "config.json", config)
    out = report.run(run_dir)
    log(f"report: {out}")
    return run_dir


def _done(run_dir: Path, arm: str, inputs: str) -> bool:
    path = run_dir / "arms" / f"{arm}.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("inputs") == inputs
    except json.JSONDecodeError:
        return False


def _record(run_dir: Path, arm: str, inputs: str, ev: dict, *, train_stats: dict | None) -> None:
    """Per-document records first, the arm's JSON last: the JSON's presence means the arm is done."""
    write_samples(run_dir / "samples" / f"{arm}.csv", ev["samples"])
    record = {"arm": arm, "inputs": inputs, "results": ev["results"], "n": ev["n"], "versions": ev["versions"],
              "eval_seconds": ev["seconds"], "train": train_stats}
    write_json(run_dir / "arms" / f"{arm}.json", record)


def _free_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
