"""Report stage: statistics, tables and plots from a run directory's stored artifacts.

    harness report results/finance/<run-id>

Reads config.json, arms/<arm>.json and samples/<arm>.csv; recomputes nothing that needs a model.
Writes metrics.json (per arm: lm-eval-style results, training and evaluation resources; per
comparison: paired statistics; provenance), results.csv (one row per arm x task x metric),
report.md and report.html (the same document; the HTML embeds its images), and the plots
(scores, tradeoff, resources, heatmap for sweeps; PNG and SVG). Regenerating is byte-stable.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from harness import corpus, evalplan, plots, records, stats
from harness.io import read_json, read_samples, write_json, write_text
from harness.render import to_html, to_markdown

N_BOOT = 10_000
NF4_REFERENCE = plots.NF4_REFERENCE  # the base quantized as QLoRA loads it, no adapter
HEATMAP_MIN_ARMS = 3  # a task x arm grid pays off for sweeps, not for two arms


def run(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    config = records.to_dict(records.read_run(run_dir / "config.json"))  # every field present (migrated)
    stored = read_json(run_dir / "config.json")  # shown in the report as written
    entries = config["evaluation"]["entries"]
    suite_tasks = [e["task"] for e in entries if e["role"] == "suite"]
    domain_tasks = [e["task"] for e in entries if e["role"] == "in_domain"]
    metric_of = {leaf: e["metric"] for e in entries for leaf in e["leaves"]} | {e["task"]: e["metric"] for e in entries}
    point_of = config["points"]  # snapshots and interpolations of an arm (harness/points.py)
    arms, failed = _load_arms(run_dir, ["base", NF4_REFERENCE, *config["methods"], *point_of])
    if "base" in failed:  # every comparison is against the base: no report without it, and why
        raise FileNotFoundError(f"{run_dir}/arms/base.json: the base evaluation failed: {failed['base']}")
    if "base" not in arms:
        raise FileNotFoundError(f"{run_dir}/arms/base.json: the base evaluation is missing")
    seed = config["task"]["training"]["seed"]

    metrics = {"run_id": config["run_id"], "task": config["task"]["name"], "suite": config["suite"]["name"],
               "profile": config["profile"], "model": config["model"], "arms": {}, "comparisons": {}}
    for name, arm in arms.items():
        tasks = {t: {"metric": metric_of.get(t), "score": arm["results"][t].get(metric_of.get(t)),
                     "stderr": arm["results"][t].get(f"{_stderr_key(metric_of.get(t))}"), "n": arm["n"][t],
                     "all": arm["results"][t]} for t in arm["results"]}
        for e in entries:  # a group's score as lm-eval aggregates it
            if e["kind"] == "group" and all(leaf in tasks for leaf in e["leaves"]):
                tasks[e["task"]] = _group_score(e, tasks)
        metrics["arms"][name] = {
            "tasks": tasks,
            "train": arm["train"], "eval_seconds": arm["eval_seconds"], "perplexity": arm["perplexity"],
            "eval_resources": arm["eval_resources"], "baseline": arm["baseline"],
            "kl": _kl_summary(arm["kl"], seed),
            "kl_resources": {k: v for k, v in (arm["kl"] or {}).items() if not isinstance(v, dict)} or None,
            "lm_eval": _lm_eval_results(arm),
            **({"point": arm["point"]} if arm["point"] else {}),
        }
    measurable = _measurability(arms, entries)
    metrics["measurability"] = measurable
    for name, arm in arms.items():
        if name == "base":
            continue
        comp = _compare(arms["base"], arm, entries, measurable, seed)
        # QLoRA's Δ against the 16-bit base mixes two effects: quantizing the base, and training.
        # Against the 4-bit base (no adapter) it isolates what training did.
        if _method(arm) == "qlora" and NF4_REFERENCE in arms:
            comp["vs_nf4_base"] = _compare(arms[NF4_REFERENCE], arm, entries, measurable, seed)
        metrics["comparisons"][name] = comp
    metrics["ceiling"] = _ceiling(metrics, entries)
    metrics["mitigations"] = _mitigation_effects(config, arms, entries, measurable, seed)
    metrics["failed_arms"] = failed
    metrics["missing_arms"] = [m for m in [*config["methods"], *point_of] if m not in arms and m not in failed]
    metrics["provenance"] = _provenance(config)
    metrics["summary"] = summary(metrics, suite_tasks, domain_tasks)

    write_json(run_dir / "metrics.json", metrics)
    write_text(run_dir / "results.csv", _csv(metrics, suite_tasks))
    figures = _plots(metrics, suite_tasks, domain_tasks, run_dir)
    blocks = _document(metrics, config, suite_tasks, domain_tasks, figures, stored)
    write_text(run_dir / "report.md", to_markdown(blocks))
    write_text(run_dir / "report.html", to_html(blocks, run_dir, title=_title(config)))
    return run_dir / "report.md"


NOT_SETTINGS = ("mitigation.", "training.eval_at=", "training.save_minutes=")  # change no weights of the arm


def _settings(overrides: list[str]) -> frozenset:
    return frozenset(o for o in overrides if not o.startswith(NOT_SETTINGS))


def _mitigation_effects(config: dict, arms: dict, entries: list[dict], measurable: dict, seed: int) -> list[dict]:
    """Each mitigated arm against the arm with the same settings but no mitigation (a grid point), and
    each interpolation point against its own arm: paired on the same documents, so the Δ of the
    forgetting score is what the mitigation changed, with its CI."""
    spec = config["arms"]
    plain = {}
    for name, a in spec.items():
        if name in arms and not any(o.startswith("mitigation.") and not o.startswith("mitigation.interpolate=")
                                    for o in a["overrides"]):
            plain.setdefault((a["method"], _settings(a["overrides"])), name)
    out = []
    for name, a in spec.items():
        used = [o for o in a["overrides"] if o.startswith("mitigation.") and not o.startswith("mitigation.interpolate=")]
        ref = plain.get((a["method"], _settings(a["overrides"])))
        if used and ref and name in arms:
            out.append({"arm": name, "reference": ref, "mitigation": " ".join(used)})
    for name, arm in arms.items():
        pt = arm["point"]
        if pt and pt["kind"] == "alpha" and pt["of"] in arms:
            out.append({"arm": name, "reference": pt["of"], "mitigation": f"interpolation α = {pt['value']:g}"})
    for m in out:
        c = _compare(arms[m["reference"]], arms[m["arm"]], entries, measurable, seed)
        m.update(forgetting=c["forgetting"], learning=c["learning"])
    return out


def _method(arm: dict) -> str | None:
    """The method an arm record was trained with; a point's, that of the arm it comes from."""
    # Either a record (every field present) or the report's own per-arm entry (a point's only has "point").
    return (arm["train"] or {}).get("method") or (arm.get("point") or {}).get("method")


def _stderr_key(metric: str | None) -> str:
    if not metric:
        return ""
    m, _, f = metric.partition(",")
    return f"{m}_stderr" + (f",{f}" if f else "")


def _group_score(e: dict, tasks: dict) -> dict:
    sizes = {leaf: tasks[leaf]["n"] for leaf in e["leaves"]}
    score = evalplan.group_score(e, {leaf: tasks[leaf]["score"] for leaf in e["leaves"]}, sizes)
    return {"metric": e["metric"], "score": score, "stderr": None, "n": sum(sizes.values()), "all": {},
            "subtasks": e["leaves"]}


def _kl_summary(kl: dict | None, seed: int) -> dict | None:
    """Mean per-token KL(base || arm) per text source, with a document-level bootstrap CI."""
    if not kl:
        return None
    out = {}
    for source, v in kl.items():
        if not isinstance(v, dict) or not v.get("docs"):
            continue
        docs = [d for d in v["docs"] if d[2] > 0]
        if not all(math.isfinite(d[1]) for d in docs):  # a diverged arm's logits are nan: no KL to report
            out[source] = {"task": v["task"], "max_tokens": v.get("max_tokens"), "nonfinite": True, "n": len(docs)}
            continue
        ci = stats.weighted_mean_ci([d[1] / d[2] for d in docs], [d[2] for d in docs], n_boot=N_BOOT, seed=seed)
        out[source] = {"task": v["task"], "max_tokens": v.get("max_tokens"), **ci}
    return out or None


