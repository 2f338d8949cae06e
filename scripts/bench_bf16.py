"""Where bf16 evaluation differs: lm-eval hf and the harness in bf16, each with lm-eval's default
log-softmax (in the model's dtype) and with it in fp32, all against the fp32 model as the reference.

    HARNESS_MIRROR=../shared/hf-mirror python scripts/bench_bf16.py            # 1,000 documents per task

Per run: documents whose chosen answer differs from fp32's, mean and max |Δ log-likelihood| per
choice against fp32, and the same between the hf and harness runs of one setting. Writes the
"## bf16 parity" section of --out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_eval import _run, _slug, _write_section  # noqa: E402

from harness import evaluate, models  # noqa: E402
from harness.config import load_suite  # noqa: E402

SECTION = "## bf16 parity"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default=",".join(t.task for t in load_suite("general").tasks))
    ap.add_argument("--limit", type=int, default=1000, help="documents per task, a seeded subset (0: all)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="markdown file (default results/bench/<date>-<device>.md)")
    ap.add_argument("--runs", type=int, default=5, help="the first N of the five settings")
    args = ap.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    mirror = Path(os.environ["HARNESS_MIRROR"]) if os.environ.get("HARNESS_MIRROR") else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    evaluate.check_tasks(tasks)
    path = models.resolve_model(args.model).path
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    samples = evaluate.subsample(tasks, args.limit, mirror=mirror, seed=0) if args.limit else None
    configs = [evaluate.task_config(t, mirror=mirror) for t in tasks]
    evaluate.task_manager().load_task_or_group(configs)

    original = evaluate.make_lm
    raw = {}
    for name, side, dtype, softmax in [("fp32 harness", "harness", "float32", None),
                                       ("bf16 hf", "hf", "bfloat16", None),
                                       ("bf16 harness", "harness", "bfloat16", None),
                                       ("bf16 hf, fp32 softmax", "hf", "bfloat16", "float32"),
                                       ("bf16 harness, fp32 softmax", "harness", "bfloat16", "float32")][:args.runs]:
        def make_lm(*a, _s=softmax, **k):
            lm = original(*a, **k)
            lm.softmax_dtype = getattr(torch, _s) if _s else None
            return lm

        evaluate.make_lm = make_lm
        # lm-eval hf takes its softmax dtype in model_args; the harness's is set by make_lm above.
        hf_softmax = f",softmax_dtype={softmax}" if side == "hf" and softmax else ""
        ns = argparse.Namespace(dtype=dtype + hf_softmax, limit=args.limit)
        try:
            seconds, _, resp = _run(side, path, tasks, configs, samples, mirror, ns, dev, args.batch_size)
        except Exception as e:  # one setting that lm-eval refuses still leaves the others' figures
            print(f"[bench] {name}: failed ({type(e).__name__}: {e})", flush=True)
            continue
        raw[name] = resp
        _write(raw, args, dev, tasks)
        print(f"[bench] {name}: {seconds:.1f}s", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    evaluate.make_lm = original
    print(_write(raw, args, dev, tasks))


def _write(raw, args, dev, tasks) -> str:
    import torch

    def compare(a, b):
        docs = diff = 0
        total = count = 0.0
        worst = 0.0
        for task, rows in raw[a].items():
            for doc, x in rows.items():
                y = raw[b][task][doc]
                docs += 1
                diff += evaluate._argmax(x) != evaluate._argmax(y)
                for (u, _), (v, _) in zip(x, y, strict=True):
                    total += abs(u - v)
                    count += 1
                    worst = max(worst, abs(u - v))
        return f"| {a} | {b} | {diff} / {docs} | {total / count:.2e} | {worst:.2e} |"

    lines = [SECTION, "", f"`scripts/bench_bf16.py --batch-size {args.batch_size}"
             f"{f' --limit {args.limit}' if args.limit else ''} --runs {args.runs}` on "
             f"{torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu'}, tasks {', '.join(tasks)}.", "",
             "| run | against | different choice | mean abs Δ loglik per choice | max abs Δ |", "|---|---|---|---|---|"]
    for name in list(raw)[1:]:
        lines.append(compare(name, "fp32 harness"))
    for a, b in (("bf16 hf", "bf16 harness"), ("bf16 hf, fp32 softmax", "bf16 harness, fp32 softmax")):
        if a in raw and b in raw:
            lines.append(compare(a, b))
    section = "\n".join(lines) + "\n"
    from datetime import date

    from harness.config import PROJECT_ROOT

    name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    _write_section(args.out or PROJECT_ROOT / "results" / "bench" / f"{date.today()}-{_slug(name)}.md", section)
    return section


if __name__ == "__main__":
    main()
