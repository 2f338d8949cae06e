"""Training stage: one arm (full | lora | qlora) on the task's training data, through HF Trainer.

    harness compare --task finance --methods full,qlora

Every trained arm sees the same examples in the same order for the same number of optimizer steps
with the same seed (training.batch_size is the effective batch; a method's micro_batch_size only
changes gradient accumulation). The loss is on the answer tokens only: the prompt is masked with -100.

Speed without changing what is learned: a micro-batch's examples are packed into one row without
padding (training.packing), position_ids restart at each example and SDPA's mask stays
block-diagonal, so no example attends to another (tests/test_train_speed.py checks the loss equals
the padded batch's); no GPU->CPU sync per step (the loss is read only every logging_steps); no
per-step walk over the model's modules (`lean_steps`); resumable checkpoints by time, not by step
count (writing fp32 weights and AdamW states cost ~10-20 s each on the H200 machine: every 100 steps
that was a third of a full arm's training). Steps are short (16 tweets, ~800 tokens), so per-step
Python and launch overhead, not arithmetic, bounds the speed on a GPU: there, each micro-step's
forward and backward are CUDA graphs captured once and replayed (StepGraph, training.cuda_graphs),
with packed rows padded to one length. On the H200 (100 finance steps, capture included): full
fine-tuning 153 -> 33 ms/step, QLoRA 434 -> 58 ms/step.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from harness import context, models, points, resources
from harness.config import HarnessError, Method, Profile, TaskConfig
from harness.data import load_split
from harness.evaluate import formatter
from harness.io import stop_point


@dataclass
class TrainResult:
    model: object  # trained model, in memory, ready to evaluate
    stats: dict


def training_texts(task: TaskConfig, profile: Profile, *, mirror) -> tuple[list[tuple[str, str]], int]:
    """(prompt, answer) strings of the examples to train on, in training order; and the split's row count."""
    ds = load_split(task.train.dataset, task.train.config, task.train.split, mirror=mirror)
    fmt, process_docs = formatter(task.train.format_task, mirror=mirror)
    if process_docs is not None:
        ds = process_docs(ds)
    rows = len(ds)
    ds = ds.shuffle(seed=task.training.seed)
    if profile.train_examples is not None:
        ds = ds.select(range(min(profile.train_examples, len(ds))))
    return [fmt(doc) for doc in ds], rows


def training_examples(task: TaskConfig, profile: Profile, tokenizer, *, mirror) -> tuple[list[dict], dict]:
    """Tokenized (input_ids, labels) pairs, prompt masked; and a record of what was used."""
    texts, rows = training_texts(task, profile, mirror=mirror)
    examples, truncated = [], 0
    # Two batched calls (the Rust tokenizer's own loop), the same ids as one call per string.
    prompts = tokenizer([c for c, _ in texts], add_special_tokens=False)["input_ids"] if texts else []
    fulls = tokenizer([c + a for c, a in texts], add_special_tokens=False)["input_ids"] if texts else []
    for (prompt, answer), prompt_ids, full_ids in zip(texts, prompts, fulls):
        n_prompt = len(prompt_ids)
        # The context's tokens are a prefix of the whole (checked): mask them, learn the answer.
        if full_ids[:n_prompt] != prompt_ids:
            n_prompt = len(tokenizer(prompt.rstrip(), add_special_tokens=False)["input_ids"])
        if len(full_ids) > task.training.max_length:  # keep the answer, cut the start of the prompt
            cut = len(full_ids) - task.training.max_length
            full_ids, n_prompt, truncated = full_ids[cut:], max(n_prompt - cut, 0), truncated + 1
        labels = [-100] * n_prompt + full_ids[n_prompt:]
        examples.append({"input_ids": full_ids, "labels": labels})
    record = {
        "dataset": task.train.dataset, "config": task.train.config, "split": task.train.split,
        "rows": rows, "examples": len(examples), "truncated": truncated,
        "tokens": sum(len(e["input_ids"]) for e in examples),
        "answer_tokens": sum(sum(1 for x in e["labels"] if x != -100) for e in examples),
    }
    return examples, record


