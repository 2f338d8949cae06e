"""Sweeps: grid expansion, and one trained and evaluated arm per grid point on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.config import HarnessError
from harness.stats import pareto_front
from harness.sweep import arms_from_grid, parse_grid


def test_grid_crosses_only_the_keys_a_method_uses():
    arms = arms_from_grid(["full", "qlora"], parse_grid(["lora.r=8,16", "methods.qlora.learning_rate=1e-4,2e-4"]))
    names = [a.name for a in arms]
    assert names == ["full", "qlora_r=8_learning_rate=1e-4", "qlora_r=8_learning_rate=2e-4",
                     "qlora_r=16_learning_rate=1e-4", "qlora_r=16_learning_rate=2e-4"]
    assert arms[1].overrides == ("lora.r=8", "methods.qlora.learning_rate=1e-4")
    # The pull toward the base weights is full fine-tuning's; freezing layers applies to every method.
    arms = arms_from_grid(["full", "qlora"], parse_grid(["mitigation.l2_to_base=0,1", "mitigation.freeze_layers=0,1"]))
    assert [a.name for a in arms] == ["full_l2_to_base=0_freeze_layers=0", "full_l2_to_base=0_freeze_layers=1",
                                      "full_l2_to_base=1_freeze_layers=0", "full_l2_to_base=1_freeze_layers=1",
                                      "qlora_freeze_layers=0", "qlora_freeze_layers=1"]


@pytest.mark.parametrize("items, message", [(["lora.r"], "expected key.path=value1"), (["lora.r="], "no values")])
def test_bad_grid_is_one_line(items, message):
    with pytest.raises(HarnessError, match=message):
        parse_grid(items)


def test_pareto_front():
    pts = [("a", 1.0, -1.0), ("b", 2.0, -2.0), ("c", 0.5, -1.5), ("d", 2.0, -1.0)]
    assert pareto_front(pts) == ["d"]
    assert sorted(pareto_front(pts[:3])) == ["a", "b"]


def test_sweep_one_point_per_grid_cell(tmp_path, tiny_model, tiny_task, mirror):
    args = ["sweep", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "qlora",
            "--grid", "lora.r=2,4", "--profile", "quick", "--mirror", str(mirror), "--run-id", "s1",
            "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"), "profiles.quick.perplexity_limit=1",
            "profiles.quick.quant_reference=false"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "r/finance/s1"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert set(m["comparisons"]) == {"qlora_r=2", "qlora_r=4"}
    r2, r4 = (m["arms"][a]["train"]["trainable_params"] for a in ("qlora_r=2", "qlora_r=4"))
    assert r4 == 2 * r2  # LoRA parameters grow linearly with the rank
    assert (run_dir / "tradeoff.png").stat().st_size > 0
    assert "Learning vs forgetting" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("grid_file", sorted((Path(__file__).parent.parent / "tasks" / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_grid_files_load(grid_file):
    """Every grid file the project ships still expands into arms whose settings the task config accepts (a
    renamed config field breaks them at once, not after a long run has started)."""
    from harness.config import load_task
    from harness.sweep import load_grid_file

    f = load_grid_file(grid_file)
    arms = arms_from_grid(f.methods if f.grid else [], f.grid, f.common, f.arms)
    assert arms
    for arm in arms:
        load_task("finance", list(arm.overrides))
