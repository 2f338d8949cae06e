"""Models at scales nothing here can download: random weights of an architecture (`--model
random:<preset or config.json>`), and jobs no GPU could hold refused before they start."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness import models, parallel
from harness.cli import cli
from harness.config import HarnessError

GiB = 2**30


@pytest.mark.slow  # a compare on the tiny architecture
def test_a_compare_on_random_weights_says_so(tmp_path, tiny_model, tiny_task, mirror, monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_MODEL", str(tiny_model))  # the tokenizer it borrows
    args = ["compare", "--task", str(tiny_task), "--model", "random:tiny-llama", "--methods", "lora",
            "--profile", "quick", "--mirror", str(mirror), "--run-id", "rnd", "--results-dir", str(tmp_path / "r"),
            "--work-dir", str(tmp_path / "w")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "r" / "finance" / "rnd"
    model = json.loads((run_dir / "config.json").read_text())["model"]
    assert model["source"] == "random" and "RANDOM WEIGHTS (seed 0) of tiny-llama" in model["detail"]
    cfg = json.loads((models.Path(model["path"]) / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (128, 2, 2048)  # the preset's
    assert "**Random weights: speed and memory only, scores meaningless.**" in (run_dir / "report.md").read_text()
    # Built once: a second resolution reuses the saved weights.
    again = models.resolve_model("random:tiny-llama")
    assert again.path == model["path"] and again.source == "random"


def test_random_weights_of_an_unknown_architecture_are_one_line(tmp_path):
    with pytest.raises(HarnessError, match="--model random: llama-9z: unknown preset; valid: llama-2-7b"):
        models.resolve_model("random:llama-9z")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HarnessError, match="not a transformers config"):
        models.resolve_model(f"random:{tmp_path / 'config.json'}")


def test_a_job_no_gpu_can_hold_is_refused_with_the_figure():
    n = 8_030_000_000  # Llama 3.1 8B
    needs = {"lora": parallel.job_memory("lora", n), "full": parallel.job_memory("full", n)}
    with pytest.raises(HarnessError) as e:
        parallel.check_fits(needs, [80 * GiB, 80 * GiB], n_params=n)
    assert str(e.value).startswith("full: needs about 139 GiB of GPU memory by the harness's estimate (8.03 B parameters), "
                                   "more than the largest GPU here (80 GiB)")
    parallel.check_fits(needs, [140 * GiB], n_params=n)  # an H200 holds it
    # Where 8-bit moments would fit, the refusal names that first (here, a 100 GiB card).
    with pytest.raises(HarnessError) as e:
        parallel.check_fits(needs, [100 * GiB], n_params=n,
                            eight_bit={"full": parallel.job_memory("full", n, optim="adamw_bnb_8bit")})
    assert str(e.value).endswith("(100 GiB); training.optim=adamw_bnb_8bit (AdamW's moments in 8 bits) needs "
                                 "about 94 GiB and fits; or use lora or qlora, training.distributed=fsdp over "
                                 "several GPUs, or a smaller model")
    with pytest.raises(HarnessError) as e:  # and not where it would not
        parallel.check_fits(needs, [80 * GiB], n_params=n,
                            eight_bit={"full": parallel.job_memory("full", n, optim="adamw_bnb_8bit")})
    assert "adamw_bnb_8bit" not in str(e.value)
    # AdamW's moments in 8 bits (training.optim=adamw_bnb_8bit): 12 bytes a parameter instead of 18.
    eight_bit = parallel.job_memory("full", n, optim="adamw_bnb_8bit")
    assert 93 * GiB < eight_bit < 94 * GiB
    # An arm's KL(base || arm) loads the fp32 base beside it: LoRA's evaluation then needs two copies.
    assert parallel.job_memory("lora", n, kl=True) - parallel.job_memory("lora", n) == 4 * n
    parallel.check_fits(needs, [], n_params=n)  # CPU: host memory is not estimated


def test_the_fit_check_runs_in_planning_before_any_weight_loads(tmp_path, tiny_model, tiny_task, mirror, monkeypatch):
    monkeypatch.setattr(models, "device_kind", lambda: "cuda")
    monkeypatch.setattr(parallel, "gpu_totals", lambda: [0.5 * GiB])
    loaded = []
    monkeypatch.setattr(models, "load_base", lambda *a, **k: loaded.append(a))
    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "full", "--profile", "quick",
            "--mirror", str(mirror), "--run-id", "fit", "--results-dir", str(tmp_path / "r"), "--work-dir",
            str(tmp_path / "w")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    error = result.output.strip().splitlines()[-1]  # (after the progress bars of reading the data)
    assert error.startswith("Error: full: needs about ") and "more than the largest GPU here (0 GiB)" in error
    assert not loaded and not (tmp_path / "r" / "finance" / "fit" / "arms").exists()
