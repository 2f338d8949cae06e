"""A compare's jobs at once on one or several GPUs: each reference evaluation and each arm (train,
then evaluate) in its own process; with several GPUs, each job on the one `Placer` picks.

    harness compare --task finance --jobs auto      (the default: at once on a GPU when memory allows)
    harness compare --task finance --jobs 1         (one after the other: each stage's time in isolation)

On a small model the GPU idles through most of a job: a QLoRA step of SmolLM2-135M on an H200 is
~430 ms of Python and kernel launches over 210 wrapped 4-bit layers. Jobs in separate processes
overlap almost perfectly, so the wall time becomes the longest job's instead of the sum. They share
nothing but files: each child runs `pipeline.run_job` (plan the run, then do its one job) and
writes the same records a sequential run writes; the parent waits, then writes the report. Times
measured while jobs share the device include their contention: the report says so. Each job's peak
memory is its own process's (torch's allocator); the device-wide NVML figure is not sampled.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from harness.config import HarnessError

SHARED_DEVICE_ENV = "HARNESS_SHARED_DEVICE"  # set in each child: resources.measure skips NVML
GiB = 2**30


def check_fits(needs: dict[str, float], totals: list[float], *, n_params: int,
               alternatives: dict[str, list[tuple[str, float]]] | None = None) -> None:
    """Refuse, before anything starts, a job whose estimate (harness/memory.py) exceeds every GPU's whole
    memory: it would not fit, whatever else runs. `alternatives`: per job, settings that would shrink it
    and their estimates, in the order to suggest them; the first that fits is named in the refusal."""
    if not totals:
        return
    largest = max(totals)
    for name, need in needs.items():
        if need > largest:
            fits = [(setting, alt) for setting, alt in (alternatives or {}).get(name, []) if alt <= largest]
            fix = "".join(f"{setting} needs about {alt / GiB:.0f} GiB and fits; or " for setting, alt in fits[:1])
            raise HarnessError(
                f"{name}: needs about {need / GiB:.0f} GiB of GPU memory by the harness's estimate "
                f"({n_params / 1e9:.2f} B parameters), more than the largest GPU here ({largest / GiB:.0f} GiB); "
                f"{fix}use lora or qlora, training.distributed=fsdp over several GPUs, or a smaller model")


def gpu_totals() -> list[float]:
    """Each visible GPU's whole memory, in bytes."""
    import torch

    return [float(torch.cuda.mem_get_info(i)[1]) for i in range(torch.cuda.device_count())]


def parse_jobs(requested: str | int) -> int | None:
    """--jobs as a number, None for auto; one clear error otherwise."""
    if str(requested) == "auto":
        return None
    try:
        n = int(requested)
    except ValueError:
        n = 0
    if n < 1:
        raise HarnessError(f"--jobs: expected a positive number or auto, got {requested!r}")
    return n


