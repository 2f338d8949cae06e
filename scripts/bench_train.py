"""Training throughput: the harness's train.run against TRL's SFTTrainer, configured for speed.

    python scripts/bench_train.py                       # full + qlora, 200 steps, 2 rounds
    python scripts/bench_train.py --model random:llama-3.2-1b --steps 100   # at 1B (random weights)
    python scripts/bench_train.py --steps 5 --examples 160 --rounds 1 --methods full   # CPU smoke

Both sides get the same model, the same (prompt, answer) examples in the same order, the same
effective batch, max length, learning rate, number of optimizer steps and weight precision (fp32
master weights, bf16 autocast on a GPU); they alternate (trl, harness, trl, harness, ...) in one
process so drift in the machine hits both. `--trl` picks TRL's configurations (comma-separated):

- `speed` (default): what TRL 1.x offers for speed without changing what a step learns: padding-free
  batches (the micro-batch's examples flattened into one row, positions restarting per example, which
  transformers' SDPA mask keeps block-diagonal), no gradient checkpointing, Liger's layer kernels
  (RMSNorm, SwiGLU, RoPE) where `liger-kernel` imports and a GPU is present, fused AdamW, TRL's own
  chunked LM-head loss.
- `packed`: as `speed`, plus TRL's best-fit-decreasing packing into rows of max_length tokens, with as
  many rows per step as hold the harness's mean tokens per step: about, not exactly, the same examples
  per step (packing regroups them), so its loss is not the same experiment; a throughput reference only.
- `default`: SFTTrainer's defaults (gradient checkpointing on, padding to the longest, no packing).

TRL computes a completion-only loss with an EOS appended to each completion (one more target per
example: compare losses as a sanity check only). On CPU, bf16 is off for both. Tokens are counted the
same way for both: the real (unpadded) tokens of every batch the trainer's collator hands over. Writes
a markdown section to --out (default results/bench/<date>-<device>-train.md) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import models, train  # noqa: E402
from harness.config import load_task  # noqa: E402
from harness.data import mirror_dir  # noqa: E402

GOAL = 1.2


class TokenCounter:
    """Wraps a data collator and counts the real tokens of the batches it builds."""

    def __init__(self, inner):
        self.inner, self.tokens, self.batches = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.batches += 1
        return batch


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace("nvidia ", "nvidia-").replace(" ", "-")
    return "cpu"


def reset_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory():
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def liger_available() -> str | None:
    """None when Liger's kernels can run here, else why not (they are Triton kernels: GPU only)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed"
    return None


def trl_args(config: str, method, task, steps, tokens_per_step: float, liger: bool = True):
    """SFTConfig keyword arguments of one TRL configuration (see the module docstring)."""
    import torch

    t, settings = task.training, task.methods[method]
    micro = min(settings.micro_batch_size, t.batch_size)
    kw = dict(per_device_train_batch_size=micro, gradient_accumulation_steps=t.batch_size // micro,
              max_steps=steps, max_length=t.max_length, learning_rate=settings.learning_rate, seed=t.seed,
              data_seed=t.seed, save_strategy="no", report_to=[], disable_tqdm=True,
              warmup_steps=int(t.warmup_ratio * steps), lr_scheduler_type=t.lr_scheduler, logging_steps=t.logging_steps)
    if not torch.cuda.is_available():
        kw.update(bf16=False, use_cpu=True)  # TRL's default bf16 autocast is for GPUs
    if config == "default":
        return kw
    # TRL refuses padding-free rows with a max_length it cannot enforce; main() checks that no example
    # reaches max_length, so lifting it changes nothing.
    kw.update(gradient_checkpointing=False, padding_free=True, optim="adamw_torch_fused",
              use_liger_kernel=liger and liger_available() is None, max_length=None)
    if config == "packed":
        # Rows of max_length tokens, as many per step as carry the harness's tokens per step.
        rows = max(1, round(tokens_per_step / t.max_length))
        kw.update(packing=True, packing_strategy="bfd", max_length=t.max_length,
                  per_device_train_batch_size=rows, gradient_accumulation_steps=1)
    return kw


