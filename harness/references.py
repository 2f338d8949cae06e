"""Stage 3, the references: the untouched base, and the 4-bit base without adapter (QLoRA's own
starting point, to separate quantization from training). Each is evaluated once per inputs, and
only on the tasks the baseline cache (harness/baselines.py) does not already hold for this exact
model and setup.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from harness import baselines, corpus, evalplan, evaluate, models, scoring
from harness.io import log, stop_point
from harness.planning import Run, input_hash
from harness.plots import NF4_REFERENCE


@dataclass(frozen=True)
class Reference:
    name: str
    inputs: str
    quant: dict | None  # the 4-bit base's quantization; None for the base


def of(run: Run) -> list[Reference]:
    """The run's references: the base; the 4-bit base where a QLoRA arm is compared and the profile asks."""
    refs = [Reference("base", input_hash(run.common), None)]
    if run.plan.profile.quant_reference and any(a.method == "qlora" for a in run.arms):
        quant = run.plan.task.quant
        refs.append(Reference(NF4_REFERENCE, input_hash({**run.common, "quant": quant}), quant))
    return refs


def cached(run: Run, ref: Reference) -> bool:
    """Every task of this reference is in the baseline cache: nothing to load or evaluate."""
    return not run.spec.refresh_baseline and all(
        baselines.lookup(run.spec.baselines_dir, k) is not None for k in _baseline_keys(run, ref.quant).values())


def evaluate_reference(run: Run, ref: Reference) -> None:
    """Evaluate what the baseline cache lacks, merge the rest from it, record the reference."""
    name, inputs, quant = ref.name, ref.inputs, ref.quant
    if run.done(name, inputs):
        log(f"{name}: evaluation recorded for these inputs, reused")
        return
    spec, task, suite = run.spec, run.plan.task, run.plan.suite
    keys = _baseline_keys(run, quant)
    hits = {} if spec.refresh_baseline else {
        t: e for t, k in keys.items() if (e := baselines.lookup(spec.baselines_dir, k)) is not None}
    missing = [t for t in run.eval_tasks if t not in hits]
    want_ppl = run.ppl_kw is not None and suite.perplexity.task not in hits
    ev = ppl = used = None  # used stays None when every task came from the baseline cache
    want_kl = quant is not None and task.kl.enabled  # the 4-bit base drifts too; the base itself: 0
    kl = None
    if missing or want_ppl or want_kl:
        model = models.load_base(run.resolved.path, quant=quant)
        if missing or want_ppl:
            ev, ppl, used = scoring.evaluate_model(run, name, model, missing, want_ppl,
                                                   load={"path": run.resolved.path, "quant": quant})
            _store_baselines(run, name, keys, ev, ppl)  # before KL: a run stopped during KL finds them
            stop_point(f"evaluated:{name}")
        kl = scoring.kl_to_base(run, name, model) if want_kl else None
        del model
        gc.collect()
        scoring.free_gpu()
    ev, ppl, reused = _merge_baselines(run, ev, ppl, hits)
    if reused["tasks"]:
        log(f"{name}: baseline reused for {len(reused['tasks'])} of {len(keys)} tasks from {spec.baselines_dir} "
            f"(saved about {reused['saved_seconds']:.0f}s of evaluation)")
    scoring.record(run.run_dir, name, inputs, ev, train_stats=None, perplexity=ppl, baseline=reused,
                   eval_resources=used, kl=kl)


def run_extra(run: evaluate.TaskRun) -> dict:
    """What a task's evaluation depends on beyond the baseline key's fields: only where it differs from
    the default, so keys of zero-shot plain-prompt tasks stay those of earlier versions."""
    extra = {}
    if run.chat_template:
        extra["chat_template"] = True
    if run.max_gen_toks is not None:
        extra["max_gen_toks"] = run.max_gen_toks
    if run.system_instruction is not None:
        extra["system_instruction"] = run.system_instruction
    if run.fewshot_as_multiturn is not None:
        extra["fewshot_as_multiturn"] = run.fewshot_as_multiturn
    if run.task.startswith(evalplan.NLTK_TASK_PREFIXES):
        # IFEval's language checks draw at random unless seeded (evaluate.seed_checks, 2026-12-03):
        # entries stored before then hold unseeded verdicts, so they are not reused.
        extra["checks"] = "seeded"
    return extra


