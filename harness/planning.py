"""Stage 1, plan: everything checked before a weight loads, the model resolved, the run recorded.

    run = planning.prepare(spec, arms)      # -> Run: what every later stage reads

`plan` checks the inputs (task files, arms, suites, lm-eval tasks and metrics, the mirror's data,
replay overlap, the results directory); `prepare` resolves the model, checks the keys handed to
peft, bitsandbytes and transformers against it, checks disk and earlier checkpoints, fixes the
evaluation settings and the input hashes that decide what is redone, and writes config.json
(harness/records.py: RunRecord). torchtune's rule: fail before the GPU, not after the base evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from harness import (baselines, context, distributed, evalplan, evaluate, memory, models, parallel, points, provenance,
                     records, replay)
from harness.config import METHODS, PROJECT_ROOT, HarnessError, MethodName, TaskConfig, load_task, task_path, to_dict
from harness.data import mirror_dir
from harness.io import environment, log, remove_partial


@dataclass(frozen=True)
class CompareSpec:
    """What the command line asked for (harness compare / sweep)."""

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

    def context(self) -> context.RunContext:
        """What this run may load and run (checked): it travels with the run, never set on a module."""
        return context.RunContext.checked(device=self.device, trust_remote_code=self.trust_remote_code,
                                          allow_pickle=self.allow_pickle, include_paths=self.include_path)


# The settings --resume takes back from config.json; what may run code (trust_remote_code,
# allow_pickle, include_path) is recorded but only ever taken from the command line (harness/cli.py).
RESUMABLE = ("task", "model", "methods", "profile", "mirror", "overrides", "device", "trust_remote_code",
             "allow_pickle", "include_path", "work_dir")


@dataclass(frozen=True)
class Arm:
    """One fine-tuned variant: a method plus task-config overrides (a sweep's grid point)."""

    name: str
    method: MethodName
    overrides: tuple[str, ...] = ()


def input_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Plan:
    """The checked inputs of a run."""

    task: TaskConfig
    arm_tasks: dict[str, TaskConfig]  # each arm's task config (its overrides applied)
    evalplan: evalplan.EvalPlan
    profile_name: str
    mirror: Path | None
    run_id: str
    run_dir: Path
    work_dir: Path

    @property
    def suite(self):
        return self.evalplan.suite

    @property
    def profile(self):
        return self.task.profiles[self.profile_name]


def plan(spec: CompareSpec, arms: list[Arm], *, child: bool = False) -> Plan:
    """Everything that can be checked before a weight is loaded. A job's process (`child`) skips the
    data checks its parent made."""
    parallel.parse_jobs(spec.jobs)
    task: TaskConfig = load_task(spec.task, list(spec.overrides))
    arm_tasks = {}
    for arm in arms:
        if arm.method not in METHODS:
            raise HarnessError(f"--methods: unknown method '{arm.method}'; valid: {', '.join(METHODS)}")
        if arm.method not in task.methods:
            raise HarnessError(f"--methods: '{arm.method}' has no settings under methods: in {task_path(spec.task)}")
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
    _check_writable(run_dir)
    rows = {}
    for key, arm_task in {input_hash(to_dict(t.train)): t for t in arm_tasks.values()}.items():
        if not child:
            rows[key] = _check_training_data(arm_task, mirror)
    # Suites merged, groups expanded, every counted metric and benchmark dataset checked (harness/evalplan.py).
    plan_ = evalplan.build(task, list(spec.suites) or task.suites, mirror=mirror)
    suite = plan_.suite
    ppl = [suite.perplexity.task] if suite.perplexity else []
    if mirror is not None:  # every benchmark's data must be in the mirror too (suite leaves: checked in evalplan)
        for name in ppl + kl_tasks:
            evaluate.task_config(name, mirror=mirror)
    if not child:  # a scored split that is also trained on would measure learning on training examples
        scored = [t for t in [*plan_.leaves, *ppl] if not evaluate.is_answer(t)]
        for train in {input_hash(to_dict(t.train)): t.train for t in arm_tasks.values()}.values():
            name = evaluate.scoring(scored, train.dataset, train.config, train.split, mirror=mirror)
            if name is not None:
                raise HarnessError(f"train: {train.dataset} ({train.config or 'default'}/{train.split}) is the split "
                                   f"that evaluated task {name} scores: it would be scored on the examples it was "
                                   "trained on; train on another split, or score another")
    evaluated = [*plan_.leaves, *ppl, *kl_tasks, task.train.format_task]
    for arm_task in {input_hash(to_dict(t.mitigation.replay)): t for t in arm_tasks.values() if t.mitigation.replay}.values():
        if not child:  # replay data that is evaluated too would be learned, then scored
            n_rows = rows[input_hash(to_dict(arm_task.train))]
            n_domain = min(n_rows, task.profiles[profile_name].train_examples or n_rows)
            replay.check(arm_task.mitigation.replay, [t for t in evaluated if not evaluate.is_answer(t)], mirror=mirror,
                         n_domain=n_domain)
    return Plan(task, arm_tasks, plan_, profile_name, mirror, run_id, run_dir, Path(spec.work_dir) / task.name / run_id)


def _run_inputs(run: evaluate.TaskRun) -> dict:
    """A task's evaluation settings as its stage inputs; the prompt settings only where set, so the
    inputs of runs without them hash as before they existed (their results are reused on --resume)."""
    return {k: v for k, v in to_dict(run).items()
            if k not in ("system_instruction", "fewshot_as_multiturn") or v is not None}


@dataclass
class Run:
    """A planned run with its model resolved: what the later stages read (harness/references.py,
    harness/arms.py, harness/scoring.py). `record` is None in a job's process: its parent records the run."""

    spec: CompareSpec
    arms: list[Arm]
    plan: Plan
    resolved: models.ResolvedModel
    n_params: int
    runs: list[evaluate.TaskRun]  # each evaluated lm-eval task with its limit, shots, chat template
    eval_kw: dict
    ppl_kw: dict | None
    common: dict  # what every evaluation's result depends on (the base of every input hash)
    points: dict[str, list[points.Point]]
    record: records.RunRecord | None
    examples: dict = field(default_factory=dict)  # tokenized training data per data setting (harness/arms.py)
    needs: dict[str, float] = field(default_factory=dict)  # GPU bytes per job by harness/memory.py; "base": a reference

    @property
    def child(self) -> bool:
        return self.record is None

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir

    @property
    def eval_tasks(self) -> list[str]:
        return self.plan.evalplan.leaves  # every lm-eval task evaluated (a group's subtasks), suites first

    @property
    def run_of(self) -> dict[str, evaluate.TaskRun]:
        return {r.task: r for r in self.runs}

    def arm_inputs(self, arm: Arm) -> str:
        return input_hash({**self.common, "method": arm.method,
                           "task": _arm_settings(arm, self.plan.arm_tasks[arm.name]),
                           "profile": _profile_key(self.plan.profile)})

    def point_inputs(self, pt: points.Point, arm: Arm) -> str:
        return input_hash({"arm": self.arm_inputs(arm), "point": pt.kind, "value": pt.value})

    def done(self, name: str, inputs: str) -> bool:
        """The evaluation of `name` is recorded, for these inputs (a failed one is redone)."""
        path = self.run_dir / "arms" / f"{name}.json"
        if not path.exists():
            return False
        record = read_or_none(path, records.read_arm)
        return record is not None and record.inputs == inputs and record.status == "done"

    def save(self) -> None:
        if self.record is not None:  # the run's folder is made here (harness/planning.py: _check_writable)
            records.write(self.run_dir / "config.json", self.record)


def _check_writable(run_dir: Path) -> None:
    """The run's folder must be creatable, but is made only by Run.save, once every check passed:
    a refused run leaves no empty folder behind to look like a run."""
    existing = next(d for d in (run_dir, *run_dir.parents) if d.exists())
    if not existing.is_dir():
        raise HarnessError(f"results directory {run_dir}: not writable ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):  # access() also answers no on a read-only mount
        raise HarnessError(f"results directory {run_dir}: not writable (no write permission in {existing})")


def read_or_none(path: Path, reader):
    """A stage record; an unreadable one counts as absent (the stage is redone, never taken as done)."""
    try:
        return reader(path)
    except HarnessError:
        log(f"{path}: unreadable record, redoing its stage")
        return None


def prepare(spec: CompareSpec, arms: list[Arm], *, child: bool = False, only: tuple[str, ...] = ()) -> Run:
    """Plan, resolve the model and check it against every arm's settings, fix the evaluation settings;
    the parent of a run (not a job's process, `child`) also records the run in config.json."""
    p = plan(spec, arms, child=child)
    task, suite, profile, mirror = p.task, p.suite, p.profile, p.mirror
    if not child:  # (a child's siblings may be writing their temporary files)
        log(f"run {p.run_id}: task {task.name}, suite {suite.name}, arms {','.join(a.name for a in arms)}, "
            f"profile {p.profile_name} (limit {profile.limit}, train examples {profile.train_examples})")
        remove_partial(p.run_dir)
    resolved = models.resolve_model(spec.model)
    # Still before any weight loads: remote code, pickle weights, truncated files, disk for checkpoints.
    mine = [a for a in arms if not child or a.name in only]
    n_params = models.check_model_dir(Path(resolved.path))
    for arm in mine:  # lora:/quant: keys against peft and transformers, target modules against the model
        t = p.arm_tasks[arm.name]
        models.check_method_settings({arm.method}, resolved.path, lora=t.lora, quant=t.quant,
                                     lr_scheduler=t.training.lr_scheduler, optim=t.training.optim,
                                     mitigation=t.mitigation,
                                     where="" if arm.name == arm.method else f"arm {arm.name}: ")
    distributed.eval_processes(p.profile, models.device_kind())
    for arm in mine:  # training.distributed: accelerate, processes against devices, what FSDP can shard
        distributed.check(p.arm_tasks[arm.name], arm.method, p.profile, models.device_kind(),
                          where="" if arm.name == arm.method else f"arm {arm.name}: ")
    needs = _needs(resolved.path, n_params, mine, p, child=child)
    if models.device_kind() == "cuda":  # an arm or reference no GPU here can hold: refused now, with the figure
        alternatives = {a.name: _alternatives(resolved.path, n_params, a, p) for a in mine if a.method == "full"}
        parallel.check_fits(needs, parallel.gpu_totals(), n_params=n_params, alternatives=alternatives)
    _check_disk(n_params, mine, p.work_dir, snapshots={
        a.name: len(points.snapshot_steps(p.arm_tasks[a.name].training.eval_at, 1 << 30)) for a in mine},
        checkpoints={a.name: bool(p.arm_tasks[a.name].training.save_minutes or p.arm_tasks[a.name].training.save_steps)
                     for a in mine})
    _check_saved(mine, p.work_dir)
    if not child:
        log(f"model {resolved.name}: {resolved.detail}")

    has_chat = models.load_tokenizer(resolved.path).chat_template is not None
    runs = p.evalplan.runs(profile, has_chat_template=has_chat)
    eval_kw = dict(mirror=mirror, batch_size=profile.eval_batch_size, seed=task.training.seed,
                   backend=profile.eval_backend)
    ppl_kw = None
    if suite.perplexity is not None:  # its own batch size: rolling windows of full context are memory-hungry
        ppl_kw = dict(mirror=mirror, limit=profile.perplexity_limit, batch_size=suite.perplexity.batch_size,
                      num_fewshot=0, seed=task.training.seed, backend=profile.eval_backend)
    # The backend is left out of the input hashes: both give the same per-document results.
    common = {"model": resolved.path, "tasks": p.evalplan.leaves, "runs": [_run_inputs(r) for r in runs],
              "eval": {k: v for k, v in eval_kw.items() if k not in ("mirror", "backend")},
              "perplexity": [suite.perplexity and suite.perplexity.task, ppl_kw and ppl_kw["limit"]],
              "kl": to_dict(task.kl) | {"documents": profile.kl_documents} if task.kl.enabled else None}
    point_list = {a.name: points.of(a.name, a.method, p.arm_tasks[a.name]) for a in arms}
    if not child:  # the jobs get what the parent decided: a run id from the clock would be another
        # second's, and each job would write to a run directory of its own (seen on a GPU, --jobs auto)
        spec = dataclasses.replace(spec, run_id=p.run_id, profile=p.profile_name)
    record = None if child else _run_record(spec, arms, p, resolved, runs, has_chat, point_list)
    run = Run(spec, arms, p, resolved, n_params, runs, eval_kw, ppl_kw, common, point_list, record, needs=needs)
    run.save()
    return run


def _shards(task: TaskConfig, method: str) -> int:
    """Over how many devices an arm's training state is spread (training.distributed=fsdp), for its estimate."""
    if task.training.distributed != "fsdp":
        return 1
    return distributed.processes(task, models.device_kind())


def _arm_need(model_dir: str, n_params: int, arm: Arm, p: Plan, *, optim: str | None = None) -> float:
    """An arm's GPU bytes per device by harness/memory.py, from the architecture and the arm's own settings
    (`optim` in its optimizer's place)."""
    t = p.arm_tasks[arm.name]
    return memory.arm_bytes(arm.method, model_dir, n_params, t, optim=optim) / _shards(t, arm.method)


def _alternatives(model_dir: str, n_params: int, arm: Arm, p: Plan) -> list[tuple[str, float]]:
    """What would shrink a full arm that does not fit: AdamW's moments in 8 bits (bitsandbytes)."""
    if "8bit" in p.arm_tasks[arm.name].training.optim:
        return []
    return [("training.optim=adamw_bnb_8bit (AdamW's moments in 8 bits)",
             _arm_need(model_dir, n_params, arm, p, optim="adamw_bnb_8bit"))]


def _needs(model_dir: str, n_params: int, arms: list[Arm], p: Plan, *, child: bool) -> dict[str, float]:
    """Each job's GPU bytes: the arms', and (in the parent) a reference evaluation's as "base"."""
    needs = {a.name: _arm_need(model_dir, n_params, a, p) for a in arms}
    if not child:
        needs["base"] = memory.eval_bytes(n_params)
    return needs


def _run_record(spec: CompareSpec, arms: list[Arm], p: Plan, resolved, runs, has_chat: bool,
                point_list: dict) -> records.RunRecord:
    task, suite = p.task, p.suite
    eval_tasks = p.evalplan.leaves
    record = records.RunRecord(
        run_id=p.run_id, task=to_dict(task), suite=to_dict(suite), methods=[a.name for a in arms],
        evaluation={**p.evalplan.record(), "runs": [to_dict(r) for r in runs], "tokenizer_chat_template": has_chat,
                    "training_chat_template": False},
        arms={a.name: {"method": a.method, "overrides": list(a.overrides)} for a in arms},
        points={pt.name: pt.record() for pts in point_list.values() for pt in pts},
        profile={"name": p.profile_name, **to_dict(p.profile)},
        model={**resolved.to_dict(), "content_sha256": baselines.model_sha256(resolved.path)},
        environment=environment(),
        datasets=provenance.datasets(to_dict(task.train), eval_tasks + ([suite.perplexity.task] if suite.perplexity else []),
                                     mirror=p.mirror),
        mirror=str(p.mirror) if p.mirror else None, overrides=list(spec.overrides), spec=_resumable(spec, p),
        device=models.device_kind(), started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    _keep_train_data(p.run_dir / "config.json", record)
    return record


def _resumable(spec: CompareSpec, p: Plan) -> dict:
    """What `--resume RUN_DIR` needs to run the same comparison again, with paths made absolute."""
    out = {k: to_dict(getattr(spec, k)) for k in RESUMABLE}
    for key in ("task", "model"):
        if Path(out[key]).expanduser().exists():
            out[key] = str(Path(out[key]).expanduser().resolve())
    out["work_dir"] = str(Path(spec.work_dir).resolve())
    return out | {"profile": p.profile_name, "mirror": str(p.mirror) if p.mirror else None,
                  "suites": list(spec.suites)}


def _keep_train_data(path: Path, record: records.RunRecord) -> None:
    """A resumed run whose arms are all reused tokenizes nothing: keep the record of the data they trained on."""
    if not path.exists():
        return
    try:
        previous = records.read_run(path)
    except HarnessError:
        return
    # The examples depend on the training data and settings, the profile and the model (not on, say, points).
    # The model by its content: its record's wording differs between a first conversion and a cached copy.
    same = (previous.profile == record.profile
            and previous.model.get("content_sha256") == record.model["content_sha256"]
            and all(previous.task.get(k) == record.task[k] for k in ("train", "training")))
    if same and previous.train_data:
        record.train_data = previous.train_data


def _profile_key(profile) -> dict:
    """The profile as it enters an arm's input hash: without how it is evaluated (backend, processes),
    which gives the same per-document results (see `common`)."""
    return {k: v for k, v in to_dict(profile).items() if k not in ("eval_backend", "eval_processes")}


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


# Bytes on disk per parameter, per arm: the saved result (full fine-tuning: an fp32 model; adapters: a
# few percent of that at most) and, where the arm saves resumable Trainer checkpoints
# (training.save_minutes or save_steps), one checkpoint (fp32 weights 4 + AdamW moments 8), two while
# the newer replaces the older.
SAVED_PER_PARAM = {"full": 4, "lora": 1, "qlora": 1}
CHECKPOINT_PER_PARAM = {"full": 2 * 12, "lora": 0, "qlora": 0}


def _check_disk(n_params: int, arms: list[Arm], work_dir: Path, snapshots: dict[str, int] | None = None,
                checkpoints: dict[str, bool] | None = None) -> None:
    """Fail before training when the work dir's disk cannot hold the saved arms, their checkpoints (where
    they save any) and the snapshots of training.eval_at (a saved model or adapter each), from the
    model's size. At 8B, full fine-tuning's two checkpoints alone are ~190 GB: an arm run with
    training.save_minutes=0 (no checkpoints) is not refused for them."""
    todo = [a for a in arms if not (work_dir / a.name / "train.json").exists()]
    needed = sum((SAVED_PER_PARAM[a.method] * (1 + (snapshots or {}).get(a.name, 0))
                  + CHECKPOINT_PER_PARAM[a.method] * (checkpoints or {}).get(a.name, True)) * n_params
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
    from harness import train

    for arm in arms:
        arm_dir = work_dir / arm.name
        train.resume_checkpoint(arm_dir / "trainer")
        if (arm_dir / "train.json").exists():
            for w in sorted(arm_dir.glob("*/*.safetensors")):
                if w.parent.name != "trainer":
                    models.safetensors_tensors(w)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB ({n} bytes)"