def collator(tokenizer, *, packing: bool):
    """Padding-free packing (one row per micro-batch, positions restart per example), or padding."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        # Each example's first label becomes -100: the last token of one example never learns to
        # predict the next example (that position is prompt, already masked, in every real example).
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)


def packed_length(examples: list[dict], micro: int, multiple: int = 64) -> int:
    """The longest a packed micro-batch can be: its `micro` longest examples end to end, rounded up."""
    longest = sorted((len(e["input_ids"]) for e in examples), reverse=True)[:micro]
    return -(-sum(longest) // multiple) * multiple


def fixed_length(collate, length: int):
    """Pad every packed row to `length` tokens: each step then has the same shapes, as CUDA graphs need.
    Each pad token gets position 0, which transformers reads as the start of a sequence of its own:
    no example attends to a pad token nor a pad token to an example. Pad labels are -100, so the loss
    and gradients are the unpadded row's (tests/test_train_speed.py)."""
    import torch.nn.functional as F

    def pad(features):
        batch = collate(features)
        extra = length - batch["input_ids"].shape[-1]
        if extra < 0:
            raise HarnessError(f"packed micro-batch of {length - extra} tokens exceeds its bound {length}")
        for key, value in (("input_ids", 0), ("labels", -100), ("position_ids", 0)):
            batch[key] = F.pad(batch[key], (0, extra), value=value)
        return batch

    return pad


def graphs_available() -> bool:
    return models.device_kind() == "cuda"


def graph_capture(module, sample_args):
    """What StepGraph captures with; tests swap in the module itself (no CUDA here).

    The warm-up (lazy CUDA initialisation that must stay out of the capture) is run here, not by
    make_graphed_callables: its own warm-up keeps the last iteration's gradients alive through the
    capture (`for v in [...]: del v` deletes only the loop variable; torch 2.13's source), a second full
    set of gradients beside the one the backward graph allocates. For full fine-tuning of Llama 3.1 8B
    that is 32 GB more at capture than at any later step (results/scale/README.md)."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        loss = module(*sample_args)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        del loss, grads
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the side stream's freed blocks: the capture allocates on another stream
    return torch.cuda.make_graphed_callables(module, sample_args, num_warmup_iters=0)


class StepGraph:
    """A micro-step's forward and backward as CUDA graphs (torch.cuda.make_graphed_callables), used by
    the Trainer in place of the model for the loss. Captured at the first micro-step, from its
    (fixed-length) batch, then replayed: one launch for the forward and one for the backward, instead
    of ~100 kernels and their Python per decoder layer (LoRA on NF4 layers: ~430 ms of a ~450 ms step
    on the H200 host). The parameters are the graph's own inputs, so optimizer updates are seen.
    Gradients: with one micro-step per optimizer step, a parameter's .grad is the graph's own output
    buffer (autograd takes it when .grad is None; zero_grad sets None before the next replay), so no
    second copy of the gradients exists; when micro-steps accumulate, they are added in place into
    persistent .grad tensors (lean_steps(keep_grads=True))."""

    def __init__(self, model):
        import torch

        class Loss(torch.nn.Module):  # tensors in, the loss out: what make_graphed_callables takes
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, position_ids, labels, num_items_in_batch):
                return self.model(input_ids=input_ids, position_ids=position_ids, labels=labels,
                                  num_items_in_batch=num_items_in_batch).loss

        self.loss, self.fn, self.capture_seconds = Loss(model), None, None

    def __call__(self, input_ids, labels, position_ids, num_items_in_batch=None):
        import torch

        if num_items_in_batch is None:  # the model's own mean: over the shifted targets
            num_items_in_batch = (labels[..., 1:] != -100).sum()
        n = torch.as_tensor(num_items_in_batch, device=input_ids.device)
        args = (input_ids, position_ids, labels, n)
        if self.fn is None:
            start = time.perf_counter()
            self.fn = graph_capture(self.loss, args)
            self.capture_seconds = time.perf_counter() - start
        return {"loss": self.fn(*args)}


def _trainer_class():
    from transformers import Trainer

    class CountOnceTrainer(Trainer):
        """HF Trainer that counts the model's parameters once, not at every micro-step.

        Trainer.floating_point_ops walks every module and parameter per micro-step to log `total_flos`;
        with ~2,500 modules in a LoRA-wrapped SmolLM2 that is tens of milliseconds of Python per step.
        The logged figure is unchanged: 6 x tokens x non-embedding parameters."""

        _params: int | None = None

        def floating_point_ops(self, inputs) -> int:
            if self._params is None:  # Trainer's own count, for a batch of one token
                import torch

                self._params = super().floating_point_ops({"input_ids": torch.zeros(1, 1)}) // 6
            return 6 * inputs["input_ids"].numel() * self._params

        step_graph: StepGraph | None = None

        l2_to_base: float = 0.0
        l2_reference: dict | None = None  # name -> the base's value of each trained weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The Trainer's own loss handling; with a StepGraph, the graph computes what the model would.
            With `l2_to_base` (mitigation.l2_to_base), plus lambda x sum (theta - theta_base)^2 once per
            optimizer step (each micro-step adds its share when the Trainer does not average them)."""
            if self.step_graph is not None and model.training and not return_outputs:
                model = self.step_graph
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if not self.l2_to_base or not self.model.training:
                return out
            reg = sum(((p - self.l2_reference[n]) ** 2).sum() for n, p in self.model.named_parameters()
                      if p.requires_grad)
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:  # summed over micro-steps
                reg = reg / self.args.gradient_accumulation_steps
            extra = self.l2_to_base * reg
            return (out[0] + extra, *out[1:]) if return_outputs else out + extra

    return CountOnceTrainer


