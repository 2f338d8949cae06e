"""The records between stages, typed and versioned; the one module that writes and reads them.

    results/<task>/<run-id>/config.json     RunRecord     the run: settings, model, data, evaluation plan
    results/<task>/<run-id>/arms/<arm>.json ArmRecord     one evaluated model (FailedArm: one that failed)
    work/<task>/<run-id>/<arm>/inputs.json  InputsStamp   what a Trainer checkpoint there was made for
    work/<task>/<run-id>/<arm>/train.json   TrainRecord   a trained and saved arm
    work/<task>/<run-id>/evaluated/<name>.json  EvaluatedRecord  an evaluation whose KL is still to do

Each carries `schema_version`. Records written before versioning (2026-12-05 and earlier) have none:
they are version 1, and `_migrate_*` turns them into the current shape explicitly, so readers index
fields instead of guessing with `.get()`. A record with a field this version does not know, or
without one it needs, is one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from harness.config import HarnessError
from harness.io import read_json, write_json

SCHEMA_VERSION = 2


@dataclass
class RunRecord:
    """config.json: everything needed to read the run's records and rebuild its report."""

    run_id: str
    task: dict  # the resolved task config (harness.config.TaskConfig as a dict)
    suite: dict
    methods: list[str]  # the arms' names, in order
    evaluation: dict  # evalplan's record: entries (task, metric, role, leaves, groups), runs
    arms: dict  # {name: {method, overrides}}
    profile: dict
    model: dict
    environment: dict
    points: dict = field(default_factory=dict)  # {point name: points.Point.record()}
    datasets: list = field(default_factory=list)
    mirror: str | None = None
    overrides: list = field(default_factory=list)
    spec: dict | None = None  # what --resume needs (pipeline.RESUMABLE)
    device: str | None = None
    started: str | None = None
    finished: str | None = None
    wall_seconds: float | None = None
    train_data: dict | None = None
    jobs: int | None = None  # jobs at once, when more than one
    schema_version: int = SCHEMA_VERSION


@dataclass
class ArmRecord:
    """arms/<name>.json of an evaluated model (the base, a reference, an arm or a point of one). Its
    per-document values are in samples/<name>.csv, written first: this file's presence means done."""

    arm: str
    inputs: str  # hash of everything the result depends on; a re-run with other inputs redoes it
    results: dict  # lm-eval's per-task metrics
    n: dict
    versions: dict
    eval_seconds: float
    train: dict | None = None  # training stats (None for references and points)
    perplexity: dict | None = None
    eval_resources: dict | None = None
    kl: dict | None = None
    baseline: dict | None = None  # tasks taken from the baseline cache
    point: dict | None = None  # a snapshot or an interpolation of an arm
    status: Literal["done"] = "done"
    schema_version: int = SCHEMA_VERSION


@dataclass
class FailedArm:
    """arms/<name>.json of an arm that ran out of memory: the report shows it, a re-run retries it."""

    arm: str
    inputs: str
    stage: str
    error_type: str
    error: str
    peak_rss_bytes: int | None = None
    peak_gpu_allocated_bytes: int | None = None
    peak_gpu_reserved_bytes: int | None = None
    status: Literal["failed"] = "failed"
    schema_version: int = SCHEMA_VERSION


@dataclass
class InputsStamp:
    inputs: str
    schema_version: int = SCHEMA_VERSION


@dataclass
class TrainRecord:
    inputs: str
    stats: dict  # train.run's stats, plus oom_retry and replay
    schema_version: int = SCHEMA_VERSION


@dataclass
class EvaluatedRecord:
    """A model's benchmarks and perplexity, kept until its arm record is written: a run stopped while
    measuring KL (a device's call limit, a pre-emption) resumes there instead of evaluating again."""

    inputs: str
    evaluation: dict  # evaluate.evaluate's result: results, n, versions, seconds, samples
    perplexity: dict | None
    resources: dict  # what the evaluation cost (resources.measure), reported as measured then
    schema_version: int = SCHEMA_VERSION


# ---------------------------------------------------------------- writing


