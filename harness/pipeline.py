"""The compare pipeline, top to bottom: check, resolve, evaluate the base, train and evaluate each
arm, report.

    harness compare --task finance --methods full,qlora --profile quick

Stages exchange data only through files of the run directory (results/<task>/<run-id>/): the
resolved config, one JSON per evaluated arm with its per-document records beside it, then the
report. Weights go to the git-ignored work directory (work/<task>/<run-id>/<arm>/). An arm whose
record exists with the same inputs is not redone, so re-running a run id picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from harness import (baselines, drift, evalplan, evaluate, models, parallel, points, provenance, replay, report,
                     resources, train)
from harness.config import METHODS, PROJECT_ROOT, HarnessError, TaskConfig, load_task, to_dict
from harness.data import mirror_dir
from harness.io import environment, read_json, remove_partial, stop_point, write_json, write_samples


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
    suites: tuple[str, ...] = ()  # --suite NAME|PATH (repeatable); empty: the task file's suite(s)
    baselines_dir: Path = field(default_factory=baselines.default_dir)
    refresh_baseline: bool = False  # evaluate the references even when the baseline cache has them
    device: str = "auto"  # auto | cpu | cuda
    trust_remote_code: bool = False
    allow_pickle: bool = False
    include_path: tuple[str, ...] = ()  # extra lm-eval task directories besides tasks/
    jobs: str = "auto"  # jobs at once (harness/parallel.py): a number, or auto (on a GPU, as many as fit)
    only: tuple[str, ...] | None = None  # a parallel child: run only these jobs; no config.json, no report


RESUMABLE = ("task", "model", "methods", "profile", "mirror", "overrides", "device", "trust_remote_code",
             "allow_pickle", "include_path", "work_dir")


@dataclass(frozen=True)
class Arm:
    """One fine-tuned variant: a method plus task-config overrides (a sweep's grid point)."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()


def log(msg: str) -> None:
    job = os.environ.get("HARNESS_JOB")  # set in each job of a parallel run (harness/parallel.py)
    print(f"[harness {datetime.now().strftime('%H:%M:%S')}{' ' + job if job else ''}] {msg}", file=sys.stderr, flush=True)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _profile_key(profile) -> dict:
    """The profile as it enters an arm's input hash (without the evaluation backend, see `common`)."""
    return {k: v for k, v in to_dict(profile).items() if k != "eval_backend"}


def plan(spec: CompareSpec, arms: list[Arm]) -> dict:
    """Everything that can be checked before a weight is loaded (torchtune: fail before the GPU)."""
    models.configure(device=spec.device, trust_remote_code=spec.trust_remote_code, allow_pickle=spec.allow_pickle)
    evaluate.set_include_paths(spec.include_path)
    parallel.parse_jobs(spec.jobs)
    task: TaskConfig = load_task(spec.task, list(spec.overrides))
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
    for arm in arms:  # a point's name must not be taken by an arm (its records would overwrite the arm's)
        for pt in points.of(arm.name, arm.method, arm_tasks[arm.name]):
            if pt.name in names:
                raise HarnessError(f"arm name {pt.name!r}: taken by a point of arm {arm.name} ({pt.kind} {pt.value:g})")
    profile_name = spec.profile or ("full" if models.device_kind() == "cuda" else "quick")
    if profile_name not in task.profiles:
        raise HarnessError(f"--profile {profile_name}: not defined under profiles: of task {task.name}")
    mirror = mirror_dir(spec.mirror)
    kl_tasks = [task.kl.domain_task] if task.kl.enabled and task.kl.domain_task else []
    evaluate.check_tasks([task.train.format_task] + kl_tasks)
    run_id = spec.run_id or f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{profile_name}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", run_id):
        raise HarnessError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' only")
    run_dir = Path(spec.results_dir) / task.name / run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # jobs of one run probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise HarnessError(f"results directory {run_dir}: not writable ({e.strerror})") from None
    rows = {}
    for key, arm_task in {_hash(to_dict(t.train)): t for t in arm_tasks.values()}.items():
        if spec.only is None:  # a parallel job's parent checked it
            rows[key] = _check_training_data(arm_task, mirror)
    # Suites merged, groups expanded, every counted metric and benchmark dataset checked (harness/evalplan.py).
    plan_ = evalplan.build(task, list(spec.suites) or task.suites, mirror=mirror)
    suite = plan_.suite
    ppl = [suite.perplexity.task] if suite.perplexity else []
    if mirror is not None:  # every benchmark's data must be in the mirror too (suite leaves: checked in evalplan)
        for name in ppl + kl_tasks:
            evaluate.task_config(name, mirror=mirror)
    evaluated = [*plan_.leaves, *ppl, *kl_tasks, task.train.format_task]
    for arm_task in {_hash(to_dict(t.mitigation.replay)): t for t in arm_tasks.values() if t.mitigation.replay}.values():
        if spec.only is None:  # replay data that is evaluated too would be learned, then scored
            n_rows = rows[_hash(to_dict(arm_task.train))]
            n_domain = min(n_rows, task.profiles[profile_name].train_examples or n_rows)
            replay.check(arm_task.mitigation.replay, [t for t in evaluated if not evaluate.is_answer(t)], mirror=mirror,
                         n_domain=n_domain)
    return {"task": task, "arm_tasks": arm_tasks, "suite": suite, "evalplan": plan_, "profile_name": profile_name,
            "profile": task.profiles[profile_name],
            "mirror": mirror, "run_id": run_id, "run_dir": run_dir,
            "work_dir": Path(spec.work_dir) / task.name / run_id}


def _resumable(spec: CompareSpec, p: dict) -> dict:
    """What `--resume RUN_DIR` needs to run the same comparison again, with paths made absolute."""
    out = {k: to_dict(getattr(spec, k)) for k in RESUMABLE}
    for key in ("task", "model"):
        if Path(out[key]).expanduser().exists():
            out[key] = str(Path(out[key]).expanduser().resolve())
    out["work_dir"] = str(Path(spec.work_dir).resolve())
    return out | {"profile": p["profile_name"], "mirror": str(p["mirror"]) if p["mirror"] else None,
                  "suites": list(spec.suites)}


def _check_training_data(task: TaskConfig, mirror) -> int:
    """Read the training split and format every row now, so a missing field, an empty split or a
    label outside the choices stops the run before any weight loads, naming the dataset; returns
    its row count (after the format task's process_docs)."""
    from harness.data import load_split

    ds = load_split(task.train.dataset, task.train.config, task.train.split, mirror=mirror)
    where = f"dataset {task.train.dataset} ({task.train.config or 'default'}/{task.train.split})"
    try:
        fmt, process_docs = evaluate.formatter(task.train.format_task, mirror=mirror)
    except HarnessError as e:
        raise HarnessError(f"{where}: {e}") from None
    try:
        if process_docs is not None:
            ds = process_docs(ds)
    except Exception as e:  # lm-eval's hooks raise whatever the data provokes
        raise HarnessError(f"{where}: {task.train.format_task}'s process_docs failed ({type(e).__name__}: {e}); "
                           f"columns are {', '.join(ds.column_names)}") from None
    if len(ds) == 0:
        raise HarnessError(f"{where}: no rows left after {task.train.format_task}'s process_docs")
    for i, doc in enumerate(ds):
        try:
            fmt(doc)
        except HarnessError as e:
            raise HarnessError(f"{where} row {i}: {e}") from None
        except Exception as e:
            raise HarnessError(f"{where} row {i}: cannot be formatted by task {task.train.format_task} "
                               f"({type(e).__name__}: {e}); columns are {', '.join(ds.column_names)}") from None
    return len(ds)


# Bytes on disk per parameter, per arm: full fine-tuning saves an fp32 model (4) and keeps one Trainer
# checkpoint (fp32 weights 4 + AdamW moments 8), two while the newer replaces the older; adapters are
# a few percent of that at most.
DISK_PER_PARAM = {"full": 4 + 2 * 12, "lora": 1, "qlora": 1}


def _check_disk(n_params: int, arms: list[Arm], work_dir: Path, snapshots: dict[str, int] | None = None) -> None:
    """Fail before training when the work dir's disk cannot hold the checkpoints (from the model's size)
    and the snapshots of training.eval_at (a saved model or adapter each)."""
    todo = [a for a in arms if not (work_dir / a.name / "train.json").exists()]
    saved = {"full": 4, "lora": 1, "qlora": 1}
    needed = sum((DISK_PER_PARAM[a.method] + (snapshots or {}).get(a.name, 0) * saved[a.method]) * n_params
                 for a in todo)
    if not needed:
        return
    probe = work_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise HarnessError(f"work directory {work_dir}: {_gb(needed)} needed for the checkpoints of "
                           f"{', '.join(a.name for a in todo)} ({n_params:,} parameters), only {_gb(free)} free on "
                           f"{probe}; free space or pass --work-dir on a larger disk")


def _check_saved(arms: list[Arm], work_dir: Path) -> None:
    """A corrupt checkpoint or saved arm from an earlier attempt is named now, not after the base evaluation."""
    for arm in arms:
        arm_dir = work_dir / arm.name
        train.resume_checkpoint(arm_dir / "trainer")
        if (arm_dir / "train.json").exists():
            for w in sorted(arm_dir.glob("*/*.safetensors")):
                if w.parent.name != "trainer":
                    models.safetensors_tensors(w)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB ({n} bytes)"


def compare(spec: CompareSpec, arms: list[Arm] | None = None) -> Path:
    """Run the whole comparison; returns the run directory (report.md inside).

    `arms` defaults to one arm per method; `harness sweep` passes one per grid point."""
    arms = arms if arms is not None else [Arm(m, m) for m in spec.methods]
    p = plan(spec, arms)
    task, suite, profile, mirror, run_dir = p["task"], p["suite"], p["profile"], p["mirror"], p["run_dir"]
    child = spec.only is not None  # one job of a parallel run: the parent writes config.json and the report
    if not child:  # (a child's siblings may be writing their temporary files)
        log(f"run {p['run_id']}: task {task.name}, suite {suite.name}, arms {','.join(a.name for a in arms)}, "
            f"profile {p['profile_name']} (limit {profile.limit}, train examples {profile.train_examples})")
        remove_partial(run_dir)
    t0 = time.perf_counter()
    resolved = models.resolve_model(spec.model)
    # Still before any weight loads: remote code, pickle weights, truncated files, disk for checkpoints.
    mine = [a for a in arms if not child or a.name in spec.only]
    n_params = models.check_model_dir(Path(resolved.path))
    for arm in mine:  # lora:/quant: keys against peft and transformers, target modules against the model
        t = p["arm_tasks"][arm.name]
        models.check_method_settings({arm.method}, resolved.path, lora=t.lora, quant=t.quant,
                                     lr_scheduler=t.training.lr_scheduler, mitigation=t.mitigation,
                                     where="" if arm.name == arm.method else f"arm {arm.name}: ")
    _check_disk(n_params, mine, p["work_dir"], snapshots={
        a.name: len(points.snapshot_steps(p["arm_tasks"][a.name].training.eval_at, 1 << 30)) for a in mine})
    _check_saved(mine, p["work_dir"])
    if not child:
        log(f"model {resolved.name}: {resolved.detail}")

    eplan: evalplan.EvalPlan = p["evalplan"]
    eval_tasks = eplan.leaves  # every lm-eval task evaluated (a group's subtasks), suites first
    has_chat = models.load_tokenizer(resolved.path).chat_template is not None
    runs = eplan.runs(profile, has_chat_template=has_chat)
    kl_domain = task.kl.domain_task or task.train.format_task
    point_list = {a.name: points.of(a.name, a.method, p["arm_tasks"][a.name]) for a in arms}
    config = None if child else {  # a parallel job's parent records the run (hashing its data once)
        "run_id": p["run_id"], "task": to_dict(task), "suite": to_dict(suite), "methods": [a.name for a in arms],
        "evaluation": {**eplan.record(), "runs": [to_dict(r) for r in runs], "tokenizer_chat_template": has_chat,
                       "training_chat_template": False},
        "arms": {a.name: {"method": a.method, "overrides": list(a.overrides)} for a in arms},
        **({"points": {pt.name: pt.record() for pts in point_list.values() for pt in pts}}
           if any(point_list.values()) else {}),
        "profile": {"name": p["profile_name"], **to_dict(profile)},
        "model": {**resolved.to_dict(), "content_sha256": baselines.model_sha256(resolved.path)},
        "datasets": provenance.datasets(to_dict(task.train), eval_tasks + ([suite.perplexity.task] if suite.perplexity else []),
                                        mirror=mirror),
        "mirror": str(mirror) if mirror else None, "overrides": list(spec.overrides),
        "spec": _resumable(spec, p),
        "device": models.device_kind(), "environment": environment(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if not child:
        _keep_train_data(run_dir / "config.json", config)
        write_json(run_dir / "config.json", config)
    eval_kw = dict(mirror=mirror, batch_size=profile.eval_batch_size, seed=task.training.seed,
                   backend=profile.eval_backend)
    ppl_kw = None
    if suite.perplexity is not None:  # its own batch size: rolling windows of full context are memory-hungry
        ppl_kw = dict(mirror=mirror, limit=profile.perplexity_limit, batch_size=suite.perplexity.batch_size,
                      num_fewshot=0, seed=task.training.seed, backend=profile.eval_backend)
    # The backend is left out of the input hashes: both give the same per-document results.
    common = {"model": resolved.path, "tasks": eval_tasks, "runs": [to_dict(r) for r in runs],
              "eval": {k: v for k, v in eval_kw.items() if k not in ("mirror", "backend")},
              "perplexity": [suite.perplexity and suite.perplexity.task, ppl_kw and ppl_kw["limit"]],
              "kl": to_dict(task.kl) | {"documents": profile.kl_documents} if task.kl.enabled else None}
    run_of = {r.task: r for r in runs}

    def run_eval(name: str, model, tasks: list[str], with_ppl: bool) -> tuple[dict | None, dict | None, dict]:
        """lm-eval on `tasks` (one evaluator call) and, if asked, the perplexity task; and what the
        whole evaluation cost (resources.measure: time, peak RSS / GPU memory, model footprint)."""
        tokenizer = models.load_tokenizer(resolved.path)
        ev = ppl = None
        with resources.measure() as measured:
            if tasks:
                log(f"{name}: evaluating {len(tasks)} tasks")
                ev = evaluate.evaluate(model, tokenizer, [run_of[t] for t in tasks], **eval_kw)
                log(f"{name}: evaluated in {ev['seconds']:.0f}s")
                stop_point(f"evaluating:{name}")
            if with_ppl:
                pv = evaluate.evaluate(model, tokenizer, [suite.perplexity.task], **ppl_kw)
                ppl = {**pv["results"][suite.perplexity.task], "n": pv["n"][suite.perplexity.task],
                       "seconds": pv["seconds"], "task": suite.perplexity.task,
                       "samples": pv["samples"][suite.perplexity.task], "version": pv["versions"][suite.perplexity.task]}
                wp = ppl.get("word_perplexity")  # None where lm-eval's was nan (a diverged model)
                log(f"{name}: {suite.perplexity.task} word perplexity {'n/a (nan)' if wp is None else format(wp, '.2f')} "
                    f"({ppl['n']} documents, {pv['seconds']:.0f}s)")
        return ev, ppl, {**measured.result, "model_footprint_bytes": resources.footprint_bytes(model)}

    def kl_of(name: str, model) -> dict | None:
        """KL(base || model) on the WikiText pages and the domain prompts (harness/drift.py)."""
        if not task.kl.enabled:
            return None
        sources = {}
        if suite.perplexity is not None:
            sources["general"] = (suite.perplexity.task, _min(profile.perplexity_limit, profile.kl_documents))
        sources["domain"] = (kl_domain, _min(profile.limit, profile.kl_documents))
        texts = {k: (t, evaluate.kl_documents(t, mirror=mirror, limit=lim, seed=task.training.seed))
                 for k, (t, lim) in sources.items()}
        start = time.perf_counter()
        base_model = models.load_base(resolved.path)
        tokenizer = models.load_tokenizer(resolved.path)
        out = {}
        for k, (t, docs) in texts.items():
            per_doc = drift.kl_per_document(base_model, model, tokenizer, docs, max_tokens=task.kl.max_tokens)
            out[k] = {"task": t, "max_tokens": task.kl.max_tokens, "docs": per_doc}
        del base_model
        gc.collect()
        _free_gpu()
        summary = ", ".join(f"{k} {drift.mean_kl(v['docs']):.4g}" for k, v in out.items())
        log(f"{name}: KL(base || {name}) per token: {summary} ({time.perf_counter() - start:.0f}s)")
        return {**out, "seconds": time.perf_counter() - start}

    def evaluate_arm(name: str, model, inputs: str, train_stats: dict | None, point: dict | None = None) -> None:
        ev, ppl, used = run_eval(name, model, eval_tasks, ppl_kw is not None)
        kl = kl_of(name, model)
        _record(run_dir, name, inputs, ev, train_stats=train_stats, perplexity=ppl, eval_resources=used, kl=kl,
                point=point)

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
        want_kl = quant is not None and task.kl.enabled  # the 4-bit base drifts too; the base itself: 0
        kl = None
        if missing or want_ppl or want_kl:
            model = models.load_base(resolved.path, quant=quant)
            if missing or want_ppl:
                ev, ppl, used = run_eval(name, model, missing, want_ppl)
            kl = kl_of(name, model) if want_kl else None
            del model
            gc.collect()
            _free_gpu()
            _store_baselines(name, keys, ev, ppl)
        ev, ppl, reused = _merge_baselines(ev, ppl, hits)
        if reused["tasks"]:
            log(f"{name}: baseline reused for {len(reused['tasks'])} of {len(keys)} tasks from {spec.baselines_dir} "
                f"(saved about {reused['saved_seconds']:.0f}s of evaluation)")
        _record(run_dir, name, inputs, ev, train_stats=None, perplexity=ppl, baseline=reused, eval_resources=used,
                kl=kl)

    def _baseline_keys(quant: dict | None) -> dict[str, dict]:
        model_sha = baselines.model_sha256(resolved.path)
        common_key = dict(model_sha=model_sha, seed=task.training.seed, quant=quant, device=models.device_kind(),
                          dtype=str(models.train_dtype()).removeprefix("torch."))
        keys = {t: baselines.key(task=t, task_sha=baselines.task_sha256(t, mirror), limit=run_of[t].limit,
                                 num_fewshot=run_of[t].num_fewshot, **common_key, **_run_extra(run_of[t]))
                for t in eval_tasks}
        if ppl_kw is not None:
            t = suite.perplexity.task
            # records 2: per-document bits per byte (paired drift), which entries before 2026-12 lack
            keys[t] = baselines.key(task=t, task_sha=baselines.task_sha256(t, mirror), limit=ppl_kw["limit"],
                                    num_fewshot=0, **common_key, records=2)
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
            ppl = {**e["results"], "n": e["n"], "seconds": 0.0, "task": suite.perplexity.task,
                   "samples": baselines.samples_of(e)}
        return ev, ppl, reused

    def reference_cached(quant: dict | None) -> bool:
        """Every task of this reference is in the baseline cache: nothing to load or evaluate."""
        return not spec.refresh_baseline and all(
            baselines.lookup(spec.baselines_dir, k) is not None for k in _baseline_keys(quant).values())

    def arm_inputs(arm: Arm) -> str:
        return _hash({**common, "method": arm.method, "task": _arm_settings(arm, p["arm_tasks"][arm.name]),
                      "profile": _profile_key(profile)})

    def record_train_data(arm: Arm, mix: bool = True) -> tuple[list, dict]:
        """The arm's tokenized training examples (once per distinct data setting) and their record in config.json."""
        arm_task = p["arm_tasks"][arm.name]
        data_key = _hash([to_dict(arm_task.train), arm_task.training.seed, arm_task.training.max_length,
                          profile.train_examples])
        rep = arm_task.mitigation.replay
        if data_key not in examples_cache:
            tokenizer = models.load_tokenizer(resolved.path)
            examples_cache[data_key] = train.training_examples(arm_task, profile, tokenizer, mirror=mirror)
            record = examples_cache[data_key][1]
            if not child:
                config["train_data"] = record
                write_json(run_dir / "config.json", config)
            log(f"training data: {record['examples']} examples, {record['tokens']} tokens")
        if rep is None or not mix:
            return examples_cache[data_key]
        mixed_key = _hash([data_key, to_dict(rep)])  # the domain examples plus replay (harness/replay.py)
        if mixed_key not in examples_cache:
            domain, record = examples_cache[data_key]
            extra, rec = replay.examples(rep, len(domain), models.load_tokenizer(resolved.path),
                                         seed=arm_task.training.seed, max_length=arm_task.training.max_length,
                                         mirror=mirror, model_path=resolved.path)
            log(f"replay ({rep.source}): {rec['examples']} examples, {rec['tokens']} tokens mixed into "
                f"{len(domain)} domain examples")
            examples_cache[mixed_key] = (domain + extra, {**record, "replay": rec})
        return examples_cache[mixed_key]

    def point_inputs(pt: points.Point, arm: Arm) -> str:
        return _hash({"arm": arm_inputs(arm), "point": pt.kind, "value": pt.value})

    def pending_points(arm: Arm) -> list[points.Point]:
        return [pt for pt in point_list[arm.name] if not _done(run_dir, pt.name, point_inputs(pt, arm))]

    def run_arm(arm: Arm) -> None:
        """Train (or reuse) one arm, evaluate it, then each of its points not yet recorded."""
        arm_task = p["arm_tasks"][arm.name]
        inputs = arm_inputs(arm)
        todo_points = pending_points(arm)
        arm_done = _done(run_dir, arm.name, inputs)
        if arm_done and not todo_points:
            log(f"{arm.name}: training and evaluation recorded for these inputs, reused")
            return
        arm_dir = p["work_dir"] / arm.name
        stage, name = "training", arm.name
        try:
            trained = _trained(arm_dir, inputs)
            if trained is not None:
                log(f"{arm.name}: training recorded for these inputs, evaluating the saved {trained['saved']['path']}")
                model = models.load_arm(arm.method, resolved.path, Path(trained["saved"]["path"]), quant=task.quant)
            else:
                examples, data = record_train_data(arm)
                model, trained = _train_arm(arm, arm_task, profile, resolved.path, examples, arm_dir, inputs,
                                            replayed=data.get("replay"))
            stage = "evaluating"
            if not arm_done:
                evaluate_arm(arm.name, model, inputs, trained)
            interpolation = None
            for pt in todo_points:
                name = pt.name
                if pt.kind == "at":
                    point_model = points.load_snapshot(pt, arm_dir, resolved.path, quant=task.quant)
                else:
                    interpolation = interpolation or points.Interpolation(model, arm.method, resolved.path)
                    interpolation.set(pt.value)
                    point_model = model
                log(f"{pt.name}: {'weights at ' + format(pt.value, 'g') + ' of the steps' if pt.kind == 'at' else 'interpolated, alpha ' + format(pt.value, 'g')}")
                evaluate_arm(pt.name, point_model, point_inputs(pt, arm), None, point=pt.record())
                point_model = None
                gc.collect()
        except MEMORY_ERRORS as e:
            if not resources.is_out_of_memory(e):
                raise
            _record_failure(run_dir, name, inputs if name == arm.name else point_inputs(
                next(pt for pt in todo_points if pt.name == name), arm), stage, e)
            log(f"{name}: FAILED, out of memory while {stage} "
                f"({str(e).splitlines()[0][:200]}); continuing with the other arms")
        model = point_model = interpolation = None
        gc.collect()
        _free_gpu()

    # References: the untouched base; and the 4-bit base without adapter, QLoRA's own starting point,
    # to separate quantization from training.
    references = [("base", _hash(common), None)]
    if profile.quant_reference and any(a.method == "qlora" for a in arms):
        references.append((report.NF4_REFERENCE, _hash({**common, "quant": task.quant}), task.quant))
    examples_cache: dict[str, tuple[list, dict]] = {}
    todo = set(spec.only) if child else {name for name, _, _ in references} | {a.name for a in arms}

    if not child:  # jobs at once (harness/parallel.py): what is left to compute, longest first
        pending = [a for a in sorted(arms, key=lambda a: ("qlora", "lora", "full").index(a.method))
                   if not _done(run_dir, a.name, arm_inputs(a)) or pending_points(a)]
        pending_refs = [(name, quant) for name, inputs, quant in references
                        if not _done(run_dir, name, inputs) and not reference_cached(quant)]
        needs = ([parallel.job_memory(a.method, n_params) for a in pending]
                 + [parallel.job_memory("eval", n_params) for _ in pending_refs])
        n = parallel.concurrency(spec.jobs, needs=needs, device=models.device_kind())
        if n > 1 and len(needs) > 1:
            names = [a.name for a in pending] + [name for name, _ in pending_refs]
            config["jobs"] = min(n, len(names))
            write_json(run_dir / "config.json", config)
            log(f"{len(names)} jobs, {config['jobs']} at once: {', '.join(names)}")
            need = dict(zip(names, needs, strict=True))
            gpus = parallel.gpu_capacity() if models.device_kind() == "cuda" else None
            auto = parallel.parse_jobs(spec.jobs) is None
            placer = parallel.Placer(gpus if auto else None, limit=n, devices=len(gpus or [0]))
            jobs = parallel.Jobs(spec, arms, names, n, p["work_dir"] / "jobs", log, runner=run_job, needs=need,
                                 placer=placer).start()
            if pending and _trained(p["work_dir"] / pending[0].name, arm_inputs(pending[0])) is None:
                record_train_data(pending[0], mix=False)  # for config.json, while the jobs run
            jobs.wait()
            todo -= set(names)

    for name, inputs, quant in references:
        if name in todo:
            evaluate_reference(name, inputs, quant)

    # Arms: same examples for all (unless an arm's overrides change the data); each trained, saved to
    # the work dir, then evaluated; then its points (snapshots, interpolations: harness/points.py).
    for arm in arms:
        if arm.name in todo:
            run_arm(arm)

    if child:
        return run_dir
    config["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    config["wall_seconds"] = time.perf_counter() - t0
    write_json(run_dir / "config.json", config)
    out = report.run(run_dir)
    log(f"report: {out}")
    return run_dir


def run_job(job: parallel.Job) -> str:
    """In a job's own process (harness/parallel.py): its part of `compare`. A HarnessError comes back to
    the parent as itself."""
    compare(job.spec, list(job.arms))
    return job.name


def _min(*xs):
    xs = [x for x in xs if x is not None]
    return min(xs) if xs else None


def _run_extra(run: evaluate.TaskRun) -> dict:
    """What a task's evaluation depends on beyond the baseline key's fields: only where it differs from
    the default, so keys of zero-shot plain-prompt tasks stay those of earlier versions."""
    extra = {}
    if run.chat_template:
        extra["chat_template"] = True
    if run.max_gen_toks is not None:
        extra["max_gen_toks"] = run.max_gen_toks
    if run.task.startswith(evalplan.NLTK_TASK_PREFIXES):
        # IFEval's language checks draw at random unless seeded (evaluate.seed_checks, 2026-12-03):
        # entries stored before then hold unseeded verdicts, so they are not reused.
        extra["checks"] = "seeded"
    return extra


def _keep_train_data(path: Path, config: dict) -> None:
    """A resumed run whose arms are all reused tokenizes nothing: keep the record of the data they trained on."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    # The examples depend on the training data and settings, the profile and the model (not on, say, points).
    # The model by its content: its record's wording differs between a first conversion and a cached copy.
    same = (previous.get("profile") == config["profile"]
            and (previous.get("model") or {}).get("content_sha256") == config["model"]["content_sha256"]
            and all((previous.get("task") or {}).get(k) == config["task"][k] for k in ("train", "training")))
    if same and previous.get("train_data"):
        config["train_data"] = previous["train_data"]


def _arm_settings(arm: Arm, arm_task: TaskConfig) -> dict:
    """The task settings an arm depends on: another method's learning rate, or the adapter settings for
    full fine-tuning, do not change it (so changing them redoes only the arms they concern)."""
    d = to_dict(arm_task)
    d["methods"] = {arm.method: d["methods"][arm.method]}
    # Interpolation is applied after training (its points have their own inputs); eval_at's snapshots are
    # saved while training, so it stays in; both left out when unset, keeping earlier runs' inputs.
    d["mitigation"].pop("interpolate")
    if d["mitigation"]["replay"] is None:
        d["mitigation"].pop("replay")
    if not d["training"]["eval_at"]:
        d["training"].pop("eval_at")
    if arm.method == "full":
        d.pop("lora")
    if arm.method != "qlora":
        d.pop("quant")
    return d


def _train_arm(arm: Arm, arm_task: TaskConfig, profile, model_path: str, examples: list, arm_dir: Path,
               inputs: str, replayed: dict | None = None):
    """Train one arm (resuming its Trainer checkpoint when one was made for these inputs); on running
    out of memory, retry once with half the micro-batch and twice the accumulation (same effective batch)."""
    stamp = arm_dir / "inputs.json"
    if (arm_dir / "trainer").exists() and (not stamp.exists() or _read_record(stamp).get("inputs") != inputs):
        log(f"{arm.name}: its checkpoint was made for other inputs; training from scratch")
        shutil.rmtree(arm_dir / "trainer")
        shutil.rmtree(arm_dir / points.SNAPSHOTS, ignore_errors=True)
    write_json(stamp, {"inputs": inputs})
    log(f"{arm.name}: training ({arm.method}{', ' + ' '.join(arm.overrides) if arm.overrides else ''})")
    retry = None
    try:
        result = train.run(arm.method, task=arm_task, profile=profile, model_path=model_path, examples=examples,
                           out_dir=arm_dir)
    except MEMORY_ERRORS as e:
        micro = arm_task.methods[arm.method].micro_batch_size
        if not resources.is_out_of_memory(e) or micro <= 1:
            raise
        gc.collect()
        _free_gpu()
        half = dataclasses.replace(arm_task.methods[arm.method], micro_batch_size=micro // 2)
        arm_task = dataclasses.replace(arm_task, methods={**arm_task.methods, arm.method: half})
        retry = {"error": str(e).splitlines()[0][:300], "micro_batch_size_from": micro, "micro_batch_size_to": micro // 2}
        log(f"{arm.name}: out of memory at micro-batch {micro}; retrying once at {micro // 2} with twice the "
            "gradient accumulation (same effective batch)")
        shutil.rmtree(arm_dir / "trainer", ignore_errors=True)  # its checkpoints belong to the other micro-batch
        result = train.run(arm.method, task=arm_task, profile=profile, model_path=model_path, examples=examples,
                           out_dir=arm_dir)
    s = {**result.stats, "oom_retry": retry, **({"replay": replayed} if replayed else {})}
    write_json(arm_dir / "train.json", {"inputs": inputs, "stats": s})
    stop_point(f"trained:{arm.name}")
    log(f"{arm.name}: {s['steps']} steps in {s['seconds']:.0f}s, loss {s['train_loss']:.4f}, "
        f"{s['trainable_params']:,} trainable ({s['trainable_pct']:.2f}%)")
    return result.model, s


def _trained(arm_dir: Path, inputs: str) -> dict | None:
    """The training stats of an arm trained and saved for these inputs (its evaluation still to do)."""
    path = arm_dir / "train.json"
    if not path.exists():
        return None
    record = _read_record(path)
    if record.get("inputs") != inputs or not Path(record["stats"]["saved"]["path"]).is_dir():
        return None
    return record["stats"]


def _read_record(path: Path) -> dict:
    """A stage record; a truncated one counts as absent (the stage is redone, never taken as done)."""
    try:
        record = read_json(path)
    except HarnessError:
        log(f"{path}: unreadable record, redoing its stage")
        return {}
    return record if isinstance(record, dict) else {}


def _done(run_dir: Path, arm: str, inputs: str) -> bool:
    path = run_dir / "arms" / f"{arm}.json"
    if not path.exists():
        return False
    record = _read_record(path)
    return record.get("inputs") == inputs and record.get("status", "done") == "done"


def _memory_errors() -> tuple:
    import torch

    return (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError, RuntimeError)


MEMORY_ERRORS = _memory_errors()


def _record_failure(run_dir: Path, arm: str, inputs: str, stage: str, e: BaseException) -> None:
    """A failed arm is recorded as such, with the memory it reached: the report shows it, a re-run retries it."""
    import torch

    peak = {"peak_rss_bytes": resources.peak_rss_since_reset() or resources.rss_bytes()}
    if torch.cuda.is_available():
        peak["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
        peak["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    write_json(run_dir / "arms" / f"{arm}.json", {
        "arm": arm, "inputs": inputs, "status": "failed", "stage": stage, "error_type": type(e).__name__,
        "error": str(e).splitlines()[0][:500] if str(e) else type(e).__name__, **peak})


def _drop_samples(ppl: dict | None) -> dict | None:
    return None if ppl is None else {k: v for k, v in ppl.items() if k not in ("samples", "version")}


def _record(run_dir: Path, arm: str, inputs: str, ev: dict, *, train_stats: dict | None,
            perplexity: dict | None = None, baseline: dict | None = None, eval_resources: dict | None = None,
            kl: dict | None = None, point: dict | None = None) -> None:
    """Per-document records first, the arm's JSON last: the JSON's presence means the arm is done."""
    samples = dict(ev["samples"])
    if perplexity is not None and perplexity.get("samples"):  # per-document bits per byte: paired drift
        samples[perplexity["task"]] = perplexity["samples"]
    perplexity = _drop_samples(perplexity)
    write_samples(run_dir / "samples" / f"{arm}.csv", samples)
    record = {"arm": arm, "inputs": inputs, "status": "done", "results": ev["results"], "n": ev["n"],
              "versions": ev["versions"], "eval_seconds": ev["seconds"], "train": train_stats, "perplexity": perplexity,
              "eval_resources": eval_resources}
    if kl is not None:
        record["kl"] = kl
    if baseline is not None:
        record["baseline"] = baseline
    if point is not None:
        record["point"] = point
    write_json(run_dir / "arms" / f"{arm}.json", record)
    stop_point(f"recorded:{arm}")


def _free_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
