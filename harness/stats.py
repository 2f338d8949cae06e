"""Paired statistics for catastrophic-forgetting comparisons.

Base model and fine-tuned arm are scored on the *same* benchmark documents, so
every comparison here is paired per document:

* ``paired_delta``      -- mean change (arm - base) on one task, percentile
                           paired-bootstrap CI, flip counts and exact McNemar.
* ``paired_corpus_delta`` -- the same for a corpus-level metric (F1, BLEU, ...):
                           a function of per-document statistics summed over
                           the documents, scored on each paired resample.
* ``aggregate_delta``   -- mean of per-task deltas ("forgetting score") with a
                           stratified paired bootstrap (resampling within task).
* ``biderman_*``        -- the hellaswag/arc_challenge/winogrande average used
                           as the forgetting metric in Biderman et al. (2024),
                           "LoRA Learns Less and Forgets Less".
* ``align``             -- pairs per-document lm-eval records by ``doc_id``.
* ``perplexity_drift``  -- change in wikitext perplexity metrics.

Pure numpy/scipy; no model or lm-eval imports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy.stats import binomtest

__all__ = [
    "BIDERMAN_TASKS",
    "PERPLEXITY_KEYS",
    "paired_delta",
    "paired_corpus_delta",
    "CorpusPair",
    "GroupPairs",
    "aggregate_delta",
    "biderman_aggregate",
    "biderman_delta",
    "align",
    "perplexity_drift",
]

BIDERMAN_TASKS: tuple[str, ...] = ("hellaswag", "arc_challenge", "winogrande")
PERPLEXITY_KEYS: tuple[str, ...] = ("word_perplexity", "byte_perplexity", "bits_per_byte")

# Budget for one bootstrap chunk (index matrix + gathered values, 8 bytes each)
# so n=20000 x n_boot=10000 never materialises the full 1.6 GB matrix.
_CHUNK_BYTES = 64 * 2**20
# Up to this many distinct per-document differences, resample counts instead of indices.
_FEW_VALUES = 64


def _as_pair(base: np.ndarray, arm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(base, dtype=float).ravel()
    a = np.asarray(arm, dtype=float).ravel()
    if b.shape != a.shape:
        raise ValueError(f"base and arm differ in length: base has {b.size}, arm has {a.size}")
    if b.size == 0:
        raise ValueError("cannot compare zero documents (n == 0)")
    # A NaN would silently poison every mean and bootstrap replicate.
    if not (np.isfinite(b).all() and np.isfinite(a).all()):
        raise ValueError("scores contain NaN or infinite values")
    return b, a


def _check_boot_args(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _boot_means(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_boot`` with-replacement resamples of ``d``.

    Resampling the per-document differences is the paired bootstrap: each
    drawn index keeps its (base, arm) pair together. A resample's mean depends
    only on how many copies of each distinct value it drew, and those counts
    are multinomial: for few distinct values (a 0/1 metric's differences are
    -1, 0, 1) drawing the counts gives the same distribution in O(n_boot * k)
    instead of O(n_boot * n) (10,000 resamples of hellaswag's 10,042 documents:
    milliseconds instead of a second).
    """
    n = d.size
    values, counts = np.unique(d, return_counts=True)
    if values.size <= _FEW_VALUES:
        return rng.multinomial(n, counts / n, size=n_boot) @ values / n
    chunk = max(1, min(n_boot, _CHUNK_BYTES // (16 * n)))
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = d[idx].mean(axis=1)
    return out


def _ci(boot: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _is_binary(x: np.ndarray) -> bool:
    return bool(np.isin(x, (0.0, 1.0)).all())


def _boot_weighted(d: np.ndarray, w: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted means sum(w d) / sum(w) of ``n_boot`` resamples of documents (each keeping its weight):
    the paired bootstrap of a ratio-of-sums aggregate such as bits per byte or instruction-level accuracy."""
    n = d.size
    out = np.empty(n_boot)
    chunk = max(1, min(n_boot, _CHUNK_BYTES // (16 * n)))
    wd = w * d
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=stop - start).astype(float)
        out[start:stop] = (counts @ wd) / np.maximum(counts @ w, 1e-300)
    return out


def _weights(weights, n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=float).ravel()
    if w.size != n:
        raise ValueError(f"weights have {w.size} entries for {n} documents")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    return w


def paired_delta(
    base: np.ndarray,
    arm: np.ndarray,
    *,
    n_boot: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
    weights: np.ndarray | None = None,
) -> dict:
    """Per-document paired comparison of ``arm`` against ``base`` on one task.

    ``ci_low``/``ci_high`` are the percentile paired-bootstrap interval of
    ``delta = mean(arm) - mean(base)``; ``significant`` means it excludes 0.
    With ``weights`` (one per document, e.g. its bytes) the means are weighted
    (sum(w x) / sum(w)), as lm-eval aggregates bits per byte, and documents are
    resampled with their weights. Flip counts and the exact McNemar p-value are
    filled only for 0/1 scores.
    """
    _check_boot_args(n_boot, alpha)
    b, a = _as_pair(base, arm)
    n = b.size
    d = a - b
    if weights is None:
        base_mean, arm_mean = float(b.mean()), float(a.mean())
        boot = _boot_means(d, n_boot, np.random.default_rng(seed))
    else:
        w = _weights(weights, n)
        base_mean, arm_mean = float(w @ b / w.sum()), float(w @ a / w.sum())
        boot = _boot_weighted(d, w, n_boot, np.random.default_rng(seed))
    ci_low, ci_high = _ci(boot, alpha)

    out: dict = {
        "n": int(n),
        "base": base_mean,
        "arm": arm_mean,
        "delta": arm_mean - base_mean if weights is not None else float(d.mean()),
        "ci_low": ci_low,
        "ci_high": ci_high,
        "significant": bool(ci_low > 0 or ci_high < 0),
        # Weighted means (bits per byte, instruction-level accuracy): the bootstrap's SE stands in for sd/sqrt(n).
        "detectable": detectable_delta(d, b, alpha=alpha) if weights is None else _detectable_from_se(boot, alpha),
        "rel_drop_pct": None if base_mean == 0 else 100.0 * (base_mean - arm_mean) / base_mean,
        "forgotten": None,
        "gained": None,
        "forgotten_rate": None,
        "gained_rate": None,
        "mcnemar_p": None,
    }
    if _is_binary(b) and _is_binary(a):
        forgotten = int(np.sum((b == 1) & (a == 0)))
        gained = int(np.sum((b == 0) & (a == 1)))
        discordant = forgotten + gained
        # Exact McNemar: under H0 each discordant doc flips either way w.p. 1/2.
        p = 1.0 if discordant == 0 else float(binomtest(min(forgotten, gained), discordant, 0.5).pvalue)
        out.update(
            forgotten=forgotten,
            gained=gained,
            forgotten_rate=forgotten / n,
            gained_rate=gained / n,
            mcnemar_p=p,
        )
    return out


class CorpusPair(NamedTuple):
    """One task's corpus-level metric: per-document statistics (documents x k) of each side, paired by
    row, and the score of a sum of rows (vectorised: (m, k) -> (m,)), e.g. harness/corpus.py's."""

    base: np.ndarray
    arm: np.ndarray
    score: Callable[[np.ndarray], np.ndarray]


def _boot_corpus(pair: CorpusPair, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """score(arm) - score(base) of ``n_boot`` resamples of documents, the same documents for both
    sides (each resample is a multinomial count per document, as in _boot_weighted)."""
    n = pair.base.shape[0]
    out = np.empty(n_boot)
    chunk = max(1, min(n_boot, _CHUNK_BYTES // (16 * max(n, pair.base.shape[1]))))
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=stop - start).astype(float)
        out[start:stop] = pair.score(counts @ pair.arm) - pair.score(counts @ pair.base)
    return out


def _corpus_means(pair: CorpusPair) -> tuple[float, float]:
    if pair.base.shape != pair.arm.shape:
        raise ValueError(f"base and arm differ in shape: base {pair.base.shape}, arm {pair.arm.shape}")
    if pair.base.shape[0] == 0:
        raise ValueError("cannot compare zero documents (n == 0)")
    b, a = pair.score(pair.base.sum(axis=0, keepdims=True)), pair.score(pair.arm.sum(axis=0, keepdims=True))
    return float(b[0]), float(a[0])


def paired_corpus_delta(pair: CorpusPair, *, n_boot: int = 10000, seed: int = 0, alpha: float = 0.05) -> dict:
    """score(arm) - score(base) on one task for a corpus-level metric, with the percentile paired
    bootstrap over documents (what sacrebleu's paired bootstrap does for BLEU). No flips: a document
    has no score of its own."""
    _check_boot_args(n_boot, alpha)
    base_score, arm_score = _corpus_means(pair)
    boot = _boot_corpus(pair, n_boot, np.random.default_rng(seed))
    ci_low, ci_high = _ci(boot, alpha)
    return {
        "n": int(pair.base.shape[0]), "base": base_score, "arm": arm_score, "delta": arm_score - base_score,
        "ci_low": ci_low, "ci_high": ci_high, "significant": bool(ci_low > 0 or ci_high < 0),
        "detectable": _detectable_from_se(boot, alpha),
        "rel_drop_pct": None if base_score == 0 else 100.0 * (base_score - arm_score) / base_score,
        "forgotten": None, "gained": None, "forgotten_rate": None, "gained_rate": None, "mcnemar_p": None,
        "corpus": True,
    }


class GroupPairs(NamedTuple):
    """An lm-eval group as one stratum: its subtasks' pairs and their shares of its aggregate (each
    subtask resampled within itself; the group's replicate is the weighted sum of theirs)."""

    pairs: Mapping[str, tuple]
    weights: Mapping[str, float]


def _stratum(pair, n_boot: int, rng: np.random.Generator) -> tuple[float, float, float, np.ndarray, int]:
    """(base score, arm score, Δ, bootstrap replicates of the Δ, documents) of one stratum: a pair of
    per-document arrays (optionally with weights), a CorpusPair, or a GroupPairs."""
    if isinstance(pair, CorpusPair):  # a corpus-level metric: its score of each resample
        bm, am = _corpus_means(pair)
        return bm, am, am - bm, _boot_corpus(pair, n_boot, rng), int(pair.base.shape[0])
    if isinstance(pair, GroupPairs):
        total = sum(float(pair.weights[t]) for t in pair.pairs)
        bm = am = delta = 0.0
        boot, n = np.zeros(n_boot), 0
        for t, sub in pair.pairs.items():
            w = float(pair.weights[t]) / total
            b_t, a_t, d_t, boot_t, n_t = _stratum(sub, n_boot, rng)
            bm, am, delta, n = bm + w * b_t, am + w * a_t, delta + w * d_t, n + n_t
            boot += w * boot_t
        return bm, am, delta, boot, n
    b, a = _as_pair(*pair[:2])
    d = a - b
    if len(pair) > 2:
        w = _weights(pair[2], b.size)
        bm, am = float(w @ b / w.sum()), float(w @ a / w.sum())
        return bm, am, am - bm, _boot_weighted(d, w, n_boot, rng), int(b.size)
    return float(b.mean()), float(a.mean()), float(d.mean()), _boot_means(d, n_boot, rng), int(b.size)


def aggregate_delta(
    pairs: Mapping[str, tuple],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
    task_weights: Mapping[str, float] | None = None,
) -> dict:
    """Mean over tasks of (arm mean - base mean), with a CI; unweighted unless ``task_weights``.

    Each task is a stratum: documents are resampled within it independently
    and the task deltas are averaged per replicate, so every task keeps its
    weight regardless of size (matching how the point estimate is defined).
    A pair may carry per-document weights as a third element (see paired_delta), or be a
    CorpusPair (see paired_corpus_delta) or a GroupPairs (a group as one stratum).
    ``task_weights`` (normalised here) give an lm-eval group's aggregate, e.g.
    weighted by subtask size.
    """
    _check_boot_args(n_boot, alpha)
    if not pairs:
        raise ValueError("aggregate_delta needs at least one task")
    rng = np.random.default_rng(seed)
    tasks = list(pairs)
    if task_weights is None:
        tw = np.full(len(tasks), 1.0 / len(tasks))
    else:
        tw = np.asarray([float(task_weights[t]) for t in tasks])
        tw = tw / tw.sum()
    boot = np.zeros(n_boot)
    deltas, base_means, arm_means, sizes = [], [], [], {}
    for task, wt in zip(tasks, tw):
        try:
            bm, am, delta, task_boot, n = _stratum(pairs[task], n_boot, rng)
        except ValueError as exc:
            raise ValueError(f"task {task!r}: {exc}") from exc
        base_means.append(bm)
        arm_means.append(am)
        deltas.append(delta)
        sizes[task] = n
        if task_weights is None:
            boot += task_boot
        else:
            boot += wt * task_boot
    if task_weights is None:
        boot /= len(tasks)
    ci_low, ci_high = _ci(boot, alpha)
    return {
        "tasks": tasks,
        "n": sizes,
        "delta": float(np.mean(deltas)) if task_weights is None else float(tw @ np.asarray(deltas)),
        "ci_low": ci_low,
        "ci_high": ci_high,
        "significant": bool(ci_low > 0 or ci_high < 0),
        "base": float(np.mean(base_means)) if task_weights is None else float(tw @ np.asarray(base_means)),
        "arm": float(np.mean(arm_means)) if task_weights is None else float(tw @ np.asarray(arm_means)),
    }


def detectable_delta(d: np.ndarray, base: np.ndarray, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest |Δ| a paired test at this n detects with the given power (two-sided alpha):
    (z_{1-alpha/2} + z_power) * sd(d) / sqrt(n). Where no document changed (sd 0), the spread of two
    independent draws from the base's scores stands in, sqrt(2) * sd(base): a change of that size is
    what a fresh arm would have to show."""
    from scipy.stats import norm

    n = d.size
    sd = float(np.std(d, ddof=1)) if n > 1 else 0.0
    if sd == 0.0:
        sd = float(np.sqrt(2.0) * np.std(base, ddof=1)) if n > 1 else 0.0
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * sd / np.sqrt(max(n, 1)))


def _detectable_from_se(boot: np.ndarray, alpha: float, power: float = 0.8) -> float:
    from scipy.stats import norm

    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * np.std(boot, ddof=1))


def above_chance(correct: np.ndarray, n_choices: np.ndarray, *, alpha: float = 0.05) -> dict:
    """Is the base's accuracy above guessing? Chance is the mean of 1/choices over the documents; the
    one-sided test is the normal approximation to the Poisson-binomial count of right answers under
    guessing (exact enough at the tens of documents a quick profile scores, and beyond)."""
    from scipy.stats import norm

    x = np.asarray(correct, dtype=float)
    p = 1.0 / np.asarray(n_choices, dtype=float)
    if x.size == 0 or x.size != p.size:
        raise ValueError("above_chance needs one choice count per document")
    var = float(np.sum(p * (1 - p)))
    z = (x.sum() - p.sum()) / np.sqrt(var) if var > 0 else 0.0
    pval = float(norm.sf(z))
    return {"chance": float(p.mean()), "score": float(x.mean()), "n": int(x.size), "p_value": pval,
            "above_chance": bool(pval < alpha)}


def weighted_mean_ci(values, weights, *, n_boot: int = 10000, seed: int = 0, alpha: float = 0.05) -> dict:
    """sum(w v) / sum(w) with a document-level bootstrap CI (e.g. mean per-token KL, w = tokens)."""
    _check_boot_args(n_boot, alpha)
    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError("weighted_mean_ci needs at least one document")
    w = _weights(weights, v.size)
    lo, hi = _ci(_boot_weighted(v, w, n_boot, np.random.default_rng(seed)), alpha)
    return {"mean": float(w @ v / w.sum()), "ci_low": lo, "ci_high": hi, "n": int(v.size), "weight": float(w.sum())}


def biderman_aggregate(scores: Mapping[str, float | None]) -> float | None:
    """Mean accuracy over ``BIDERMAN_TASKS``; None if any of them is missing."""
    vals = [scores.get(t) for t in BIDERMAN_TASKS]
    if any(v is None for v in vals):
        return None
    return float(np.mean(vals))


def biderman_delta(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict | None:
    """``aggregate_delta`` over ``BIDERMAN_TASKS`` only; None if any is missing."""
    if any(t not in pairs for t in BIDERMAN_TASKS):
        return None
    sub = {t: pairs[t] for t in BIDERMAN_TASKS}
    return aggregate_delta(sub, n_boot=n_boot, seed=seed, alpha=alpha)


def _index_records(records: Sequence[Mapping], side: str) -> dict:
    by_id: dict = {}
    for rec in records:
        doc_id = rec["doc_id"]
        if doc_id in by_id:
            # Silently keeping one of two duplicates would mis-pair documents.
            raise ValueError(f"duplicate doc_id {doc_id!r} in {side} records")
        by_id[doc_id] = rec
    return by_id


def paired_records(base_records: Sequence[Mapping], arm_records: Sequence[Mapping]) -> list[tuple[Mapping, Mapping]]:
    """The (base, arm) records of the documents both sides scored, by ``doc_id``.

    Documents present on only one side are dropped. When both records carry a
    ``doc_hash`` they must agree, otherwise the two runs scored different
    content under the same id and any comparison would be meaningless.
    """
    base_by_id = _index_records(base_records, "base")
    arm_by_id = _index_records(arm_records, "arm")
    out = []
    for doc_id in sorted(base_by_id.keys() & arm_by_id.keys()):
        rb, ra = base_by_id[doc_id], arm_by_id[doc_id]
        hb, ha = rb.get("doc_hash"), ra.get("doc_hash")
        if hb is not None and ha is not None and hb != ha:
            raise ValueError(f"doc_hash mismatch for doc_id {doc_id!r}: base {hb!r} vs arm {ha!r}")
        out.append((rb, ra))
    return out


def align(
    base_records: Sequence[Mapping],
    arm_records: Sequence[Mapping],
    *,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair per-document records (paired_records) and return aligned metric arrays."""
    b_vals, a_vals = [], []
    for rb, ra in paired_records(base_records, arm_records):
        for side, rec in (("base", rb), ("arm", ra)):
            if metric not in rec:
                raise KeyError(f"metric {metric!r} missing from {side} record doc_id {rec['doc_id']!r}")
        b_vals.append(float(rb[metric]))
        a_vals.append(float(ra[metric]))
    return np.asarray(b_vals, dtype=float), np.asarray(a_vals, dtype=float)


def perplexity_drift(base: Mapping[str, float], arm: Mapping[str, float]) -> dict:
    """Change of wikitext perplexity metrics present in both result dicts.

    Higher is worse for all three, so a positive ``delta`` means forgetting.
    """
    out: dict = {}
    for key in PERPLEXITY_KEYS:
        if key not in base or key not in arm or base[key] is None or arm[key] is None:
            continue
        b, a = float(base[key]), float(arm[key])
        out[key] = {
            "base": b,
            "arm": a,
            "delta": a - b,
            "rel_pct": None if b == 0 else 100.0 * (a - b) / b,
        }
    return out


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (more learning, less forgetting)."""
    front = []
    for name, x, y in points:
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for _, ox, oy in points)
        if not dominated:
            front.append(name)
    return front


def matched_learning(points: dict[str, list[tuple[str, float, float]]]) -> dict | None:
    """Forgetting compared at one amount of learning (Biderman et al. 2024), from (arm, learning,
    forgetting score) points per method.

    Each method's frontier is its Pareto-optimal points in order of learning, starting from the base
    (no learning, no forgetting). The matched level is the most learning every method reached (the
    smallest of the methods' best). Each method's forgetting there is read by linear interpolation
    between the two frontier points around it. None with fewer than two methods or no learning."""
    points = {m: [p for p in pts if p[1] is not None and p[2] is not None] for m, pts in points.items()}
    points = {m: pts for m, pts in points.items() if pts}
    if len(points) < 2:
        return None
    level = min(max(p[1] for p in pts) for pts in points.values())
    if level <= 0:
        return None
    out = {}
    for method, pts in points.items():
        front = set(pareto_front(pts))
        chain = [("base", 0.0, 0.0)] + sorted((p for p in pts if p[0] in front and p[1] > 0), key=lambda p: p[1])
        for lo, hi in zip(chain, chain[1:]):
            if lo[1] <= level <= hi[1]:
                t = (level - lo[1]) / (hi[1] - lo[1]) if hi[1] > lo[1] else 1.0
                out[method] = {"forgetting": lo[2] + t * (hi[2] - lo[2]), "between": [lo[0], hi[0]], "weight": t}
                break
    return {"learning": level, "methods": out}

