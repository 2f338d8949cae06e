"""The compare pipeline, top to bottom:

    plan (harness/planning.py) -> jobs: the references (harness/references.py) and each arm
    (harness/arms.py) -> run the jobs, at once where the device allows (harness/parallel.py)
    -> paired statistics and the report (harness/report.py)

    harness compare --task finance --methods full,qlora --profile quick

Stages exchange data only through files of the run directory (results/<task>/<run-id>/), written
and read by harness/records.py: the run's config.json, one JSON per evaluated model with its
per-document records beside it, then the report. Weights go to the git-ignored work directory
(work/<task>/<run-id>/<arm>/). A job whose record exists for the same inputs is not redone, so
re-running a run id picks up where it stopped.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from harness import arms as arm_stage
from harness import context, models, parallel, references, report
from harness.io import log
from harness.planning import RESUMABLE, Arm, CompareSpec, Run, prepare

__all__ = ["RESUMABLE", "Arm", "CompareSpec", "compare", "run_job"]


def compare(spec: CompareSpec, arms: list[Arm] | None = None) -> Path:
    """Run the whole comparison; returns the run directory (report.md inside). `arms` defaults to one
    arm per method; `harness sweep` passes one per grid point."""
    arms = arms if arms is not None else [Arm(m, m) for m in spec.methods]
    start = time.perf_counter()
    with context.use(spec.context()):
        run = prepare(spec, arms)  # 1. everything checked before a weight loads; config.json
        jobs = [r.name for r in references.of(run)] + [a.name for a in arms]
        _run_jobs(run, jobs)  # 2-5. references, then each arm: trained, evaluated, its points
        run.record.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        run.record.wall_seconds = time.perf_counter() - start
        run.save()
        out = report.run(run.run_dir)  # 6. paired statistics, tables, plots
    log(f"report: {out}")
    return run.run_dir


def execute(run: Run, name: str) -> None:
    """One job of a run: a reference's evaluation, or an arm (training, evaluation, points)."""
    for ref in references.of(run):
        if ref.name == name:
            return references.evaluate_reference(run, ref)
    arm = next(a for a in run.arms if a.name == name)
    arm_stage.run_arm(run, arm)


def run_job(job: parallel.Job) -> str:
    """In a job's own process (harness/parallel.py): that job alone, in the run's context. A
    HarnessError comes back to the parent as itself."""
    with context.use(job.spec.context()):
        run = prepare(job.spec, list(job.arms), child=True, only=(job.name,))
        execute(run, job.name)
    return job.name


def spans_devices(run: Run) -> bool:
    """Some job of the run uses several devices itself (harness/distributed.py)."""
    return ((run.plan.profile.eval_processes or 1) > 1
            or any(t.training.distributed != "none" for t in run.plan.arm_tasks.values()))


def _run_jobs(run: Run, names: list[str]) -> None:
    """What is left to compute, several at once where `--jobs` and the device allow (longest first);
    the rest (and everything, when one at a time) in this process, references first."""
    pending = [a for a in sorted(run.arms, key=lambda a: ("qlora", "lora", "full").index(a.method))
               if arm_stage.pending(run, a)]
    pending_refs = [r for r in references.of(run) if not run.done(r.name, r.inputs) and not references.cached(run, r)]
    needs = [run.needs[a.name] for a in pending] + [run.needs["base"] for _ in pending_refs]
    device = models.device_kind()
    n = parallel.concurrency(run.spec.jobs, needs=needs, device=device)
    if n > 1 and spans_devices(run):  # a job placed on one GPU would hide the others from its launch
        log("jobs run one at a time: an arm trains or a model is evaluated over several devices "
            "(training.distributed, profiles.*.eval_processes), each with every device")
        n = 1
    in_jobs = []
    if n > 1 and len(needs) > 1:
        in_jobs = [a.name for a in pending] + [r.name for r in pending_refs]
        run.record.jobs = min(n, len(in_jobs))
        run.save()
        log(f"{len(in_jobs)} jobs, {run.record.jobs} at once: {', '.join(in_jobs)}")
        gpus = parallel.gpu_capacity() if device == "cuda" else None
        auto = parallel.parse_jobs(run.spec.jobs) is None
        placer = parallel.Placer(gpus if auto else None, limit=n, devices=len(gpus or [0]))
        jobs = parallel.Jobs(run.spec, run.arms, in_jobs, n, run.plan.work_dir / "jobs", log, runner=run_job,
                             needs=dict(zip(in_jobs, needs, strict=True)), placer=placer).start()
        if pending and arm_stage.trained_stats(run.plan.work_dir / pending[0].name,
                                               run.arm_inputs(pending[0])) is None:
            arm_stage.training_data(run, pending[0], mix=False)  # for config.json, while the jobs run
        jobs.wait()
    for name in names:
        if name not in in_jobs:
            execute(run, name)