def write(path: Path, record) -> Path:
    """Atomically (harness.io). Optional fields left unset are not written, as before versioning."""
    data = {k: v for k, v in dataclasses.asdict(record).items() if v is not None or k not in _OMIT_WHEN_NONE}
    return write_json(path, data)


_OMIT_WHEN_NONE = {"kl", "baseline", "point", "jobs", "train_data", "finished", "wall_seconds",
                   "peak_gpu_allocated_bytes", "peak_gpu_reserved_bytes"}


def to_dict(record) -> dict:
    """Every field, present (what the report indexes)."""
    return dataclasses.asdict(record)


# ---------------------------------------------------------------- reading, with migration


def read_run(path: Path) -> RunRecord:
    return _build(RunRecord, _migrate_run(_read(path)), path)


def read_arm(path: Path) -> ArmRecord | FailedArm:
    data = _migrate_arm(_read(path))
    return _build(FailedArm if data.get("status") == "failed" else ArmRecord, data, path)


def read_inputs(path: Path) -> InputsStamp:
    return _build(InputsStamp, _migrate_plain(_read(path)), path)


def read_train(path: Path) -> TrainRecord:
    return _build(TrainRecord, _migrate_plain(_read(path)), path)


def read_evaluated(path: Path) -> EvaluatedRecord:
    return _build(EvaluatedRecord, _read(path), path)  # new in version 2: nothing to migrate


def _read(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise HarnessError(f"{path}: not a harness record (a JSON object expected)")
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise HarnessError(f"{path}: schema_version {version!r} is newer than this harness reads ({SCHEMA_VERSION}); "
                           "upgrade the harness")
    return data


def _build(cls, data: dict, path: Path):
    names = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(data) - names)
    if extra:
        near = difflib.get_close_matches(extra[0], names, n=1)
        raise HarnessError(f"{path}: unknown field '{extra[0]}' in a {cls.__name__} record"
                           + (f" (did you mean '{near[0]}'?)" if near else "") + "; written by another harness version?")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise HarnessError(f"{path}: field '{missing[0]}' missing from a {cls.__name__} record")
    return cls(**{**data, "schema_version": SCHEMA_VERSION})


def _migrate_plain(data: dict) -> dict:
    return data  # inputs.json and train.json: version 1 had the same fields


def _migrate_arm(data: dict) -> dict:
    """Version 1 arm records: `status` absent meant done; `versions` came later than `results`."""
    if data.get("schema_version", 1) == 1:
        data = {"status": "done", **data}
        if data["status"] == "done":
            data.setdefault("versions", {})
    return data


def _migrate_run(data: dict) -> dict:
    """Version 1 config.json, written by every harness before 2026-12-05, in the shapes it took:
    before 2026-12 the evaluation was recorded as task names and metrics only (each a task of its
    own, higher is better); before sweeps, the arms were the methods, untouched; before content
    hashing, only the training split was recorded as a dataset."""
    if data.get("schema_version", 1) != 1:
        return data
    data = dict(data)
    if not data.get("evaluation") and "suite" in data and "task" in data:  # else: named missing by _build
        entries = [{"task": t["task"], "metric": t["metric"], "role": "suite", "kind": "task", "leaves": [t["task"]],
                    "groups": {}, "higher_is_better": {}} for t in data["suite"]["tasks"]]
        entries += [{"task": t["task"], "metric": t["metric"], "role": "in_domain", "kind": "task",
                     "leaves": [t["task"]], "groups": {}, "higher_is_better": {}} for t in data["task"]["in_domain"]]
        data["evaluation"] = {"entries": entries}
    if not data.get("arms") and "methods" in data:
        data["arms"] = {m: {"method": m, "overrides": []} for m in data["methods"]}
    data["points"] = data.get("points") or {}
    td = data.get("train_data") or {}
    if data.get("datasets") is None:
        data["datasets"] = [{"id": td.get("dataset"), "config": td.get("config"), "split": td.get("split"),
                             "rows": td.get("rows"), "sha256": None, "used_for": "train"}] if td else []
    data.setdefault("overrides", [])
    return data
