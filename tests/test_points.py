"""Points of an arm on the tiny Llama: weight interpolation toward the start (exact at both ends),
snapshots part-way through training (forgetting curves), their records, report and resume."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from harness import models, points, train
from harness.cli import cli
from harness.config import load_task
from harness.io import read_samples


@pytest.mark.parametrize("method", ["full", "lora"])
def test_interpolation_is_the_start_at_0_and_the_arm_at_1(method, tmp_path, tiny_model, tiny_task, mirror):
    task = load_task(str(tiny_task), ["training.cuda_graphs=false"])
    tok = models.load_tokenizer(str(tiny_model))
    examples, _ = train.training_examples(task, task.profiles["quick"], tok, mirror=mirror)
    result = train.run(method, task=task, profile=task.profiles["quick"], model_path=str(tiny_model),
                       examples=examples, out_dir=tmp_path / method)
    model = result.model
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = models.load_base(str(tiny_model))
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]], device=model.device)  # on the GPU where training put it
    with torch.no_grad():
        base_logits, arm_logits = base(ids).logits, model(ids).logits
    interp = points.Interpolation(model, method, str(tiny_model))
    interp.set(0.5)
    with torch.no_grad():
        half = model(ids).logits
        interp.set(0.0)
        start = model(ids).logits
        interp.set(1.0)
        end = model(ids).logits
    assert torch.equal(start, base_logits)  # the base, bit for bit
    assert torch.equal(end, arm_logits)  # the arm, bit for bit
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    assert not torch.equal(half, start) and not torch.equal(half, end)


def _compare(tmp_path, tiny_model, tiny_task, mirror, *extra):
    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "full,lora",
            "--profile", "quick", "--mirror", str(mirror), "--run-id", "p1", "--results-dir", str(tmp_path / "r"),
            "--work-dir", str(tmp_path / "w"), "profiles.quick.perplexity_limit=1", "training.eval_at=[0.5]", *extra]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp_path / "r/finance/p1", result.output


def test_points_are_evaluated_recorded_reported_and_resumed(tmp_path, tiny_model, tiny_task, mirror):
    run_dir, out = _compare(tmp_path, tiny_model, tiny_task, mirror, "mitigation.interpolate=[0, 0.5]")
    config = json.loads((run_dir / "config.json").read_text())
    assert set(config["points"]) == {f"{a}_{p}" for a in ("full", "lora") for p in ("at=0.5", "alpha=0", "alpha=0.5")}
    # alpha 0 is the base: every per-document result equals the base's
    base = read_samples(run_dir / "samples/base.csv")
    for arm in ("full", "lora"):
        start = read_samples(run_dir / f"samples/{arm}_alpha=0.csv")
        for t, recs in base.items():
            assert [r["acc"] for r in start[t] if "acc" in r] == [r["acc"] for r in recs if "acc" in r], (arm, t)
        assert start != read_samples(run_dir / f"samples/{arm}.csv")
    m = json.loads((run_dir / "metrics.json").read_text())
    steps = m["arms"]["full"]["train"]["steps"]
    assert m["arms"]["full"]["train"]["snapshots"] == {"0.5": round(0.5 * steps)}
    assert m["arms"]["full_at=0.5"]["point"] == {"of": "full", "method": "full", "kind": "at", "value": 0.5}
    snap = json.loads((tmp_path / "w/finance/p1/full/at/0.5/harness_arm.json").read_text())
    assert snap["step"] == round(0.5 * steps)
    # a snapshot is not the trained arm: the weights moved after it
    assert read_samples(run_dir / "samples/full_at=0.5.csv") != read_samples(run_dir / "samples/full.csv")
    report = (run_dir / "report.md").read_text()
    assert "## Forgetting curves and interpolation" in report
    assert f"step {round(0.5 * steps)} of {steps} (50%)" in report and "interpolated, α = 0.5" in report
    assert (run_dir / "curves.png").stat().st_size > 0
    assert "full_at=0.5" not in m.get("missing_arms", [])
    # Resume: one more alpha is one more evaluation, no training
    _, out = _compare(tmp_path, tiny_model, tiny_task, mirror, "mitigation.interpolate=[0, 0.5, 0.25]")
    assert "full_alpha=0.25: interpolated, alpha 0.25" in out and "lora_alpha=0.25: interpolated" in out
    assert "full: training (" not in out and "full_alpha=0.5: interpolated" not in out
    assert "full_at=0.5: weights at" not in out  # the snapshot's evaluation is recorded: not redone
    assert (run_dir / "arms/full_alpha=0.25.json").exists()
