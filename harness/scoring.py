"""Evaluate one model of a run and record it: the run's lm-eval tasks, the perplexity task, and
KL(base || model) (harness/drift.py); then arms/<name>.json with its per-document values beside it.

Used by the references (harness/references.py) and by every arm and point (harness/arms.py), so all
of them are measured the same way on the same documents.
"""

from __future__ import annotations

import gc
from pathlib import Path

from harness import distributed, drift, evaluate, models, records, resources
from harness.io import log, stop_point, write_samples
from harness.planning import Run, read_or_none


def evaluate_model(run: Run, name: str, model, tasks: list[str], with_ppl: bool,
                   load: dict | None = None) -> tuple[dict | None, dict | None, dict]:
    """lm-eval on `tasks` (one evaluator call) and, if asked, the perplexity task; and what the whole
    evaluation cost (resources.measure: time, peak RSS / GPU memory, model footprint). With
    profiles.*.eval_processes > 1 and a model that can be loaded again (`load`: models.load_base or
    load_arm arguments), the tasks are scored over that many processes (harness/distributed.py);
    the memory figures are then this process's, not the ranks'."""
    tokenizer = models.load_tokenizer(run.resolved.path)
    suite = run.plan.suite
    ev = ppl = None
    with resources.measure() as measured:
        if tasks:
            log(f"{name}: evaluating {len(tasks)} tasks")
            run_of = run.run_of
            n = run.plan.profile.eval_processes or 1
            if n > 1 and load is not None:
                ev = distributed.evaluate(load, [run_of[t] for t in tasks], n=n, device=models.device_kind(),
                                          work=run.plan.work_dir / "eval" / name, **run.eval_kw)
            else:
                ev = evaluate.evaluate(model, tokenizer, [run_of[t] for t in tasks], **run.eval_kw)
            log(f"{name}: evaluated in {ev['seconds']:.0f}s")
            stop_point(f"evaluating:{name}")
        if with_ppl:
            task = suite.perplexity.task
            pv = evaluate.evaluate(model, tokenizer, [task], **run.ppl_kw)
            # Drift is paired per document by bits per byte; the word and byte perplexities stay lm-eval's
            # corpus figures, unpaired, so these records (and the cached baselines') keep their form.
            recs = [{k: v for k, v in r.items() if not k.endswith(":s")} for r in pv["samples"][task]]
            ppl = {**pv["results"][task], "n": pv["n"][task], "seconds": pv["seconds"], "task": task,
                   "samples": recs, "version": pv["versions"][task]}
            wp = ppl.get("word_perplexity")  # None where lm-eval's was nan (a diverged model)
            log(f"{name}: {task} word perplexity {'n/a (nan)' if wp is None else format(wp, '.2f')} "
                f"({ppl['n']} documents, {pv['seconds']:.0f}s)")
    return ev, ppl, {**measured.result, "model_footprint_bytes": resources.footprint_bytes(model)}


def kl_to_base(run: Run, name: str, model) -> dict | None:
    """KL(base || model) per token on the WikiText pages and the domain prompts (harness/drift.py)."""
    task, profile, suite = run.plan.task, run.plan.profile, run.plan.suite
    if not task.kl.enabled:
        return None
    sources = {}
    if suite.perplexity is not None:
        sources["general"] = (suite.perplexity.task, _min(profile.perplexity_limit, profile.kl_documents))
    sources["domain"] = (task.kl.domain_task or task.train.format_task, _min(profile.limit, profile.kl_documents))
    texts = {k: (t, evaluate.kl_documents(t, mirror=run.plan.mirror, limit=lim, seed=task.training.seed))
             for k, (t, lim) in sources.items()}
    out = {}
    # Measured as a stage of its own: it holds a second copy of the base beside the arm, the peak
    # that decides whether an arm fits (at 8B, 32 GB more than its evaluation).
    with resources.measure() as measured:
        base_model = models.load_base(run.resolved.path)
        tokenizer = models.load_tokenizer(run.resolved.path)
        footprint = resources.footprint_bytes(base_model) + resources.footprint_bytes(model)
        for k, (t, docs) in texts.items():
            per_doc = drift.kl_per_document(base_model, model, tokenizer, docs, max_tokens=task.kl.max_tokens)
            out[k] = {"task": t, "max_tokens": task.kl.max_tokens, "docs": per_doc}
        del base_model
        gc.collect()
        free_gpu()
    summary = ", ".join(f"{k} {drift.mean_kl(v['docs']):.4g}" for k, v in out.items())
    log(f"{name}: KL(base || {name}) per token: {summary} ({measured.result['seconds']:.0f}s)")
    # Sources are the dict values; the stage's figures sit beside them as plain values.
    return {**out, **measured.result, "model_footprint_bytes": footprint}


