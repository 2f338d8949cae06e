"""Report plots (matplotlib, PNG and SVG), drawn from metrics.json's content only.

Fixed SVG ids and no dates in metadata: a regenerated report is byte-identical.
"""

from __future__ import annotations

from pathlib import Path

from harness.stats import pareto_front

NF4_REFERENCE = "base-nf4"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "harness"  # fixed SVG ids: regenerated reports are byte-stable
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, stem: Path) -> None:
    """PNG and SVG; fixed metadata keeps regenerated images byte-stable."""
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120, metadata={"Software": None})
    fig.savefig(stem.with_suffix(".svg"), metadata={"Date": None, "Creator": None})
    plt.close(fig)


def scores(metrics: dict, tasks: list[str], run_dir: Path) -> None:
    """Before (base) and after (each arm) bars per task, with 95% CI error bars (1.96 × lm-eval stderr)."""
    plt = _pyplot()
    import numpy as np

    arms = list(metrics["arms"])
    x = np.arange(len(tasks))
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tasks)), 4))
    for i, arm in enumerate(arms):
        values, errs = [], []
        for t in tasks:
            r = metrics["arms"][arm]["tasks"].get(t, {})
            values.append(100 * (r.get("score") or 0))
            errs.append(196 * (r.get("stderr") or 0))
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, values, width, yerr=errs, capsize=2, label=arm)
    ax.set_xticks(x, [f"{t}\n({metrics['arms']['base']['tasks'][t]['metric']})" for t in tasks], fontsize=8)
    ax.set_ylabel("score (%), ±95% CI")
    ax.set_ylim(0, 100)
    ax.set_title(f"{metrics['task']}: before (base) and after fine-tuning — {metrics['profile']['name']} profile")
    _save(plt, fig, run_dir / "scores")


def tradeoff(metrics: dict, run_dir: Path, labels: dict[str, str] | None = None) -> None:
    """The learning-forgetting plane of Biderman et al. (2024), one point per arm; an arm's points
    (snapshots, interpolations) are small markers joined to it by a line (its path from the start)."""
    plt = _pyplot()

    labels = labels or {}
    pts, colors, xy = [], {}, {}
    fig, ax = plt.subplots(figsize=(6, 4.5) if len(metrics["comparisons"]) <= 8 else (8, 6))
    for arm, c in metrics["comparisons"].items():
        f, l = c["forgetting"], c["learning"]
        if not (f and l):
            continue
        a = metrics["arms"][arm]
        point = a.get("point")
        method = (a["train"] or {}).get("method") or (point or {}).get("method") or arm
        color = colors.setdefault(method, f"C{len(colors)}")
        x, y = 100 * l["delta"], 100 * f["delta"]
        xy[arm] = (x, y)
        if point:
            ax.plot(x, y, "s" if point["kind"] == "alpha" else "^", color=color, ms=4, alpha=0.8)
            continue
        ax.errorbar(x, y, xerr=[[x - 100 * l["ci_low"]], [100 * l["ci_high"] - x]],
                    yerr=[[y - 100 * f["ci_low"]], [100 * f["ci_high"] - y]], fmt="o", color=color, capsize=3,
                    label=method if method not in [h.get_label() for h in ax.get_legend_handles_labels()[0]] else None)
        ax.annotate(labels.get(arm, arm), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        pts.append((arm, x, y))
    for arm, (x, y) in list(xy.items()):  # each arm's paths: snapshots from the base, interpolations from its start
        for kind, style in (("at", "-"), ("alpha", ":")):
            path = sorted((metrics["arms"][n]["point"]["value"], xy[n]) for n in xy
                          if (metrics["arms"][n].get("point") or {}).get("of") == arm
                          and metrics["arms"][n]["point"]["kind"] == kind)
            if not path:
                continue
            line = ([(0.0, 0.0)] if kind == "at" else []) + [p for _, p in path] + [(x, y)]
            method = (metrics["arms"][arm]["train"] or {}).get("method", arm)
            ax.plot([p[0] for p in line], [p[1] for p in line], style, color=colors.get(method, "grey"), lw=1,
                    label=("training path (eval_at)" if kind == "at" else "interpolation (α)")
                    if ("training path (eval_at)" if kind == "at" else "interpolation (α)")
                    not in [h.get_label() for h in ax.get_legend_handles_labels()[0]] else None)
    front = sorted((p for p in pts if p[0] in pareto_front(pts)), key=lambda p: p[1])
    if len(front) > 1:
        ax.plot([p[1] for p in front], [p[2] for p in front], "--", color="grey", lw=1, label="Pareto frontier")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("learning: mean in-domain Δ (points)")
    ax.set_ylabel("forgetting score: mean general Δ (points)")
    ax.set_title(f"{metrics['task']}: learning vs forgetting ({metrics['profile']['name']} profile)")
    _save(plt, fig, run_dir / "tradeoff")


def curves(metrics: dict, run_dir: Path, labels: dict[str, str] | None = None) -> bool:
    """Forgetting curves: learning and the forgetting score against the fraction of training steps, one
    line per arm with snapshots (training.eval_at), from the base at 0 to the arm at 1. False: none."""
    labels = labels or {}
    series = {}
    for arm, a in metrics["arms"].items():
        c = metrics["comparisons"].get(arm) or {}
        pt = a.get("point")
        if pt and pt["kind"] == "at" and c.get("forgetting") and c.get("learning"):
            series.setdefault(pt["of"], []).append((pt["value"], c))
    series = {arm: v for arm, v in series.items() if (metrics["comparisons"].get(arm) or {}).get("forgetting")}
    if not series:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (arm, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: p[0]) + [(1.0, metrics["comparisons"][arm])]
        for ax, key in zip(axes, ("learning", "forgetting")):
            xs = [0.0] + [p[0] for p in pts]
            ys = [0.0] + [100 * p[1][key]["delta"] for p in pts]
            lo = [0.0] + [100 * p[1][key]["ci_low"] for p in pts]
            hi = [0.0] + [100 * p[1][key]["ci_high"] for p in pts]
            ax.plot(xs, ys, "o-", color=f"C{i}", ms=3, label=labels.get(arm, arm))
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15)
    for ax, title in zip(axes, ("learning: mean in-domain Δ (points)", "forgetting score: mean general Δ (points)")):
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("fraction of the arm's training steps")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{metrics['task']}: learning and forgetting during training (95% CI bands)", fontsize=11)
    _save(plt, fig, run_dir / "curves")
    return True


