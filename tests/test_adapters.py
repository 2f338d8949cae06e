"""Adapters as the chapter describes them, on the tiny Llama: exact parameter counts, sizes read from
the files, merging (LoRA, and QLoRA into the 16-bit base) with logit checks, lm-eval loading the merged
model by path, several adapters switched on one loaded base; and resources.measure."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import ON_CPU
from harness import adapters, context, merge, models, resources
from harness.cli import cli
from harness.config import HarnessError, load_task

RANK = 4
LORA = {"r": RANK, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
QUANT = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
         "bnb_4bit_compute_dtype": "bfloat16"}
# Merges and measurements run ON_CPU (the merge command: --device cpu): fp32 logits (a GPU merges in bf16, whose rounding the fp32
# bounds below would not hold), and no GPU figures to record.


def _dims(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    h, i, n_layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return h, i, n_layers, v, kv


def _expected(tiny_model) -> tuple[int, int]:
    """Total (tied embeddings, no biases) and LoRA-on-all-linear counts, by hand: r*(in+out) per module."""
    h, i, n_layers, v, kv = _dims(tiny_model)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q o, k v, gate up down, two RMSNorms
    total = v * h + n_layers * per_layer + h  # embeddings (= lm_head), layers, final norm
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down: (in, out)
    lora = n_layers * sum(RANK * (a + b) for a, b in shapes)
    return total, lora


def _adapter(method: str, tiny_model, out, seed: int):
    """A saved adapter with non-zero lora_B (PEFT initialises B to zero, which would merge to a no-op)."""
    torch.manual_seed(seed)
    model, trainable, total = models.build_model(method, str(tiny_model), lora=LORA, quant=QUANT)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    saved = models.save_arm(model, models.load_tokenizer(str(tiny_model)), out,
                            record={"method": method, "base_model": str(tiny_model),
                                    "quant": QUANT if method == "qlora" else None})
    return model, trainable, total, saved


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model):
    out = tmp_path_factory.mktemp("adapters")
    arms = {}
    for i, method in enumerate(("lora", "qlora")):
        model, trainable, total, saved = _adapter(method, tiny_model, out / method / "adapter", seed=i)
        arms[method] = dict(trainable=trainable, total=total, saved=saved, footprint=resources.footprint_bytes(model))
        del model
    model, trainable, total = models.build_model("full", str(tiny_model), lora=LORA, quant=QUANT)
    saved = models.save_arm(model, models.load_tokenizer(str(tiny_model)), out / "full" / "model")
    arms["full"] = dict(trainable=trainable, total=total, saved=saved, footprint=resources.footprint_bytes(model))
    return out, arms


def test_parameter_counts_exact(built, tiny_model):
    _, arms = built
    total, lora = _expected(tiny_model)
    assert arms["full"]["trainable"] == arms["full"]["total"] == total
    for m in ("lora", "qlora"):
        assert arms[m]["trainable"] == lora
        assert arms[m]["total"] == total + lora  # 4-bit weights counted unpacked


def test_saved_sizes_and_dtypes_match_the_files(built, tiny_model):
    out, arms = built
    total, lora = _expected(tiny_model)
    for m in ("lora", "qlora"):
        f = out / m / "adapter" / "adapter_model.safetensors"
        s = arms[m]["saved"]
        assert s["bytes"] == f.stat().st_size and s["files"] == ["adapter_model.safetensors"]
        assert s["dtype"] == "float32" and s["elements_by_dtype"] == {"float32": lora}
        assert sum(t.numel() for t in load_file(f).values()) == lora
        assert json.loads((out / m / "adapter" / models.ARM_RECORD).read_text())["method"] == m
    f = out / "full" / "model" / "model.safetensors"
    assert arms["full"]["saved"]["bytes"] == f.stat().st_size
    assert arms["full"]["saved"]["elements_by_dtype"] == {"float32": total}  # tied lm_head stored once
    # The 4-bit base takes less memory than the fp32 one it was quantized from.
    assert arms["qlora"]["footprint"] < arms["lora"]["footprint"]


def test_measure_reports_stage_figures():
    with context.use(ON_CPU), resources.measure() as m:
        block = bytearray(64 * 2**20)  # touch 64 MiB: the stage's peak RSS must see it
        block[::4096] = b"x" * len(block[::4096])
    r = m.result
    assert r["seconds"] > 0 and r["peak_rss_bytes"] >= 64 * 2**20
    assert r["peak_gpu_allocated_bytes"] is None and r["nvml_source"] is None  # CPU
    del block


def test_a_cpu_run_on_a_gpu_machine_measures_no_gpu(monkeypatch):
    """--device cpu where torch sees a GPU: the stage's figures are the CPU's, not zeros or another
    process's memory from the idle GPU (torch.cuda is not touched at all)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with context.use(ON_CPU), resources.measure() as m:
        pass
    assert m.result["peak_gpu_allocated_bytes"] is None and m.result["nvml_source"] is None
    assert m.result["start_gpu_allocated_bytes"] is None and m.result["peak_rss_bytes"] > 0


