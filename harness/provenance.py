"""Provenance: content hashes of the base model and of every dataset a run reads.

A report must say exactly which weights and which rows produced its numbers. Hashing a 14 GB
model on every run is wasteful, so each file's sha256 is cached under the harness cache
(file-hashes.json), keyed by path, size and modification time: a changed file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness.config import HarnessError
from harness.data import file_sha256, load_split, mirror_file
from harness.io import write_json

MODEL_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json")


def _cache_path() -> Path:
    from harness.models import cache_dir

    return cache_dir() / "file-hashes.json"


def cached_sha256(path: Path, cache: dict) -> str:
    """sha256 of a file, reused while its size and mtime are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    hit = cache.get(key)
    if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
        return hit["sha256"]
    digest = file_sha256(path)
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _save_cache(cache: dict) -> None:
    try:
        write_json(_cache_path(), cache)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass


def model_hash(model_dir: str | Path) -> dict:
    """{"content_sha256", "files": {name: sha256}, "bytes"} over the weights and config."""
    model_dir = Path(model_dir)
    files = sorted({p for pat in MODEL_PATTERNS for p in model_dir.glob(pat)})
    cache = _load_cache()
    per_file = {p.name: cached_sha256(p, cache) for p in files}
    _save_cache(cache)
    combined = hashlib.sha256("".join(f"{n} {h}\n" for n, h in per_file.items()).encode()).hexdigest()
    return {"content_sha256": combined, "files": per_file, "bytes": sum(p.stat().st_size for p in files)}


def dataset_record(dataset: str, config: str | None, split: str, *, mirror: Path | None, used_for: str,
                   cache: dict) -> dict:
    """Id, split, rows and a content hash: of the mirror's jsonl file, else the hub dataset's fingerprint."""
    rec = {"id": dataset, "config": config, "split": split, "used_for": used_for}
    if mirror is not None:
        path = mirror_file(mirror, dataset, config, split)
        if not path.exists():
            raise HarnessError(f"dataset {dataset} ({config or 'default'}/{split}): not in the mirror, looked for {path}")
        with open(path, "rb") as fh:
            rec["rows"] = sum(1 for line in fh if line.strip())
        rec["sha256"] = cached_sha256(path, cache)
        rec["source"] = "mirror"
    else:
        ds = load_split(dataset, config, split, mirror=None)
        rec.update(rows=len(ds), sha256=None, fingerprint=ds._fingerprint, source="hub")
    return rec


def datasets(train: dict, eval_tasks: list[str], *, mirror: Path | None) -> list[dict]:
    """One record for the training split, one per evaluated task (the split lm-eval scores)."""
    from harness.evaluate import task_source

    cache = _load_cache()
    out = []
    for task in eval_tasks:
        src = task_source(task, mirror=mirror)
        out.append(dataset_record(src["dataset"], src["config"], src["split"], mirror=mirror, used_for=task,
                                  cache=cache))
    train_rec = dataset_record(train["dataset"], train["config"], train["split"], mirror=mirror, used_for="train",
                               cache=cache)
    _save_cache(cache)
    return [train_rec, *out]