BOOKKEEPING = ("doc_id", "doc_hash", "target", "pred", "n_choices")


def _metric_keys(records: list[dict]) -> list[str]:
    """The metrics of a task's records (every record of a task carries the same keys); a corpus-level
    metric's are under `<key>:s` (harness/corpus.py)."""
    return [k.removesuffix(":s") for k in (records[0] if records else {})
            if k not in BOOKKEEPING and not k.endswith(":w")]


def _corpus_pair(base_recs: list[dict], arm_recs: list[dict], metric: str) -> stats.CorpusPair | None:
    """A corpus-level metric's per-document statistics of both sides, paired by document."""
    key = f"{metric}:s"
    rows = [(rb[key], ra[key]) for rb, ra in stats.paired_records(base_recs, arm_recs) if key in rb and key in ra]
    if not rows:
        return None
    agg = rows[0][0][0]
    sb, sa = corpus.matrices(agg, [b[1] for b, _ in rows], [a[1] for _, a in rows])
    return stats.CorpusPair(sb, sa, lambda x: corpus.score(agg, x))


def _is_proportion(values) -> bool:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return bool(v.size and ((v >= 0) & (v <= 1)).all())


def _direction(e: dict, leaf: str, metric: str) -> bool:
    """higher_is_better of a metric (lm-eval's, as recorded); bits per byte and perplexities: lower."""
    name = metric.partition(",")[0]
    hib = (e.get("higher_is_better") or {}).get(leaf, {})
    if name in hib:
        return bool(hib[name])
    return not ("perplexity" in name or name == "bits_per_byte")


def _measurability(arms: dict, entries: list[dict]) -> dict:
    """For multiple-choice tasks: chance from the documents' choice counts, and whether the base is
    significantly above it (one-sided, alpha 0.05). A task at chance cannot show forgetting."""
    out = {}
    base = arms["base"]["samples"]
    for e in entries:
        metric = e["metric"]
        correct, choices = [], []
        for leaf in e["leaves"]:
            recs = base.get(leaf) or []
            counts = _choice_counts(arms, leaf)
            if not recs or not counts or metric not in recs[0]:
                correct = None
                break
            for r in recs:
                if r["doc_id"] in counts:
                    correct.append(r[metric])
                    choices.append(counts[r["doc_id"]])
        if correct:
            out[e["task"]] = stats.above_chance(correct, choices)
    return out


def _ceiling(metrics: dict, entries: list[dict]) -> list[str]:
    """In-domain tasks whose base already scores every document right (a proportion at 100%, higher
    better): no arm can show learning there, only a loss."""
    base = metrics["arms"]["base"]["tasks"]
    out = []
    for e in entries:
        b = base.get(e["task"])
        if e["role"] != "in_domain" or not b or b["score"] != 1.0 or not _direction(e, e["leaves"][0], e["metric"]):
            continue
        comps = [c["tasks"].get(e["task"], {}).get(e["metric"]) for c in metrics["comparisons"].values()]
        if any(c and c.get("proportion") for c in comps):
            out.append(e["task"])
    return out


def _limit_label(metrics: dict, task: str, role: str, *, short: bool) -> str:
    """What a task's base leaves no room for: forgetting at chance (suite), learning at ceiling (in-domain)."""
    if role == "suite":
        m = metrics.get("measurability", {}).get(task)
        if m is not None and not m["above_chance"]:
            return " (at chance)" if short else f" — at chance ({100 * m['chance']:.0f}%): cannot show forgetting"
    elif task in metrics.get("ceiling", []):
        return " (at ceiling)" if short else " — at ceiling (base 100%): cannot show learning"
    return ""


def _choice_counts(arms: dict, task: str) -> dict[int, int]:
    """Number of choices per document, from whichever arm's records have it (cached baselines may not)."""
    for arm in arms.values():
        recs = arm["samples"].get(task) or []
        if recs and "n_choices" in recs[0]:
            return {r["doc_id"]: int(r["n_choices"]) for r in recs}
    return {}


def _compare(base: dict, arm: dict, entries: list[dict], measurable: dict, seed: int) -> dict:
    """Paired statistics of one arm against a reference evaluated on the same documents: every
    per-document metric of every task; each group's aggregate; the forgetting score (mean of the
    suite's counted proportion-metric Δs, tasks at chance left out), learning, and drift."""
    import numpy as np

    comp = {"tasks": {}}
    pairs: dict[str, dict[str, tuple]] = {}
    for task, docs in arm["samples"].items():
        if task not in base["samples"]:
            continue
        comp["tasks"][task] = {}
        pairs[task] = {}
        for metric in _metric_keys(docs):
            if f"{metric}:s" in docs[0]:  # a corpus-level metric (F1, BLEU, ...): scored on resampled sums
                cp = _corpus_pair(base["samples"][task], docs, metric)
                if cp is None:
                    continue
                comp["tasks"][task][metric] = stats.paired_corpus_delta(cp, n_boot=N_BOOT, seed=seed)
                agg = docs[0][f"{metric}:s"][0]
                if not all(map(math.isfinite, (comp["tasks"][task][metric]["base"], comp["tasks"][task][metric]["arm"]))):
                    comp.setdefault("nonfinite", []).append(f"{task} {metric}")
                    del comp["tasks"][task][metric]
                    continue
                comp["tasks"][task][metric]["proportion"] = corpus.is_proportion(agg)
                pairs[task][metric] = cp
                continue
            if metric not in (base["samples"][task][:1] or [{}])[0]:
                continue
            b, a = stats.align(base["samples"][task], docs, metric=metric)
            w = None
            if f"{metric}:w" in docs[0]:
                _, w = stats.align(base["samples"][task], docs, metric=f"{metric}:w")
            if not b.size:
                continue
            if not (np.isfinite(b).all() and np.isfinite(a).all()):  # a diverged model (nan loss) scores nan
                comp.setdefault("nonfinite", []).append(f"{task} {metric}")
                continue
            comp["tasks"][task][metric] = stats.paired_delta(b, a, n_boot=N_BOOT, seed=seed, weights=w)
            comp["tasks"][task][metric]["proportion"] = _is_proportion(b) and _is_proportion(a)
            pairs[task][metric] = (b, a) if w is None else (b, a, w)
    counted: dict[str, tuple] = {}
    for e in entries:
        metric, name = e["metric"], e["task"]
        if not all(metric in pairs.get(leaf, {}) for leaf in e["leaves"]):
            continue
        if e["kind"] == "group":
            sizes = {leaf: len(pairs[leaf][metric][0]) for leaf in e["leaves"]}
            w = evalplan.leaf_weights(e, sizes)
            sub = {leaf: pairs[leaf][metric] for leaf in e["leaves"]}
            c = stats.aggregate_delta(sub, n_boot=N_BOOT, seed=seed, task_weights=w)
            c["proportion"] = all(comp["tasks"][leaf][metric]["proportion"] for leaf in e["leaves"])
            comp["tasks"].setdefault(name, {})[metric] = c
            counted[name] = ("group", sub, w, c["proportion"])
        else:
            counted[name] = ("task", pairs[name][metric], None, comp["tasks"][name][metric]["proportion"])
    comp["excluded"] = {}

    def score(role: str):
        chosen = {}
        for e in entries:
            if e["role"] != role or e["task"] not in counted:
                continue
            kind, pair, w, proportion = counted[e["task"]]
            if not proportion:
                comp["excluded"][e["task"]] = "not a proportion: reported beside the score, not in it"
                continue
            if not _direction(e, e["leaves"][0], e["metric"]):
                comp["excluded"][e["task"]] = "lower is better: reported beside the score"
                continue
            m = measurable.get(e["task"])
            if role == "suite" and m is not None and not m["above_chance"]:
                comp["excluded"][e["task"]] = (f"at chance: cannot show forgetting (base {100 * m['score']:.1f} vs "
                                               f"chance {100 * m['chance']:.1f}, p={m['p_value']:.2g})")
                continue
            if kind == "group" and any(isinstance(p, stats.CorpusPair) for p in pair.values()):
                chosen[e["task"]] = stats.GroupPairs(pair, w)  # its subtasks' corpus scores, weighted
            elif kind == "group":  # a group counts as one entry: its own aggregate's replicates
                chosen[e["task"]] = _group_pair(pair, w)
            else:
                chosen[e["task"]] = pair
        return stats.aggregate_delta(chosen, n_boot=N_BOOT, seed=seed) if chosen else None

    comp["forgetting"] = score("suite")
    # Biderman et al. average plain accuracy of the three tasks, whatever metric the suite counts.
    bid = {t: stats.align(base["samples"][t], arm["samples"][t], metric="acc") for t in stats.BIDERMAN_TASKS
           if t in arm["samples"] and t in base["samples"] and "acc" in (arm["samples"][t][:1] or [{}])[0]}
    comp["biderman"] = stats.biderman_delta(bid, n_boot=N_BOOT, seed=seed) if len(bid) == 3 else None
    comp["learning"] = score("in_domain")
    base_ppl, arm_ppl = base.get("perplexity"), arm.get("perplexity")
    comp["perplexity"] = stats.perplexity_drift(base_ppl, arm_ppl) if base_ppl and arm_ppl else None
    if comp["perplexity"] is not None and base_ppl.get("task") in comp["tasks"]:
        bpb = comp["tasks"][base_ppl["task"]].get("bits_per_byte")
        if bpb:
            comp["perplexity"]["bits_per_byte_paired"] = bpb
    return comp


