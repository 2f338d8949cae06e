"""harness merge ADAPTER_DIR --out DIR [--base MODEL]

Merge a LoRA or QLoRA adapter into its base (PEFT's merge_and_unload) and save an HF-format model
that any HF loader takes (`lm_eval --model hf --model_args pretrained=DIR`), with no PEFT at
inference time. Then verify it: on a fixed batch of token ids, the merged model's logits against the
unmerged base + adapter in the same dtype; the max abs difference is recorded in DIR/merge.json and
the merge fails (nothing saved) above a tolerance for that dtype.

A QLoRA adapter was trained on the NF4 base, but 4-bit weights cannot absorb an adapter exactly:
it is merged into the 16-bit base (dequantized: the original weights, in bf16 on GPU, fp32 on CPU).
The merged model therefore differs from what was trained (4-bit base + adapter) by the quantization
error; both differences are reported: vs the 16-bit base + adapter (~0: the merge itself) and vs the
4-bit base + adapter (the quantization gap).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path

from harness import models
from harness.config import PROJECT_ROOT, HarnessError
from harness.io import write_json
from harness.resources import safetensors_summary

# Max |merged - unmerged| logit allowed, relative to the largest |logit| (at least 1): W x + B(A x)
# and (W + BA) x differ only by rounding. bf16 keeps 8 significant bits (at a logit of 32 one step is
# 0.25) and the merged weights are rounded once more; SmolLM2-135M's QLoRA adapter merged in bf16 on
# CPU differed by 1.0 at a largest logit of 33.5 (0.03), so bf16 allows 0.08.
TOLERANCE = {"float32": 1e-4, "bfloat16": 8e-2, "float16": 2e-2}
BATCH, SEQ = 2, 64  # the verification batch (token ids drawn with a fixed seed)


def _run_record(adapter_dir: Path) -> dict:
    """For an adapter in the work dir (work/<task>/<run>/<arm>/adapter) saved before harness_arm.json
    existed: method, base and quantization from the run's results/<task>/<run>/config.json."""
    parts = adapter_dir.resolve().parts
    if len(parts) < 4 or parts[-1] != "adapter":
        return {}
    arm, run, task = parts[-2], parts[-3], parts[-4]
    path = PROJECT_ROOT / "results" / task / run / "config.json"
    if not path.is_file():
        return {}
    from harness import records

    cfg = records.read_run(path)
    if arm not in cfg.arms:
        return {}
    method = cfg.arms[arm]["method"]
    return {"method": method, "base_model": cfg.model["path"],
            "quant": cfg.task["quant"] if method == "qlora" else None, "from": str(path)}


def adapter_info(adapter_dir: Path, base: str | None) -> dict:
    """What the adapter is and which base it belongs to: --base, else the harness's record beside
    it (or the run's config.json), else PEFT's adapter_config.json base_model_name_or_path."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise HarnessError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise HarnessError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are merged")
    record_path = adapter_dir / models.ARM_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else _run_record(adapter_dir)
    name = base or record.get("base_model") or cfg.get("base_model_name_or_path")
    if not name:
        raise HarnessError(f"{cfg_path}: base_model_name_or_path is empty; give --base MODEL")
    return {"base": models.resolve_model(name).path, "method": record.get("method", "lora"),
            "quant": record.get("quant"), "adapter_config": cfg}


def default_dtype() -> str:
    return "bfloat16" if models.device_kind() == "cuda" else "float32"


def run(adapter_dir: Path, out: Path, *, base: str | None = None, dtype: str | None = None,
        tolerance: float | None = None) -> dict:
    """Merge, verify, save to `out`; returns the record also written to out/merge.json."""
    import torch
    from transformers import AutoTokenizer

    adapter_dir, out = Path(adapter_dir), Path(out)
    info = adapter_info(adapter_dir, base)
    dtype = dtype or default_dtype()
    if dtype not in TOLERANCE:
        raise HarnessError(f"--dtype {dtype}: valid: {', '.join(TOLERANCE)}")
    rel_tol = TOLERANCE[dtype] if tolerance is None else tolerance
    qlora = info["method"] == "qlora"
    start = time.perf_counter()

    def logits(model, ids):
        with torch.no_grad():
            return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()

    def free():
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(info["base"]).vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    trained = None  # QLoRA: the model as it was trained, 4-bit base + adapter
    if qlora:
        model = models.attach_adapter(models.load_base(info["base"], quant=info["quant"]), str(adapter_dir))
        trained = logits(model.eval(), ids)
        del model
        free()

    model = models.attach_adapter(models.load_base(info["base"], dtype=getattr(torch, dtype)), str(adapter_dir))
    unmerged = logits(model.eval(), ids)
    merged_model = model.merge_and_unload()
    merged = logits(merged_model, ids)
    scale = max(1.0, unmerged.abs().max().item())
    diff = (merged - unmerged).abs().max().item()
    record = {
        "adapter": str(adapter_dir.resolve()), "base": info["base"], "method": info["method"], "dtype": dtype,
        "merged_into": (f"the unquantized (16-bit) base, loaded in {dtype}: the original weights, not the 4-bit base the "
                        "adapter was trained on" if qlora else f"the base in {dtype}"),
        "verification": {"batch": [BATCH, SEQ], "seed": 0, "max_abs_logit": scale,
                         "max_abs_diff_vs_base_plus_adapter": diff, "tolerance_abs": rel_tol * scale,
                         "top1_agreement_vs_base_plus_adapter": _agree(merged, unmerged),
                         "tolerance_rel": rel_tol, "passed": diff <= rel_tol * scale},
    }
    if trained is not None:  # the quantization gap: what merging into 16-bit changes vs the trained model
        record["verification"]["max_abs_diff_vs_4bit_base_plus_adapter"] = (merged - trained).abs().max().item()
        record["verification"]["mean_abs_diff_vs_4bit_base_plus_adapter"] = (merged - trained).abs().mean().item()
        record["verification"]["top1_agreement_vs_4bit_base_plus_adapter"] = _agree(merged, trained)
    if not record["verification"]["passed"]:
        raise HarnessError(f"merge {adapter_dir}: merged logits differ from base + adapter by {diff:.3g} "
                           f"(> {rel_tol * scale:.3g} allowed for {dtype}); nothing saved")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged_model.save_pretrained(tmp)
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(info["base"])
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(tmp)
    record["saved"] = {"path": str(out.resolve()), **safetensors_summary(sorted(tmp.glob("*.safetensors")))}
    record["seconds"] = time.perf_counter() - start
    write_json(tmp / "merge.json", record)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)  # atomic: a half-written directory is never taken for the merged model
    del model, merged_model
    free()
    return record


def _agree(a, b) -> float:
    """Share of positions whose most likely next token is the same."""
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()
