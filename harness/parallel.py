"""A compare's jobs at once on one or several GPUs: each reference evaluation and each arm (train,
then evaluate) in its own process; with several GPUs, each job on the one `Placer` picks.

    harness compare --task finance --jobs auto      (the default: at once on a GPU when memory allows)
    harness compare --task finance --jobs 1         (one after the other: each stage's time in isolation)

On a small model the GPU idles through most of a job: a QLoRA step of SmolLM2-135M on an H200 is
~430 ms of Python and kernel launches over 210 wrapped 4-bit layers. Jobs in separate processes
overlap almost perfectly, so the wall time becomes the longest job's instead of the sum. They share
nothing but files: each child runs `pipeline.compare` restricted to its job (`CompareSpec.only`) and
writes the same records a sequential run writes; the parent waits, then writes the report. Times
measured while jobs share the device include their contention: the report says so. Each job's peak
memory is its own process's (torch's allocator); the device-wide NVML figure is not sampled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness.config import HarnessError

SHARED_DEVICE_ENV = "HARNESS_SHARED_DEVICE"  # set in each child: resources.measure skips NVML
PATH_FIELDS = ("results_dir", "work_dir", "baselines_dir")
GiB = 2**30


def job_memory(kind: str, n_params: int) -> int:
    """Rough peak GPU bytes of one job on a model of `n_params`: the larger of its training and its
    evaluation. Evaluation: fp32 weights plus the harness's 8 GiB scoring budget (fastlm) and slack.
    Training: full fine-tuning holds fp32 weights, gradients and two AdamW moments (16 bytes per
    parameter); adapters train over a frozen fp32 (lora) or 4-bit (qlora) base. Activations: a few GiB."""
    evaluation = 4 * n_params + 9 * GiB
    training = {"full": 16 * n_params + 4 * GiB, "lora": 4 * n_params + 4 * GiB,
                "qlora": n_params + 4 * GiB}.get(kind, 0)
    return max(evaluation, training)


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
    gains nothing); on GPUs, as many as fit at once by `job_memory` in 85% of each GPU's free memory
    (placed as `Placer` places them), at most one per two CPU cores (each job is one busy Python
    thread plus tokenizer threads)."""
    n = parse_jobs(requested)
    if n is not None:
        return n
    if device != "cuda" or len(needs) < 2:
        return 1
    placer = Placer(gpu_capacity(), limit=max(1, (os.cpu_count() or 2) // 2))
    fitted = 0
    for i, need in enumerate(sorted(needs, reverse=True)):  # the largest first: the worst case that must fit
        if placer.device_for(need) is None:
            break
        placer.take(str(i), placer.device_for(need), need)
        fitted += 1
    return max(1, fitted)


def gpu_capacity() -> list[float]:
    """Bytes each visible GPU offers the jobs: 85% of its free memory now."""
    import torch

    return [0.85 * torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


class Placer:
    """Which GPU a job runs on. Each GPU holds jobs while their `job_memory` estimates fit in its
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


@dataclasses.dataclass
class _Job:
    name: str
    proc: subprocess.Popen
    log: Path
    start: float
    last_error: str = ""
    reader: threading.Thread | None = None


class Jobs:
    """Child processes, `n` at a time, in the order given (put the longest first)."""

    def __init__(self, spec, arms, names: list[str], n: int, log_dir: Path, log, *,
                 needs: dict[str, float] | None = None, placer: Placer | None = None):
        self.spec, self.arms, self.queue, self.n = spec, arms, list(names), n
        self.needs = needs or {}
        self.placer = placer or Placer(None, limit=n)  # one device, n at a time
        self.log_dir, self.log = Path(log_dir), log
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.running: list[_Job] = []
        self.failed: list[str] = []
        self.total = len(names)
        self.finished = 0
        self._lock = threading.Lock()

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
        spec = dataclasses.replace(self.spec, only=(name,))
        payload = {"spec": {k: _plain(v) for k, v in dataclasses.asdict(spec).items()},
                   "arms": [dataclasses.asdict(a) for a in self.arms]}
        job_file = self.log_dir / f"{name}.json"
        job_file.write_text(json.dumps(payload))
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // self.n)),  # a user's setting wins
               **os.environ, SHARED_DEVICE_ENV: "1", "HARNESS_JOB": name}
        if len(self.placer.used) > 1:  # several GPUs: this job sees only its own
            env["CUDA_VISIBLE_DEVICES"] = visible_device(device)
        log = self.log_dir / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "harness.parallel", str(job_file)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        job = _Job(name, proc, log, time.perf_counter())
        job.reader = threading.Thread(target=self._relay, args=(job,), daemon=True)
        job.reader.start()
        self.running.append(job)
        where = f"GPU {device}; " if len(self.placer.used) > 1 else ""
        self.log(f"job {name}: started (pid {proc.pid}; {where}{len(self.running)} running; log {log})")

    def _relay(self, job: _Job) -> None:
        """Every line to the job's log (progress bars included: `tail -f` it); the harness's own stage
        lines on to this terminal."""
        with open(job.log, "w") as fh:
            for line in job.proc.stdout:
                fh.write(line)
                fh.flush()
                text = line.rstrip()
                if text.startswith("[harness"):
                    with self._lock:
                        print(text, file=sys.stderr, flush=True)
                elif text.startswith(("Error:", "harness: error")) or "Error" in text.split(":")[0]:
                    job.last_error = text

    def wait(self) -> None:
        """Until every job ends; then one error naming the jobs that failed (the others' records stand)."""
        try:
            while self.running:
                time.sleep(0.5)
                for job in [j for j in self.running if j.proc.poll() is not None]:
                    job.reader.join()
                    self.running.remove(job)
                    self.placer.release(job.name)
                    self.finished += 1
                    rc, took = job.proc.returncode, time.perf_counter() - job.start
                    if rc:
                        self.failed.append(f"{job.name} (exit {rc}: {job.last_error or 'see ' + str(job.log)})")
                    self.log(f"job {job.name}: {'FAILED' if rc else 'done'} in {took:.0f}s "
                             f"({self.finished} of {self.total})")
                    self.start()
        finally:
            for job in self.running:  # interrupted: stop the children too
                job.proc.terminate()
        if self.failed:
            raise HarnessError(f"jobs failed: {'; '.join(self.failed)}; finished jobs are kept, re-run the same "
                               "--run-id to redo the others")


def _plain(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def main(job_file: str) -> int:
    """A child: run one job of a compare (see Jobs._launch)."""
    from harness.pipeline import Arm, CompareSpec, compare

    payload = json.loads(Path(job_file).read_text())
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["spec"].items()}
    kw.update({k: Path(kw[k]) for k in PATH_FIELDS})
    arms = [Arm(a["name"], a["method"], tuple(a["overrides"])) for a in payload["arms"]]
    try:
        compare(CompareSpec(**kw), arms)
    except HarnessError as e:
        print(f"Error: {e}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main(sys.argv[1]))