def run_trl(config, method, task, texts, model_path, steps, out_dir, tokens_per_step):
    """One TRL run; where Liger's kernels fail on this model or stack, the run is redone without them
    and the row says why (TRL's speed configuration minus what does not work here)."""
    try:
        return _run_trl(config, method, task, texts, model_path, steps, out_dir, tokens_per_step, liger=True)
    except Exception as e:  # noqa: BLE001 (any failure of Liger's patching or kernels)
        if config == "default" or liger_available() is not None:
            raise
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
        print(f"[bench] trl-{config} {method}: Liger failed ({why}); again without it", file=sys.stderr)
        reset_memory()
        res = _run_trl(config, method, task, texts, model_path, steps, Path(f"{out_dir}-noliger"), tokens_per_step,
                       liger=False)
        res["settings"] = res["settings"].replace("liger=off (not asked)", f"liger=failed ({why})")
        return res


def _run_trl(config, method, task, texts, model_path, steps, out_dir, tokens_per_step, *, liger):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    init_kwargs, peft_config = None, None
    if method == "qlora":
        init_kwargs = {"quantization_config": models.bnb_config(task.quant)}
    if method != "full":
        peft_config = LoraConfig(task_type="CAUSAL_LM", **task.lora)
    args = SFTConfig(output_dir=str(out_dir), model_init_kwargs=init_kwargs,
                     **trl_args(config, method, task, steps, tokens_per_step, liger))
    data = Dataset.from_list([{"prompt": p, "completion": a} for p, a in texts])
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=data, peft_config=peft_config,
                         processing_class=models.load_tokenizer(model_path))
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    reset_memory()
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    optim = getattr(args.optim, "value", args.optim)
    liger = "on" if args.use_liger_kernel else f"off ({liger_available() or 'not asked'})"
    settings = (f"gradient_checkpointing={args.gradient_checkpointing}, bf16={args.bf16}, packing={args.packing}, "
                f"padding_free={trainer.padding_free}, liger={liger}, optim={optim}, "
                f"rows/micro-batch={args.per_device_train_batch_size}")
    return {"seconds": seconds, "tokens": counter.tokens, "steps": trainer.state.global_step,
            "loss": out.training_loss, "peak": peak_memory(), "settings": settings}


def run_harness(method, task, profile, examples, model_path, out_dir):
    counters = []
    plain = train.collator

    def counting(*a, **kw):
        counters.append(TokenCounter(plain(*a, **kw)))
        return counters[-1]

    train.collator = counting
    try:
        reset_memory()
        res = train.run(method, task=task, profile=profile, model_path=model_path, examples=examples, out_dir=out_dir)
    finally:
        train.collator = plain
    s = res.stats
    out = {"seconds": s["seconds"], "tokens": counters[-1].tokens, "steps": s["steps"], "loss": s["train_loss"],
           "peak": s.get("peak_gpu_allocated_bytes"),
           "settings": f"gradient_checkpointing={task.training.gradient_checkpointing}, packing={s['packing']}, "
                       f"compute={s['compute_dtype']}"}
    del res
    return out


def warm_up():
    """First CUDA use pays for context and cuBLAS set-up: not either arm's cost."""
    import torch

    if torch.cuda.is_available():
        a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
        (a @ a).sum().item()


