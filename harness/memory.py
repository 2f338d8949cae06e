"""How much GPU memory a job needs, before any weight loads.

One estimate serves two uses: `harness profile` prints it beside what it measures, and planning
(harness/planning.py) uses it to refuse a job no GPU can hold and to decide how many jobs share a GPU
(harness/parallel.py). It is built from the architecture (counted on the meta device: no memory) and
the arm's own settings: its micro-batch and max_length, LoRA rank and target modules, 4-bit
quantization, optimizer, gradient checkpointing, and whether KL to the base loads a second model.

Checked against the compares at 1B and 8B on an H100 (results/scale/, tests/test_scale.py): over
every measured training and evaluation peak, training within 1.35x, and over the GPU where 8B full
fine-tuning ran out of memory. A flat "bytes per parameter + a few GiB" rule, used before, put 8B
LoRA's training at 36 GB where it measured 59 GB: activations and autocast's bf16 weight copies grow
with the model, not by a constant.
"""

from __future__ import annotations

import re

from harness import context
from harness.config import HarnessError

GiB = 2**30
# The CUDA context and the libraries' memory outside torch's allocator: NVML's device figure minus
# torch's reserved peak was 1.3-1.5 GB for every stage measured on an H100 (results/scale).
CUDA_CONTEXT = 3 * GiB // 2
# The caching allocator's blocks reserved but not allocated at the peak: 2-11% of the peak allocated over
# the training stages measured at 1B and 8B (results/scale; 4% for 8B full fine-tuning, where the
# activations' padding to max_length, generous elsewhere, is a small part of the total).
ALLOCATOR_SLACK = 0.05
# Evaluation: the harness's scoring budget (harness/fastlm.py: 8 GiB of logits and activations per
# batch) and slack, beside fp32 weights. Measured: 1B base 12.3 GB, 8B base 40.4 GB allocated.
EVAL_BUDGET = 9 * GiB
LORA_DROPOUT = 0.05  # the harness's default (config.TaskConfig.lora): dropout keeps a copy of each input


