"""A compare's jobs at once on one GPU: each reference evaluation and each arm (train, then evaluate)
in its own process.

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
    gains nothing); on a GPU, as many as fit in 85% of its free memory by `job_memory`, at most one
    per two CPU cores (each job is one busy Python thread plus tokenizer threads)."""
    n = parse_jobs(requested)
    if n is not None:
        return n
    if device != "cuda" or len(needs) < 2:
        return 1
    import torch

    free, _ = torch.cuda.mem_get_info()
    n, used = 0, 0
    for need in sorted(needs, reverse=True):  # the largest first: the worst case that must fit
        if used + need > 0.85 * free:
            break
        n, used = n + 1, used + need
    return max(1, min(n, (os.cpu_count() or 2) // 2))


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

    def __init__(self, spec, arms, names: list[str], n: int, log_dir: Path, log):
        self.spec, self.arms, self.queue, self.n = spec, arms, list(names), n
        self.log_dir, self.log = Path(log_dir), log
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.running: list[_Job] = []
        self.failed: list[str] = []
        self.total = len(names)
        self.finished = 0
        self._lock = threading.Lock()

    def start(self) -> Jobs:
        while self.queue and len(self.running) < self.n:
            self._launch(self.queue.pop(0))
        return self

    def _launch(self, name: str) -> None:
        spec = dataclasses.replace(self.spec, only=(name,))
        payload = {"spec": {k: _plain(v) for k, v in dataclasses.asdict(spec).items()},
                   "arms": [dataclasses.asdict(a) for a in self.arms]}
        job_file = self.log_dir / f"{name}.json"
        job_file.write_text(json.dumps(payload))
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // self.n)),  # a user's setting wins
               **os.environ, SHARED_DEVICE_ENV: "1", "HARNESS_JOB": name}
        log = self.log_dir / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "harness.parallel", str(job_file)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        job = _Job(name, proc, log, time.perf_counter())
        job.reader = threading.Thread(target=self._relay, args=(job,), daemon=True)
        job.reader.start()
        self.running.append(job)
        self.log(f"job {name}: started (pid {proc.pid}; {len(self.running)} running; log {log})")

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
