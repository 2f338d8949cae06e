"""harness profile on the tiny-llama preset (random weights, CPU, a few seconds)."""

from __future__ import annotations

import json

import pytest

from conftest import ON_CPU
from harness import context, models, profile
from harness.config import HarnessError

RANK = 4
TARGETS = ["q_proj", "v_proj"]


def _expected_counts() -> tuple[int, int]:
    """Full and LoRA parameter counts, by hand from the preset (untied Llama, no biases)."""
    c = profile.PRESETS["tiny-llama"]
    h, i, n_layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = h * h + h * kv + h * kv + h * h + 3 * h * i + 2 * h  # q k v o, gate up down, two RMSNorms
    full = v * h + n_layers * per_layer + h + v * h  # embeddings, layers, final norm, lm_head
    lora = n_layers * (RANK * (h + h) + RANK * (h + kv))  # r*(in+out) for q_proj (h->h) and v_proj (h->kv)
    return full, lora


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        with context.use(ON_CPU):  # the figures below are CPU's, on a GPU machine too
            result = profile.run(arch="tiny-llama", methods=["full", "lora", "qlora"], batch=2, seq=32, rank=RANK,
                                 targets=TARGETS, steps=2, out_dir=out, save_dir=out / "work")
    return result, out


def test_parameter_counts_exact(profiled):
    result, _ = profiled
    full, lora = _expected_counts()
    rows = {r["method"]: r for r in result["rows"]}
    assert [r["method"] for r in result["rows"]] == ["full", "lora", "qlora"]
    assert all(r["failed"] is None for r in rows.values())
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"] == full
    for m in ("lora", "qlora"):
        assert rows[m]["trainable_params"] == lora
        assert rows[m]["total_params"] == full + lora  # 4-bit weights counted unpacked
        assert rows[m]["estimate"]["trainable_params"] == lora
    assert result["config"]["params"] == full


def test_row_measurements(profiled):
    result, out = profiled
    rows = {r["method"]: r for r in result["rows"]}
    # base_4bit is harness.models.is_4bit on the model the steps ran on
    assert rows["qlora"]["base_4bit"] is True and rows["lora"]["base_4bit"] is False
    assert "nf4 (packed uint8)" in rows["qlora"]["param_bytes_by_dtype"]
    _, lora = _expected_counts()
    for m in ("lora", "qlora"):
        saved = out / "work" / f"{m}-adapter" / "adapter_model.safetensors"
        assert rows[m]["adapter_bytes"] == saved.stat().st_size
        assert lora * 4 <= rows[m]["adapter_bytes"] < lora * 4 + 16_384  # fp32 tensors + safetensors header
        assert rows[m]["saved_dtype"] == "float32"
    assert rows["full"]["checkpoint_bytes"] == (out / "work" / "full-model" / "model.safetensors").stat().st_size
    for r in rows.values():
        assert r["peak_rss_bytes"] > 0 and r["rss_before_steps_bytes"] > 0 and r["rss_delta_bytes"] >= 0
        assert r["peak_rss_bytes"] >= r["rss_before_steps_bytes"] - 2**20  # pages may be returned between reads
        assert r["tokens_per_second"] > 0 and len(r["losses"]) == 2
        e = r["estimate"]
        for k in ("weights", "grads", "optimizer", "activations", "total"):
            assert e[k] > 0, (r["method"], k)
        assert e["master"] == 0  # no autocast on CPU: the fp32 copy is the weights themselves
    # precision "bf16" (the default): full fine-tuning trains bf16 weights (2 B), gradients (2 B) and AdamW's
    # two moments (2 x 2 B); peft keeps adapters in fp32 (4 B, 4 B, 2 x 4 B) over a bf16 base.
    full, lora = _expected_counts()
    assert (rows["full"]["estimate"]["weights"], rows["full"]["estimate"]["grads"],
            rows["full"]["estimate"]["optimizer"]) == (2 * full, 2 * full, 4 * full)
    for m in ("lora", "qlora"):
        assert (rows[m]["estimate"]["grads"], rows[m]["estimate"]["optimizer"]) == (4 * lora, 8 * lora)
    assert rows["lora"]["estimate"]["weights"] == 2 * full + 4 * lora
    # The NF4 base is smaller than the bf16 one, and full FT carries far more optimizer state.
    assert rows["qlora"]["estimate"]["weights"] < rows["lora"]["estimate"]["weights"]
    assert rows["full"]["estimate"]["optimizer"] > 100 * rows["lora"]["estimate"]["optimizer"]


def test_files_written(profiled):
    result, out = profiled
    assert json.loads((out / "profile.json").read_text()) == json.loads(json.dumps(result))
    md = (out / "profile.md").read_text()
    assert "harness profile --arch tiny-llama --methods full,lora,qlora" in md
    assert "GPU memory required" in md and "~40 GB" in md and "~12 GB" in md
    assert md.count("| GPU memory required |") == 3


def test_oom_in_one_method_does_not_stop_the_others(monkeypatch):
    import torch

    real = models.build_model

    def build(method, *a, **kw):
        if method == "full":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(method, *a, **kw)

    monkeypatch.setattr(models, "build_model", build)
    result = profile.run(arch="tiny-llama", methods=["full", "lora"], batch=1, seq=8, rank=2, targets=["q_proj"],
                         steps=1, out_dir=None)
    full, lora = result["rows"]
    assert full["failed"].startswith("OutOfMemoryError") and full["peak_rss_bytes"] > 0
    assert lora["failed"] is None and lora["tokens_per_second"] > 0
    assert "failed" in profile.render_md(result)


def test_bad_preset_lists_valid_ones():
    with pytest.raises(HarnessError) as e:
        profile.run(arch="llama-9-70b", methods=["lora"], batch=1, seq=8, rank=4, targets=TARGETS)
    msg = str(e.value)
    assert "llama-9-70b" in msg and "\n" not in msg
    assert all(name in msg for name in ("llama-2-7b", "llama-2-13b", "smollm2-135m", "tiny-llama"))


@pytest.mark.parametrize("kw, named", [
    ({"methods": ["full", "dora"]}, "dora"),
    ({"batch": 0}, "--batch 0"),
    ({"seq": -1}, "--seq -1"),
    ({"rank": 0}, "--rank 0"),
    ({"arch": "/nonexistent/config.json"}, "/nonexistent/config.json"),
    ({"targets": ["qkv_proj"]}, "qkv_proj"),
    ({"optimizer": "sgd"}, "sgd"),
])
def test_bad_input_is_one_line(kw, named):
    args = dict(arch="tiny-llama", methods=["lora"], batch=1, seq=8, rank=4, targets=TARGETS)
    with pytest.raises(HarnessError) as e:
        profile.run(**{**args, **kw})
    assert named in str(e.value) and "\n" not in str(e.value)


def test_cli_profiles_the_tiny_preset(tmp_path):
    from click.testing import CliRunner

    from harness.cli import cli

    result = CliRunner().invoke(cli, ["profile", "--arch", "tiny-llama", "--methods", "lora", "--batch", "1", "--seq",
                                      "16", "--rank", "2", "--steps", "2", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "profile.json").read_text())["rows"][0]
    assert row["failed"] is None and row["peak_rss_bytes"] > 0 and row["rss_source"]
    assert row["saved_dtype"] == "float32" and row["model_footprint_bytes"] > 0
