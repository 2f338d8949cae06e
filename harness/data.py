"""Dataset resolution: a hub id, read from a local mirror when one is named, else from the hub.

A mirror is a directory laid out as `<hub id>/<config or "default">/<split>.jsonl` (the layout of
../shared/hf-mirror). It is named by `--mirror` or the HARNESS_MIRROR environment variable, and
serves both the training data and lm-eval's own benchmark tasks (see evaluate.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from harness.config import HarnessError

MIRROR_ENV = "HARNESS_MIRROR"


def mirror_dir(option: str | Path | None) -> Path | None:
    """The mirror named by the option or the environment; None when neither names one."""
    value = option or os.environ.get(MIRROR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "--mirror" if option else MIRROR_ENV
        raise HarnessError(f"{source}: mirror directory {path} does not exist")
    return path.resolve()


def mirror_file(mirror: Path, dataset: str, config: str | None, split: str) -> Path:
    return mirror / dataset / (config or "default") / f"{split}.jsonl"


def load_split(dataset: str, config: str | None, split: str, *, mirror: Path | None):
    """One split as a `datasets.Dataset`, from the mirror or the hub."""
    import datasets

    if mirror is not None:
        path = mirror_file(mirror, dataset, config, split)
        if not path.exists():
            raise HarnessError(f"dataset {dataset} ({config or 'default'}/{split}): not in the mirror, looked for {path}")
        if not path.read_text().strip():
            raise HarnessError(f"dataset {dataset} ({config or 'default'}/{split}): the split is empty "
                               f"({path} has no rows)")
        try:
            ds = datasets.load_dataset("json", data_files={split: str(path)}, split=split)
        except Exception as e:  # malformed JSON lines, mixed schemas: name the file
            cause = e.__cause__ or e
            raise HarnessError(f"{path}: not readable as JSON lines ({type(cause).__name__}: "
                               f"{str(cause).splitlines()[0][:200] if str(cause) else ''})") from None
    else:
        try:
            ds = datasets.load_dataset(dataset, config, split=split)
        except Exception as e:  # offline, unknown id, gated...: say which dataset and what to do
            raise HarnessError(
                f"dataset {dataset} ({config or 'default'}/{split}): cannot load from the hub "
                f"({type(e).__name__}); set {MIRROR_ENV} or pass --mirror DIR"
            ) from None
    if len(ds) == 0:
        raise HarnessError(f"dataset {dataset} ({config or 'default'}/{split}): the split is empty")
    return ds


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