def _group_pair(sub: dict, w: dict) -> tuple:
    """A group's subtasks as one pseudo-task whose mean is the group's weighted aggregate: each document
    weighted by its subtask's share divided by the subtask's size (weights carried per document)."""
    import numpy as np

    bs, as_, ws = [], [], []
    for leaf, pair in sub.items():
        b, a = pair[0], pair[1]
        dw = pair[2] / pair[2].sum() if len(pair) > 2 else np.full(b.size, 1.0 / b.size)
        bs.append(b)
        as_.append(a)
        ws.append(w[leaf] * dw)
    return np.concatenate(bs), np.concatenate(as_), np.concatenate(ws)


def _lm_eval_results(arm: dict) -> dict:
    """The arm's scores in lm-eval's own results layout ("metric,filter" keys), for tools that read it."""
    results = {t: {"alias": t, **{f"{k},none": v for k, v in r.items()}} for t, r in arm["results"].items()}
    ppl = arm["perplexity"]
    if ppl:
        results[ppl["task"]] = {"alias": ppl["task"], **{f"{k},none": v for k, v in ppl.items()
                                                       if k not in ("task", "n", "seconds")}}
    n = {t: {"effective": c} for t, c in arm["n"].items()}
    if ppl:
        n[ppl["task"]] = {"effective": ppl["n"]}
    return {"results": results, "versions": arm["versions"], "n-samples": n}


def _provenance(config: dict) -> dict:
    return {"model": config["model"], "datasets": config["datasets"], "environment": config["environment"],
            "seed": config["task"]["training"]["seed"], "profile": config["profile"], "device": config["device"],
            "mirror": config["mirror"], "overrides": config["overrides"],
            "started": config["started"], "finished": config["finished"],
            "wall_seconds": config["wall_seconds"]}


def _load_arms(run_dir: Path, names: list[str]) -> tuple[dict, dict]:
    """Evaluated arms with their per-document records; and {arm: error} for arms recorded as failed."""
    arms, failed = {}, {}
    for name in names:
        path = run_dir / "arms" / f"{name}.json"
        if not path.exists():
            continue
        record = records.read_arm(path)
        if record.status == "failed":
            failed[name] = record.error or "no error message recorded"
            continue
        arms[name] = records.to_dict(record)
        arms[name]["samples"] = read_samples(run_dir / "samples" / f"{name}.csv")
    return arms, failed


# ---------------------------------------------------------------- words computed from numbers


def _interval(c: dict) -> str:
    return f"95% CI [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"


def _ci(c: dict | None, scale: float = 100.0, digits: int = 1, *, detectable: bool = False) -> str:
    """Δ [CI]; with `detectable`, a non-significant Δ also says the smallest |Δ| this n would detect
    (80% power), so "no forgetting" reads as "none larger than this"."""
    if not c:
        return "n/a"
    sig = "" if c["significant"] else ", not significant"
    if not c["significant"] and detectable and c.get("detectable") is not None:
        sig += f" (detects ±{scale * c['detectable']:.{digits}f})"
    f = f"+.{digits}f"
    return f"{scale * c['delta']:{f}} [{scale * c['ci_low']:{f}}, {scale * c['ci_high']:{f}}]{sig}"


def summary(metrics: dict, suite_tasks: list[str], domain_tasks: list[str]) -> str:
    """One paragraph, every claim read off the statistics (CI spanning 0 is 'not significant')."""
    parts = []
    trained = [a for a in metrics["comparisons"] if a != NF4_REFERENCE and not metrics["arms"][a].get("point")]
    if len(trained) > WIDE_MAX:
        return _digest(metrics, trained)
    for arm, comp in metrics["comparisons"].items():
        f, l = comp["forgetting"], comp["learning"]
        if f is None or metrics["arms"][arm].get("point"):
            continue
        if arm == NF4_REFERENCE:  # a reference, not a fine-tuned arm
            word = "changed" if f["significant"] else "did not significantly change"
            parts.append(f"Quantizing the base to 4-bit alone ({arm}, no adapter) {word} general ability "
                         f"({100 * f['delta']:+.1f}, {_interval(f)}).")
            continue
        if f["significant"]:
            verdict = "lost" if f["delta"] < 0 else "gained"
            gen = f"{verdict} {abs(100 * f['delta']):.1f} points of general ability ({_interval(f)})"
        else:
            gen = f"showed no significant change in general ability ({100 * f['delta']:+.1f}, {_interval(f)})"
        learn = ""
        if l is not None:
            word = "a significant" if l["significant"] else "a non-significant"
            learn = f" at {word} in-domain change of {100 * l['delta']:+.1f} points ({_interval(l)})"
        parts.append(f"**{arm}** {gen}{learn}.")
        cost = _cost(metrics["arms"][arm]["train"])
        if cost:
            parts.append(cost)
        q = comp.get("vs_nf4_base")
        if q and q["forgetting"]:
            sig = "" if q["forgetting"]["significant"] else ", not significant"
            parts.append(f"Against the 4-bit base it was trained on, {arm}'s general change is "
                         f"{100 * q['forgetting']['delta']:+.1f} ({_interval(q['forgetting'])}{sig}).")
    ranked = [(a, c["forgetting"]["delta"]) for a, c in metrics["comparisons"].items()
              if c["forgetting"] and a in trained]
    if len(ranked) > 1:
        worst = min(ranked, key=lambda x: x[1])
        parts.append(f"Lowest mean general change: {worst[0]} ({100 * worst[1]:+.1f} points); "
                     "compare CIs before calling one arm more forgetful than another.")
    for arm, error in metrics.get("failed_arms", {}).items():
        parts.append(f"**{arm}** failed and has no scores ({_first_line(error)}).")
    return " ".join(parts)


