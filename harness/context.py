"""What a run may do, carried by the run rather than set on modules.

    with context.use(RunContext.checked(device="cpu", trust_remote_code=False)):
        ...  # models.load_base, evaluate.task_manager, ... read context.current()

A run enters its context for as long as it works and leaves it on the way out, so `harness adapters`,
`harness merge` and the tests never inherit what the last run allowed: outside a `use` block the
safe defaults apply (no remote code, no pickled weights, tasks only from tasks/). The value lives in
a `contextvars.ContextVar`, which is per thread and per process: a job's process (harness/parallel.py)
enters the context its Job carries.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path

from harness.config import HarnessError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunContext:
    """Loading and task-source choices from the command line (safe by default)."""

    device: str = "auto"  # auto | cpu | cuda
    trust_remote_code: bool = False  # run a model repository's own Python code
    allow_pickle: bool = False  # accept .bin/.pt weights (torch.load can execute code)
    include_paths: tuple[str, ...] = ()  # lm-eval task directories besides tasks/, resolved (their hooks run code)

    @classmethod
    def checked(cls, *, device: str = "auto", trust_remote_code: bool = False, allow_pickle: bool = False,
                include_paths=()) -> RunContext:
        """A context from command-line values, each checked: one line naming the option otherwise."""
        if device not in DEVICES:
            raise HarnessError(f"--device {device}: valid: {', '.join(DEVICES)}")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise HarnessError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is "
                                   "False); use --device cpu or auto")
        resolved = []
        for p in include_paths:
            d = Path(p).expanduser()
            if not d.is_dir():
                raise HarnessError(f"--include-path {p}: not a directory")
            resolved.append(str(d.resolve()))
        return cls(device, bool(trust_remote_code), bool(allow_pickle), tuple(resolved))

    def device_kind(self) -> str:
        """cpu or cuda: the device this context runs on."""
        if self.device == "cpu":
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


_CURRENT: contextvars.ContextVar[RunContext] = contextvars.ContextVar("harness_run_context", default=RunContext())


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a launch of several processes
    (harness/distributed.py; accelerate or torchrun set RANK and WORLD_SIZE)."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def current() -> RunContext:
    return _CURRENT.get()


@contextlib.contextmanager
def use(ctx: RunContext):
    """`ctx` for the block; the previous context again after it, however the block ends."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
