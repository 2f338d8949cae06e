"""Writing run artifacts: atomic (temporary file, then rename), diffable JSON, per-document CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from harness.config import PROJECT_ROOT, HarnessError

_UMASK = os.umask(0)
os.umask(_UMASK)
STOP_ENV = "HARNESS_STOP_AT"  # fault injection for the resume tests: SIGKILL at a named point

SAMPLE_FIELDS = ("task", "doc_id", "doc_hash", "filter", "metric", "value", "weight")
RECORD_IDS = ("doc_id", "doc_hash", "target")
PACKAGES = ("harness", "torch", "transformers", "peft", "bitsandbytes", "lm_eval", "datasets", "accelerate",
            "numpy", "scipy")  # the last two: the bootstrap CIs are computed with them


def write_text(path: Path, text: str) -> Path:
    """Write atomically: a reader (or a resumed run) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # on disk before the rename makes it visible
    stop_point(f"write:{path.name}")
    os.replace(tmp, path)
    return path


def stop_point(name: str) -> None:
    """Kill this process, as a pre-emption would, when HARNESS_STOP_AT names this point.

    Points: write:<file name> (temporary file written, not yet renamed), recorded:<arm>,
    evaluating:<arm> (between its benchmarks and its perplexity), evaluated:<arm> (evaluation kept,
    KL not yet measured), train:<arm>:<step> (after the Trainer checkpoint of that step). Used by
    tests/test_resume.py; unset in normal runs."""
    if os.environ.get(STOP_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def log(msg: str) -> None:
    """A stage line on stderr, `[harness HH:MM:SS job] msg`: what a parallel run's parent relays from
    each job's log (harness/parallel.py sets HARNESS_JOB in each job's process)."""
    import sys
    from datetime import datetime

    job = os.environ.get("HARNESS_JOB")
    print(f"[harness {datetime.now().strftime('%H:%M:%S')}{' ' + job if job else ''}] {msg}", file=sys.stderr, flush=True)


def remove_partial(run_dir: Path) -> None:
    """Temporary files a killed run left behind (never a finished artifact)."""
    for tmp in Path(run_dir).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise HarnessError(f"{path}: corrupt or truncated JSON ({e.msg} at line {e.lineno}); "
                           "delete it to redo the stage that wrote it") from None


def write_samples(path: Path, samples: dict[str, list[dict]]) -> Path:
    """One row per (task, document, filter, metric): what the paired statistics need, nothing more.
    `weight` is set for metrics aggregated as weighted means (bytes for bits_per_byte, instructions
    for IFEval's instruction-level accuracy); `pred` and `n_choices` (multiple choice) are rows too.
    A corpus-level metric's row has no value and, in a `stats` column that only files with such a
    metric have, JSON [aggregation, the document's statistics] (harness/corpus.py)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    corpus = any(k.endswith(":s") for records in samples.values() for rec in records for k in rec)
    writer.writerow(SAMPLE_FIELDS + (("stats",) if corpus else ()))
    for task, records in samples.items():
        for rec in sorted(records, key=lambda r: r["doc_id"]):
            short = (rec.get("doc_hash") or "")[:16]  # 64 bits pair documents safely; keeps files small
            for key in sorted(k for k in rec if k not in RECORD_IDS and not k.endswith(":w")):
                value = rec[key]
                if key.endswith(":s"):  # a corpus-level metric: its statistics, summed over resamples later
                    metric, _, filt = key[:-2].partition(",")
                    writer.writerow([task, rec["doc_id"], short, filt or "none", metric, "", "",
                                     json.dumps(value, separators=(",", ":"))])
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                metric, _, filt = key.partition(",")
                writer.writerow([task, rec["doc_id"], short, filt or "none", metric, repr(float(value)),
                                 repr(float(rec[f"{key}:w"])) if f"{key}:w" in rec else ""] + ([""] if corpus else []))
    return write_text(path, buf.getvalue())


def read_samples(path: Path) -> dict[str, list[dict]]:
    """Per-document records back from samples/<arm>.csv; runs written before 2026-12 (one row per
    document, acc and acc_norm columns) are read through the same record shape."""
    by_task: dict[str, dict[int, dict]] = {}
    path = Path(path)
    if not path.exists() and path.with_suffix(".csv.gz").exists():  # a committed report keeps them compressed
        import gzip

        opener = lambda: gzip.open(path.with_suffix(".csv.gz"), "rt", newline="")  # noqa: E731
    else:
        opener = lambda: open(path, newline="")  # noqa: E731
    with opener() as fh:
        reader = csv.DictReader(fh)
        long = "metric" in (reader.fieldnames or [])
        for row in reader:
            doc_id = int(row["doc_id"])
            rec = by_task.setdefault(row["task"], {}).setdefault(
                doc_id, {"doc_id": doc_id, "doc_hash": row["doc_hash"] or None})
            if long:
                key = row["metric"] if row["filter"] in ("none", "") else f"{row['metric']},{row['filter']}"
                if row.get("stats"):
                    rec[f"{key}:s"] = json.loads(row["stats"])
                    continue
                rec[key] = float(row["value"])
                if row.get("weight"):
                    rec[f"{key}:w"] = float(row["weight"])
                continue
            for key in ("acc", "acc_norm", "pred"):  # the wide format of older runs
                if row.get(key) not in (None, ""):
                    rec[key] = float(row[key])
    return {task: [docs[d] for d in sorted(docs)] for task, docs in by_task.items()}


def environment() -> dict:
    """Versions, hardware and commit: what a reader needs to reproduce a number."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env = {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
           "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "gpu": None, "gpu_count": 0, "cuda": None}
    try:
        import torch

        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_count"] = torch.cuda.device_count()
            env["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
        # Tracked code that differs from the commit: the commit alone does not reproduce the run.
        env["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "harness"],
                                               cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
