"""Never lose a run: SIGKILL the pipeline at several points, resume, and get the uninterrupted result.

The pipeline runs in a subprocess that HARNESS_STOP_AT kills (SIGKILL, as a pre-emption would) at a
named point: between stages, during training (after a Trainer checkpoint), during evaluation, and
while the report is being written (temporary file written, not yet renamed).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.config import PROJECT_ROOT
from harness.models import safetensors_tensors

# Timings, memory, paths, the run's own name, and whether the base came from the baseline cache
# (and so whether its evaluation was measured) differ between two runs of the same inputs; the
# summary is prose over the compared numbers plus those timings.
VOLATILE = ("seconds", "per_second", "peak_", "path", "run_id", "resumed_from_step", "started", "finished",
            "baseline", "resources", "summary")


def _stable(x):
    if isinstance(x, dict):
        return {k: _stable(v) for k, v in x.items() if not any(v_ in k for v_ in VOLATILE)}
    if isinstance(x, list):
        return [_stable(v) for v in x]
    return x


def _same(a, b, where="metrics"):
    """Equal, floats to 1e-9 relative (a resumed arm's mean loss is summed in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)), \
            f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture
def args(tmp_path, tiny_model, tiny_task, mirror, monkeypatch):
    # Each test its own baseline cache: whether the base is evaluated or reused must not depend on
    # which tests ran before (the session-wide scratch cache of conftest._baselines).
    monkeypatch.setenv("HARNESS_BASELINES", str(tmp_path / "baselines"))

    def make(run_id, methods="full,lora"):
        return ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", methods,
                "--profile", "quick", "--mirror", str(mirror), "--run-id", run_id,
                "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"),
                "--device", "cpu",  # bit-for-bit equal runs: CPU's, on a GPU machine too
                "training.save_steps=1"]
    return make


