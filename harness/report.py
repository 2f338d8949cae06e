"""Report stage: statistics, tables and plots from a run directory's stored artifacts.

    harness report results/finance/<run-id>

Reads config.json, arms/<arm>.json and samples/<arm>.csv; recomputes nothing that needs a model.
Writes metrics.json (per arm and task: score, stderr, n; per comparison: paired statistics),
results.csv (one row per arm x task x metric), report.md and scores.png/.svg.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from harness import stats
from harness.io import read_json, read_samples, write_json, write_text

N_BOOT = 10_000
NF4_REFERENCE = "base-nf4"  # the base quantized as QLoRA loads it, no adapter


def run(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json")
    suite_tasks = [t["task"] for t in config["suite"]["tasks"]]
    metric_of = {t["task"]: t["metric"] for t in config["suite"]["tasks"] + config["task"]["in_domain"]}
    domain_tasks = [t["task"] for t in config["task"]["in_domain"]]
    arms = _load_arms(run_dir, ["base", NF4_REFERENCE, *config["methods"]])
    if "base" not in arms:
        raise FileNotFoundError(f"{run_dir}/arms/base.json: the base evaluation is missing")
    seed = config["task"]["training"]["seed"]

    metrics = {"run_id": config["run_id"], "task": config["task"]["name"], "suite": config["suite"]["name"],
               "profile": config["profile"], "model": config["model"], "arms": {}, "comparisons": {}}
    for name, arm in arms.items():
        metrics["arms"][name] = {
            "tasks": {t: {"metric": metric_of[t], "score": arm["results"][t].get(metric_of[t]),
                          "stderr": arm["results"][t].get(f"{metric_of[t]}_stderr"), "n": arm["n"][t],
                          "all": arm["results"][t]} for t in arm["results"]},
            "train": arm["train"], "eval_seconds": arm["eval_seconds"], "perplexity": arm.get("perplexity"),
        }
    for name, arm in arms.items():
        if name == "base":
            continue
        comp = _compare(arms["base"], arm, metric_of, suite_tasks, domain_tasks, seed)
        # QLoRA's Δ against the 16-bit base mixes two effects: quantizing the base, and training.
        # Against the 4-bit base (no adapter) it isolates what training did.
        if (arm["train"] or {}).get("method") == "qlora" and NF4_REFERENCE in arms:
            comp["vs_nf4_base"] = _compare(arms[NF4_REFERENCE], arm, metric_of, suite_tasks, domain_tasks, seed)
        metrics["comparisons"][name] = comp
    metrics["summary"] = summary(metrics, suite_tasks, domain_tasks)
    metrics["missing_arms"] = [m for m in config["methods"] if m not in arms]

    write_json(run_dir / "metrics.json", metrics)
    write_text(run_dir / "results.csv", _csv(metrics, suite_tasks))
    _plot(metrics, suite_tasks + [t for t in domain_tasks if t not in suite_tasks], run_dir)
    if any(c["forgetting"] and c["learning"] for c in metrics["comparisons"].values()):
        _plot_tradeoff(metrics, run_dir)
    write_text(run_dir / "report.md", _markdown(metrics, config, suite_tasks, domain_tasks))
    return run_dir / "report.md"


def _compare(base: dict, arm: dict, metric_of: dict, suite_tasks: list[str], domain_tasks: list[str],
             seed: int) -> dict:
    """Paired statistics of one arm against a reference evaluated on the same documents."""
    comp = {"tasks": {}}
    pairs = {}
    for task, records in arm["samples"].items():
        comp["tasks"][task] = {}
        for metric in ("acc", "acc_norm"):
            if metric not in records[0]:
                continue
            b, a = stats.align(base["samples"][task], records, metric=metric)
            comp["tasks"][task][metric] = stats.paired_delta(b, a, n_boot=N_BOOT, seed=seed)
            if metric == metric_of.get(task):
                pairs[task] = (b, a)
    general = {t: pairs[t] for t in suite_tasks if t in pairs}
    comp["forgetting"] = stats.aggregate_delta(general, n_boot=N_BOOT, seed=seed) if general else None
    # Biderman et al. average plain accuracy of the three tasks, whatever metric the suite counts.
    bid = {t: stats.align(base["samples"][t], arm["samples"][t], metric="acc") for t in stats.BIDERMAN_TASKS
           if t in arm["samples"]}
    comp["biderman"] = stats.biderman_delta(bid, n_boot=N_BOOT, seed=seed) if len(bid) == 3 else None
    domain = {t: pairs[t] for t in domain_tasks if t in pairs}
    comp["learning"] = stats.aggregate_delta(domain, n_boot=N_BOOT, seed=seed) if domain else None
    base_ppl, arm_ppl = base.get("perplexity"), arm.get("perplexity")
    comp["perplexity"] = stats.perplexity_drift(base_ppl, arm_ppl) if base_ppl and arm_ppl else None
    return comp


def _load_arms(run_dir: Path, names: list[str]) -> dict:
    arms = {}
    for name in names:
        path = run_dir / "arms" / f"{name}.json"
        if path.exists():
            arms[name] = read_json(path)
            arms[name]["samples"] = read_samples(run_dir / "samples" / f"{name}.csv")
    return arms


# ---------------------------------------------------------------- words computed from numbers


def _interval(c: dict) -> str:
    return f"95% CI [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"


def _ci(c: dict | None, scale: float = 100.0) -> str:
    if not c:
        return "n/a"
    sig = "" if c["significant"] else ", not significant"
    return f"{scale * c['delta']:+.1f} [{scale * c['ci_low']:+.1f}, {scale * c['ci_high']:+.1f}]{sig}"


def summary(metrics: dict, suite_tasks: list[str], domain_tasks: list[str]) -> str:
    """One paragraph, every claim read off the statistics (CI spanning 0 is 'not significant')."""
    parts = []
    for arm, comp in metrics["comparisons"].items():
        f, l = comp["forgetting"], comp["learning"]
        if f is None:
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
        q = comp.get("vs_nf4_base")
        if q and q["forgetting"]:
            sig = "" if q["forgetting"]["significant"] else ", not significant"
            parts.append(f"Against the 4-bit base it was trained on, {arm}'s general change is "
                         f"{100 * q['forgetting']['delta']:+.1f} ({_interval(q['forgetting'])}{sig}).")
    ranked = [(a, c["forgetting"]["delta"]) for a, c in metrics["comparisons"].items()
              if c["forgetting"] and a != NF4_REFERENCE]
    if len(ranked) > 1:
        worst = min(ranked, key=lambda x: x[1])
        parts.append(f"Most negative mean general change: {worst[0]} ({100 * worst[1]:+.1f} points); "
                     "compare CIs before calling one arm more forgetful than another.")
    return " ".join(parts)


# ---------------------------------------------------------------- tables


def _csv(metrics: dict, suite_tasks: list[str]) -> str:
    buf = io.StringIO()
    cols = ["arm", "task", "kind", "metric", "counted", "score", "stderr", "n", "delta", "ci_low", "ci_high",
            "significant", "mcnemar_p", "forgotten", "gained"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for arm, a in metrics["arms"].items():
        for task, t in a["tasks"].items():
            for metric in ("acc", "acc_norm"):
                if metric not in t["all"]:
                    continue
                row = {"arm": arm, "task": task, "kind": "general" if task in suite_tasks else "in_domain",
                       "metric": metric, "counted": metric == t["metric"], "score": t["all"][metric],
                       "stderr": t["all"].get(f"{metric}_stderr"), "n": t["n"]}
                c = metrics["comparisons"].get(arm, {}).get("tasks", {}).get(task, {}).get(metric)
                if c:
                    row.update({k: c[k] for k in ("delta", "ci_low", "ci_high", "significant", "mcnemar_p",
                                                  "forgotten", "gained")})
                w.writerow(row)
    return buf.getvalue()


def _fmt(x, pct=True):
    if x is None:
        return "n/a"
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


def _score_table(metrics: dict, tasks: list[str]) -> list[str]:
    arms = [a for a in metrics["arms"] if a != "base"]
    head = "| task | metric | n | base | " + " | ".join(f"{a} | Δ {a} [95% CI]" for a in arms) + " |"
    lines = [head, "|" + " --- |" * (4 + 2 * len(arms))]
    for task in tasks:
        b = metrics["arms"]["base"]["tasks"].get(task)
        if b is None:
            continue
        row = f"| {task} | {b['metric']} | {b['n']} | {_fmt(b['score'])} |"
        for a in arms:
            t = metrics["arms"][a]["tasks"].get(task)
            c = metrics["comparisons"][a]["tasks"].get(task, {}).get(b["metric"])
            row += f" {_fmt(t['score']) if t else 'n/a'} | {_ci(c)} |"
        lines.append(row)
    return lines


def _limits(prof: dict) -> str:
    docs = "all documents" if prof["limit"] is None else f"at most {prof['limit']} documents per task"
    n = prof["train_examples"]
    return f"{docs}, {'all training examples' if n is None else f'{n} training examples'}"


def _markdown(metrics: dict, config: dict, suite_tasks: list[str], domain_tasks: list[str]) -> str:
    prof = config["profile"]
    td = config.get("train_data", {})
    env = config["environment"]
    lines = [
        f"# Forgetting report: {config['task']['name']} on {config['model']['name']}",
        "",
        metrics["summary"],
        "",
        *([f"**Not in this report:** {', '.join(metrics['missing_arms'])} (requested, but no evaluation was "
           "recorded: the run stopped before it finished).", ""] if metrics["missing_arms"] else []),
        f"- **Run** `{config['run_id']}`, profile **{prof['name']}**: {_limits(prof)}.",
        f"- **Model** {config['model']['name']} — {config['model']['detail']}.",
        f"- **Training data** {td.get('dataset', 'n/a')} ({td.get('split', '')}): {td.get('examples', 'n/a')} of "
        f"{td.get('rows', 'n/a')} rows, {td.get('tokens', 'n/a')} tokens; loss on the answer only; "
        f"format from lm-eval task `{config['task']['train']['format_task']}`.",
        f"- **Device** {env.get('gpu') or 'CPU'} ({config['device']}); seed {config['task']['training']['seed']}; "
        f"{', '.join(f'{k} {v}' for k, v in env['packages'].items() if v)}.",
        "",
        "Scores in percent. Δ is arm − base on the same documents, with a 95% paired bootstrap CI; "
        "where the CI spans 0 the change is *not significant*.",
        "",
        "## General benchmarks (forgetting)",
        "",
        *_score_table(metrics, suite_tasks),
        "",
        "## In-domain (learning)",
        "",
        *_score_table(metrics, domain_tasks),
        "",
        "## Aggregates",
        "",
        "| arm | forgetting score: mean Δ over the suite | Biderman et al. avg (hellaswag, arc_challenge, winogrande acc) | learning: mean in-domain Δ |",
        "| --- | --- | --- | --- |",
    ]
    for arm, c in metrics["comparisons"].items():
        bid = c["biderman"]
        bid_s = f"{_fmt(bid['base'])} → {_fmt(bid['arm'])} ({_ci(bid)})" if bid else "n/a"
        lines.append(f"| {arm} | {_ci(c['forgetting'])} | {bid_s} | {_ci(c['learning'])} |")
        q = c.get("vs_nf4_base")
        if q:
            qb = q["biderman"]
            qb_s = f"{_fmt(qb['base'])} → {_fmt(qb['arm'])} ({_ci(qb)})" if qb else "n/a"
            lines.append(f"| {arm} vs {NF4_REFERENCE} (training alone) | {_ci(q['forgetting'])} | {qb_s} | "
                         f"{_ci(q['learning'])} |")
    ppl_rows = [(arm, c["perplexity"]) for arm, c in metrics["comparisons"].items() if c.get("perplexity")]
    if ppl_rows:
        base_ppl = metrics["arms"]["base"]["perplexity"]
        lines += ["", f"## Perplexity drift ({base_ppl['task']}, {base_ppl['n']} documents)", "",
                  "Lower is better; a rise means the arm models general text worse than the base.", "",
                  "| arm | word perplexity | Δ | bits per byte | Δ |", "| --- | --- | --- | --- | --- |",
                  f"| base | {base_ppl['word_perplexity']:.3f} | | {base_ppl['bits_per_byte']:.4f} | |"]
        for arm, d in ppl_rows:
            w, b = d["word_perplexity"], d["bits_per_byte"]
            lines.append(f"| {arm} | {w['arm']:.3f} | {w['delta']:+.3f} ({w['rel_pct']:+.1f}%) | {b['arm']:.4f} | "
                         f"{b['delta']:+.4f} ({b['rel_pct']:+.1f}%) |")
            q = (metrics["comparisons"][arm].get("vs_nf4_base") or {}).get("perplexity")
            if q:
                w, b = q["word_perplexity"], q["bits_per_byte"]
                lines.append(f"| {arm} vs {NF4_REFERENCE} | | {w['delta']:+.3f} ({w['rel_pct']:+.1f}%) | | "
                             f"{b['delta']:+.4f} ({b['rel_pct']:+.1f}%) |")
    lines += ["", "## Flips (counted metric)", "",
              "| arm | task | forgotten (base right, arm wrong) | gained | McNemar exact p |", "| --- | --- | --- | --- | --- |"]
    for arm, c in metrics["comparisons"].items():
        for task in suite_tasks + domain_tasks:
            m = metrics["arms"]["base"]["tasks"].get(task, {}).get("metric")
            s = c["tasks"].get(task, {}).get(m)
            if s and s.get("forgotten") is not None:
                lines.append(f"| {arm} | {task} | {s['forgotten']} ({100 * s['forgotten_rate']:.1f}%) | "
                             f"{s['gained']} ({100 * s['gained_rate']:.1f}%) | {s['mcnemar_p']:.3g} |")
    lines += ["", "## Training and resources", "",
              "| arm | steps | lr | final loss | train time | tokens/s | trainable params | saved (safetensors) | peak memory | eval time |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, a in metrics["arms"].items():
        t = a["train"]
        if t is None:
            lines.append(f"| {arm} | – | – | – | – | – | – | – | – | {a['eval_seconds']:.0f} s |")
            continue
        mem = t.get("peak_gpu_allocated_bytes")
        mem_s = f"{_size(mem)} GPU alloc." if mem else f"{_size(t['peak_rss_bytes'])} RSS"
        kind = "checkpoint" if t["method"] == "full" else "adapter"
        base4 = ", base 4-bit" if t.get("base_4bit") else ""
        lines.append(f"| {arm} | {t['steps']} | {t['learning_rate']:g} | {t['train_loss']:.4f} | {t['seconds']:.0f} s | "
                     f"{t['tokens_per_second']:,.0f} | {t['trainable_params']:,} ({t['trainable_pct']:.2f}%{base4}) | "
                     f"{kind} {_size(t['saved']['bytes'])}{_dtype(t['saved'])} | {mem_s} | {a['eval_seconds']:.0f} s |")
    stages = []
    for arm, a in metrics["arms"].items():
        train_s = f"train {a['train']['seconds']:.0f} s + " if a["train"] else ""
        stages.append(f"{arm} {train_s}eval {a['eval_seconds']:.0f} s")
    lines += ["", "Stage wall times: " + "; ".join(stages) + "."]
    lines += ["", "## Scores before and after", "", "![scores per task and arm](scores.png)", ""]
    if any(c["forgetting"] and c["learning"] for c in metrics["comparisons"].values()):
        lines += ["## Learning vs forgetting", "",
                  "![in-domain learning against the forgetting score, one point per arm](tradeoff.png)", "",
                  "Each point is an arm: x is the mean in-domain Δ, y the forgetting score (mean Δ over the "
                  "suite), bars are 95% CIs; the line joins the arms no other arm beats on both.", ""]
    lines += [
              "Files: `metrics.json` (all statistics), `results.csv` (one row per arm × task × metric), "
              "`samples/` (per-document records), `config.json` (the resolved configuration and environment).", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "harness"  # fixed SVG ids: regenerated reports are byte-stable
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, stem: Path) -> None:
    """PNG and SVG; fixed metadata keeps regenerated images byte-stable."""
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120, metadata={"Software": None})
    fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None, "Creator": None})
    plt.close(fig)


def _plot(metrics: dict, tasks: list[str], run_dir: Path) -> None:
    plt = _pyplot()
    import numpy as np

    arms = list(metrics["arms"])
    x = np.arange(len(tasks))
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tasks)), 4))
    for i, arm in enumerate(arms):
        scores, errs = [], []
        for t in tasks:
            r = metrics["arms"][arm]["tasks"].get(t, {})
            scores.append(100 * (r.get("score") or 0))
            errs.append(196 * (r.get("stderr") or 0))
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, scores, width, yerr=errs, capsize=2, label=arm)
    ax.set_xticks(x, [f"{t}\n({metrics['arms']['base']['tasks'][t]['metric']})" for t in tasks], fontsize=8)
    ax.set_ylabel("score (%), ±95% CI")
    ax.set_ylim(0, 100)
    ax.set_title(f"{metrics['task']}: before (base) and after fine-tuning — {metrics['profile']['name']} profile")
    _save(plt, fig, run_dir / "scores")


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (more learning, less forgetting)."""
    front = []
    for name, x, y in points:
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for _, ox, oy in points)
        if not dominated:
            front.append(name)
    return front