def _digest(metrics: dict, trained: list[str]) -> str:
    """The summary of a many-arm run (a sweep): counts and extremes, each with its CI; per-arm detail is
    in the tables."""
    comps = metrics["comparisons"]
    scored = [a for a in trained if comps[a]["forgetting"]]
    lost = [a for a in scored if comps[a]["forgetting"]["significant"] and comps[a]["forgetting"]["delta"] < 0]
    parts = [f"{len(trained)} fine-tuned arms; {len(lost)} of {len(scored)} lost general ability significantly "
             "(forgetting score's 95% CI below 0)."]
    if scored:
        worst = min(scored, key=lambda a: comps[a]["forgetting"]["delta"])
        parts.append(f"Most forgetful: **{worst}** ({_ci(comps[worst]['forgetting'])}, learning "
                     f"{_ci(comps[worst]['learning'])}).")
    learned = [a for a in scored if comps[a]["learning"]]
    if learned:
        best = max(learned, key=lambda a: comps[a]["learning"]["delta"])
        parts.append(f"Most learning: **{best}** ({_ci(comps[best]['learning'])}, forgetting "
                     f"{_ci(comps[best]['forgetting'])}).")
    m = _matched_learning(metrics)
    if m and len(m["methods"]) >= 2:
        order = sorted(m["methods"].items(), key=lambda kv: kv[1]["forgetting"])
        parts.append(f"At matched learning ({m['learning']:+.1f} points in-domain), the forgetting score is "
                     + ", ".join(f"{k} {v['forgetting']:+.1f}" for k, v in order)
                     + " (read off each method's frontier; see the table for the arms and CIs it comes from).")
    if metrics.get("mitigations"):
        parts.append(_mitigation_verdict(metrics))
    q = comps.get(NF4_REFERENCE, {}).get("forgetting")
    if q:
        word = "changed" if q["significant"] else "did not significantly change"
        parts.append(f"Quantizing the base to 4-bit alone {word} general ability ({_ci(q)}).")
    for arm, error in metrics.get("failed_arms", {}).items():
        parts.append(f"**{arm}** failed and has no scores ({_first_line(error)}).")
    return " ".join(parts)


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0][:200] if str(text).strip() else "no message"


def _peak(stage: dict | None) -> tuple[int | None, str]:
    """The stage's headline peak memory: GPU allocated by torch where recorded, else the process RSS."""
    stage = stage or {}
    if stage.get("peak_gpu_allocated_bytes"):
        return stage["peak_gpu_allocated_bytes"], "GPU allocated"
    return stage.get("peak_rss_bytes"), "RSS"


def _cost(t: dict | None) -> str:
    """What training the arm cost, in one sentence."""
    if not t:
        return ""
    mem, kind = _peak(t)
    saved = t.get("saved") or {}
    what = "checkpoint" if t.get("method") == "full" else "adapter"
    peak = f" at a peak of {_size(mem)} ({kind})" if mem else ""
    stored = f"; it stores a {_size(saved['bytes'])} {what}{_dtype(saved)}" if saved.get("bytes") else ""
    return (f"Training took {t['seconds']:.0f} s ({t['tokens_per_second']:,.0f} tokens/s){peak}, "
            f"{t['trainable_pct']:.2f}% of parameters trainable{stored}.")


# ---------------------------------------------------------------- tables


def _csv(metrics: dict, suite_tasks: list[str]) -> str:
    buf = io.StringIO()
    cols = ["arm", "task", "kind", "metric", "counted", "score", "stderr", "n", "delta", "ci_low", "ci_high",
            "significant", "mcnemar_p", "forgotten", "gained"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for arm, a in metrics["arms"].items():
        for task, t in a["tasks"].items():
            names = [k for k in t["all"] if "_stderr" not in k] or [t["metric"]]
            for metric in names:
                row = {"arm": arm, "task": task, "kind": "general" if task in suite_tasks else "in_domain",
                       "metric": metric, "counted": metric == t["metric"],
                       "score": t["all"].get(metric, t["score"] if metric == t["metric"] else None),
                       "stderr": t["all"].get(_stderr_key(metric)), "n": t["n"]}
                c = metrics["comparisons"].get(arm, {}).get("tasks", {}).get(task, {}).get(metric)
                if c:
                    row.update({k: c.get(k) for k in ("delta", "ci_low", "ci_high", "significant", "mcnemar_p",
                                                      "forgotten", "gained")})
                w.writerow(row)
    return buf.getvalue()


def _fmt(x, pct=True, digits=None):
    if x is None:
        return "n/a"
    if isinstance(x, float) and x == float("inf"):
        return "inf (collapsed)"
    if digits is not None:
        return f"{100 * x:.{digits}f}" if pct else f"{x:,.{digits}f}"
    return f"{100 * x:.1f}" if pct else f"{x:,.0f}"


def _size(b):
    if b is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} TB"


def _dtype(saved: dict) -> str:
    return f" ({saved['dtype']})" if saved.get("dtype") else ""  # runs before 2026-11-28 did not record it


WIDE_MAX = 4  # arms (besides the base) shown as table columns; with more, arms are rows


def _others(metrics: dict) -> list[str]:
    return [a for a in metrics["arms"] if a != "base"]


def _score_table(metrics: dict, tasks: list[str], role: str) -> tuple:
    """Arms as columns for a few arms (arms as rows for many); each score in percent where the metric
    is a proportion, else as is. `role`: suite or in_domain (what a task's base leaves no room for)."""
    arms = _others(metrics)
    if len(arms) > WIDE_MAX:
        return _score_rows(metrics, tasks, arms, role)
    header = ["task", "metric", "n", "base"] + [c for a in arms for c in (a, f"Δ {a} [95% CI]")]
    rows = []
    for task in tasks:
        b = metrics["arms"]["base"]["tasks"].get(task)
        if b is None:
            continue
        comps = [metrics["comparisons"][a]["tasks"].get(task, {}).get(b["metric"]) for a in arms]
        pct = _in_percent(metrics, task)
        name = task + (" (group)" if b.get("subtasks") else "") + _limit_label(metrics, task, role, short=False)
        row = [name, b["metric"], b["n"], _fmt(b["score"], pct=pct, digits=1 if pct else 4)]
        for a, c in zip(arms, comps):
            t = metrics["arms"][a]["tasks"].get(task)
            row += [_fmt(t["score"], pct=pct, digits=1 if pct else 4) if t else "n/a",
                    _ci(c, scale=100.0 if pct else 1.0, digits=1 if pct else 4, detectable=True)]
        rows.append(row)
    return ("table", header, rows)


def _in_percent(metrics: dict, task: str) -> bool:
    """Whether a task's counted metric is a proportion, shown in percent (as the comparisons found it;
    a run without any comparison: yes)."""
    metric = metrics["arms"]["base"]["tasks"].get(task, {}).get("metric")
    comps = [c["tasks"].get(task, {}).get(metric) for c in metrics["comparisons"].values()]
    return next((c["proportion"] for c in comps if c and "proportion" in c), True)


def _score_rows(metrics: dict, tasks: list[str], arms: list[str], role: str) -> tuple:
    """Arms as rows, tasks as columns: the Δ [95% CI] per cell, in bold where the CI excludes 0; the
    base's score in the column header. Stays readable at 10-30 arms."""
    base = metrics["arms"]["base"]["tasks"]
    shown = [t for t in tasks if t in base]
    label = labels(metrics)
    header = ["arm"]
    pct_of = {}
    for t in shown:
        pct_of[t] = _in_percent(metrics, t)
        header.append(f"{t}{_limit_label(metrics, t, role, short=True)} {base[t]['metric']}, base "
                      f"{_fmt(base[t]['score'], pct=pct_of[t], digits=1 if pct_of[t] else 4)}")
    rows = []
    for a in arms:
        row = [label[a]]
        for t in shown:
            c = metrics["comparisons"][a]["tasks"].get(t, {}).get(base[t]["metric"])
            pct = pct_of[t]
            if not c:
                row.append("n/a")
                continue
            cell = _ci(c, scale=100.0 if pct else 1.0, digits=1 if pct else 4).removesuffix(", not significant")
            delta, _, rest = cell.partition(" ")
            row.append(f"**{delta}** {rest}" if c["significant"] else cell)
        rows.append(row)
    return ("table", header, rows)