def concurrency(requested: str | int, *, needs: list[int], device: str) -> int:
    """How many jobs run at once. An integer is taken as given. `auto`: one on CPU (a 2-core machine
    gains nothing); on GPUs, as many as fit at once by their estimates (harness/memory.py) in 85% of
    each GPU's free memory (placed as `Placer` places them), at most one per two CPU cores (each job is
    one busy Python thread plus tokenizer threads)."""
    n = parse_jobs(requested)
    if n is not None:
        return n
    if device != "cuda" or len(needs) < 2:
        return 1
    placer = Placer(gpu_capacity(), limit=max(1, (os.cpu_count() or 2) // 2))
    fitted = 0
    for i, need in enumerate(sorted(needs, reverse=True)):  # the largest first: the worst case that must fit
        device = placer.device_for(need)
        if device is None:
            break
        placer.take(str(i), device, need)
        fitted += 1
    return max(1, fitted)


def gpu_capacity() -> list[float]:
    """Bytes each visible GPU offers the jobs: 85% of its free memory now."""
    import torch

    return [0.85 * torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


class Placer:
    """Which GPU a job runs on. Each GPU holds jobs while their memory estimates fit in its
    capacity, so small jobs pack several to a GPU and a sweep of large arms gets one GPU each; a job
    larger than any GPU's capacity runs alone on an empty one (the estimate is rough; an
    out-of-memory error then retries the arm with half the micro-batch, as on one device).
    `capacity` None: memory is not the limit (CPU, or --jobs N), jobs go to the least busy device."""

    def __init__(self, capacity: list[float] | None, *, limit: int, devices: int = 1):
        self.capacity = capacity
        self.limit = limit
        self.used = [0.0] * (len(capacity) if capacity is not None else max(1, devices))
        self.count = [0] * len(self.used)
        self.where: dict[str, tuple[int, float]] = {}

    def device_for(self, need: float) -> int | None:
        """The device to start a job of `need` bytes on now, or None (wait for one to finish)."""
        if sum(self.count) >= self.limit:
            return None
        order = sorted(range(len(self.used)), key=lambda d: (self.count[d], self.used[d], d))
        if self.capacity is None:
            return order[0]
        free = {d: self.capacity[d] - self.used[d] for d in order}
        fitting = [d for d in order if free[d] >= need]
        if fitting:
            return max(fitting, key=lambda d: (free[d], -d))  # the roomiest: spreads jobs over the GPUs
        empty = [d for d in order if self.count[d] == 0]
        if empty and need > max(self.capacity):
            return max(empty, key=lambda d: (self.capacity[d], -d))
        return None

    def take(self, name: str, device: int, need: float) -> None:
        self.where[name] = (device, need)
        self.used[device] += need
        self.count[device] += 1

    def release(self, name: str) -> None:
        device, need = self.where.pop(name)
        self.used[device] -= need
        self.count[device] -= 1


def visible_device(index: int) -> str:
    """CUDA_VISIBLE_DEVICES for a child on the parent's GPU `index` (the parent's own list respected)."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent:
        ids = [x.strip() for x in parent.split(",") if x.strip()]
        if index < len(ids):
            return ids[index]
    return str(index)


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of a compare, picklable: the spec restricted to this job (a reference's evaluation, or
    an arm's training and evaluation), the arms, the environment its process starts with, its log."""

    name: str
    spec: object  # planning.CompareSpec of the whole run; the child does the job `name` of it
    arms: tuple
    env: dict
    log: Path


def _child_start(env: dict, log: str) -> None:
    """A job's process, before it imports torch: its environment (its GPU, thread count), and its
    stdout and stderr (progress bars included) into the job's log."""
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)


@dataclasses.dataclass
class _Running:
    job: Job
    pool: object  # the job's own ProcessPoolExecutor (one worker, one task)
    future: object
    start: float
    offset: int = 0  # how far its log has been relayed


class Jobs:
    """Jobs, `n` at a time, in the order given (put the longest first), each in a fresh process of a
    standard executor (`ProcessPoolExecutor`, spawn context, one worker and one task per job: the
    job's GPU is set before CUDA starts, and nothing stays loaded between jobs). Results and errors
    come back as objects; the harness's own stage lines in each log are relayed to this terminal."""

    def __init__(self, spec, arms, names: list[str], n: int, log_dir: Path, log, *, runner: Callable[[Job], str],
                 needs: dict[str, float] | None = None, placer: Placer | None = None):
        # `runner` (pipeline.run_job) is what a child runs: passed in, so this module imports no stage
        # and the import graph has no cycle; it is pickled by reference for the spawned process.
        self.spec, self.arms, self.queue, self.n, self.runner = spec, arms, list(names), n, runner
        self.needs = needs or {}
        self.placer = placer or Placer(None, limit=n)  # one device, n at a time
        self.log_dir, self.log = Path(log_dir), log
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.running: list[_Running] = []
        self.failed: list[str] = []
        self.total = len(names)
        self.finished = 0

    def start(self) -> Jobs:
        """Start queued jobs, in order, while the next one has a device (a job never overtakes an
        earlier one: the longest are queued first)."""
        while self.queue and len(self.running) < self.n:
            need = self.needs.get(self.queue[0], 0.0)
            device = self.placer.device_for(need)
            if device is None:
                break
            name = self.queue.pop(0)
            self.placer.take(name, device, need)
            self._launch(name, device)
        return self

    def _launch(self, name: str, device: int = 0) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 2) // self.n)),
               SHARED_DEVICE_ENV: "1", "HARNESS_JOB": name,
               "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
        if len(self.placer.used) > 1:  # several GPUs: this job sees only its own
            env["CUDA_VISIBLE_DEVICES"] = visible_device(device)
        log = self.log_dir / f"{name}.log"
        job = Job(name, self.spec, tuple(self.arms), env, log)
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_child_start, initargs=(env, str(log)))
        self.running.append(_Running(job, pool, pool.submit(self.runner, job), time.perf_counter()))
        where = f"GPU {device}; " if len(self.placer.used) > 1 else ""
        self.log(f"job {name}: started ({where}{len(self.running)} running; log {log})")

    def _relay(self, r: _Running) -> None:
        """New lines of the job's log: the harness's stage lines on to this terminal."""
        try:
            with open(r.job.log, errors="replace") as fh:
                fh.seek(r.offset)
                text = fh.read()
        except OSError:  # not created yet
            return
        done = text.rfind("\n") + 1
        r.offset += len(text[:done].encode("utf-8", errors="replace"))
        for line in text[:done].splitlines():
            if line.startswith("[harness"):
                print(line, file=sys.stderr, flush=True)

    def wait(self) -> None:
        """Until every job ends; then one error naming the jobs that failed (the others' records stand)."""
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_for

        try:
            while self.running:
                wait_for([r.future for r in self.running], timeout=0.5, return_when=FIRST_COMPLETED)
                for r in list(self.running):
                    self._relay(r)
                    if not r.future.done():
                        continue
                    self.running.remove(r)
                    r.pool.shutdown()
                    self.placer.release(r.job.name)
                    self.finished += 1
                    error = _failure(r)
                    if error:
                        self.failed.append(f"{r.job.name} ({error})")
                    self.log(f"job {r.job.name}: {'FAILED' if error else 'done'} in {time.perf_counter() - r.start:.0f}s "
                             f"({self.finished} of {self.total})")
                    self.start()
        finally:
            for r in self.running:  # interrupted: stop the children too
                _stop(r.pool)
        if self.failed:
            raise HarnessError(f"jobs failed: {'; '.join(self.failed)}; finished jobs are kept, re-run the same "
                               "--run-id to redo the others")


def _failure(r: _Running) -> str:
    """'' for a job that finished; else what went wrong, the traceback (if any) appended to its log."""
    from concurrent.futures.process import BrokenProcessPool

    e = r.future.exception()
    if e is None:
        return ""
    if isinstance(e, HarnessError):
        return str(e)
    if isinstance(e, BrokenProcessPool):
        return f"its process died; see {r.job.log}"
    import traceback

    with open(r.job.log, "a") as fh:
        fh.write("".join(traceback.format_exception(e)))
    return f"{type(e).__name__}: {e}; traceback in {r.job.log}"


def _stop(pool) -> None:
    """Terminate a job's process now. The executor has no public call for it before Python 3.14
    (terminate_workers); its worker table is the one private name used."""
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.terminate()