@contextlib.contextmanager
def lean_steps(model, keep_grads: bool = False):
    """HF Trainer calls model.train() and model.zero_grad() at every step, and each walks every module
    or parameter: ~2,500 modules on a LoRA-wrapped SmolLM2, ~60 ms of Python per QLoRA step on the
    H200 host (cProfile). Inside the block train(mode) walks only when the mode changes (nothing
    else switches modes during training), and zero_grad clears only the trainable parameters' gradients
    (frozen ones never get any): the same effect. The instance overrides are removed on exit.

    keep_grads (for StepGraph when micro-steps accumulate): the trainable parameters get zero .grad
    tensors up front, and zero_grad zeroes them in place. Autograd then adds each replay's gradients
    into them; a parameter without one would take the graph's own output buffer as its .grad, which
    the next replay overwrites."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    if keep_grads:
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    state = {"mode": None}
    plain_train = model.train

    def train(mode: bool = True):
        if state["mode"] is not mode:
            plain_train(mode)
            state["mode"] = mode
        return model

    def zero_grad(set_to_none: bool = True):
        if keep_grads:
            torch._foreach_zero_([p.grad for p in trainable])
            return
        for p in trainable:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    model.train, model.zero_grad = train, zero_grad
    try:
        yield model
    finally:
        del model.train, model.zero_grad
        if keep_grads:  # as after a plain run: no gradient memory held into evaluation
            for p in trainable:
                p.grad = None


def repeated_blocks(model) -> list:
    """The model's repeated blocks (the decoder layers): the largest ModuleList whose children all
    share one class; empty when there is none."""
    import torch

    best = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            if sum(p.numel() for p in module.parameters()) > sum(p.numel() for b in best for p in b.parameters()):
                best = list(module)
    return best


@contextlib.contextmanager
def compiled_blocks(model, enabled: bool, **compile_kw):
    """Regional compilation (PyTorch's recipe): torch.compile each decoder block in place for the
    block. The blocks share one class, so Dynamo compiles one graph (forward and backward) and every
    block reuses it; parameter names, saving and the rest of the model are untouched. bitsandbytes'
    4-bit ops and PEFT's LoRA layers trace without graph breaks. Packed batches change length every
    step: dynamic shapes, one graph. Measured on an H200 (SmolLM2-135M, finance, 16 tweets a step):
    full 153 -> 89 ms/step after 14 s of compiling; QLoRA 434 -> 254 ms/step after 85 s (its 4-bit
    ops still dispatch through Python), so it is off by default. Eager again on exit: evaluation's
    cached forward passes are other graphs."""
    blocks = repeated_blocks(model) if enabled else []
    for block in blocks:
        block.compile(dynamic=True, **compile_kw)
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set: the plain forward again


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def freeze_lowest_layers(model, n: int) -> int:
    """Stop every parameter of decoder layers 0..n-1 from training (the weights themselves for full
    fine-tuning, the adapters for LoRA/QLoRA); returns how many parameters were trainable there."""
    frozen = 0
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        if m and int(m.group(1)) < n and p.requires_grad:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def run(method: str, *, task: TaskConfig, profile: Profile, model_path: str, examples: list[dict],
        out_dir: Path) -> TrainResult:
    """Train one arm; save its checkpoint or adapter under out_dir (the git-ignored work dir)."""
    from transformers import TrainingArguments, set_seed

    settings: Method | None = task.methods.get(method)
    if settings is None:
        raise HarnessError(f"methods.{method}: not configured in task {task.name}")
    t = task.training
    batch = profile.batch_size or t.batch_size
    micro = min(settings.micro_batch_size, batch)
    rank, n_proc = context.world()  # under training.distributed (harness/distributed.py): each process one device
    if batch % (micro * n_proc):
        raise HarnessError(f"methods.{method}.micro_batch_size={micro}" + (f" x {n_proc} processes" if n_proc > 1 else "")
                           + f" must divide the effective batch {batch}")
    set_seed(t.seed)  # adapter init and dropout start from the same state for every arm
    tokenizer = models.load_tokenizer(model_path)
    model, trainable, total = models.build_model(
        method, model_path, lora=task.lora, quant=task.quant, gradient_checkpointing=t.gradient_checkpointing
    )
    mit = task.mitigation
    if mit.freeze_layers:
        trainable -= freeze_lowest_layers(model, mit.freeze_layers)
    if mit.l2_to_base and method != "full":
        raise HarnessError(f"mitigation.l2_to_base: pulls full fine-tuning's weights toward the base; arm method is {method}")
    steps_per_epoch = math.ceil(len(examples) / batch)
    max_steps = math.ceil(steps_per_epoch * t.epochs)
    if profile.max_steps is not None:
        max_steps = min(max_steps, profile.max_steps)
    cuda = models.device_kind() == "cuda"
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // (micro * n_proc),  # each optimizer step: `batch` examples in all
        learning_rate=settings.learning_rate,
        max_steps=max_steps,
        warmup_steps=int(t.warmup_ratio * max_steps),
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        logging_steps=t.logging_steps,
        save_strategy="no",  # _checkpoint_callback decides; Trainer's own also saves after the last step
        save_total_limit=1,  # one checkpoint to resume from; the final weights go to save_arm
        report_to=[],
        seed=t.seed,
        data_seed=t.seed,
        bf16=cuda,  # bf16 autocast over fp32 master weights on GPU; plain fp32 on CPU
        use_cpu=not cuda,
        optim=t.optim if t.optim != "auto" else "adamw_torch_fused" if cuda else "adamw_torch",
        # The default filter tests every micro-step's loss for nan/inf in Python: a GPU->CPU sync per
        # step that stalls the launch queue. A nan loss still shows in the logged history.
        logging_nan_inf_filter=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        disable_tqdm=rank != 0,
        **(_fsdp_args(model) if n_proc > 1 and t.distributed == "fsdp" else {}),
    )
    # CUDA graphs need one shape for every step (packed rows padded to one length) and a step without
    # the Python that checkpointing's recomputation or compiled code runs.
    # (A mitigation changes which weights train or adds a loss term outside the captured step: no graphs.)
    graphs = (t.cuda_graphs and t.packing and not t.gradient_checkpointing and not t.compile and graphs_available()
              and not mit.freeze_layers and not mit.l2_to_base and n_proc == 1)
    data_collator = collator(tokenizer, packing=t.packing)
    length = packed_length(examples, micro) if graphs else None
    if graphs:
        data_collator = fixed_length(data_collator, length)
    snapshots = points.snapshot_steps(t.eval_at, max_steps)  # forgetting curves: weights part-way (harness/points.py)
    callbacks = [_checkpoint_callback()(t, max_steps, arm=out_dir.name)]
    if snapshots and rank == 0:  # (under DDP every rank holds the same weights: one saves them; FSDP: refused in planning)
        callbacks.append(_snapshot_callback()(snapshots, tokenizer, out_dir, record={
            "method": method, "base_model": model_path, "quant": task.quant if method == "qlora" else None}))
    trainer = _trainer_class()(model=model, args=args, train_dataset=examples, data_collator=data_collator,
                               callbacks=callbacks)
    trainer.step_graph = StepGraph(model) if graphs else None
    if mit.l2_to_base:
        trainer.l2_to_base = mit.l2_to_base
        trainer.l2_reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    checkpoint = resume_checkpoint(out_dir / "trainer")
    if checkpoint is None:  # from scratch: snapshots of an earlier attempt are not this run's
        shutil.rmtree(out_dir / points.SNAPSHOTS, ignore_errors=True)
    # A KV cache during training makes transformers skip the packed-sequence mask (examples would
    # attend across their boundaries); it is useless for training anyway.
    config = model.config
    use_cache, config.use_cache = config.use_cache, False
    try:  # measured: this stage's own peaks and time, compilation included
        with (resources.measure() as measured, lean_steps(model, keep_grads=graphs and batch > micro),
              compiled_blocks(model, t.compile) as n_compiled):
            out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        config.use_cache = use_cache
    seconds = measured.result["seconds"]
    train_loss = out.training_loss
    if checkpoint is not None:
        # A resumed call's training_loss divides this call's loss sum by all steps (transformers up to
        # 5.17) or by this call's steps (later): the sum itself is the same in both.
        train_loss = _resumed_loss(trainer.state.log_history, _step(checkpoint), trainer._total_loss_scalar, max_steps)
    # Sharded weights (FSDP) are gathered whole for rank 0; every rank takes part in the gathering.
    state = trainer.accelerator.get_state_dict(trainer.model) if n_proc > 1 and t.distributed == "fsdp" else None
    saved = None
    if rank == 0:  # one process saves the arm
        saved = models.save_arm(model, tokenizer, out_dir / ("adapter" if method != "full" else "model"),
                                record={"method": method, "base_model": model_path,
                                        "quant": task.quant if method == "qlora" else None}, state_dict=state)
    seen = max_steps * batch  # examples through the model (the trainer cycles the data)
    tokens = seen * sum(len(e["input_ids"]) for e in examples) / len(examples)  # unpadded
    stats = {
        "method": method,
        "learning_rate": settings.learning_rate,
        "micro_batch_size": micro,
        "batch_size": batch,
        "steps": max_steps,
        "packing": t.packing,
        **({"distributed": {"mode": t.distributed, "processes": n_proc}} if n_proc > 1 else {}),
        "compiled_blocks": n_compiled,
        "cuda_graphs": graphs,
        "padded_length": length,
        "graph_capture_seconds": trainer.step_graph.capture_seconds if graphs else None,
        "epochs": round(seen / len(examples), 4),
        "train_loss": train_loss,
        "resumed_from_step": _step(checkpoint) if checkpoint else None,
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "examples_per_second": seen / seconds,
        "trainable_params": trainable,
        "mitigation": {"freeze_layers": mit.freeze_layers, "l2_to_base": mit.l2_to_base},
        **({"snapshots": {format(f, "g"): step for step, fs in snapshots.items() for f in fs}} if snapshots else {}),
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "base_4bit": models.is_4bit(model),
        "compute_dtype": models.compute_dtype(model),
        "optim": getattr(args.optim, "value", args.optim),
        "saved": saved,
        "model_footprint_bytes": resources.footprint_bytes(model),
        **{k: v for k, v in measured.result.items() if k != "seconds"},
    }
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)  # the arm is saved; its checkpoint is spent
    release(trainer, model)
    model.eval()
    return TrainResult(model=model, stats=stats)


def release(trainer, model) -> None:
    """Free what training held before the arm is evaluated in this process: the optimizer's state,
    the gradients (with CUDA graphs, buffers of the graphs' private pools), the graphs themselves; and
    give the model back its own forward, without training's mixed precision.
    The Trainer, its callback handler and accelerate each keep a reference to the optimizer, and the
    Trainer itself can outlive this function (a traceback kept by a lazy import held run()'s frame in
    a test), so each reference is dropped here rather than left to the Trainer's collection. Measured
    on an H100 before this: the arm's evaluation held the training leftovers (1B full: 18.6 GB allocated
    to evaluate a 4.9 GB model; 8B LoRA: 25 GiB in the graphs' pools, and its KL step, which loads the
    base beside it, ran out of memory)."""
    import gc

    import torch
    from accelerate.utils import extract_model_from_parallel

    # Trainer's accelerate, with bf16=True (on GPU), replaced model.forward by a bf16-autocast wrapper
    # that casts the outputs to fp32. Left in place, the arm would be evaluated, and its KL and
    # interpolations measured, under bf16 autocast while the base is evaluated in its own dtype: a
    # change of precision counted as forgetting (and autocast's bf16 copies in the evaluation's memory).
    extract_model_from_parallel(model, keep_fp32_wrapper=False)
    model.zero_grad(set_to_none=True)
    trainer.step_graph = None
    trainer.accelerator.free_memory()  # its lists of models, optimizers, schedulers and dataloaders
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fsdp_args(model) -> dict:
    """TrainingArguments for FSDP: full sharding, each decoder layer its own unit. use_orig_params off
    and the 4-bit storage in the compute dtype are what FSDP needs to shard QLoRA's NF4 weights
    (Answer.AI's FSDP + QLoRA); rank 0 loads nothing extra (all ranks load the base from disk)."""
    blocks = repeated_blocks(model)
    if not blocks:
        raise HarnessError(f"training.distributed=fsdp: no repeated decoder layers found in {type(model).__name__}")
    layer = type(blocks[0]).__name__
    return {"fsdp": "full_shard auto_wrap",
            "fsdp_config": {"transformer_layer_cls_to_wrap": [layer], "use_orig_params": False,
                            "sync_module_states": False, "state_dict_type": "FULL_STATE_DICT",
                            "limit_all_gathers": True}}


def _checkpoint_callback():
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        """A resumable checkpoint once `save_minutes` have passed since the last (or the start), and
        every `save_steps` if set; only at logging steps, so the loss logged up to a checkpoint covers
        every step before it and a resumed arm reports the whole run's mean loss (_resumed_loss). None
        after the last step: the arm is saved whole right after training.
        HARNESS_STOP_AT=train:<arm>:<step> kills the run right after that checkpoint."""

        def __init__(self, training, max_steps: int, *, arm: str):
            self.t, self.max_steps, self.arm = training, max_steps, arm
            self.every = (math.ceil(training.save_steps / training.logging_steps) * training.logging_steps
                          if training.save_steps else None)
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step % self.t.logging_steps or step >= self.max_steps:
                return control
            due_time = self.t.save_minutes > 0 and time.monotonic() - self.last >= 60 * self.t.save_minutes
            if due_time or (self.every and step % self.every == 0):
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()
            stop_point(f"train:{self.arm}:{state.global_step}")

    return Checkpoints


def _snapshot_callback():
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        """The weights (or adapter) right after the optimizer steps of `training.eval_at`, saved as an arm
        is (models.save_arm) under <arm>/at/<fraction>/: a point of the forgetting curve, evaluated later."""

        def __init__(self, steps: dict[int, list[float]], tokenizer, out_dir: Path, *, record: dict):
            self.steps, self.tokenizer, self.out_dir, self.record = steps, tokenizer, out_dir, record

        def on_step_end(self, args, state, control, model=None, **kwargs):
            for f in self.steps.get(state.global_step, []):
                models.save_arm(model, self.tokenizer, points.snapshot_dir(self.out_dir, f),
                                record={**self.record, "step": state.global_step, "fraction": f})
            return control

    return Snapshots


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def resume_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint, or None.

    A checkpoint interrupted while being written lacks a readable trainer_state.json (written last):
    it is skipped. One that looks complete but whose weights are corrupt is an error, not silently
    retrained over (the caller removes checkpoints whose inputs changed)."""
    found = []
    for d in trainer_dir.glob("checkpoint-*"):
        try:
            json.loads((d / "trainer_state.json").read_text())
            found.append((_step(d), d))
        except (OSError, ValueError):
            continue
    if not found:
        return None
    checkpoint = max(found)[1]
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        raise HarnessError(f"{checkpoint}: checkpoint has no safetensors weights; delete it to retrain from scratch")
    for w in weights:
        models.safetensors_tensors(w)
    return checkpoint


def _resumed_loss(history: list[dict], resumed_at: int, loss_sum_after: float, max_steps: int) -> float:
    """Mean training loss over all steps of a resumed run: the Trainer summed the step losses after the
    checkpoint (`loss_sum_after`); the logged windows before it (restored with the checkpoint) add the rest."""
    before, last = 0.0, 0
    for h in history:
        if "loss" in h and h["step"] <= resumed_at:
            before += h["loss"] * (h["step"] - last)
            last = h["step"]
    return (before + loss_sum_after) / max_steps