def labels(metrics: dict) -> dict[str, str]:
    """Short names for tables and plots: a name of up to 14 characters stays; a longer one becomes
    <method>-<k> (k counts that method's arms in order); a point is its arm's label and where it sits:
    `@25%` of the steps, `α0.5` of the way from the start."""
    out, count = {}, {}
    for name, a in metrics["arms"].items():
        if a.get("point"):
            continue
        method = _method(a)
        if len(name) <= 14 or method is None:
            out[name] = name
        else:
            count[method] = count.get(method, 0) + 1
            out[name] = f"{method}-{count[method]}"
    for name, a in metrics["arms"].items():
        pt = a.get("point")
        if pt:
            where = f"@{100 * pt['value']:g}%" if pt["kind"] == "at" else f"α{pt['value']:g}"
            out[name] = f"{out.get(pt['of'], pt['of'])} {where}"
    return out


def _lab(metrics: dict, arm: str) -> str:
    return labels(metrics).get(arm, arm)


def _legend(metrics: dict, config: dict) -> list[tuple]:
    """What each short label stands for: the arm's name, method and settings (its overrides)."""
    label = labels(metrics)
    if all(label[a] == a for a in label if not metrics["arms"][a].get("point")):
        return []
    rows = []
    for name, a in metrics["arms"].items():
        if name == "base" or a.get("point"):
            continue
        arm = config["arms"].get(name, {})
        pts = [label[p] for p, b in metrics["arms"].items() if (b.get("point") or {}).get("of") == name]
        rows.append([label[name], f"`{name}`", _method(a) or "reference",
                     " ".join(f"`{o}`" for o in arm.get("overrides", [])) or "task file's settings",
                     ", ".join(pts) or "–"])
    return [("h", 2, "Arms"), ("p", "Short labels stand for these arms in the tables and plots below."),
            ("table", ["label", "arm", "method", "settings", "points"], rows)]


def _limits(prof: dict) -> str:
    docs = "all documents" if prof["limit"] is None else f"at most {prof['limit']} documents per task"
    n = prof["train_examples"]
    return f"{docs}, {'all training examples' if n is None else f'{n} training examples'}"


def _prompts(config: dict) -> list[str]:
    """Which tasks were prompted otherwise than lm-eval's plain zero-shot text: chat template, system
    prompt, few-shot examples (as turns or not). Nothing when every task was plain."""
    said: dict[str, list[str]] = {}
    runs = config["evaluation"].get("runs", [])
    for r in runs:
        parts = []
        if r.get("num_fewshot"):
            turns = r.get("fewshot_as_multiturn")
            parts.append(f"{r['num_fewshot']}-shot" + ("" if not r.get("chat_template") or turns is None
                                                       else " as turns" if turns else " in one turn"))
        if r.get("chat_template"):
            parts.append("chat template")
        if r.get("system_instruction"):
            parts.append(f"system prompt “{r['system_instruction']}”")
        if parts:
            said.setdefault(", ".join(parts), []).append(r["task"])
    if not said:
        return []
    plain = len(runs) > sum(len(tasks) for tasks in said.values())
    return ["**Prompts** " + "; ".join(f"{', '.join(tasks)}: {how}" for how, tasks in said.items())
            + ("; the other tasks zero-shot plain text." if plain else ".")]


def _title(config: dict) -> str:
    return f"Forgetting report: {config['task']['name']} on {config['model']['name']}"


def _s(seconds) -> str:
    return "–" if seconds is None else f"{seconds:,.0f} s"


def _b(n) -> str:
    return "–" if not n else _size(n)


# ---------------------------------------------------------------- the document


def _document(metrics: dict, config: dict, suite_tasks: list[str], domain_tasks: list[str],
              figures: list[tuple], stored: dict) -> list[tuple]:
    prof = config["profile"]
    td = config["train_data"] or {}
    env = config["environment"]
    notes = []
    if config["model"].get("source") == "random":  # --model random:<arch> (harness/models.py)
        notes.append(("p", "**Random weights: speed and memory only, scores meaningless.** The model is an "
                      "architecture initialised at random (no weights can be downloaded here); every accuracy "
                      "below sits at chance, and forgetting cannot be read from them. The training, memory, "
                      "time and storage figures are the architecture's."))
    if metrics["failed_arms"]:
        notes.append(("p", "**Failed arms:** " + "; ".join(f"{a}: `{_first_line(e)}`" for a, e in
                                                           metrics["failed_arms"].items())
                      + " (see arms/<arm>.json for the full error)."))
    if metrics["missing_arms"]:
        notes.append(("p", f"**Not in this report:** {', '.join(metrics['missing_arms'])} (requested, but no "
                      "evaluation was recorded: the run stopped before it finished)."))
    blocks = [
        ("h", 1, _title(config)),
        ("p", metrics["summary"]),
        *notes,
        ("ul", [
            f"**Run** `{config['run_id']}`, profile **{prof['name']}**: {_limits(prof)}.",
            f"**Model** {config['model']['name']} — {config['model']['detail']}.",
            f"**Training data** {td.get('dataset', 'n/a')} ({td.get('split', '')}): {td.get('examples', 'n/a')} of "
            f"{td.get('rows', 'n/a')} rows, {td.get('tokens', 'n/a')} tokens; loss on the answer only; "
            f"format from lm-eval task `{config['task']['train']['format_task']}`.",
            f"**Device** {env.get('gpu') or 'CPU'} ({config['device']}); seed {config['task']['training']['seed']}. "
            "Full provenance at the end.",
            *_prompts(config),
            *([f"**Jobs** {config['jobs']} at once on one device (`--jobs`): stage times include their contention "
               "(`--jobs 1` measures each alone); memory figures are each job's own process (torch's allocator)."]
              if (config["jobs"] or 1) > 1 else []),
        ]),
        ("p", "Scores in percent. Δ is arm − base on the same documents, with a 95% paired bootstrap CI; "
              "where the CI spans 0 the change is *not significant*"
              + (" (with many arms, arms are rows and a significant Δ is in bold)." if len(_others(metrics)) > WIDE_MAX
                 else ".")),
        *_legend(metrics, config),
        ("h", 2, "General benchmarks (forgetting)"), _score_table(metrics, suite_tasks, "suite"),
        ("h", 2, "In-domain (learning)"), _score_table(metrics, domain_tasks, "in_domain"),
        *_aggregates(metrics), *_points(metrics), *_drift(metrics), *_perplexity(metrics), *_flips(metrics, suite_tasks + domain_tasks),
        *_training(metrics), *_resources(metrics),
        ("h", 2, "Plots"),
    ]
    for stem, title, alt, caption in figures:
        blocks += [("h", 3, title), ("img", f"{stem}.png", alt)] + ([("p", caption)] if caption else [])
    blocks += _provenance_blocks(metrics, stored)
    blocks.append(("p", "Files: `metrics.json` (all statistics, resources and provenance; per arm an lm-eval-style "
                        "`results` block), `results.csv` (one row per arm × task × metric), `samples/` (per-document "
                        "records), `config.json` (the resolved configuration and environment), `report.html` (this "
                        "report as one self-contained page)."))
    return blocks


def _aggregates(metrics: dict) -> list[tuple]:
    rows = []
    short = labels(metrics)
    for arm, c in metrics["comparisons"].items():
        if metrics["arms"][arm].get("point"):  # in their own section (_points)
            continue
        for label, comp in ((short[arm], c), (f"{short[arm]} vs {NF4_REFERENCE} (training alone)", c.get("vs_nf4_base"))):
            if comp is None:
                continue
            bid = comp["biderman"]
            bid_s = f"{_fmt(bid['base'])} → {_fmt(bid['arm'])} ({_ci(bid)})" if bid else "n/a"
            rows.append([label, _ci(comp["forgetting"]), bid_s, _ci(comp["learning"])])
    header = ["arm", "forgetting score: mean Δ over the suite",
              "Biderman et al. avg (hellaswag, arc_challenge, winogrande acc)", "learning: mean in-domain Δ"]
    return [("h", 2, "Aggregates"), ("table", header, rows), *_matched(metrics), *_mitigation_blocks(metrics)]


