"""Benchmark: generation (IFEval, all 541 prompts, greedy) through plain lm-eval (`--model hf`,
`batch_size=auto`) against the harness's model class, same model, prompts (chat template) and cap on
new tokens, with a per-prompt comparison of the generated text.

    HARNESS_MIRROR=../shared/hf-mirror NLTK_DATA=../shared/nltk_data python scripts/bench_generate.py
    ... --limit 20 --max-gen-toks 64          # a quick look (CPU)

Reference, as a user would run it: lm_eval.simple_evaluate(model="hf", model_args="pretrained=<dir>,
dtype=<dtype>", batch_size="auto", apply_chat_template=True, gen_kwargs="max_gen_toks=N") on IFEval
(mirror-rewritten by harness.evaluate.task_config). Harness: the same call with the model class
harness.evaluate.make_lm builds (all prompts that fit its memory budget in one batch). A third run,
lm-eval's HFLM at the harness's batch size (skipped with `--no-explain`), tells batch-shape numerics from a harness bug: a
prompt whose text differs between hf@auto and the harness but not between hf@<harness batch> and the
harness differs because the batch (padding, kernel shapes) differs, not because of the harness.
Wall time covers loading the model and lm-eval's whole evaluation (both log samples). Writes the
"## Generation" section of --out (markdown).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import evaluate, models  # noqa: E402
from harness.config import PROJECT_ROOT  # noqa: E402

from bench_eval import _gib, _slug, _write_section  # noqa: E402

SECTION = "## Generation"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="directory, hub id or harness alias")
    ap.add_argument("--task", default="ifeval", help="an lm-eval generate_until task")
    ap.add_argument("--limit", type=int, default=None, help="prompts (a seeded subset, as the harness's)")
    ap.add_argument("--max-gen-toks", type=int, default=256, help="cap on new tokens (both sides)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--no-explain", action="store_true", help="skip hf at the harness's batch size")
    ap.add_argument("--out", type=Path, default=None, help="markdown file (default results/bench/<date>-<device>.md)")
    args = ap.parse_args()

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    mirror = Path(os.environ["HARNESS_MIRROR"]) if os.environ.get("HARNESS_MIRROR") else None
    evaluate.check_tasks([args.task])
    path = models.resolve_model(args.model).path
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    samples = evaluate.subsample([args.task], args.limit, mirror=mirror, seed=0)
    config = evaluate.task_config(args.task, mirror=mirror)
    evaluate.task_manager().load_task_or_group([config])  # warm-up: the datasets cache

    runs = {}
    # On a CPU, `auto` probes batches of the model's whole window (8,192 tokens for SmolLM2) for
    # over ten minutes: a fixed batch stands in there.
    order = [("hf", "auto" if dev == "cuda" else 8), ("harness", None)]
    for side, batch in order:
        runs[(side, batch)] = _timed(side, batch, path, config, samples, mirror, args, dev)
        print(f"[bench] {side} batch {batch or 'harness'}: {runs[(side, batch)]['seconds']:.1f}s", flush=True)
    harness_batch = runs[("harness", None)]["batch"]
    if not args.no_explain and ("hf", harness_batch) not in runs:
        runs[("hf", harness_batch)] = _timed("hf", harness_batch, path, config, samples, mirror, args, dev)
        print(f"[bench] hf batch {harness_batch}: {runs[('hf', harness_batch)]['seconds']:.1f}s", flush=True)
    section = _render(runs, harness_batch, args, device_name, len(samples[args.task]))
    out = args.out or PROJECT_ROOT / "results" / "bench" / f"{date.today()}-{_slug(device_name)}.md"
    _write_section(out, section)
    print(section)
    print(f"[bench] wrote {out}")


def _timed(side, batch, path, config, samples, mirror, args, dev) -> dict:
    """One timed evaluation: seconds, peak memory, {doc_id: generated text}, metrics, batch size."""
    import torch
    from lm_eval import simple_evaluate

    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    common = dict(tasks=[config], samples=samples, log_samples=True, apply_chat_template=True,
                  gen_kwargs=f"max_gen_toks={args.max_gen_toks}", task_manager=evaluate.task_manager(),
                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    used = batch
    evaluate.seed_checks(0)  # IFEval's langdetect draws at random: the same text scores alike on every side
    if side == "hf":
        out = simple_evaluate(model="hf", model_args=f"pretrained={path},dtype={args.dtype}", device=dev,
                              batch_size=batch, **common)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(dev).eval()
        lm = evaluate.make_lm(model, models.load_tokenizer(path), batch_size=64)
        sizes = []
        original = lm._model_generate
        lm._model_generate = lambda context, **kw: sizes.append(context.shape[0]) or original(context=context, **kw)
        out = simple_evaluate(model=lm, **common)
        used = max(sizes)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if dev == "cuda" else (None, None)
    rows = out["samples"][args.task]
    texts = {s["doc_id"]: s["resps"][0][0] for s in rows}
    metrics = {k.split(",")[0]: v for k, v in out["results"][args.task].items()
               if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    return {"seconds": seconds, "peak": peak, "texts": texts, "metrics": metrics, "batch": used}


def _differ(a: dict, b: dict) -> list[int]:
    return sorted(d for d in a if a[d] != b.get(d))


def _render(runs, harness_batch, args, device_name, n) -> str:
    ref, fast = next(iter(runs.values())), runs[("harness", None)]
    same_batch = runs.get(("hf", harness_batch))
    diff = _differ(ref["texts"], fast["texts"])
    lines = [SECTION, "",
             f"`scripts/bench_generate.py --model {args.model} --task {args.task} --max-gen-toks {args.max_gen_toks} "
             f"--dtype {args.dtype}{f' --limit {args.limit}' if args.limit else ''}` on {device_name}: {n} prompts, "
             "chat template, greedy decoding.", "",
             f"Reference: `lm_eval.simple_evaluate(model=\"hf\", batch_size={ref['batch']!r}, apply_chat_template=True, "
             f"gen_kwargs=\"max_gen_toks={args.max_gen_toks}\")` (lm-eval's HFLM; `auto` picks its batch by probing "
             f"memory, at most 64; a CPU uses 8). Harness: model class `harness`, {harness_batch} prompts per batch (as many as "
             f"{evaluate.GPU_GEN_MEMORY / 2**30:.0f} GiB of KV cache and activations hold). Wall time includes loading "
             "the model; both log samples.", "",
             "| run | prompts per batch | wall (s) | peak allocated / reserved |", "|---|---|---|---|"]
    for (side, batch), r in runs.items():
        label = {"hf": "lm-eval hf", "harness": "harness"}[side]
        lines.append(f"| {label} | {r['batch']} | {r['seconds']:.1f} | {_gib(*r['peak'])} |")
    lines += ["", f"Speed-up: **{ref['seconds'] / fast['seconds']:.2f}x** (lm-eval hf at `{ref['batch']}` / harness).", ""]
    text = f"Outputs: {n - len(diff)}/{n} prompts generated the same text on both."
    if diff and same_batch is not None:
        explained = [d for d in diff if same_batch["texts"].get(d) == fast["texts"][d]]
        own = _differ(same_batch["texts"], fast["texts"])
        text += (f" Of the {len(diff)} that differ, {len(explained)} generate the harness's text under lm-eval's own "
                 f"HFLM at {harness_batch} prompts per batch: batch-shape numerics ({args.dtype} sums in another order "
                 "with other padding), not the harness. lm-eval hf at the harness's batch size against the harness: "
                 f"{n - len(own)}/{n} the same.")
    lines += [text, "", "| metric | " + " | ".join(f"{'hf' if s == 'hf' else 'harness'} ({b or 'harness'})"
                                                   for s, b in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for m in sorted(ref["metrics"]):
        lines.append(f"| {m} | " + " | ".join(f"{r['metrics'].get(m, float('nan')):.4f}" for r in runs.values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
