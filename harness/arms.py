"""Stages 4 and 5, each arm: train (or reuse the saved arm), evaluate, then each of its points
(snapshots during training, interpolations toward the base: harness/points.py).

Every arm trains on the same examples in the same order (unless its overrides change the data),
through HF Trainer (harness/train.py), is saved to the work directory (work/<task>/<run-id>/<arm>/),
and is evaluated as the references are (harness/scoring.py). What was recorded for the same inputs
is not redone: a killed run picks up where it stopped. An arm that runs out of memory while
training is retried once at half the micro-batch; if it fails again it is recorded as failed and the
run goes on with the others.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
from pathlib import Path

from harness import distributed, models, points, records, replay, resources, scoring, train
from harness.config import TaskConfig, to_dict
from harness.io import log, stop_point
from harness.planning import Arm, Run, input_hash, read_or_none


def pending(run: Run, arm: Arm) -> bool:
    """Anything of this arm left to do: its own evaluation, or a point's."""
    return not run.done(arm.name, run.arm_inputs(arm)) or bool(_pending_points(run, arm))


def run_arm(run: Run, arm: Arm) -> None:
    """Train (or reuse) one arm, evaluate it, then each of its points not yet recorded."""
    inputs = run.arm_inputs(arm)
    todo_points = _pending_points(run, arm)
    arm_done = run.done(arm.name, inputs)
    if arm_done and not todo_points:
        log(f"{arm.name}: training and evaluation recorded for these inputs, reused")
        return
    arm_dir = run.plan.work_dir / arm.name
    quant = run.plan.task.quant
    stage, name = "training", arm.name
    model = point_model = interpolation = None
    try:
        trained = trained_stats(arm_dir, inputs)
        if trained is not None:
            log(f"{arm.name}: training recorded for these inputs, evaluating the saved {trained['saved']['path']}")
            model = models.load_arm(arm.method, run.resolved.path, Path(trained["saved"]["path"]), quant=quant)
        else:
            examples, data = training_data(run, arm)
            model, trained = _train(run, arm, examples, arm_dir, inputs, replayed=data.get("replay"))
        stage = "evaluating"
        if not arm_done:  # (over several processes, each loads the saved arm: profiles.*.eval_processes)
            scoring.evaluate_and_record(run, arm.name, model, inputs, trained, load={
                "method": arm.method, "path": run.resolved.path, "saved": trained["saved"]["path"], "quant": quant})
        for pt in todo_points:
            name = pt.name
            if pt.kind == "at":
                point_model = points.load_snapshot(pt, arm_dir, run.resolved.path, quant=quant)
                log(f"{pt.name}: weights at {pt.value:g} of the steps")
            else:
                interpolation = interpolation or points.Interpolation(model, arm.method, run.resolved.path)
                interpolation.set(pt.value)
                point_model = model
                log(f"{pt.name}: interpolated, alpha {pt.value:g}")
            scoring.evaluate_and_record(run, pt.name, point_model, run.point_inputs(pt, arm), None, point=pt.record())
            point_model = None
            gc.collect()
    except MEMORY_ERRORS as e:
        if not resources.is_out_of_memory(e):
            raise
        failed_inputs = inputs if name == arm.name else run.point_inputs(next(pt for pt in todo_points
                                                                              if pt.name == name), arm)
        scoring.record_failure(run.run_dir, name, failed_inputs, stage, e)
        log(f"{name}: FAILED, out of memory while {stage} "
            f"({str(e).splitlines()[0][:200]}); continuing with the other arms")
    model = point_model = interpolation = None
    gc.collect()
    scoring.free_gpu()


def _pending_points(run: Run, arm: Arm) -> list[points.Point]:
    return [pt for pt in run.points[arm.name] if not run.done(pt.name, run.point_inputs(pt, arm))]


def training_data(run: Run, arm: Arm, mix: bool = True) -> tuple[list, dict]:
    """The arm's tokenized training examples (once per distinct data setting) and their record in
    config.json; with `mix`, the arm's replay examples mixed in (harness/replay.py)."""
    arm_task = run.plan.arm_tasks[arm.name]
    profile = run.plan.profile
    data_key = input_hash([to_dict(arm_task.train), arm_task.training.seed, arm_task.training.max_length,
                           profile.train_examples])
    rep = arm_task.mitigation.replay
    cache = run.examples
    if data_key not in cache:
        tokenizer = models.load_tokenizer(run.resolved.path)
        cache[data_key] = train.training_examples(arm_task, profile, tokenizer, mirror=run.plan.mirror)
        data = cache[data_key][1]
        if run.record is not None:
            run.record.train_data = data
            run.save()
        log(f"training data: {data['examples']} examples, {data['tokens']} tokens")
    if rep is None or not mix:
        return cache[data_key]
    mixed_key = input_hash([data_key, to_dict(rep)])
    if mixed_key not in cache:
        domain, data = cache[data_key]
        extra, rec = replay.examples(rep, len(domain), models.load_tokenizer(run.resolved.path),
                                     seed=arm_task.training.seed, max_length=arm_task.training.max_length,
                                     mirror=run.plan.mirror, model_path=run.resolved.path)
        log(f"replay ({rep.source}): {rec['examples']} examples, {rec['tokens']} tokens mixed into "
            f"{len(domain)} domain examples")
        cache[mixed_key] = (domain + extra, {**data, "replay": rec})
    return cache[mixed_key]