def _plot_tradeoff(metrics: dict, run_dir: Path) -> None:
    """The learning-forgetting plane of Biderman et al. (2024), one point per arm."""
    plt = _pyplot()

    pts, colors = [], {}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm, c in metrics["comparisons"].items():
        f, l = c["forgetting"], c["learning"]
        if not (f and l):
            continue
        method = (metrics["arms"][arm]["train"] or {}).get("method", arm)
        color = colors.setdefault(method, f"C{len(colors)}")
        x, y = 100 * l["delta"], 100 * f["delta"]
        ax.errorbar(x, y, xerr=[[x - 100 * l["ci_low"]], [100 * l["ci_high"] - x]],
                    yerr=[[y - 100 * f["ci_low"]], [100 * f["ci_high"] - y]], fmt="o", color=color, capsize=3,
                    label=method if method not in [h.get_label() for h in ax.get_legend_handles_labels()[0]] else None)
        ax.annotate(arm, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        pts.append((arm, x, y))
    front = sorted((p for p in pts if p[0] in pareto_front(pts)), key=lambda p: p[1])
    if len(front) > 1:
        ax.plot([p[1] for p in front], [p[2] for p in front], "--", color="grey", lw=1, label="Pareto frontier")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("learning: mean in-domain Δ (points)")
    ax.set_ylabel("forgetting score: mean general Δ (points)")
    ax.set_title(f"{metrics['task']}: learning vs forgetting ({metrics['profile']['name']} profile)")
    _save(plt, fig, run_dir / "tradeoff")