def _points(metrics: dict) -> list[tuple]:
    """Each arm's points beside the arm: its weights part-way through training (training.eval_at) and
    interpolated toward its start (mitigation.interpolate), learning and forgetting with their CIs."""
    short = labels(metrics)
    rows = []
    for arm, a in metrics["arms"].items():
        pts = sorted(((n, b["point"]) for n, b in metrics["arms"].items() if (b.get("point") or {}).get("of") == arm),
                     key=lambda x: (x[1]["kind"], x[1]["value"]))
        if not pts:
            continue
        steps = (a.get("train") or {}).get("snapshots") or {}
        total = (a.get("train") or {}).get("steps")
        for name, pt in pts + [(arm, None)]:
            c = metrics["comparisons"].get(name) or {}
            if pt is None:
                where = f"the arm: step {total}" if total else "the arm"
            elif pt["kind"] == "at":
                step = steps.get(format(pt["value"], "g"))
                where = f"step {step} of {total} ({100 * pt['value']:g}%)" if step else f"{100 * pt['value']:g}% of steps"
            else:
                where = f"interpolated, α = {pt['value']:g}"
            kl = ((metrics["arms"].get(name) or {}).get("kl") or {}).get("general")
            rows.append([short.get(name, name), where, _ci(c.get("learning")), _ci(c.get("forgetting")),
                         _kl_cell(kl).split(" [")[0] if kl else "n/a"])
    if not rows:
        return []
    return [("h", 2, "Forgetting curves and interpolation"),
            ("p", "Points of each arm against the base, on the same documents: its weights part-way through training "
                  "(`training.eval_at`) and its weights moved back toward where it started (`mitigation.interpolate`: "
                  "θ₀ + α(θ − θ₀) for full fine-tuning, the adapter scaled by α for LoRA/QLoRA, so α = 0 is the base, "
                  "or the 4-bit base for QLoRA). Each row is the arm's own evaluation; the last row of each arm is the "
                  "trained arm itself."),
            ("table", ["point", "where", "learning: mean in-domain Δ", "forgetting score", "KL general"], rows)]


def _mitigation_verdict(metrics: dict) -> str:
    """Per method, the mitigation that raised the forgetting score most (paired against its own arm)."""
    best: dict[str, dict] = {}
    for m in metrics.get("mitigations") or []:
        if not (m["forgetting"] and m["learning"]):
            continue
        method = _method(metrics["arms"][m["reference"]]) or "?"
        if method not in best or m["forgetting"]["delta"] > best[method]["forgetting"]["delta"]:
            best[method] = m
    return " ".join(
        f"For {method}, {m['mitigation'].replace('mitigation.', '')} on {_lab(metrics, m['reference'])} moved the "
        f"forgetting score most: {_ci(m['forgetting'])} points, at a learning change of {_ci(m['learning'])}."
        for method, m in best.items())


def _mitigation_blocks(metrics: dict) -> list[tuple]:
    rows = []
    for m in metrics.get("mitigations") or []:
        if not (m["forgetting"] and m["learning"]):
            continue
        comps = metrics["comparisons"]
        ref_f, arm_f = comps[m["reference"]]["forgetting"], comps[m["arm"]]["forgetting"]
        ref_l, arm_l = comps[m["reference"]]["learning"], comps[m["arm"]]["learning"]
        rows.append([m["mitigation"].replace("mitigation.", ""), _lab(metrics, m["arm"]), _lab(metrics, m["reference"]),
                     f"{100 * ref_f['delta']:+.1f} → {100 * arm_f['delta']:+.1f}", _ci(m["forgetting"]),
                     f"{100 * ref_l['delta']:+.1f} → {100 * arm_l['delta']:+.1f}", _ci(m["learning"])])
    if not rows:
        return []
    verdict = _mitigation_verdict(metrics)
    return [("h", 3, "What each mitigation changed"),
            ("p", "Each mitigated arm against the arm with the same settings and no mitigation, paired on the same "
                  "documents (an interpolation against the arm it was interpolated from): the Δ is mitigated − "
                  "unmitigated, so a positive forgetting Δ is general ability kept. " + verdict),
            ("table", ["mitigation", "arm", "against", "forgetting score (against → arm)", "Δ forgetting [95% CI]",
                       "learning (against → arm)", "Δ learning [95% CI]"], rows)]


def _matched_learning(metrics: dict) -> dict | None:
    """stats.matched_learning over the trained arms (points are not arms of a method: left out)."""
    pts: dict[str, list] = {}
    for arm, c in metrics["comparisons"].items():
        train = metrics["arms"].get(arm, {}).get("train")
        if not train or not (c.get("forgetting") and c.get("learning")):
            continue
        pts.setdefault(train["method"], []).append((arm, 100 * c["learning"]["delta"], 100 * c["forgetting"]["delta"]))
    return stats.matched_learning(pts)


def _matched(metrics: dict) -> list[tuple]:
    """Forgetting at matched learning (stats.matched_learning), with the arms each figure comes from."""
    comps = metrics["comparisons"]
    m = _matched_learning(metrics)
    if not m or len(m["methods"]) < 2:
        return []
    def cell(a: str) -> str:
        if a == "base":
            return "the base (0, 0)"
        return f"{a} (learning {100 * comps[a]['learning']['delta']:+.1f}, forgetting {_ci(comps[a]['forgetting'])})"

    rows = []
    for method, r in m["methods"].items():
        lo, hi = r["between"]
        if r["weight"] in (0.0, 1.0):
            src = "at " + cell(hi if r["weight"] == 1.0 else lo)
        else:
            src = f"between {cell(lo)} and {cell(hi)}"
        rows.append([method, f"{r['forgetting']:+.1f}", src])
    return [("h", 3, "Forgetting at matched learning"),
            ("p", f"The forgetting score of each method at a mean in-domain gain of {m['learning']:+.1f} points, the "
                  "most learning every method reached (Biderman et al. 2024 compare methods this way). It is read "
                  "off each method's frontier: its arms that no other arm of the method beats on both axes, "
                  "joined in order of learning from the base (0, 0). An interpolated figure has no CI of its "
                  "own; the arms it comes from are listed with theirs."),
            ("table", ["method", "forgetting score at matched learning", "from"], rows)]


def _kl_cell(k: dict | None) -> str:
    if not k:
        return "n/a"
    if k.get("nonfinite"):
        return "non-finite (diverged)"
    return f"{k['mean']:.4f} [{k['ci_low']:.4f}, {k['ci_high']:.4f}] ({k['n']} docs)"