def _killed_at(point: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HARNESS_STOP_AT": point}
    proc = subprocess.run([sys.executable, "-m", "harness", *argv], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"{point}: not killed (rc {proc.returncode})\n{proc.stderr[-3000:]}"
    return proc


def _resumed(run_dir) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "harness", "compare", "--resume", str(run_dir)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # five pipeline runs in subprocesses: minutes on a busy CPU
def test_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, args):
    ref = CliRunner().invoke(cli, args("straight", "full"), catch_exceptions=False)
    assert ref.exit_code == 0, ref.output
    run_dir = tmp_path / "results/finance/killed"
    work = tmp_path / "work/finance/killed"

    _killed_at("recorded:base", args("killed", "full"))  # between stages
    assert (run_dir / "arms/base.json").exists() and not (run_dir / "arms/full.json").exists()

    _killed_at("train:full:2", args("killed", "full"))  # during training, after the step-2 checkpoint
    assert (work / "full/trainer/checkpoint-2/trainer_state.json").exists()
    assert not (work / "full/train.json").exists()

    _killed_at("evaluating:full", args("killed", "full"))  # during evaluation
    assert (work / "full/train.json").exists() and not (run_dir / "arms/full.json").exists()
    trained = json.loads((work / "full/train.json").read_text())
    assert trained["stats"]["resumed_from_step"] == 2  # training went on from the checkpoint, not from scratch

    proc = _killed_at("write:report.md", args("killed", "full"))  # while writing the report
    assert "full: training recorded for these inputs, evaluating the saved" in proc.stderr
    assert not (run_dir / "report.md").exists() and list(run_dir.glob(".report.md.*.tmp"))

    resumed = _resumed(run_dir)
    for line in ("base: evaluation recorded for these inputs, reused",
                 "full: training and evaluation recorded for these inputs, reused"):
        assert line in resumed.stderr

    straight = json.loads((tmp_path / "results/finance/straight/metrics.json").read_text())
    after = json.loads((run_dir / "metrics.json").read_text())
    _same(_stable(after), _stable(straight))

    # Nothing truncated or half-written: every artifact parses, no temporary file is left.
    assert not [p for p in tmp_path.rglob("*.tmp")] and not list(tmp_path.rglob("*.partial"))
    for path in run_dir.rglob("*.json"):
        json.loads(path.read_text())
    for path in run_dir.rglob("*.csv"):
        assert list(csv.DictReader(path.open()))
    for path in work.rglob("*.safetensors"):
        safetensors_tensors(path)
    assert not (work / "full/trainer").exists()  # the spent checkpoint is gone


@pytest.mark.slow  # three pipeline runs in subprocesses per case
@pytest.mark.parametrize("reference,arm", [("base", "full"), ("base-nf4", "qlora")])
def test_a_run_stopped_during_kl_resumes_at_kl(tmp_path, args, monkeypatch, reference, arm):
    """KL comes last; stopped there (the device's call limit did), a run keeps what it evaluated: a
    reference's tasks in the baseline cache, an arm's evaluation in the work directory. The 4-bit base
    has a KL of its own (to the base), measured after its tasks were stored."""
    ref = CliRunner().invoke(cli, args("straight", arm), catch_exceptions=False)
    assert ref.exit_code == 0, ref.output
    monkeypatch.setenv("HARNESS_BASELINES", str(tmp_path / "baselines-killed"))  # references evaluated again
    run_dir = tmp_path / "results/finance/killed"
    kept = tmp_path / f"work/finance/killed/evaluated/{arm}.json"

    _killed_at(f"evaluated:{reference}", args("killed", arm))
    proc = _killed_at(f"evaluated:{arm}", args("killed", arm))
    assert f"{reference}: baseline reused for" in proc.stderr  # stored before the point it was stopped at
    if reference != "base":
        assert f"{reference}: KL(base || {reference})" in proc.stderr  # measured after the stop, not skipped
    assert kept.exists() and not (run_dir / f"arms/{arm}.json").exists()

    resumed = _resumed(run_dir)
    assert f"{arm}: evaluation recorded for these inputs, reused; measuring KL" in resumed.stderr
    assert f"{arm}: evaluating" not in resumed.stderr and f"{arm}: KL(base || {arm})" in resumed.stderr
    assert not kept.exists()  # the arm's record holds it now
    straight = json.loads((tmp_path / "results/finance/straight/metrics.json").read_text())
    _same(_stable(json.loads((run_dir / "metrics.json").read_text())), _stable(straight))


def test_changed_inputs_are_redone_and_failed_arms_reported(tmp_path, args, monkeypatch):
    """A stage whose inputs changed is redone; an arm that runs out of memory is recorded as failed
    with its peak memory while the other arms finish; a truncated record is redone, not taken as done."""
    import torch

    from harness import train

    real_run = train.run

    def oom_for_lora(method, **kw):
        if method == "lora":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(method, **kw)

    monkeypatch.setattr(train, "run", oom_for_lora)
    result = CliRunner().invoke(cli, args("r1"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "results/finance/r1"
    failed = json.loads((run_dir / "arms/lora.json").read_text())
    assert failed["status"] == "failed" and failed["stage"] == "training"
    assert failed["error_type"] == "OutOfMemoryError" and failed["peak_rss_bytes"] > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "lora" in metrics["failed_arms"] and "full" in metrics["comparisons"]
    assert "**lora** failed" in (run_dir / "report.md").read_text()

    # Re-run: the failed arm is retried (now with memory), the finished one reused; a truncated
    # record of the base is redone.
    monkeypatch.setattr(train, "run", real_run)
    base = run_dir / "arms/base.json"
    base.write_text(base.read_text()[:50])
    result = CliRunner().invoke(cli, args("r1"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "full: training and evaluation recorded for these inputs, reused" in result.output
    assert "lora: training (lora)" in result.output
    # Not from its damaged record: from the baseline cache this test's first run filled.
    assert "base: evaluation recorded for these inputs, reused" not in result.output
    assert "base: baseline reused for" in result.output
    assert json.loads(base.read_text())["status"] == "done"

    # Changed inputs: the lora arm's learning rate; lora is redone, full reused.
    result = CliRunner().invoke(cli, [*args("r1"), "methods.lora.learning_rate=1e-2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "full: training and evaluation recorded for these inputs, reused" in result.output
    assert "lora: training (lora)" in result.output
    assert json.loads((run_dir / "arms/lora.json").read_text())["train"]["learning_rate"] == 1e-2