def heatmap(metrics: dict, tasks: list[str], arms: list[str], run_dir: Path, labels: dict[str, str] | None = None) -> None:
    """Task × arm Δ (counted metric, points); * marks a 95% CI that excludes 0. For sweeps."""
    plt = _pyplot()
    import numpy as np

    grid = np.full((len(tasks), len(arms)), np.nan)
    marks = [["" for _ in arms] for _ in tasks]
    for j, arm in enumerate(arms):
        for i, task in enumerate(tasks):
            metric = metrics["arms"]["base"]["tasks"].get(task, {}).get("metric")
            c = metrics["comparisons"][arm]["tasks"].get(task, {}).get(metric)
            if c:
                grid[i, j] = 100 * c["delta"]
                marks[i][j] = f"{100 * c['delta']:+.1f}{'*' if c['significant'] else ''}"
    vmax = max(float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0, 1.0)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(arms) + 3), max(3, 0.45 * len(tasks) + 1.5)))
    im = ax.imshow(grid, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(arms)):
            ax.text(j, i, marks[i][j], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(arms)), [(labels or {}).get(a, a) for a in arms], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    fig.colorbar(im, ax=ax, label="Δ vs base (points)")
    ax.set_title(f"{metrics['task']}: Δ per task and arm (* = 95% CI excludes 0)", fontsize=10)
    _save(plt, fig, run_dir / "heatmap")


def resources(rows: list[dict], run_dir: Path) -> None:
    """Peak memory (training and evaluation) and storage per arm; log scale where they span orders of magnitude.

    rows: [{"arm", "train_mem", "eval_mem", "mem_kind", "saved", "footprint"}], bytes or None."""
    plt = _pyplot()
    import numpy as np

    arms = [r["arm"] for r in rows]
    x = np.arange(len(arms))
    fig, (ax_m, ax_s) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(arms) + 4), 4))
    kind = rows[0]["mem_kind"] if rows else ""
    for ax, series, ylabel, title in (
            (ax_m, (("train_mem", "training"), ("eval_mem", "evaluation")), f"peak memory ({kind}), GB",
             "Peak memory per arm and stage"),
            (ax_s, (("saved", "stored on disk"), ("footprint", "loaded model in memory")), "size, GB",
             "Storage and model footprint")):
        series = [(key, label) for key, label in series if any(r[key] for r in rows)] or list(series[:1])
        width = 0.8 / len(series)
        for k, (key, label) in enumerate(series):
            vals = [(r[key] or 0) / 1e9 for r in rows]
            ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, label=label)
            for xi, v in zip(x + (k - (len(series) - 1) / 2) * width, vals):
                if v > 0:
                    ax.text(xi, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        positive = [r[key] for r in rows for key, _ in series if r[key]]
        if positive and max(positive) >= 10 * min(positive):  # orders of magnitude apart: log scale
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ylabel += " (log scale)"
        ax.set_xticks(x, arms, rotation=30 if len(arms) > 4 else 0, ha="right" if len(arms) > 4 else "center",
                      fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    _save(plt, fig, run_dir / "resources")