def _drift(metrics: dict) -> list[tuple]:
    """Distribution drift beside the forgetting score (not mixed into it): KL(base || arm) per token on
    general text and on domain prompts, and the paired change in bits per byte on general text."""
    rows = []
    for arm, a in metrics["arms"].items():
        if arm == "base":
            continue
        kl = a.get("kl") or {}
        bpb = ((metrics["comparisons"].get(arm) or {}).get("perplexity") or {}).get("bits_per_byte_paired")
        rows.append([_lab(metrics, arm), _kl_cell(kl.get("general")), _kl_cell(kl.get("domain")),
                     _ci(bpb, scale=1.0, digits=4) if bpb else "n/a"])
    if not any(r[1] != "n/a" or r[2] != "n/a" or r[3] != "n/a" for r in rows):
        return []
    src = next((a["kl"] for a in metrics["arms"].values() if a.get("kl")), {}) or {}
    where = ", ".join(f"{k}: `{v['task']}`" for k, v in src.items())
    notes = []
    for arm, c in metrics["comparisons"].items():
        for task, why in (c.get("excluded") or {}).items():
            notes.append(f"{task}: {why}")
    blocks = [("h", 2, "Distribution drift"),
              ("p", "Mean per-token KL(base ‖ arm) of the next-token distributions over the same tokens, in nats, "
                    f"with a document-level bootstrap 95% CI ({where}; first "
                    f"{next((v.get('max_tokens') for v in src.values()), 'n/a')} tokens per document; Shenfeld et al. "
                    "2025). Bits per byte: paired per document on the general text (lower is better; a rise is drift). "
                    "Reported beside the forgetting score, not in it."),
              ("table", ["arm", "KL general text", "KL domain prompts", "Δ bits per byte (general) [95% CI]"], rows)]
    if notes:
        blocks.append(("p", "Left out of the forgetting score (suite tasks) and the learning score (in-domain): "
                            + "; ".join(sorted(set(notes))) + "."))
    diverged = {arm: c["nonfinite"] for arm, c in metrics["comparisons"].items() if c.get("nonfinite")}
    if diverged:
        blocks.append(("p", "**Diverged** (non-finite per-document values, e.g. a nan training loss; those metrics "
                            "have no Δ): " + "; ".join(f"{_lab(metrics, a)}: {', '.join(v)}" for a, v in diverged.items())
                            + "."))
    return blocks


def _perplexity(metrics: dict) -> list[tuple]:
    ppl_rows = [(arm, c["perplexity"]) for arm, c in metrics["comparisons"].items() if c.get("perplexity")]
    if not ppl_rows:
        return []
    base_ppl = metrics["arms"]["base"]["perplexity"]
    rows = [["base", f"{base_ppl['word_perplexity']:.3f}", "", f"{base_ppl['bits_per_byte']:.4f}", ""]]
    for arm, d in ppl_rows:
        w, b = d["word_perplexity"], d["bits_per_byte"]
        rows.append([_lab(metrics, arm), _ppl(w["arm"]), _rel(w), f"{b['arm']:.4f}", f"{b['delta']:+.4f} ({b['rel_pct']:+.1f}%)"])
        q = (metrics["comparisons"][arm].get("vs_nf4_base") or {}).get("perplexity")
        if q:
            w, b = q["word_perplexity"], q["bits_per_byte"]
            rows.append([f"{_lab(metrics, arm)} vs {NF4_REFERENCE}", "", _rel(w), "",
                         f"{b['delta']:+.4f} ({b['rel_pct']:+.1f}%)"])
    return [("h", 2, f"Perplexity drift ({base_ppl['task']}, {base_ppl['n']} documents)"),
            ("p", "Lower is better; a rise means the arm models general text worse than the base."),
            ("table", ["arm", "word perplexity", "Δ", "bits per byte", "Δ"], rows)]


COLLAPSED_RATIO = 10.0  # a perplexity 10x the base's: the model no longer models the text


def _ppl(x: float) -> str:
    if x == float("inf"):
        return "inf (collapsed)"
    return f"{x:.2e}" if x >= 1e6 else f"{x:,.3f}"  # a collapsed model's perplexity: no 16-digit figures


def _rel(d: dict) -> str:
    """A perplexity change; a blow-up is flagged as collapsed with its ratio, never a seven-digit percentage."""
    if d["arm"] == float("inf") or (d["base"] and d["arm"] / d["base"] >= COLLAPSED_RATIO):
        r = d["arm"] / d["base"] if d["arm"] != float("inf") else None
        ratio = "inf" if r is None else (f"{r:.1e}x" if r >= 1e6 else f"{r:,.0f}x")
        return f"collapsed ({ratio} the base)"
    return f"{d['delta']:+.3f} ({d['rel_pct']:+.1f}%)"


def _flips(metrics: dict, tasks: list[str]) -> list[tuple]:
    rows = []
    for arm, c in metrics["comparisons"].items():
        if metrics["arms"][arm].get("point"):  # an arm's points: their Δs are in the tables above
            continue
        for task in tasks:
            m = metrics["arms"]["base"]["tasks"].get(task, {}).get("metric")
            s = c["tasks"].get(task, {}).get(m)
            if s and s.get("forgotten") is not None:
                rows.append([_lab(metrics, arm), task, f"{s['forgotten']} ({100 * s['forgotten_rate']:.1f}%)",
                             f"{s['gained']} ({100 * s['gained_rate']:.1f}%)", f"{s['mcnemar_p']:.3g}"])
    header = ["arm", "task", "forgotten (base right, arm wrong)", "gained", "McNemar exact p"]
    return [("h", 2, "Flips (counted metric)"), ("table", header, rows)]


def _last_loss(train: dict) -> str:
    """The last logged window's mean loss and its step; "–" when training ended before the first log."""
    history = train.get("loss_history") or []
    return f"{history[-1]['loss']:.4f} (step {history[-1]['step']})" if history else "–"


def _training(metrics: dict) -> list[tuple]:
    rows = []
    for arm, a in metrics["arms"].items():
        t = a["train"]
        if t:
            rows.append([_lab(metrics, arm), t["method"], t["steps"], f"{t.get('epochs', 'n/a')}", t.get("batch_size", "n/a"),
                         f"{t['learning_rate']:g}", f"{t['train_loss']:.4f}", _last_loss(t), t.get("compute_dtype") or "n/a"])
    if not rows:
        return []
    # The Trainer's training_loss is the mean over every step; the last logged window shows where it ended.
    header = ["arm", "method", "steps", "epochs", "batch", "lr", "mean loss", "last logged loss", "compute"]
    blocks = [("h", 2, "Training"), ("table", header, rows)]
    optims = {arm: a["train"]["optim"] for arm, a in metrics["arms"].items()
              if a["train"] and a["train"].get("optim") not in (None, "adamw_torch_fused", "adamw_torch")}
    if optims:  # not the default AdamW: its state (and so the memory figures) differs
        rest = len(rows) > len(optims)
        blocks.append(("p", "Optimizer (`training.optim`): " + ", ".join(f"{arm} {o}" for arm, o in optims.items())
                       + ("; the other arms AdamW with fp32 moments." if rest else ".")))
    graphed = {arm: a["train"]["padded_length"] for arm, a in metrics["arms"].items()
               if a["train"] and a["train"].get("cuda_graphs")}
    if graphed:  # a cost of the speed, not of the method: say so beside the memory figures
        blocks.append(("p", f"Training steps of {', '.join(graphed)} ran as CUDA graphs (captured once, then "
                            f"replayed; packed rows padded to {', '.join(sorted({str(n) for n in graphed.values()}))} "
                            "tokens): their training memory includes the graphs' pools and that padding. "
                            "`training.cuda_graphs=false` measures without."))
    return blocks


def _stage_row(arm: str, stage: str, r: dict, throughput: str) -> list:
    return [arm, stage, _s(r.get("seconds")), _b(r.get("peak_gpu_allocated_bytes")),
            _b(r.get("peak_gpu_reserved_bytes")), _b(r.get("peak_nvml_used_bytes")), _b(r.get("peak_rss_bytes")),
            _b(r.get("model_footprint_bytes")), throughput]


