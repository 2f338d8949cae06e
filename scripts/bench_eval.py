"""Benchmark: plain lm-eval (`--model hf`) against the harness's suite evaluation, same model, tasks,
batch size and documents, alternating (ref, harness, ref, harness, ...), with a per-document check.

    HARNESS_MIRROR=../shared/hf-mirror python scripts/bench_eval.py                 # full general suite
    HARNESS_MIRROR=../shared/hf-mirror python scripts/bench_eval.py --limit 20 --tasks arc_easy,boolq

Reference: lm_eval.simple_evaluate(model="hf", model_args="pretrained=<dir>,dtype=<dtype>", batch_size=N)
on the same task configs (mirror-rewritten by harness.evaluate.task_config). Harness: load the model,
then harness.evaluate.evaluate (lm-eval's evaluator with the "harness" model class, all tasks in one
call). Each run's wall time covers model loading, building the tasks (the harness's per-process task
cache is emptied before each of its runs) and lm-eval's whole evaluation; both log samples (needed for
the check). Before timing, lm-eval's task index and the datasets cache are built once, so that neither
side pays for them. The process runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (as the
`harness` command sets it), for both sides. Writes the "## Evaluation" section of --out (markdown).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import evaluate, models  # noqa: E402
from harness.config import PROJECT_ROOT, load_suite  # noqa: E402

SECTION = "## Evaluation"
# bf16 rounds logits to ~3 significant digits; the two paths run different kernel shapes (one pass
# vs prefix + continuation), so log-likelihoods may differ by about this much per document.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25}
CHOSEN: dict = {}  # lm-eval hf's batch argument -> the batch sizes it reported using (auto's probe)
GOAL = 2.0  # issue 17: the harness's suite evaluation at least this much faster than lm-eval hf at batch auto


def batch_arg(value: str) -> int | str:
    """A batch size: a positive integer, or lm-eval's `auto` (it probes the largest batch memory holds)."""
    if value == "auto" or value.startswith("auto:"):
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a positive integer or auto")
    return n


