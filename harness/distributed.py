"""Work over several devices, one process a device, under `accelerate launch`: an arm's training
(HF Trainer), or a model's evaluation (lm-eval's own data-parallel path).

    training.distributed: ddp     every device a full copy; gradients all-reduced (LoRA, QLoRA, small full FT)
    training.distributed: fsdp    weights, gradients and optimizer state sharded; a decoder layer is a unit
    profiles.*.eval_processes: N  each rank scores every N-th document; rank 0 gathers them

The job's process writes what the ranks need (the tokenized examples and the arm's settings, or how
to load the model and which tasks to score) to <work dir>/<kind>.job.pkl and runs

    python -m accelerate.commands.launch --multi_gpu --num_processes N -m harness.distributed <kind>.job.pkl

(on CPU, for the tests: `python -m torch.distributed.run --nproc_per_node N`, which is what accelerate runs on
GPUs; accelerate itself starts several CPU processes only through MPI; gloo is the backend there).

Training: every rank enters the run's context and calls `train.run` with the same examples. Trainer,
through accelerate, gives each rank its share of every optimizer step's micro-batches from the one
seeded order, and `train.run` divides the gradient accumulation by the world size, so each step sees
the same examples as on one device (tests/test_distributed.py checks losses and weights against one
process). Rank 0 saves the arm; its stats come back in <kind>.out.pkl, and the job loads the arm to
evaluate it, as after training on one device.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

from harness import context
from harness import train as training
from harness.config import HarnessError, TaskConfig


def processes(task: TaskConfig, device: str) -> int:
    """How many processes the arm trains with; one line naming the setting where it cannot."""
    t = task.training
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise HarnessError(f"training.distributed={t.distributed}: accelerate is not installed "
                           "(pip install accelerate)") from None
    if device == "cuda":
        import torch

        visible = torch.cuda.device_count()
        n = t.processes or visible
        if n > visible:
            raise HarnessError(f"training.processes={n}: more processes than devices ({visible} GPUs visible)")
        if n < 2:
            raise HarnessError(f"training.distributed={t.distributed}: needs 2 or more devices, {visible} GPU visible; "
                               "set training.distributed=none")
        return n
    if t.processes is None:
        raise HarnessError(f"training.distributed={t.distributed}: on CPU, give training.processes (processes over gloo)")
    return t.processes


def eval_processes(profile, device: str) -> int:
    """Processes each model is evaluated over (profiles.*.eval_processes); checked in planning."""
    n = profile.eval_processes or 1
    if n > 1 and device == "cuda":
        import torch

        if n > torch.cuda.device_count():
            raise HarnessError(f"profiles.*.eval_processes={n}: more processes than devices "
                               f"({torch.cuda.device_count()} GPUs visible)")
    return n


def check(task: TaskConfig, method: str, profile, device: str, *, where: str = "") -> None:
    """Planning's check of an arm's training.distributed (before any weight loads)."""
    t = task.training
    if t.distributed == "none":
        return
    n = processes(task, device)
    batch = profile.batch_size or t.batch_size
    micro = min(task.methods[method].micro_batch_size, batch)
    if batch % (micro * n):  # each optimizer step: micro x processes x accumulation = the effective batch
        raise HarnessError(f"{where}methods.{method}.micro_batch_size={micro} x {n} processes must divide the "
                           f"effective batch {batch}")
    if t.distributed == "fsdp" and t.eval_at:
        raise HarnessError(f"{where}training.eval_at: snapshots of FSDP-sharded weights are not saved; "
                           "use training.distributed=ddp, or no eval_at")
    if t.distributed == "fsdp" and method == "qlora" and task.quant.get("bnb_4bit_quant_storage") in (None, "uint8"):
        # FSDP shards flat tensors of one dtype: the 4-bit weights must be stored as the compute dtype.
        raise HarnessError(f"{where}training.distributed=fsdp with qlora: set quant.bnb_4bit_quant_storage=bfloat16 "
                           "(FSDP cannot shard uint8-stored 4-bit weights beside bf16 ones)")


def train(method: str, *, task: TaskConfig, profile, model_path: str, examples: list[dict], out_dir: Path,
          device: str, log=print) -> dict:
    """Train the arm in `n` processes; returns rank 0's training stats (the arm is saved as on one device)."""
    n = processes(task, device)
    log(f"{out_dir.name}: training over {n} {'processes (gloo)' if device == 'cpu' else 'GPUs'} "
        f"({task.training.distributed}) through accelerate launch")
    return _launch("train", {"method": method, "task": task, "profile": profile, "model_path": model_path,
                             "examples": examples, "out_dir": str(out_dir)}, out_dir / "distributed", n, device,
                   what=f"{out_dir.name}: distributed training ({task.training.distributed}, {n} processes)")