def trained_stats(arm_dir: Path, inputs: str) -> dict | None:
    """The training stats of an arm trained and saved for these inputs (its evaluation still to do)."""
    path = arm_dir / "train.json"
    if not path.exists():
        return None
    record = read_or_none(path, records.read_train)
    if record is None or record.inputs != inputs or not Path(record.stats["saved"]["path"]).is_dir():
        return None
    return record.stats


def _train(run: Run, arm: Arm, examples: list, arm_dir: Path, inputs: str, replayed: dict | None = None):
    """Train one arm (resuming its Trainer checkpoint when one was made for these inputs); on running
    out of memory, retry once with half the micro-batch and twice the accumulation (same effective batch)."""
    arm_task: TaskConfig = run.plan.arm_tasks[arm.name]
    stamp = arm_dir / "inputs.json"
    if (arm_dir / "trainer").exists():
        made_for = read_or_none(stamp, records.read_inputs) if stamp.exists() else None
        if made_for is None or made_for.inputs != inputs:
            log(f"{arm.name}: its checkpoint was made for other inputs; training from scratch")
            shutil.rmtree(arm_dir / "trainer")
            shutil.rmtree(arm_dir / points.SNAPSHOTS, ignore_errors=True)
    records.write(stamp, records.InputsStamp(inputs))
    log(f"{arm.name}: training ({arm.method}{', ' + ' '.join(arm.overrides) if arm.overrides else ''})")
    kw = dict(profile=run.plan.profile, model_path=run.resolved.path, examples=examples, out_dir=arm_dir)
    if arm_task.training.distributed != "none":  # over several devices, in processes of their own
        s = distributed.train(arm.method, task=arm_task, device=models.device_kind(), log=log, **kw)
        model = models.load_arm(arm.method, run.resolved.path, Path(s["saved"]["path"]), quant=run.plan.task.quant)
        return _record_trained(arm, arm_dir, inputs, model, s, retry=None, replayed=replayed)
    retry = None
    try:
        result = train.run(arm.method, task=arm_task, **kw)
    except MEMORY_ERRORS as e:
        micro = arm_task.methods[arm.method].micro_batch_size
        if not resources.is_out_of_memory(e) or micro <= 1:
            raise
        retry = {"error": str(e).splitlines()[0][:300], "micro_batch_size_from": micro,
                 "micro_batch_size_to": micro // 2}
    if retry is not None:
        # Retried outside the except block: there, the exception's traceback still holds the failed
        # attempt's frames (its model, gradients and optimizer state), and the retry would load a
        # second model beside them. At 8B full fine-tuning on an H100 that was 76 GiB: the retry ran
        # out of memory loading the model, before its first step.
        gc.collect()
        scoring.free_gpu()
        half = dataclasses.replace(arm_task.methods[arm.method], micro_batch_size=retry["micro_batch_size_to"])
        arm_task = dataclasses.replace(arm_task, methods={**arm_task.methods, arm.method: half})
        log(f"{arm.name}: out of memory at micro-batch {retry['micro_batch_size_from']}; retrying once at "
            f"{retry['micro_batch_size_to']} with twice the gradient accumulation (same effective batch)")
        shutil.rmtree(arm_dir / "trainer", ignore_errors=True)  # its checkpoints belong to the other micro-batch
        result = train.run(arm.method, task=arm_task, **kw)
    return _record_trained(arm, arm_dir, inputs, result.model, result.stats, retry=retry, replayed=replayed)


def _record_trained(arm: Arm, arm_dir: Path, inputs: str, model, stats: dict, *, retry: dict | None,
                    replayed: dict | None):
    """Record a trained and saved arm (its stats, the out-of-memory retry, the replay mixed in): its
    evaluation may now be redone without retraining."""
    s = {**stats, "oom_retry": retry, **({"replay": replayed} if replayed else {})}
    records.write(arm_dir / "train.json", records.TrainRecord(inputs, s))
    stop_point(f"trained:{arm.name}")
    log(f"{arm.name}: {s['steps']} steps in {s['seconds']:.0f}s, mean loss {s['train_loss']:.4f}, "
        f"{s['trainable_params']:,} trainable ({s['trainable_pct']:.2f}%)")
    return model, s


def _memory_errors() -> tuple:
    import torch

    return (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError, RuntimeError)


MEMORY_ERRORS = _memory_errors()