def fmt_mem(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="finance")
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="as harness --model (default: converted SmolLM2)")
    ap.add_argument("--methods", default="full,qlora")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    ap.add_argument("--examples", type=int, default=None, help="training examples (default: steps x batch)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of (trl, harness) per method")
    ap.add_argument("--trl", default="speed", help="TRL configurations, comma-separated: speed, packed, default")
    ap.add_argument("--warmup-steps", type=int, default=5,
                    help="on a GPU, one unmeasured run of this many steps per arm first (kernel compilation); 0: none")
    ap.add_argument("--mirror", default=None, help="dataset mirror (default: HARNESS_MIRROR)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import peft
    import torch
    import transformers
    import trl

    task = load_task(a.task)
    batch = task.training.batch_size
    examples_n = a.examples or a.steps * batch
    # Enough epochs that the harness, like TRL's max_steps, cycles the data for exactly --steps steps.
    task = load_task(a.task, [f"training.epochs={max(1.0, a.steps * batch / examples_n)}"])
    profile = dataclasses.replace(task.profiles.get("full") or next(iter(task.profiles.values())),
                                  train_examples=examples_n, max_steps=a.steps, batch_size=None)
    mirror = mirror_dir(a.mirror)
    model_path = models.resolve_model(a.model).path
    tok = models.load_tokenizer(model_path)
    texts, _ = train.training_texts(task, profile, mirror=mirror)
    examples, record = train.training_examples(task, profile, tok, mirror=mirror)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    configs = [c.strip() for c in a.trl.split(",") if c.strip()]
    bad = sorted(set(configs) - {"speed", "packed", "default"})
    if bad or not configs:
        ap.error(f"--trl {a.trl}: unknown configuration {', '.join(bad) or '(none)'}; valid: speed, packed, default")
    if record["truncated"] and set(configs) & {"speed", "packed"}:
        ap.error(f"{record['truncated']} examples exceed max_length {task.training.max_length}: TRL's padding-free "
                 "rows would not be cut as the harness cuts them; use --trl default")
    tokens_per_step = record["tokens"] / max(record["examples"], 1) * batch
    device = device_name()
    warm_up()
    rows = []
    arms = [f"trl-{c}" for c in configs] + ["harness"]
    warmed = bool(a.warmup_steps) and torch.cuda.is_available()

    def run(arm, method, steps, out_dir):
        with contextlib.redirect_stdout(io.StringIO()):
            if arm == "harness":
                return run_harness(method, task, dataclasses.replace(profile, max_steps=steps), examples,
                                   model_path, out_dir)
            return run_trl(arm[4:], method, task, texts, model_path, steps, out_dir, tokens_per_step)

    with tempfile.TemporaryDirectory() as tmp:
        if warmed:
            # One short unmeasured run of each arm first: Liger's Triton kernels compile on first use
            # (on an H100 that made TRL's first run 1.7x slower than its second), and neither side's
            # one-off compilation is what the comparison is about.
            for method in methods:
                for arm in arms:
                    run(arm, method, a.warmup_steps, Path(tmp) / f"warm-{arm}-{method}")
                    gc.collect()
            print(f"[bench] warm-up done ({a.warmup_steps} steps of each arm, not measured)", file=sys.stderr)
        for r in range(a.rounds):
            for method in methods:
                for arm in arms:
                    res = run(arm, method, a.steps, Path(tmp) / f"{arm}-{method}-{r}")
                    res.update(arm=arm, method=method, round=r + 1)
                    rows.append(res)
                    print(f"[bench] round {r + 1} {method} {arm}: {res['tokens'] / res['seconds']:,.0f} tok/s, "
                          f"{res['steps'] / res['seconds']:.2f} steps/s, loss {res['loss']:.4f}", file=sys.stderr)
                    gc.collect()

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"## Training throughput: harness vs TRL SFTTrainer ({device}, {date})", "",
             f"`scripts/bench_train.py --model {a.model} --methods {a.methods} --steps {a.steps} --rounds {a.rounds} "
             f"--trl {','.join(configs)}{f' --examples {a.examples}' if a.examples else ''} --warmup-steps {a.warmup_steps}`. "
             f"Task `{task.name}`: {record['examples']} examples ({record['tokens']:,} tokens, "
             f"{record['answer_tokens']:,} answer tokens), effective batch {task.training.batch_size}, "
             f"max_length {task.training.max_length}, {a.steps} optimizer steps per run, {a.rounds} round(s) "
             f"alternating {', '.join(f'trl-{c}' for c in configs)}, harness"
             f"{f', after an unmeasured {a.warmup_steps}-step run of each' if warmed else ''}. "
             f"torch {torch.__version__}, "
             f"transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}. Tokens: real "
             "(unpadded) tokens of the batches each trainer's collator built; time: `trainer.train()` only. "
             "TRL configurations: see the script's docstring.", "",
             "| method | arm | round | tokens/s | steps/s | peak allocated | mean train loss | settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in rows:
        lines.append(f"| {x['method']} | {x['arm']} | {x['round']} | {x['tokens'] / x['seconds']:,.0f} | "
                     f"{x['steps'] / x['seconds']:.2f} | {fmt_mem(x['peak'])} | {x['loss']:.4f} | {x['settings']} |")
    lines += ["", "| method | TRL configuration | TRL tokens/s | harness tokens/s | ratio | goal |",
              "| --- | --- | --- | --- | --- | --- |"]
    for method in methods:
        # Median over rounds: one slow round (first use, a neighbour's load) does not decide the ratio.
        def tps(arm):
            return statistics.median(x["tokens"] / x["seconds"] for x in rows if x["method"] == method and x["arm"] == arm)
        for c in configs:
            ratio = tps("harness") / tps(f"trl-{c}")
            verdict = "met" if ratio >= GOAL else "not met"
            lines.append(f"| {method} | {c} | {tps(f'trl-{c}'):,.0f} | {tps('harness'):,.0f} | {ratio:.2f}x | "
                         f">= {GOAL}x: {verdict} |")
    text = "\n".join(lines) + "\n"
    out = Path(a.out) if a.out else ROOT / "results" / "bench" / f"{date}-{device}-train.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"[bench] written to {out}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