def shape(config, targets, rank: int, *, label: str = "the model", flag: str | None = None,
          trust_remote_code: bool = False) -> dict:
    """Counts from the architecture built on the meta device: all parameters, the linear weights
    bitsandbytes quantizes (every nn.Linear but lm_head), the LoRA parameters peft adds for `targets`
    ("all-linear", a list of module names or dotted suffixes, or a regex peft full-matches).
    With `flag`, a listed target that matches no linear module is refused naming it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}

    def hits(t):  # peft's rule for a list: the full name, or its dotted suffix
        return {n: m for n, m in linears.items() if n == t or n.endswith("." + t)}

    if targets == "all-linear":
        hit = linears
    elif isinstance(targets, str):  # peft: a string is a regex the whole module name must match
        hit = {n: m for n, m in linears.items() if re.fullmatch(targets, n)}
    else:
        missing = [t for t in targets if not hits(t)]
        if missing and flag:
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise HarnessError(f"{flag} {missing[0]}: no such linear module in {label}; valid: "
                               f"{', '.join(names)}, all-linear")
        hit = {n: m for t in targets for n, m in hits(t).items()}
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "quantizable": sum(m.weight.numel() for m in linears.values()),
        "embedding": sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)),
        "lora": sum(rank * (m.in_features + m.out_features) for m in hit.values()),
        "lora_in_per_layer": sum(m.in_features for m in hit.values()) // layers,
        "layers": layers, "hidden": h, "intermediate": getattr(config, "intermediate_size", None) or 4 * h,
        "kv_dim": h // heads * (getattr(config, "num_key_value_heads", None) or heads), "vocab": config.vocab_size,
    }


def estimate(shape: dict, method: str, st: dict) -> dict:
    """Bytes by component of training `method` with settings `st` (a Llama-style decoder): `st` has
    batch, seq, precision ("fp32-master": fp32 weights under bf16 autocast, the harness's way; "bf16"),
    autocast ("bf16" on a GPU, None), optimizer, gradient_checkpointing, quant, and optionally
    l2_to_base (full fine-tuning keeps an fp32 copy of the base's weights).

    weights: as stored (fp32 4 B, bf16 2 B, NF4 4.127 bits with double quantization, 4.5 without); an
      fp32 trainable weight under GPU autocast counts 2 B here (the bf16 copy autocast computes with)
      and 4 B as `master` (the fp32 copy the optimizer updates). grads: trainable x their dtype.
    optimizer: AdamW keeps 2 states in the parameter's dtype (2 x 2 B bf16, 2 x 4 B fp32); an 8-bit one
      (bitsandbytes, `*8bit*`) 2 x 1 B, but 2 x 4 B for the token embeddings, which HF Trainer keeps in
      32 bits (8B: 3.2 GB more; without it, 8B full fine-tuning was estimated to fit an 80 GB H100,
      and ran out there at 78 GiB allocated).
    activations: Korthikanti et al. 2022 count 34*s*b*h + 5*a*s^2*b bytes per GPT layer in 16-bit; for a
      Llama layer (no dropout, SwiGLU, GQA, fp32 RMSNorm, SDPA keeps no s^2 scores) that is, per token,
      A*(6h + 2kv + 4i) + 8h with A = 2 B (autocast or bf16 weights) or 4; plus LoRA dropout's copy of
      each targeted input ((A+1) B a feature); plus logits, their fp32 copy and log-softmax ((A+8) B x
      vocab). With gradient checkpointing: each layer's input, and one layer recomputed at a time.
    total: the sum, an upper bound. peak: the larger of end of forward (weights, master, optimizer,
      activations) and optimizer step (weights less autocast's copies, master, optimizer, grads). The
      harness's captured step (CUDA graphs, harness/train.py: StepGraph) peaks where the eager one does:
      the capture reuses the blocks it frees (8B full fine-tuning with 8-bit moments on an H200: 83.9 GB
      allocated against 83.5 GB here, which the allocator slack of `train_bytes` covers).
    """
    P, A, L, cuda = shape["total"], shape["lora"], shape["layers"], st["autocast"] is not None
    h, i, kv, V = shape["hidden"], shape["intermediate"], shape["kv_dim"], shape["vocab"]
    stored = 4 if st["precision"] == "fp32-master" else 2
    trainable, t_bytes = (P, stored) if method == "full" else (A, 4)  # peft keeps adapters in fp32
    if method == "qlora":
        bits = 4 + (8 / 64 + 32 / (64 * 256) if st["quant"].get("bnb_4bit_use_double_quant") else 32 / 64)
        weights = shape["quantizable"] * bits / 8 + (P - shape["quantizable"]) * stored
    else:
        weights = 0 if method == "full" else P * stored
    master = cache = 0
    if cuda and t_bytes == 4:
        cache, master = trainable * 2, trainable * 4
    else:
        weights += trainable * t_bytes
    if cuda and method == "lora" and stored == 4 and not st["gradient_checkpointing"]:
        cache += shape["quantizable"] * 2  # autograd keeps the bf16 cast of each frozen fp32 weight for backward
    weights += cache
    if method == "full" and st.get("l2_to_base"):
        weights += trainable * 4  # mitigation.l2_to_base: the base's value of every trained weight
    grads = trainable * t_bytes
    opt = trainable * (2 if "8bit" in st["optimizer"] else 2 * t_bytes)
    if "8bit" in st["optimizer"] and method == "full":
        opt += shape.get("embedding", 0) * (8 - 2)
    a, tokens = (2 if cuda or stored == 2 else 4), st["batch"] * st["seq"]
    layer = tokens * (a * (6 * h + 2 * kv + 4 * i) + 8 * h)
    if method != "full" and st.get("lora_dropout", LORA_DROPOUT) > 0:
        layer += tokens * (a + 1) * shape["lora_in_per_layer"]
    layers = L * tokens * h * stored + layer if st["gradient_checkpointing"] else L * layer
    parts = {"weights": weights, "grads": grads, "optimizer": opt, "master": master,
             "activations": layers + tokens * V * (a + 8)}
    parts = {k: int(v) for k, v in parts.items()}
    held = parts["master"] + parts["optimizer"]
    parts.update(total=sum(parts.values()),
                 peak=max(parts["weights"] + held + parts["activations"], parts["weights"] - cache + held + grads),
                 storage=int(trainable * t_bytes),  # adapter (fp32) or full checkpoint in its dtype
                 trainable_params=int(trainable))
    return parts


def eval_bytes(n_params: int, *, kl: bool = False) -> int:
    """Evaluating a model: fp32 weights and the scoring budget; with `kl` (an arm's KL(base || arm),
    harness/scoring.py), the fp32 base beside it."""
    return (8 if kl else 4) * n_params + EVAL_BUDGET + CUDA_CONTEXT


def settings(task, method: str, *, optim: str | None = None) -> dict:
    """`estimate`'s settings for an arm of `task` (a TaskConfig) as the harness trains it on a GPU: fp32
    weights under bf16 autocast, the method's micro-batch of rows up to training.max_length tokens
    (packed or padded, never more); `optim` puts another optimizer in the config's place."""
    t = task.training
    return {"batch": task.methods[method].micro_batch_size, "seq": t.max_length, "precision": "fp32-master",
            "autocast": "bf16", "optimizer": optim or t.optim, "gradient_checkpointing": t.gradient_checkpointing,
            "quant": dict(task.quant), "l2_to_base": task.mitigation.l2_to_base,
            "lora_dropout": task.lora.get("lora_dropout", 0.0)}


def arm_bytes(method: str, model_dir: str, n_params: int, task, *, optim: str | None = None) -> int:
    """Peak GPU bytes of an arm's job on the model in `model_dir`: the larger of training it (`estimate`
    with the arm's settings, `optim` in its optimizer's place) and evaluating it (KL's second model
    included)."""
    evaluation = eval_bytes(n_params, kl=task.kl.enabled)
    counts = model_shape(model_dir, task)
    if counts is None:
        return max(rough_train_bytes(method, n_params, optim or task.training.optim), evaluation)
    return max(train_bytes(method, counts, task, optim=optim), evaluation)


def train_bytes(method: str, counts: dict, task, *, optim: str | None = None) -> int:
    """Peak GPU bytes of training an arm of `task` on an architecture of `shape` `counts`."""
    peak = estimate(counts, method, settings(task, method, optim=optim))["peak"]
    return int(peak * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT


def rough_train_bytes(method: str, n_params: int, optim: str) -> int:
    """For an architecture `shape` cannot read: bytes per parameter plus a few GiB of activations (an
    underestimate for adapters on large models: see the module's docstring)."""
    per_param = {"full": 4 + 4 + (2 if "8bit" in optim else 8) + 2, "lora": 6, "qlora": 1}[method]
    return per_param * n_params + 4 * GiB + CUDA_CONTEXT


def model_shape(model_dir: str, task) -> dict | None:
    """`shape` of the model in `model_dir` (its config.json) with the task's LoRA rank and targets; None
    where its config has no decoder dimensions this estimate knows (hidden_size, layers, heads)."""
    from transformers import AutoConfig

    trust = context.current().trust_remote_code
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
        return shape(config, task.lora.get("target_modules", "all-linear"), int(task.lora.get("r", 8)),
                     trust_remote_code=trust)
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
