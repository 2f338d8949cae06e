"""Training throughput: the harness's train.run against TRL's SFTTrainer with its default settings.

    python scripts/bench_train.py                       # full + qlora, 200 steps, 2 rounds
    python scripts/bench_train.py --steps 5 --examples 160 --rounds 1 --methods full   # CPU smoke

Both arms get the same model, the same (prompt, answer) examples in the same order, the same
effective batch, max length, learning rate and number of optimizer steps; they alternate
(trl, harness, trl, harness, ...) in one process so drift in the machine hits both. TRL runs with
SFTTrainer's defaults otherwise (TRL 1.x SFTConfig: bf16 autocast over fp32 weights, gradient
checkpointing on, no packing, pad to the longest in the batch, completion-only loss for a
prompt/completion dataset with an EOS appended to each completion (so its loss has one more target
per example: compare losses as a sanity check only), logging_steps 10, fused AdamW); on CPU bf16 is
turned off for both. Tokens are counted the same way for both: the real (unpadded) tokens of every
batch the trainer's collator hands over. Writes a markdown section to --out
(default results/bench/<date>-<device>-train.md) and prints it.
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


def run_trl(method, task, texts, model_path, steps, out_dir):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    t, settings = task.training, task.methods[method]
    micro = min(settings.micro_batch_size, t.batch_size)
    cuda = torch.cuda.is_available()
    kw = {} if cuda else {"bf16": False, "use_cpu": True}  # TRL's default bf16 autocast is for GPUs
    init_kwargs, peft_config = None, None
    if method == "qlora":
        init_kwargs = {"quantization_config": models.bnb_config(task.quant)}
    if method != "full":
        peft_config = LoraConfig(task_type="CAUSAL_LM", **task.lora)
    args = SFTConfig(
        output_dir=str(out_dir), per_device_train_batch_size=micro, gradient_accumulation_steps=t.batch_size // micro,
        max_steps=steps, max_length=t.max_length, learning_rate=settings.learning_rate, seed=t.seed,
        data_seed=t.seed, save_strategy="no", report_to=[], model_init_kwargs=init_kwargs, disable_tqdm=True, **kw)
    data = Dataset.from_list([{"prompt": p, "completion": a} for p, a in texts])
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=data, peft_config=peft_config,
                         processing_class=models.load_tokenizer(model_path))
    counter = trainer.data_collator = TokenCounter(trainer.data_collator)
    reset_memory()
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    optim = getattr(args.optim, "value", args.optim)
    return {"seconds": seconds, "tokens": counter.tokens, "steps": trainer.state.global_step,
            "loss": out.training_loss, "peak": peak_memory(),
            "settings": f"gradient_checkpointing={args.gradient_checkpointing}, bf16={args.bf16}, "
                        f"packing={args.packing}, padding_free={args.padding_free}, optim={optim}"}


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
    device = device_name()
    warm_up()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for method in methods:
                for arm in ("trl", "harness"):
                    out_dir = Path(tmp) / f"{arm}-{method}-{r}"
                    quiet = io.StringIO()
                    with contextlib.redirect_stdout(quiet):
                        if arm == "trl":
                            res = run_trl(method, task, texts, model_path, a.steps, out_dir)
                        else:
                            res = run_harness(method, task, profile, examples, model_path, out_dir)
                    res.update(arm=arm, method=method, round=r + 1)
                    rows.append(res)
                    print(f"[bench] round {r + 1} {method} {arm}: {res['tokens'] / res['seconds']:,.0f} tok/s, "
                          f"{res['steps'] / res['seconds']:.2f} steps/s, loss {res['loss']:.4f}", file=sys.stderr)
                    gc.collect()

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"## Training throughput: harness vs TRL SFTTrainer ({device}, {date})", "",
             f"Model `{a.model}`, task `{task.name}`: {record['examples']} examples ({record['tokens']:,} tokens, "
             f"{record['answer_tokens']:,} answer tokens), effective batch {task.training.batch_size}, "
             f"max_length {task.training.max_length}, {a.steps} optimizer steps per run, {a.rounds} round(s) "
             f"alternating trl, harness. torch {torch.__version__}, transformers {transformers.__version__}, "
             f"trl {trl.__version__}, peft {peft.__version__}. Tokens: real (unpadded) tokens "
             "of the batches each trainer's collator built; time: `trainer.train()` only.", "",
             "| method | arm | round | tokens/s | steps/s | peak allocated | mean train loss | settings |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in rows:
        lines.append(f"| {x['method']} | {x['arm']} | {x['round']} | {x['tokens'] / x['seconds']:,.0f} | "
                     f"{x['steps'] / x['seconds']:.2f} | {fmt_mem(x['peak'])} | {x['loss']:.4f} | {x['settings']} |")
    lines += ["", "| method | TRL tokens/s | harness tokens/s | ratio | goal |", "| --- | --- | --- | --- | --- |"]
    for method in methods:
        # Median over rounds: one slow round (first use, a neighbour's load) does not decide the ratio.
        tps = {arm: statistics.median(x["tokens"] / x["seconds"] for x in rows
                                      if x["method"] == method and x["arm"] == arm) for arm in ("trl", "harness")}
        ratio = tps["harness"] / tps["trl"]
        verdict = "met" if ratio >= GOAL else "not met"
        lines.append(f"| {method} | {tps['trl']:,.0f} | {tps['harness']:,.0f} | {ratio:.2f}x | >= {GOAL}x: {verdict} |")
    text = "\n".join(lines) + "\n"
    out = Path(a.out) if a.out else ROOT / "results" / "bench" / f"{date}-{device}-train.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"[bench] written to {out}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