def _records_extra(task: str, mirror) -> dict:
    """A task logging a corpus-level metric (F1, BLEU, ...) stores its documents' statistics
    (harness/corpus.py, 2026-12-07): entries stored before then lack them, so they are not reused.
    Other tasks' keys are unchanged."""
    aggs = evaluate.task_info(task, mirror=mirror)["aggregation"].values()
    return {"records": "corpus"} if any(a in corpus.AGGREGATIONS for a in aggs) else {}


def _baseline_keys(run: Run, quant: dict | None) -> dict[str, dict]:
    mirror, seed = run.plan.mirror, run.plan.task.training.seed
    common_key = dict(model_sha=baselines.model_sha256(run.resolved.path), seed=seed, quant=quant,
                      device=models.device_kind(), dtype=str(models.train_dtype()).removeprefix("torch."))
    run_of = run.run_of
    keys = {t: baselines.key(task=t, task_sha=baselines.task_sha256(t, mirror), limit=run_of[t].limit,
                             num_fewshot=run_of[t].num_fewshot, **common_key, **run_extra(run_of[t]),
                             **_records_extra(t, mirror))
            for t in run.eval_tasks}
    if run.ppl_kw is not None:
        t = run.plan.suite.perplexity.task
        # records 2: per-document bits per byte (paired drift), which entries before 2026-12 lack
        keys[t] = baselines.key(task=t, task_sha=baselines.task_sha256(t, mirror), limit=run.ppl_kw["limit"],
                                num_fewshot=0, **common_key, records=2)
    return keys


def _store_baselines(run: Run, name: str, keys: dict, ev: dict | None, ppl: dict | None) -> None:
    source = {"run_id": run.plan.run_id, "reference": name, "model": run.resolved.name}
    total = sum(ev["n"].values()) if ev else 0
    for t in (ev["results"] if ev else {}):
        baselines.store(run.spec.baselines_dir, keys[t], results=ev["results"][t], n=ev["n"][t],
                        version=ev["versions"][t], samples=ev["samples"][t],
                        seconds=ev["seconds"] * ev["n"][t] / max(total, 1), source=source)
    if ppl is not None:
        results = {k: v for k, v in ppl.items() if k not in ("n", "seconds", "task", "samples", "version")}
        baselines.store(run.spec.baselines_dir, keys[ppl["task"]], results=results, n=ppl["n"],
                        version=ppl["version"], samples=ppl["samples"], seconds=ppl["seconds"], source=source)


def _merge_baselines(run: Run, ev: dict | None, ppl: dict | None, hits: dict) -> tuple[dict, dict | None, dict]:
    """Fresh results plus cached ones, in the shape of one evaluation of every task."""
    eval_tasks = run.eval_tasks
    ev = ev or {"results": {}, "n": {}, "samples": {}, "versions": {}, "seconds": 0.0}
    reused = {"tasks": sorted(hits), "saved_seconds": round(sum(e["seconds"] for e in hits.values()), 1),
              "files": sorted(Path(e["file"]).name for e in hits.values())}
    for t in eval_tasks:
        if t in hits:
            e = hits[t]
            ev["results"][t], ev["n"][t], ev["versions"][t] = e["results"], e["n"], e["version"]
            ev["samples"][t] = baselines.samples_of(e)
    ev = {**ev, **{k: {t: ev[k][t] for t in eval_tasks} for k in ("results", "n", "samples", "versions")}}
    if run.ppl_kw is not None and ppl is None:
        task = run.plan.suite.perplexity.task
        e = hits[task]
        ppl = {**e["results"], "n": e["n"], "seconds": 0.0, "task": task, "samples": baselines.samples_of(e)}
    return ev, ppl, reused
