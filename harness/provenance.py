"""Provenance of a run's data: id, config, split, row count and content hash of every dataset it reads.

The base model's content hash is baselines.model_sha256 (cached beside the model); this module
covers the datasets: the training split and the split each evaluated task scores.
"""

from __future__ import annotations

from pathlib import Path

from harness.config import HarnessError
from harness.data import file_sha256, load_split, mirror_file


def dataset_record(dataset: str, config: str | None, split: str, *, mirror: Path | None, used_for: str) -> dict:
    """Id, split, rows and a content hash: of the mirror's jsonl file, else the hub dataset's fingerprint."""
    rec = {"id": dataset, "config": config, "split": split, "used_for": used_for}
    if mirror is not None:
        path = mirror_file(mirror, dataset, config, split)
        if not path.exists():
            raise HarnessError(f"dataset {dataset} ({config or 'default'}/{split}): not in the mirror, looked for {path}")
        with open(path, "rb") as fh:
            rec["rows"] = sum(1 for line in fh if line.strip())
        rec.update(sha256=file_sha256(path), source="mirror")
    else:
        ds = load_split(dataset, config, split, mirror=None)
        rec.update(rows=len(ds), sha256=None, fingerprint=ds._fingerprint, source="hub")
    return rec


def datasets(train: dict, eval_tasks: list[str], *, mirror: Path | None) -> list[dict]:
    """The training split first, then one record per evaluated task (the split lm-eval scores).

    The evaluated tasks are checked first: a mirror lacking a benchmark fails naming that benchmark."""
    from harness.evaluate import task_source

    evaluated = []
    for task in eval_tasks:
        src = task_source(task, mirror=mirror)
        evaluated.append(dataset_record(src["dataset"], src["config"], src["split"], mirror=mirror, used_for=task))
    train_rec = dataset_record(train["dataset"], train["config"], train["split"], mirror=mirror, used_for="train")
    return [train_rec, *evaluated]
