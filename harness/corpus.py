"""lm-eval's corpus-level metrics, paired per document.

Some lm-eval metrics are not a mean over documents: F1 and Matthews' correlation are computed from the
whole confusion matrix, BLEU, chrF and TER from n-gram and edit counts summed over the corpus,
perplexity as exp of a (weighted) mean log-likelihood. Each is a function of per-document statistics
summed over the documents, which is how sacrebleu's own paired bootstrap resamples them
(`sacrebleu.significance`: `_extract_corpus_statistics`, then `_compute_score_from_stats` of each
resample's sum). The harness records each document's statistics (`doc_stats`, from the item lm-eval
logs for it), and the report resamples documents, the same indices for the base and the arm, and
scores every resample with `score` (harness/stats.py: paired_corpus_delta). On all the documents
`score` gives lm-eval's own aggregate (tests/test_corpus.py checks each against lm-eval's function).

A task YAML's own aggregation (`!function`) is not among these and stays refused, with one line
(harness/evaluate.py: check_metric): its per-document statistics are unknown.
"""

from __future__ import annotations

import numpy as np

# lm-eval's registered aggregations this module scores (its `register_aggregation` names).
SACREBLEU = ("bleu", "chrf", "chrf++", "ter")
LABELS = ("f1", "matthews_corrcoef")  # items (gold, pred): statistics built over both sides' labels
PERPLEXITY = ("perplexity", "weighted_perplexity")
AGGREGATIONS = (*LABELS, *SACREBLEU, *PERPLEXITY)


def _sacrebleu_metric(agg: str):
    # lm-eval's own calls: corpus_bleu / corpus_chrf / corpus_ter with sacrebleu's defaults; chrF++ is word_order=2.
    from sacrebleu.metrics import BLEU, CHRF, TER

    return {"bleu": BLEU, "chrf": CHRF, "chrf++": lambda: CHRF(word_order=2), "ter": TER}[agg]()


def _refs(gold) -> list[str]:
    return [str(r) for r in gold] if isinstance(gold, (list, tuple)) else [str(gold)]


def _pred(pred) -> str:
    if isinstance(pred, (list, tuple)):  # lm-eval's _sacreformat: a one-element list stands for its string
        pred = pred[0]
    return str(pred)


def doc_stats(agg: str, item) -> list:
    """One document's statistics for `agg` from the item lm-eval logged for it (what its aggregation
    function receives in a list): numbers to be summed, or for F1/MCC the (gold, pred) labels."""
    if agg in LABELS:
        gold, pred = item
        return [_label(gold), _label(pred)]
    if agg in SACREBLEU:
        gold, pred = item
        refs = _refs(gold)
        return [float(x) for x in _sacrebleu_metric(agg)._extract_corpus_statistics([_pred(pred)], [[r] for r in refs])[0]]
    if agg == "perplexity":
        return [float(item), 1.0]
    if agg == "weighted_perplexity":
        loglik, weight = item
        return [float(loglik), float(weight)]
    raise ValueError(f"no per-document statistics for aggregation {agg!r}")


def _label(x):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return x if isinstance(x, str) else str(x)
    return int(x) if float(x).is_integer() else float(x)


def matrices(agg: str, base: list[list], arm: list[list]) -> tuple[np.ndarray, np.ndarray]:
    """The two sides' per-document statistics as summable (documents x k) matrices. F1 and MCC
    one-hot their labels over the labels either side used, so both sides' sums are comparable."""
    if agg not in LABELS:
        return np.asarray(base, dtype=float), np.asarray(arm, dtype=float)
    labels = sorted({x for rows in (base, arm) for row in rows for x in row}, key=lambda v: (str(type(v)), v))
    col = {lab: i for i, lab in enumerate(labels)}
    k = len(labels)

    def one(rows):
        m = np.zeros((len(rows), 2 + 2 * k))
        for i, (gold, pred) in enumerate(rows):
            m[i, 0] = gold == pred
            m[i, 1] = 1.0
            m[i, 2 + col[pred]] = 1.0
            m[i, 2 + k + col[gold]] = 1.0
        if agg == "f1":  # sklearn's binary F1: positive label 1 -> columns tp, fp, fn
            pos = col.get(1)
            if pos is None:
                return np.zeros((len(rows), 3))
            p, g = m[:, 2 + pos], m[:, 2 + k + pos]
            return np.stack([p * g, p * (1 - g), (1 - p) * g], axis=1)
        return m

    return one(base), one(arm)


def score(agg: str, summed: np.ndarray) -> np.ndarray:
    """`agg` of summed statistics: one row (k,) gives a float array of shape (), several (m, k) give (m,).
    Where the metric is undefined (F1 or MCC with a zero denominator) it is 0, as sklearn returns."""
    s = np.atleast_2d(np.asarray(summed, dtype=float))
    if agg == "f1":
        tp, fp, fn = s[:, 0], s[:, 1], s[:, 2]
        den = 2 * tp + fp + fn
        out = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)
    elif agg == "matthews_corrcoef":
        k = (s.shape[1] - 2) // 2
        c, n, p, t = s[:, 0], s[:, 1], s[:, 2:2 + k], s[:, 2 + k:]
        cov_ytyp = c * n - (p * t).sum(axis=1)
        cov_ypyp = n * n - (p * p).sum(axis=1)
        cov_ytyt = n * n - (t * t).sum(axis=1)
        den = np.sqrt(cov_ytyt * cov_ypyp)
        out = np.where(den > 0, cov_ytyp / np.where(den > 0, den, 1), 0.0)
    elif agg in SACREBLEU:
        metric = _sacrebleu_metric(agg)
        # BLEU's statistics are counts; sacrebleu's own bootstrap hands it integer sums.
        rows = s.astype(int) if agg in ("bleu", "chrf", "chrf++") else s
        out = np.asarray([metric._compute_score_from_stats(list(r)).score for r in rows], dtype=float)
    elif agg in PERPLEXITY:
        with np.errstate(over="ignore"):
            out = np.exp(-s[:, 0] / s[:, 1])
    else:
        raise ValueError(f"no corpus score for aggregation {agg!r}")
    return out if np.ndim(summed) > 1 else out[0]


def is_proportion(agg: str) -> bool:
    """Scores in [0, 1] (F1): they may enter the forgetting score; the others are reported beside it."""
    return agg == "f1"