def evaluate(load: dict, tasks: list, *, n: int, device: str, work: Path, **kw) -> dict:
    """lm-eval over `n` processes, each holding the model `load` describes (models.load_base or
    load_arm keyword arguments): lm-eval's data-parallel path gives each its share of the documents
    and gathers them; returns what evaluate.evaluate returns in one process."""
    return _launch("evaluate", {"load": load, "tasks": tasks, "kw": kw}, work, n, device,
                   what=f"data-parallel evaluation ({n} processes)")


def _launch(kind: str, job: dict, work: Path, n: int, device: str, *, what: str):
    """Run `python -m harness.distributed` in `n` processes on `job`; rank 0's result back."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{kind}.out.pkl"
    out.unlink(missing_ok=True)
    path = work / f"{kind}.job.pkl"
    ctx = context.current()
    if device == "cpu":  # the ranks run where the caller asked, on a machine with GPUs too
        ctx = dataclasses.replace(ctx, device="cpu")
    with open(path, "wb") as fh:
        pickle.dump({"kind": kind, **job, "context": ctx}, fh)
    port = str(_free_port())
    if device == "cuda":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    else:  # accelerate launches several CPU processes only through MPI; torchrun is what it runs on GPUs
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", port]
    cmd += ["-m", "harness.distributed", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":  # each rank its share of the cores, not all of them each
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // n))
        # and none sees a GPU: a rank that took one would load onto cuda:LOCAL_RANK, which on a
        # one-GPU machine does not exist for rank 1 ("invalid device ordinal", seen on an H100).
        env["CUDA_VISIBLE_DEVICES"] = ""
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0 or not out.exists():
        raise HarnessError(f"{what} failed with exit code {rc}; its ranks' output is above")
    with open(out, "rb") as fh:
        result = pickle.load(fh)
    path.unlink()  # the examples or settings: a copy of what the caller holds
    return result


def _free_port() -> int:
    """A port for this launch's rendezvous: jobs of one run may train distributed arms at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(path: str) -> None:
    """One rank of a launch (accelerate or torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)."""
    with open(path, "rb") as fh:
        job = pickle.load(fh)
    with context.use(job["context"]):
        if job["kind"] == "train":
            result = training.run(job["method"], task=job["task"], profile=job["profile"],
                                  model_path=job["model_path"], examples=job["examples"],
                                  out_dir=Path(job["out_dir"])).stats
        else:
            from harness import evaluate as evaluation
            from harness import models

            load = dict(job["load"])
            saved = load.pop("saved", None)
            model = (models.load_arm(load.pop("method"), load.pop("path"), Path(saved), **load) if saved
                     else models.load_base(load.pop("path"), **load))
            tokenizer = models.load_tokenizer(job["load"]["path"])
            result = evaluation.evaluate(model, tokenizer, job["tasks"], **job["kw"])
    if context.world()[0] == 0:
        with open(Path(path).with_name(f"{job['kind']}.out.pkl"), "wb") as fh:
            pickle.dump(result, fh)
    _leave_group()


def _leave_group() -> None:
    """Wait for every rank, then close the process group. A rank that exits with the group still open
    can abort at interpreter exit ("terminate called without an active exception", SIGABRT: seen once
    in a full test run, over gloo on CPU), which fails the whole launch after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