def main() -> None:
    general = [t.task for t in load_suite("general").tasks]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="directory, hub id or harness alias")
    ap.add_argument("--tasks", default=",".join(general), help="comma-separated lm-eval tasks (default: general suite)")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (a seeded subset, as the harness's)")
    ap.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--hf-batch-size", type=batch_arg, action="append", default=None,
                    help="lm-eval hf's batch size, or auto (repeatable: lm-eval's own noise across batch sizes is "
                         "reported; default auto, the reference a user would pick)")
    ap.add_argument("--out", type=Path, default=None, help="markdown file (default results/bench/<date>-<device>.md)")
    args = ap.parse_args()

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts
    import torch

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    mirror = Path(os.environ["HARNESS_MIRROR"]) if os.environ.get("HARNESS_MIRROR") else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    evaluate.check_tasks(tasks)
    path = models.resolve_model(args.model).path
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    samples = evaluate.subsample(tasks, args.limit, mirror=mirror, seed=0) if args.limit else None
    configs = [evaluate.task_config(t, mirror=mirror) for t in tasks]
    evaluate.task_manager().load_task_or_group(configs)  # warm-up: the datasets cache

    hf_batches = args.hf_batch_size or ["auto"]
    runs, raw, extra = [], {}, {}
    for r in range(args.rounds):
        for side, batch in [("hf", hf_batches[0]), ("harness", args.batch_size)] + (
                [("hf", b) for b in hf_batches[1:]] if r == 0 else []):
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds, metrics, resp = _run(side, path, tasks, configs, samples, mirror, args, dev, batch)
            peak = ((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if dev == "cuda"
                    else (None, None))
            if side == "hf" and batch != hf_batches[0]:
                extra[batch] = (seconds, resp)  # lm-eval's own noise: not a timing round
            else:
                runs.append((side, r + 1, seconds, *peak))
                raw.setdefault(side, (metrics, resp))
            print(f"[bench] {side} (batch {batch}) round {r + 1}: {seconds:.1f}s", flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
    section = _render(runs, raw, tasks, args, device_name, dev, hf_batches[0], extra)
    out = args.out or PROJECT_ROOT / "results" / "bench" / f"{date.today()}-{_slug(device_name)}.md"
    _write_section(out, section)
    print(section)
    print(f"[bench] wrote {out}")


def _run(side, path, tasks, configs, samples, mirror, args, dev, batch):
    """One timed evaluation: (seconds, {task: metrics}, raw responses)."""
    import torch

    start = time.perf_counter()
    if side == "hf":
        from lm_eval import simple_evaluate

        out = simple_evaluate(model="hf", model_args=f"pretrained={path},dtype={args.dtype}", device=dev,
                              batch_size=batch, tasks=configs, samples=samples, log_samples=True,
                              task_manager=evaluate.task_manager(), random_seed=0, numpy_random_seed=0,
                              torch_random_seed=0, fewshot_random_seed=0)
        seconds = time.perf_counter() - start
        CHOSEN.setdefault(batch, out["config"].get("batch_sizes"))
        metrics = {t: {k.replace(",none", ""): v for k, v in out["results"][t].items()
                       if "," in k and "stderr" not in k} for t in tasks}
        return seconds, metrics, evaluate.raw_responses(out)
    from transformers import AutoModelForCausalLM

    evaluate._TASKS.clear()  # this run builds its tasks, as the reference does
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(dev).eval()
    tokenizer = models.load_tokenizer(path)
    ev = evaluate.evaluate(model, tokenizer, tasks, mirror=mirror, limit=args.limit, batch_size=batch,
                           raw=True, backend="harness")
    seconds = time.perf_counter() - start
    metrics = {t: {k: v for k, v in ev["results"][t].items() if "stderr" not in k} for t in tasks}
    return seconds, metrics, ev["raw"]


def _render(runs, raw, tasks, args, device_name, dev, hf_batch, extra) -> str:
    ref = [s for side, _, s, *_ in runs if side == "hf"]
    fast = [s for side, _, s, *_ in runs if side == "harness"]
    mem = {side: [(a, b) for s_, _, _, a, b in runs if s_ == side] for side in ("hf", "harness")}
    agree = evaluate.agreement(raw["hf"][1], raw["harness"][1])
    tol = TOLERANCE[args.dtype]
    ok = agree["same_pred"] == agree["documents"] and agree["max_abs_diff"] <= tol
    mc = max(args.batch_size, evaluate.GPU_MC_BATCH) if dev == "cuda" else args.batch_size
    lines = [SECTION, "",
             f"`scripts/bench_eval.py --model {args.model} --tasks {','.join(tasks)} --dtype {args.dtype} "
             f"--batch-size {args.batch_size}{''.join(f' --hf-batch-size {b}' for b in [hf_batch, *extra])}"
             f"{f' --limit {args.limit}' if args.limit else ''}` on {device_name}, "
             f"{agree['documents']} documents.", "",
             f"Reference: `lm_eval.simple_evaluate(model=\"hf\", batch_size={hf_batch})` (lm-eval's HFLM). "
             f"Harness: `harness.evaluate.evaluate` (model class `harness`, up to {mc} multiple-choice requests per "
             f"batch{', prefixes within ' + str(evaluate.GPU_PREFIX_RATIO) + 'x of the longest' if dev == 'cuda' else ''}). "
             "Wall time includes loading the model; both log samples."
             f"{f' lm-eval hf at auto used batch sizes {CHOSEN.get(hf_batch)}.' if hf_batch in CHOSEN else ''}", "",
             "| run | lm-eval hf (s) | harness (s) | peak allocated / reserved, hf | peak allocated / reserved, "
             "harness |", "|---|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(ref, fast, strict=True)):
        lines.append(f"| {i + 1} | {a:.1f} | {b:.1f} | {_gib(*mem['hf'][i])} | {_gib(*mem['harness'][i])} |")
    ratio = statistics.median(ref) / statistics.median(fast)
    lines += ["", f"Speed-up: **{min(ref) / min(fast):.2f}x** (best of each), {ratio:.2f}x (medians); goal "
              f">= {GOAL}x against lm-eval hf at batch auto: "
              f"{('met' if ratio >= GOAL else 'not met') if hf_batch == 'auto' else 'not measured (hf batch not auto)'}.",
              "",
              f"Agreement: same choice on {agree['same_pred']}/{agree['documents']} documents, same is_greedy "
              f"flags: {'yes' if agree['same_greedy'] else 'no'}, max |Δ log-likelihood| {agree['max_abs_diff']:.2e} "
              f"(tolerance {tol:g} in {args.dtype}): **{'PASS' if ok else 'FAIL'}**.", "",
              *_noise(raw, extra, hf_batch, args.dtype),
              "| task | metric | lm-eval hf | harness |", "|---|---|---|---|"]
    for t in tasks:
        a, b = raw["hf"][0][t], raw["harness"][0][t]
        for m in sorted(a):
            if isinstance(a[m], (int, float)) and m in b:
                lines.append(f"| {t} | {m} | {a[m]:.4f} | {b[m]:.4f} |")
    return "\n".join(lines) + "\n"


def _noise(raw, extra, hf_batch, dtype) -> list[str]:
    """lm-eval's own disagreement with itself across batch sizes, beside the harness's with it: whether
    the harness's differences are within the noise of the reference's batch shapes."""
    if not extra:
        return []
    ref, fast = raw["hf"][1], raw["harness"][1]
    lines = [f"Noise of lm-eval itself ({dtype}), choices that differ between runs on the same documents:", "",
             "| pair | different choice | max \u0394 log-likelihood |", "|---|---|---|"]

    def row(name, a, b):
        g = evaluate.agreement(a, b)
        lines.append(f"| {name} | {g['documents'] - g['same_pred']} / {g['documents']} | {g['max_abs_diff']:.2e} |")

    row(f"lm-eval hf {hf_batch} vs harness", ref, fast)
    for b, (_, resp) in extra.items():
        row(f"lm-eval hf {hf_batch} vs lm-eval hf {b}", ref, resp)
        row(f"lm-eval hf {b} vs harness", resp, fast)
    return lines + [""]


def _gib(allocated, reserved) -> str:
    return "n/a" if allocated is None else f"{allocated / 2**30:.1f} / {reserved / 2**30:.1f} GiB"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _write_section(path: Path, section: str) -> None:
    """Replace this script's section of a shared bench report (other bench scripts write theirs)."""
    from harness.io import write_text

    heading = section.splitlines()[0]  # each script's own "## ..." line: it replaces only its section
    old = path.read_text() if path.exists() else ""
    kept = re.sub(rf"(?ms)^{re.escape(heading)}\n.*?(?=^## |\Z)", "", old).rstrip()
    head = "" if kept else f"# Benchmarks, {date.today()}\n"
    write_text(path, (kept or head) + "\n\n" + section)


if __name__ == "__main__":
    main()