def evaluate_and_record(run: Run, name: str, model, inputs: str, train_stats: dict | None,
                        point: dict | None = None, load: dict | None = None) -> None:
    """Every measurement of a trained model (or a point of one), then its record. Where KL follows,
    the evaluation is kept in the work directory until the record is written, so a run stopped
    during KL resumes at KL (on a GPU with a 10-minute call limit, a full-profile arm's evaluation
    is minutes that a resume would otherwise spend again)."""
    kept = run.plan.work_dir / "evaluated" / f"{name}.json"
    earlier = read_or_none(kept, records.read_evaluated) if kept.exists() else None
    if earlier is not None and earlier.inputs == inputs:
        ev, ppl, used = earlier.evaluation, earlier.perplexity, earlier.resources
        log(f"{name}: evaluation recorded for these inputs, reused; measuring KL")
    else:
        ev, ppl, used = evaluate_model(run, name, model, run.eval_tasks, run.ppl_kw is not None, load=load)
        if run.plan.task.kl.enabled:
            records.write(kept, records.EvaluatedRecord(inputs, ev, ppl, used))
            stop_point(f"evaluated:{name}")
    kl = kl_to_base(run, name, model)
    record(run.run_dir, name, inputs, ev, train_stats=train_stats, perplexity=ppl, eval_resources=used, kl=kl,
           point=point)
    kept.unlink(missing_ok=True)  # the arm's record holds it all now


def record(run_dir: Path, arm: str, inputs: str, ev: dict, *, train_stats: dict | None,
           perplexity: dict | None = None, baseline: dict | None = None, eval_resources: dict | None = None,
           kl: dict | None = None, point: dict | None = None) -> None:
    """Per-document records first, the arm's JSON last: the JSON's presence means the arm is done."""
    samples = dict(ev["samples"])
    if perplexity is not None and perplexity.get("samples"):  # per-document bits per byte: paired drift
        samples[perplexity["task"]] = perplexity["samples"]
    if perplexity is not None:
        perplexity = {k: v for k, v in perplexity.items() if k not in ("samples", "version")}
    write_samples(run_dir / "samples" / f"{arm}.csv", samples)
    records.write(run_dir / "arms" / f"{arm}.json", records.ArmRecord(
        arm=arm, inputs=inputs, results=ev["results"], n=ev["n"], versions=ev["versions"], eval_seconds=ev["seconds"],
        train=train_stats, perplexity=perplexity, eval_resources=eval_resources, kl=kl, baseline=baseline, point=point))
    stop_point(f"recorded:{arm}")


def record_failure(run_dir: Path, arm: str, inputs: str, stage: str, e: BaseException) -> None:
    """A failed arm is recorded as such, with the memory it reached: the report shows it, a re-run retries it."""
    import torch

    gpu = {}
    if models.device_kind() == "cuda":  # the run's device: none on a CPU run, GPU or not
        gpu = {"peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(),
               "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved()}
    records.write(run_dir / "arms" / f"{arm}.json", records.FailedArm(
        arm=arm, inputs=inputs, stage=stage, error_type=type(e).__name__,
        error=str(e).splitlines()[0][:500] if str(e) else type(e).__name__,
        peak_rss_bytes=resources.peak_rss_since_reset() or resources.rss_bytes(), **gpu))


def free_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _min(*xs):
    xs = [x for x in xs if x is not None]
    return min(xs) if xs else None
