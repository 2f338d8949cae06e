"""harness profile --arch llama-2-7b --methods full,lora,qlora --batch 1 --seq 512 --rank 16 --targets q_proj,v_proj

What a few training steps cost each method on an architecture with RANDOM weights (memory and speed do
not depend on their values, so nothing is downloaded): peak memory (CUDA allocator and NVML; host RSS
on CPU), tokens/s, trainable parameters, adapter or checkpoint size, each beside an analytic estimate
split into weights, gradients, optimizer states, master copy and activations, and beside the seed
chapter's claims and the plain-script anchors (shared/reference/anchors.md).

Every arm is built by `harness.models.build_model` from a saved random model, so this measures the
code path the harness trains with. precision="fp32-master" is that path as it is (fp32 weights, bf16
autocast on GPU); "bf16" then casts every frozen weight (and for full, every weight) to bf16.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import tempfile
import time
from pathlib import Path

from harness import memory, models, resources
from harness.config import METHODS, HarnessError, TaskConfig
from harness.io import write_json, write_text

PRESETS = models.ARCH_PRESETS  # LlamaConfig kwargs of published architectures (harness/models.py)
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
PRECISIONS = ("bf16", "fp32-master")
LORA_DROPOUT = memory.LORA_DROPOUT
SAVE_FULL_BELOW = 1e9  # write and measure full checkpoints of smaller models; estimate bigger ones
GiB = 2**30

# Source: the seed chapter, shared/seed/lora-chapter.txt, "Examples" (Llama-2-7B; its LoRA example is QLoRA).
CHAPTER = {  # GPU memory required, storage per task, what is updated, training time
    "full": ("~40 GB", "14 GB (full model checkpoint)", "all 7 billion parameters", "12+ hours"),
    "lora": ("- (claimed for QLoRA)", "8 MB (adapter, rank 16)", "~4 million adapter parameters", "-"),
    "qlora": ("~12 GB", "8 MB (adapter, rank 16)", "~4 million adapter parameters", "2-3 hours"),
}
# Source: shared/reference/anchors.md, plain PyTorch/transformers/peft scripts on one H200 (GiB),
# keyed by method/precision ("bf16": 16-bit base or pure-bf16 full fine-tuning).
ANCHORS = {
    "llama-2-7b": {
        "setting": "batch 1 x 512, gradient checkpointing, r=16 on q_proj,v_proj",
        "match": dict(batch=1, seq=512, rank=16, targets=["q_proj", "v_proj"], gradient_checkpointing=True),
        "full/bf16": {"alloc": 62.9, "reserved": 65.9, "params": "6.74 B", "storage": "13.5 GB checkpoint"},
        "full/fp32-master": {"alloc": 125.6, "reserved": 136.5, "params": "6.74 B"},
        "lora/bf16": {"alloc": 15.4, "reserved": 15.8, "params": "8.39 M", "storage": "33.6 MB (fp32)"},
        "qlora/bf16": {"alloc": 8.28, "reserved": 8.81, "params": "8.39 M", "storage": "33.6 MB (fp32)"},
    },
    "smollm2-135m": {
        "setting": "bf16, batch 16 x 512, no gradient checkpointing, r=16 all-linear",
        "match": dict(batch=16, seq=512, rank=16, targets=["all-linear"], gradient_checkpointing=False),
        "full/bf16": {"alloc": 11.7, "reserved": 13.1, "params": "134.5 M", "tokens_per_second": 65600},
        "lora/bf16": {"alloc": 14.2, "reserved": 15.8, "params": "4.88 M", "tokens_per_second": 34100},
        "qlora/bf16": {"alloc": 14.0, "reserved": 16.0, "params": "4.88 M", "tokens_per_second": 21300},
    },
}


def run(*, arch: str, methods: list[str], batch: int, seq: int, rank: int, targets: list[str], steps: int = 3,
        gradient_checkpointing: bool = False, optimizer: str = "adamw", precision: str = "bf16",
        out_dir: Path | None = None, save_dir: Path | None = None) -> dict:
    """Profile each method; write profile.json and profile.md under out_dir when given. Adapters (and
    full checkpoints under 1e9 parameters) are kept under save_dir when given, else in a temp dir."""
    import torch

    config, name = _config(arch)
    methods = _check(methods, batch=batch, seq=seq, rank=rank, targets=targets, steps=steps,
                     optimizer=optimizer, precision=precision, config=config)
    tgt = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    lora = {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": LORA_DROPOUT, "target_modules": tgt}
    quant = {f.name: f for f in dataclasses.fields(TaskConfig)}["quant"].default_factory()  # the harness default
    shape = memory.shape(config, tgt, rank, label=arch, flag="--targets")
    cuda = models.device_kind() == "cuda"
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    result = {
        "arch": name, "config": {**{k: getattr(config, k, None) for k in keys}, "params": shape["total"]},
        "settings": dict(batch=batch, seq=seq, rank=rank, targets=list(targets), steps=steps, optimizer=optimizer,
                         precision=precision, gradient_checkpointing=gradient_checkpointing, lora=lora, quant=quant,
                         autocast="bf16" if cuda else None),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)", "rows": []}
    # For 7B this writes ~13.5 GB of bf16 safetensors to the temp dir (TMPDIR decides where): loading it
    # back through build_model is what lets QLoRA quantize it exactly as the harness does.
    with tempfile.TemporaryDirectory(prefix="harness-profile-") as tmp:
        base = _write_random(config, Path(tmp) / "base", cuda)
        for method in methods:
            row = _profile_method(method, str(base), result["settings"], config.vocab_size, save_dir, Path(tmp))
            row["estimate"] = memory.estimate(shape, method, result["settings"])
            result["rows"].append(row)
            _free(cuda)
            if cuda:  # what the next method starts with: ~0 when this one's model and optimizer were released
                row["allocated_after_bytes"] = torch.cuda.memory_allocated()
    if out_dir is not None:
        write_json(Path(out_dir) / "profile.json", result)
        write_text(Path(out_dir) / "profile.md", render_md(result))
    return result


# ---------------------------------------------------------------- inputs


def _config(arch: str):
    return models.arch_config(arch, flag="--arch")


def _check(methods, *, batch, seq, rank, targets, steps, optimizer, precision, config) -> list[str]:
    for flag, v in (("batch", batch), ("seq", seq), ("rank", rank), ("steps", steps)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise HarnessError(f"--{flag} {v}: must be a positive integer")
    methods = list(dict.fromkeys(methods))  # keep the order, drop repeats
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise HarnessError(f"--methods {(bad or [''])[0]}: unknown method; valid: {', '.join(METHODS)}")
    if not targets:
        raise HarnessError("--targets: empty; give module names (q_proj,v_proj) or all-linear")
    for flag, v, valid in (("optimizer", optimizer, OPTIMIZERS), ("precision", precision, PRECISIONS)):
        if v not in valid:
            raise HarnessError(f"--{flag} {v}: unknown; valid: {', '.join(valid)}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and seq > max_pos:
        raise HarnessError(f"--seq {seq}: longer than the architecture's max_position_embeddings {max_pos}")
    return methods


def _write_random(config, path: Path, cuda: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # initialised once, where it lives, in bf16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    _free(cuda)
    return path


def _free(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # so the next peak_reserved is not inflated by blocks cached earlier


# ---------------------------------------------------------------- measuring


def _profile_method(method: str, base: str, st: dict, vocab: int, save_dir, tmp: Path) -> dict:
    import torch

    cuda, batch, seq, precision = st["autocast"] is not None, st["batch"], st["seq"], st["precision"]
    row = {"method": method, "failed": None}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resources.reset_peak_rss()
    steps = None  # resources.measure over the optimizer steps: its own peaks, NVML sampled every 200 ms
    try:
        model, trainable, total = models.build_model(method, base, lora=st["lora"], quant=st["quant"],
                                                     gradient_checkpointing=st["gradient_checkpointing"])
        if precision == "bf16":  # frozen weights (all of them for full) in bf16; peft's adapters stay fp32
            for p in model.parameters():
                if p.is_floating_point() and (method == "full" or not p.requires_grad):
                    p.data = p.data.to(torch.bfloat16)
        model.train()  # from_pretrained returns eval mode, where HF skips gradient checkpointing
        by_dtype: dict[str, int] = {}
        for p in model.parameters():
            key = "nf4 (packed uint8)" if p.__class__.__name__ == "Params4bit" else str(p.dtype)[6:]
            by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size()
        row.update(trainable_params=trainable, total_params=total, trainable_pct=100.0 * trainable / total,
                   base_4bit=models.is_4bit(model), param_bytes_by_dtype=by_dtype,
                   model_footprint_bytes=resources.footprint_bytes(model))
        params = [p for p in model.parameters() if p.requires_grad]
        if st["optimizer"] == "paged_adamw_8bit":  # 8-bit states in CUDA unified memory (bitsandbytes: plain on CPU)
            import bitsandbytes as bnb

            opt = bnb.optim.PagedAdamW8bit(params, lr=1e-5)
        else:  # fused on CUDA, like the harness's Trainer (adamw_torch_fused): no foreach temporaries
            opt = torch.optim.AdamW(params, lr=1e-5, fused=True if cuda else None)
        if cuda:  # count training, not the load (fp32, then cast) nor blocks it left cached
            row["load_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            _free(cuda)
        row["rss_before_steps_bytes"] = resources.rss_bytes()
        gen, device = torch.Generator().manual_seed(0), next(model.parameters()).device
        times, losses = [], []
        steps = resources.measure()
        with steps:  # resets the CUDA peaks and the kernel's peak RSS
            for _ in range(st["steps"]):
                ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach().item())  # also waits for the GPU
                times.append(time.perf_counter() - start)
        timed = times[1:] or times  # the first step warms up kernels and allocates optimizer states
        row.update(step_seconds=times, losses=losses, tokens_per_second=batch * seq * len(timed) / sum(timed))
        del loss, opt
        row.update(_saved_size(model, method, total, save_dir, tmp))  # after the peaks: saving is not training
    except Exception as e:
        if not resources.is_out_of_memory(e):
            raise
        row["failed"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    if steps is not None and steps.result:
        m = steps.result
    else:  # failed before the steps began: the peaks so far (the load)
        m = {"peak_rss_bytes": max(resources.rss_bytes(), resources.peak_rss_since_reset() or 0),
             "rss_source": "at failure", "peak_nvml_used_bytes": None, "nvml_source": None,
             "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
             "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None}
    peak_rss = m["peak_rss_bytes"]
    row.update(peak_rss_bytes=peak_rss, rss_source=m["rss_source"],
               rss_delta_bytes=max(0, peak_rss - row.get("rss_before_steps_bytes", peak_rss)),
               nvml_used_bytes=m["peak_nvml_used_bytes"],  # whole device: CUDA context, paged optimizer states
               nvml_source=m["nvml_source"],
               peak_allocated_bytes=m["peak_gpu_allocated_bytes"], peak_reserved_bytes=m["peak_gpu_reserved_bytes"])
    return row


def _saved_size(model, method, total, save_dir, tmp) -> dict:
    """Adapters: saved and measured. Full: saved and measured under 1e9 parameters, else params x bytes."""
    dtype = ",".join(sorted({str(p.dtype)[6:] for p in model.parameters() if p.requires_grad}))
    if method == "full" and total >= SAVE_FULL_BELOW:
        return {"checkpoint_bytes_estimated": total * next(model.parameters()).element_size(), "saved_dtype": dtype}
    out = (Path(save_dir) if save_dir else tmp) / (f"{method}-adapter" if method != "full" else "full-model")
    model.save_pretrained(out)
    saved = resources.safetensors_summary(sorted(out.glob("*.safetensors")))  # size and dtype from the files
    key = "checkpoint_bytes" if method == "full" else "adapter_bytes"
    return {key: saved["bytes"], "saved_dtype": saved["dtype"], "saved_path": str(out) if save_dir else None}


# ---------------------------------------------------------------- the report


def _gib(b) -> str:
    if b is None:
        return "-"
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.2f} MiB"


def _size(n, units=(("GB", 1e9), ("MB", 1e6), ("KB", 1e3))) -> str:
    return next((f"{n / div:.3g} {unit}" for unit, div in units if n >= div), f"{n:.3g}")


def _count(n) -> str:
    return _size(n, (("B", 1e9), ("M", 1e6), ("K", 1e3)))


def render_md(result: dict) -> str:
    s, cfg, arch = result["settings"], result["config"], result["arch"]
    gpu, anchors = s["autocast"] is not None, ANCHORS.get(arch)
    cmd = (f"harness profile --arch {arch} --methods {','.join(r['method'] for r in result['rows'])} "
           f"--batch {s['batch']} --seq {s['seq']} --rank {s['rank']} --targets {','.join(s['targets'])} "
           f"--steps {s['steps']} --optimizer {s['optimizer']} --precision {s['precision']}"
           + (" --gradient-checkpointing" if s["gradient_checkpointing"] else ""))
    out = [f"# Fine-tuning cost profile: {arch} (random weights)", "", f"`{cmd}`", "",
           f"Device: {result['device']}. Model: {_count(cfg['params'])} parameters, hidden {cfg['hidden_size']}, "
           f"{cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}. Measured peaks cover the optimizer steps, "
           "not the model load; tokens/s leaves out the first (warm-up) step. The seed chapter's claims are for "
           "Llama-2-7B (shared/seed/lora-chapter.txt, Examples).", ""]
    if anchors:
        same = all(s[k] == v for k, v in anchors["match"].items())
        out += [f"Anchors: plain scripts on one H200 (shared/reference/anchors.md), {anchors['setting']}; this run's "
                f"setting is {'the same' if same else 'DIFFERENT: compare with care'}. Their full-FT peaks fit torch's "
                "default (foreach) AdamW, whose step adds a temporary of one optimizer state; the harness and this "
                "profile use fused AdamW, which has none.", ""]
    names = {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA (NF4, double quantization)"}
    for r in result["rows"]:
        (m, e), (c_mem, c_store, c_upd, c_time) = (r["method"], r["estimate"]), CHAPTER[r["method"]]
        anc = anchors.get(f"{m}/{s['precision']}") if anchors else None
        if r["failed"]:
            peak = _gib(r["peak_allocated_bytes"]) + " allocated" if gpu else _gib(r["peak_rss_bytes"]) + " RSS"
            mem = f"failed ({r['failed']}); peak reached {peak}"
        elif gpu:
            mem = (f"{_gib(r['peak_allocated_bytes'])} allocated, {_gib(r['peak_reserved_bytes'])} reserved"
                   + (f", NVML {_gib(r['nvml_used_bytes'])} (whole device, {r.get('nvml_source')})"
                      if r["nvml_used_bytes"] else "")
                   + f"; loading peaked at {_gib(r.get('load_peak_allocated_bytes'))}")
        else:
            mem = (f"CPU: peak RSS {_gib(r['peak_rss_bytes'])} (+{_gib(r['rss_delta_bytes'])} during steps)"
                   + f" ({r.get('rss_source', 'process-lifetime peak')})")
        store = "-"
        for key, what in (("adapter_bytes", "adapter"), ("checkpoint_bytes", "checkpoint"),
                          ("checkpoint_bytes_estimated", "checkpoint, estimated")):
            if key in r:
                store = f"{_size(r[key])} {what} ({r['saved_dtype']})"
        ok = not r["failed"]
        upd = (f"{_count(r['trainable_params'])} of {_count(r['total_params'])} ({r['trainable_pct']:.3g}%)"
               if ok else "-")
        est = (f"{_gib(e['peak'])} peak; weights {_gib(e['weights'])}, master {_gib(e['master'])}, optimizer "
               f"{_gib(e['optimizer'])}, grads {_gib(e['grads'])}, activations {_gib(e['activations'])}")
        speed = f"{r['tokens_per_second']:,.0f} tokens/s" if ok else "-"
        a_mem = f"{anc['alloc']} GiB allocated, {anc['reserved']} GiB reserved" if anc else "-"
        a_tps = f"{anc['tokens_per_second']:,} tokens/s" if anc and "tokens_per_second" in anc else "-"
        anc = anc or {}
        out += [f"## {names[m]}", "", "| | seed chapter claims | plain-script anchor | measured here | analytic "
                "estimate |", "| --- | --- | --- | --- | --- |",
                f"| GPU memory required | {c_mem} | {a_mem} | {mem} | {est} |",
                f"| Storage per task | {c_store} | {anc.get('storage', '-')} | {store} | {_size(e['storage'])} |",
                f"| What is updated | {c_upd} | {anc.get('params', '-')} | {upd} "
                f"| {_count(e['trainable_params'])} |",
                f"| Training time / speed | {c_time} | {a_tps} | {speed} | - |", ""]
    out += ["## Where the memory goes (analytic estimate)", "",
            "| method | weights | master | optimizer | grads | activations | sum | peak | measured peak |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        cells = " | ".join(_gib(r["estimate"][k]) for k in ("weights", "master", "optimizer", "grads", "activations",
                                                            "total", "peak"))
        measured = _gib(r["peak_allocated_bytes"] if gpu else r["peak_rss_bytes"])
        out.append(f"| {r['method']} | {cells} | {measured}{' (failed)' if r['failed'] else ''} |")
    out += ["", "Formulas: `harness.memory.estimate`. Measured on GPU: the CUDA allocator's peak (NVML adds the CUDA "
            "context, and paged 8-bit optimizer states, which live in unified memory outside the allocator). On CPU: "
            "the whole process's peak RSS during the steps, libraries included."]
    return "\n".join(out) + "\n"