def test_merge_lora_equals_base_plus_adapter(built, tmp_path):
    out, _ = built
    # The command enters the context its options ask for (the caller's does not reach it): fp32 on CPU.
    result = CliRunner().invoke(cli, ["merge", str(out / "lora" / "adapter"), "--out", str(tmp_path / "merged"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "merged" / "merge.json").read_text())
    v = rec["verification"]
    assert v["passed"] and v["max_abs_diff_vs_base_plus_adapter"] < 1e-4 * v["max_abs_logit"]
    assert v["top1_agreement_vs_base_plus_adapter"] == 1.0 and "4bit" not in json.dumps(v)
    assert rec["dtype"] == "float32" and rec["saved"]["dtype"] == "float32"
    assert not (tmp_path / "merged" / "adapter_config.json").exists()  # a plain model: no PEFT needed
    # lm-eval's HF backend loads the merged directory by path, as `lm_eval --model hf` does.
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tmp_path / "merged"), batch_size=1, device="cpu")
    assert lm.model.__class__.__name__ == "LlamaForCausalLM"
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.equal(p.detach(), merged[n]) for n, p in lm.model.named_parameters() if n in merged)


def test_merge_qlora_into_16bit_base_reports_the_quantization_gap(built, tmp_path):
    out, _ = built
    with context.use(ON_CPU):
        rec = merge.run(out / "qlora" / "adapter", tmp_path / "merged")
    v = rec["verification"]
    assert rec["method"] == "qlora" and "unquantized (16-bit) base" in rec["merged_into"]
    assert v["passed"] and v["max_abs_diff_vs_base_plus_adapter"] < 1e-4 * v["max_abs_logit"]
    # NF4 rounds the weights: the merged model is the trained one up to that error, not exactly.
    assert v["max_abs_diff_vs_4bit_base_plus_adapter"] > 10 * v["max_abs_diff_vs_base_plus_adapter"]
    assert v["mean_abs_diff_vs_4bit_base_plus_adapter"] > 0


def test_merge_rejects_a_non_adapter_and_a_tight_tolerance(built, tmp_path, tiny_model):
    out, _ = built
    result = CliRunner().invoke(cli, ["merge", str(tiny_model), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "adapter_config.json" in result.output
    with pytest.raises(HarnessError, match="differ from base \\+ adapter"):
        merge.run(out / "lora" / "adapter", tmp_path / "m2", tolerance=0.0)
    assert not (tmp_path / "m2").exists()  # nothing saved


def test_adapters_of_other_bases_or_of_4bit_and_16bit_bases_are_refused(built, tmp_path, tiny_task, mirror):
    """One line, exit 2, before a weight loads: an adapter is only evaluated on the base it was trained on."""
    import shutil

    out, _ = built
    other = tmp_path / "other" / "adapter"
    shutil.copytree(out / "lora" / "adapter", other)
    record = json.loads((other / models.ARM_RECORD).read_text())
    (other / models.ARM_RECORD).write_text(json.dumps({**record, "base_model": "someone/another-model"}))
    common = ["--task", str(tiny_task), "--profile", "quick", "--mirror", str(mirror), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, ["adapters", str(out / "lora" / "adapter"), str(other), *common])
    assert result.exit_code == 2 and "trained on different bases" in result.output
    assert "someone/another-model" in result.output
    result = CliRunner().invoke(cli, ["adapters", str(out / "lora" / "adapter"), str(out / "qlora" / "adapter"), *common])
    assert result.exit_code == 2 and f"{out / 'qlora' / 'adapter'} trained on the 4-bit base" in result.output
    assert not (tmp_path / "o").exists()


def test_adapters_switch_on_one_base_equals_fresh_loads(built, tmp_path, tiny_model, tiny_task, mirror):
    out, _ = built
    paths = [out / "lora" / "adapter", out / "full"]
    with pytest.raises(HarnessError, match="adapter_config.json"):
        adapters.run(base=None, adapters=paths, task=str(tiny_task), profile="quick", mirror=str(mirror),
                     out=tmp_path)
    # Two LoRA adapters (the second with other weights) on one 16-bit base.
    _adapter("lora", tiny_model, out / "lora2" / "adapter", seed=7)
    paths = [out / "lora" / "adapter", out / "lora2" / "adapter"]
    result = CliRunner().invoke(cli, ["adapters", *map(str, paths), "--task", str(tiny_task), "--profile", "quick",
                                      "--mirror", str(mirror), "--out", str(tmp_path / "sw")])
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "sw" / "adapters.json").read_text())
    assert [a["adapter"] for a in r["adapters"]] == ["lora", "lora2"] and r["base_4bit"] is False
    assert r["base_load_seconds"] > 0 and r["reload_base_and_adapter_seconds"] > 0
    assert all(a["load_ms"] > 0 and a["switch_ms"] >= 0 and a["eval_seconds"] > 0 for a in r["adapters"])
    assert "| lora2 | lora |" in (tmp_path / "sw" / "adapters.md").read_text()
    # The adapter switched to (evaluated after the other) scores as base + it loaded afresh.
    from harness import evaluate

    task = load_task(str(tiny_task))
    prof = task.profiles["quick"]
    fresh = models.attach_adapter(models.load_base(str(tiny_model)), str(paths[1])).eval()
    ev = evaluate.evaluate(fresh, models.load_tokenizer(str(tiny_model)), r["tasks"], mirror=mirror,
                           limit=prof.limit, batch_size=prof.eval_batch_size, seed=task.training.seed,
                           backend=prof.eval_backend)
    assert ev["results"] == r["adapters"][1]["results"]
    assert r["adapters"][0]["results"] != r["adapters"][1]["results"]  # the switch took effect