def _resources(metrics: dict) -> list[tuple]:
    """Memory and time per arm and stage; parameters and storage per arm ("–": not recorded)."""
    rows, storage = [], []
    for arm, a in metrics["arms"].items():
        t = a["train"]
        if t:
            rows.append(_stage_row(_lab(metrics, arm), "train", t, f"{t['tokens_per_second']:,.0f} tokens/s, "
                                                    f"{t.get('examples_per_second', 0):,.2f} examples/s"))
        ev = dict(a.get("eval_resources") or {})
        ev.setdefault("seconds", a["eval_seconds"])
        ppl = a.get("perplexity") or {}
        row = _stage_row(_lab(metrics, arm), "eval", ev, "")
        if ppl.get("seconds"):
            row[2] += f" (+ {_s(ppl['seconds'])} perplexity)"
        reused = a.get("baseline") or {}
        if reused.get("tasks"):  # read from baselines/ instead of evaluated again
            row[2] += f"; {len(reused['tasks'])} tasks reused from baselines/ (saved {_s(reused['saved_seconds'])})"
        rows.append(row)
        if a.get("kl_resources"):  # the base's second copy beside the arm: the stage's own peak
            rows.append(_stage_row(_lab(metrics, arm), "KL to base", a["kl_resources"], ""))
        if t:
            saved = t.get("saved") or {}
            what = "full checkpoint" if t["method"] == "full" else "adapter"
            storage.append([_lab(metrics, arm), f"{t['trainable_params']:,}", f"{t['total_params']:,}", f"{t['trainable_pct']:.2f}%",
                            "4-bit NF4" if t.get("base_4bit") else "16/32-bit (unquantized)",
                            what, saved.get("dtype") or "not recorded", _b(saved.get("bytes"))])
    header = ["arm", "stage", "wall time", "peak GPU allocated (torch)", "peak GPU reserved (torch)",
              "peak GPU used (NVML)", "peak RSS", "loaded model", "throughput"]
    out = [("h", 2, "Resources"),
           ("p", "Per arm and stage. GPU figures come from torch's allocator (allocated, reserved) and the "
                 "device's own count (NVML); on CPU, the process's peak resident memory (RSS) is the measure. "
                 "“–”: not recorded by this run."),
           ("table", header, rows)]
    if storage:
        out += [("h", 3, "Parameters and storage"),
                ("table", ["arm", "trainable params", "total params", "trainable", "base weights", "saved",
                           "saved dtype", "on disk"], storage)]
    return out


def _provenance_blocks(metrics: dict, stored: dict) -> list[tuple]:
    p = metrics["provenance"]
    model, env = p["model"], p["environment"]
    sha = model.get("content_sha256")
    mirror = f"`{p['mirror']}`" if p["mirror"] else "none (datasets from the hub)"
    wall = f", wall time {p['wall_seconds']:,.0f} s" if p.get("wall_seconds") else ""
    blocks = [("h", 2, "Provenance"), ("ul", [
        f"**Base model** `{model['name']}` (source: {model.get('source', 'n/a')}) — {model.get('detail', '')}.",
        f"**Model content sha256** `{sha}` (weight, config and tokenizer files, by name and content)"
        if sha else "**Model content sha256** not recorded (the run predates content hashing).",
        f"**Seed** {p['seed']}; **profile** {p['profile']['name']}: {_limits(p['profile'])}"
        f"{'; max steps ' + str(p['profile']['max_steps']) if p['profile'].get('max_steps') else ''}.",
        f"**Overrides** {' '.join(f'`{o}`' for o in p['overrides']) or 'none'}; **mirror** {mirror}.",
        f"**Started** {p['started'] or 'n/a'}, **finished** {p['finished'] or 'n/a'}"
        f"{wall}.",
    ])]
    rows = [[d.get("used_for", ""), d.get("id", ""), d.get("config") or "default", d.get("split", ""),
             f"{d['rows']:,}" if d.get("rows") is not None else "n/a",
             f"`{d['sha256'][:16]}…`" if d.get("sha256") else (f"fingerprint `{d['fingerprint']}`"
                                                               if d.get("fingerprint") else "not recorded")]
            for d in p["datasets"]]
    blocks += [("h", 3, "Datasets"), ("table", ["used for", "dataset", "config", "split", "rows", "sha256"], rows)]
    hw = [["python", env.get("python")], ["platform", env.get("platform")],
          ["CPU", f"{env.get('cpu') or 'model not recorded'}, {env.get('cpu_count')} cores"],
          ["GPU", f"{env['gpu']} × {env.get('gpu_count') or 1}" if env.get("gpu") else "none"],
          ["CUDA", env.get("cuda") or "n/a"], ["git commit", (env.get("git_commit") or "n/a") + (" (harness/ modified)" if env.get("git_dirty") else "")
                          + (f"; {env['git_commit_note']}" if env.get("git_commit_note") else "")]]
    hw += [[k, v or "not installed"] for k, v in env.get("packages", {}).items()]
    blocks += [("h", 3, "Environment"), ("table", ["", "version / value"], [[k, str(v)] for k, v in hw]),
               ("code", "Resolved configuration (config.json)", json.dumps(stored, indent=2, sort_keys=True))]
    return blocks


# ---------------------------------------------------------------- plots


def _plots(metrics: dict, suite_tasks: list[str], domain_tasks: list[str], run_dir: Path) -> list[tuple]:
    """Draw the plots this run supports; returns (stem, title, alt text, caption) for each."""
    every = suite_tasks + [t for t in domain_tasks if t not in suite_tasks]
    # The plots' axes are percent and points: a metric on another scale (bits per byte, BLEU, MCC) is
    # in the tables only, and the caption says so.
    tasks = [t for t in every if _in_percent(metrics, t)]
    left = [t for t in every if t not in tasks and t in metrics["arms"]["base"]["tasks"]]
    plots.scores(metrics, tasks, run_dir)
    figures = [("scores", "Scores before and after", "scores per task and arm, with 95% CI error bars",
                f"Not a percentage, so in the tables only: {', '.join(left)}." if left else "")]
    short = labels(metrics)
    if any(c["forgetting"] and c["learning"] for c in metrics["comparisons"].values()):
        plots.tradeoff(metrics, run_dir, short)
        figures.append(("tradeoff", "Learning vs forgetting",
                        "in-domain learning against the forgetting score, one point per arm",
                        "Each point is an arm: x is the mean in-domain Δ, y the forgetting score (mean Δ over the "
                        "suite), bars are 95% CIs; the line joins the arms no other arm beats on both."
                        + (" Small markers are an arm's points (triangles: part-way through training, joined "
                           "from the base; squares: interpolated toward its start, α)."
                           if any(a.get("point") for a in metrics["arms"].values()) else "")))
    if plots.curves(metrics, run_dir, short):
        figures.append(("curves", "Forgetting curves", "learning and forgetting against the fraction of training steps",
                        "Each line is an arm evaluated at `training.eval_at` fractions of its steps (0: the base, 1: "
                        "the trained arm); bands are 95% CIs."))
    trained = [a for a, v in metrics["arms"].items() if v["train"]]
    if len(trained) >= HEATMAP_MIN_ARMS:
        plots.heatmap(metrics, tasks, trained, run_dir, short)
        figures.append(("heatmap", "Δ per task and arm", "task by arm heat map of Δ against the base",
                        "Colour: Δ in points (blue gain, red loss); * marks a 95% CI that excludes 0."
                        + (f" Not a percentage, so in the tables only: {', '.join(left)}." if left else "")))
    stages = [(a["train"] or {}, a.get("eval_resources") or {}) for a in metrics["arms"].values()]
    gpu = any(x.get("peak_gpu_allocated_bytes") for pair in stages for x in pair)  # one measure for all arms
    key = "peak_gpu_allocated_bytes" if gpu else "peak_rss_bytes"
    rows = []
    for arm, (t, ev) in zip(metrics["arms"], stages):
        if metrics["arms"][arm].get("point"):  # an arm's point costs an evaluation, shown in the table
            continue
        rows.append({"arm": short[arm], "train_mem": t.get(key), "eval_mem": ev.get(key),
                     "mem_kind": "GPU allocated" if gpu else "RSS", "saved": (t.get("saved") or {}).get("bytes"),
                     "footprint": t.get("model_footprint_bytes") or ev.get("model_footprint_bytes")})
    if any(r["train_mem"] or r["saved"] for r in rows):
        plots.resources(rows, run_dir)
        figures.append(("resources", "Memory and storage", "peak memory and storage per arm, log scale",
                        "Log scale: a full checkpoint and an adapter differ by orders of magnitude. "
                        "Missing bars: not recorded by this run."))
    return figures
