"""Baseline cache: evaluations of an untrained base, reused across runs.

    harness compare --task finance                      # reuses baselines/ when a key matches
    harness compare --task finance --refresh-baseline   # evaluates the base again and overwrites

A forgetting study evaluates the same base again and again (every run, every sweep); its scores
only change when the model, the task, the document selection or the harness's way of evaluating
changes. So each task's result is stored under a key made of exactly those things:

- the model's content hash (its weight and config files, not its path),
- the task's content hash: lm-eval's own task config (prompt, choices, metrics, version) and the
  documents it is evaluated on (not where they were read from, so a mirror and the hub agree),
- limit, seed and few-shot count (which documents, which examples),
- the reference's loading: 16-bit, or the quantization config for the 4-bit base,
- the device kind and dtype, and EVAL_VERSION (bumped when the harness changes how it scores).

One small JSON per (model, task, key) under baselines/<model>/: aggregate results plus the
per-document records the paired statistics need.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from harness.config import PROJECT_ROOT, HarnessError
from harness.io import write_json, write_text
from harness.models import PROVENANCE_FILE

EVAL_VERSION = 1
BASELINES_ENV = "HARNESS_BASELINES"
# Where a task's data comes from (hub or mirror) and which splits a mirror lacks: not what is scored.
WHERE_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "training_split", "fewshot_split", "tag")
WEIGHT_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja")  # weights, config, tokenizer


def default_dir() -> Path:
    return Path(os.environ.get(BASELINES_ENV) or PROJECT_ROOT / "baselines")


def model_sha256(path: str | Path) -> str:
    """sha256 over a model directory's weight, config and tokenizer files (names and contents).

    Cached beside the model in .harness-sha256.json, keyed by the files' sizes and mtimes: hashing a
    7B checkpoint takes a minute, and a directory that has not changed need not be read again.
    The harness's own provenance note (harness_source.json) is not the model: it names the GGUF's path
    on this machine, and hashing it gave the same weights another key under another home directory,
    so a fresh user's run never found the committed baselines."""
    root = Path(path)
    cache = root / ".harness-sha256.json"
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                   and p.name not in (cache.name, PROVENANCE_FILE))
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        cached = json.loads(cache.read_text())
        if cached.get("files") == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        if p.suffix == ".json":  # the same model saved by another transformers version hashes alike
            data = json.loads(p.read_text())
            if isinstance(data, dict):
                data.pop("transformers_version", None)
            h.update(json.dumps(data, sort_keys=True).encode())
            continue
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    digest = h.hexdigest()
    try:
        write_json(cache, {"files": stamp, "sha256": digest})
    except OSError:  # a read-only model directory: hash again next time
        pass
    return digest


@lru_cache(maxsize=None)
def task_sha256(name: str, mirror: Path | None) -> str:
    """lm-eval's task config (minus where its data lives) plus the documents it evaluates."""
    from harness.evaluate import eval_task

    task = eval_task(name, mirror=mirror)  # the Task evaluation then uses: built once
    # A run sets few-shot count and generation cap on the shared Task (they are in the key on their own):
    # hash the config as built, whichever evaluation ran first.
    dump = getattr(task, "_harness_dump", None) or task.dump_config()
    config = {k: v for k, v in dump.items() if k not in WHERE_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=_describe).encode())
    for doc in task.eval_docs:
        h.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _describe(obj) -> str:
    """Functions in a task config (process_docs, doc_to_text...) hash by their qualified name."""
    name = getattr(obj, "__qualname__", None)
    return f"{getattr(obj, '__module__', '')}.{name}" if name else str(obj)


def key(*, model_sha: str, task: str, task_sha: str, limit: int | None, seed: int, num_fewshot: int,
        quant: dict | None, device: str, dtype: str, **extra) -> dict:
    """The cache key. `extra` holds what only some evaluations depend on (chat template, a generation
    cap, the per-document record version of a perplexity task), present only when set, so the keys
    of evaluations that do not use them are those of earlier versions."""
    return {"eval_version": EVAL_VERSION, "model_sha256": model_sha, "task": task, "task_sha256": task_sha,
            "limit": limit, "seed": seed, "num_fewshot": num_fewshot, "quant": quant, "device": device,
            "dtype": dtype, **extra}


def _path(root: Path, k: dict) -> Path:
    digest = hashlib.sha256(json.dumps(k, sort_keys=True).encode()).hexdigest()[:16]
    return root / k["model_sha256"][:16] / f"{k['task']}-{digest}.json"


def lookup(root: Path, k: dict) -> dict | None:
    """The stored evaluation for this key, or None. A file that does not parse, or whose key differs
    (a hash-prefix collision), is a miss, never a result."""
    path = _path(root, k)
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if entry.get("key") != k:
        return None
    entry["file"] = str(path)
    return entry


def store(root: Path, k: dict, *, results: dict, n: int, version, samples: list[dict], seconds: float,
          source: dict) -> Path:
    """One task's evaluation of a reference model; `seconds` is the evaluation time it stands for."""
    entry = {"key": k, "results": results, "n": n, "version": version, "seconds": round(seconds, 3),
             "source": source, "samples": _columns(samples)}
    try:
        return write_text(_path(root, k), _dump(entry))
    except OSError as e:
        raise HarnessError(f"baselines directory {root}: not writable ({e.strerror}); "
                           f"pass --baselines-dir or set {BASELINES_ENV}") from None


def samples_of(entry: dict) -> list[dict]:
    cols = entry["samples"]
    return [dict(zip(cols["columns"], row)) for row in cols["rows"]]


def _columns(samples: list[dict]) -> dict:
    """Per-document records as one column list and rows: a third of the size of a list of dicts.
    Hashes are cut to 64 bits as in samples/*.csv; a text target (a perplexity task's whole page)
    is left out: pairing needs ids and scores, not the documents."""
    samples = [{k: (v[:16] if k == "doc_hash" and isinstance(v, str) else v) for k, v in s.items()
                if not (k == "target" and not isinstance(v, (int, float)))} for s in samples]
    columns = sorted({k for s in samples for k in s})
    return {"columns": columns, "rows": [[s.get(c) for c in columns] for s in sorted(samples, key=lambda s: s["doc_id"])]}


def _dump(entry: dict) -> str:
    """Indented JSON, but one line per document row: readable, diffable, and small."""
    rows = entry["samples"]["rows"]
    head = json.dumps({**entry, "samples": {**entry["samples"], "rows": "@ROWS@"}}, indent=2, sort_keys=True)
    body = ",\n".join("      " + json.dumps(r, separators=(",", ":")) for r in rows)
    return head.replace('"@ROWS@"', "[\n" + body + "\n    ]" if rows else "[]") + "\n"
