"""Tests for harness.stats against independently computed reference values."""

import numpy as np
import pytest
from scipy.stats import binomtest

from harness.stats import (
    BIDERMAN_TASKS,
    aggregate_delta,
    align,
    biderman_aggregate,
    biderman_delta,
    paired_delta,
    perplexity_drift,
)

N_BOOT = 2000  # enough for stable percentiles, keeps the file fast


def flip_table(n, forgotten, gained, both_right):
    """Binary base/arm arrays with an exact 2x2 table (rest are both wrong)."""
    both_wrong = n - forgotten - gained - both_right
    assert both_wrong >= 0
    base = np.array([1] * forgotten + [0] * gained + [1] * both_right + [0] * both_wrong, float)
    arm = np.array([0] * forgotten + [1] * gained + [1] * both_right + [0] * both_wrong, float)
    return base, arm


def test_identical_predictions():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, size=500).astype(float)
    r = paired_delta(x, x.copy(), n_boot=N_BOOT)
    assert r["n"] == 500
    assert r["delta"] == 0.0
    assert r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    assert r["significant"] is False
    assert r["forgotten"] == 0 and r["gained"] == 0
    assert r["forgotten_rate"] == 0.0 and r["gained_rate"] == 0.0
    assert r["mcnemar_p"] == 1.0
    assert r["rel_drop_pct"] == pytest.approx(0.0)


def test_known_flip_table_significant():
    base, arm = flip_table(100, forgotten=15, gained=3, both_right=50)
    r = paired_delta(base, arm, n_boot=N_BOOT)
    assert r["forgotten"] == 15 and r["gained"] == 3
    assert r["forgotten_rate"] == pytest.approx(0.15)
    assert r["gained_rate"] == pytest.approx(0.03)
    assert r["base"] == pytest.approx(0.65)
    assert r["arm"] == pytest.approx(0.53)
    assert r["delta"] == pytest.approx((3 - 15) / 100)
    assert r["rel_drop_pct"] == pytest.approx(100 * 0.12 / 0.65)
    assert r["mcnemar_p"] == pytest.approx(binomtest(3, 18, 0.5).pvalue)
    assert r["mcnemar_p"] < 0.01
    assert r["ci_low"] <= r["delta"] <= r["ci_high"]
    assert r["ci_high"] < 0
    assert r["significant"] is True


def test_tiny_difference_not_significant():
    base, arm = flip_table(100, forgotten=1, gained=0, both_right=60)
    r = paired_delta(base, arm, n_boot=N_BOOT)
    assert r["delta"] == pytest.approx(-0.01)
    assert r["ci_low"] < 0 <= r["ci_high"]
    assert r["significant"] is False
    assert r["mcnemar_p"] == pytest.approx(1.0)


def test_rel_drop_none_when_base_zero():
    r = paired_delta(np.zeros(10), np.ones(10), n_boot=200)
    assert r["rel_drop_pct"] is None
    assert r["gained"] == 10 and r["delta"] == pytest.approx(1.0)


def test_bootstrap_reproducible_and_seed_dependent():
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2, size=300).astype(float)
    arm = np.where(rng.random(300) < 0.2, 1 - base, base)
    r1 = paired_delta(base, arm, n_boot=N_BOOT, seed=3)
    r2 = paired_delta(base, arm, n_boot=N_BOOT, seed=3)
    r3 = paired_delta(base, arm, n_boot=N_BOOT, seed=4)
    assert r1 == r2
    assert (r1["ci_low"], r1["ci_high"]) != (r3["ci_low"], r3["ci_high"])
    assert r1["delta"] == r3["delta"]


def test_large_n_ci_covers_truth_and_matches_normal_width():
    rng = np.random.default_rng(11)
    n = 20000
    base = (rng.random(n) < 0.6).astype(float)
    # Forget 10% of correct answers, gain 5% of wrong ones.
    u = rng.random(n)
    arm = np.where(base == 1, (u >= 0.10).astype(float), (u < 0.05).astype(float))
    true_delta = 0.6 * -0.10 + 0.4 * 0.05
    r = paired_delta(base, arm, n_boot=N_BOOT, seed=0)
    assert r["ci_low"] <= true_delta <= r["ci_high"]
    d = arm - base
    normal_width = 2 * 1.96 * np.sqrt(d.var() / n)
    assert (r["ci_high"] - r["ci_low"]) == pytest.approx(normal_width, rel=0.2)
    assert r["significant"] is True


def test_float_inputs_have_no_flips():
    rng = np.random.default_rng(5)
    base = rng.random(200)
    arm = base + 0.01
    r = paired_delta(base, arm, n_boot=N_BOOT)
    for key in ("forgotten", "gained", "forgotten_rate", "gained_rate", "mcnemar_p"):
        assert r[key] is None
    assert r["delta"] == pytest.approx(0.01)
    # A constant shift has zero bootstrap variance.
    assert r["ci_low"] == pytest.approx(0.01) and r["ci_high"] == pytest.approx(0.01)


def test_length_mismatch_and_empty():
    with pytest.raises(ValueError, match=r"5.*4"):
        paired_delta(np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="n == 0"):
        paired_delta(np.array([]), np.array([]))


def test_aggregate_is_mean_of_task_deltas():
    t1 = flip_table(200, forgotten=30, gained=5, both_right=100)
    t2 = flip_table(50, forgotten=2, gained=4, both_right=20)
    agg = aggregate_delta({"a": t1, "b": t2}, n_boot=N_BOOT)
    assert agg["tasks"] == ["a", "b"]
    assert agg["n"] == {"a": 200, "b": 50}
    # By hand: a's Δ = (5 - 30) / 200 = -0.125, b's = (4 - 2) / 50 = +0.04; each task counts once.
    assert agg["delta"] == pytest.approx((-0.125 + 0.04) / 2)
    assert agg["base"] == pytest.approx((130 / 200 + 22 / 50) / 2)
    assert agg["arm"] == pytest.approx((105 / 200 + 24 / 50) / 2)
    assert agg["ci_low"] <= agg["delta"] <= agg["ci_high"]
    assert agg["significant"] == (agg["ci_low"] > 0 or agg["ci_high"] < 0)
    assert aggregate_delta({"a": t1, "b": t2}, n_boot=N_BOOT) == agg


def test_aggregate_rejects_empty_and_names_task():
    with pytest.raises(ValueError):
        aggregate_delta({})
    with pytest.raises(ValueError, match="bad"):
        aggregate_delta({"bad": (np.ones(3), np.ones(2))})


def test_biderman_aggregate():
    scores = {"hellaswag": 0.6, "arc_challenge": 0.45, "winogrande": 0.75, "mmlu": 0.1}
    assert BIDERMAN_TASKS == ("hellaswag", "arc_challenge", "winogrande")
    assert biderman_aggregate(scores) == pytest.approx(0.6)
    del scores["winogrande"]
    assert biderman_aggregate(scores) is None


def test_biderman_delta():
    pairs = {t: flip_table(100, forgotten=5 + i, gained=1, both_right=50) for i, t in enumerate(BIDERMAN_TASKS)}
    pairs["gsm8k"] = flip_table(100, forgotten=0, gained=40, both_right=10)
    r = biderman_delta(pairs, n_boot=N_BOOT)
    assert r["tasks"] == list(BIDERMAN_TASKS)
    assert r["delta"] == pytest.approx(np.mean([-(4 + i) / 100 for i in range(3)]))
    del pairs["arc_challenge"]
    assert biderman_delta(pairs) is None


def test_align_pairs_by_doc_id_and_drops_unmatched():
    base = [
        {"doc_id": 2, "doc_hash": "c", "acc": 1.0},
        {"doc_id": 0, "doc_hash": "a", "acc": 0.0},
        {"doc_id": 1, "doc_hash": "b", "acc": 1.0},
        {"doc_id": 9, "doc_hash": "z", "acc": 1.0},  # base only
    ]
    arm = [
        {"doc_id": 1, "doc_hash": "b", "acc": 0.0},
        {"doc_id": 5, "acc": 1.0},  # arm only
        {"doc_id": 0, "acc": 1.0},  # no hash: still paired
        {"doc_id": 2, "doc_hash": "c", "acc": 1.0},
    ]
    b, a = align(base, arm, metric="acc")
    np.testing.assert_array_equal(b, [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(a, [1.0, 0.0, 1.0])
    assert b.dtype == float and a.dtype == float


def test_align_hash_mismatch_and_missing_metric():
    base = [{"doc_id": 0, "doc_hash": "a", "acc": 1.0}, {"doc_id": 7, "doc_hash": "x", "acc": 1.0}]
    arm = [{"doc_id": 0, "doc_hash": "a", "acc": 1.0}, {"doc_id": 7, "doc_hash": "y", "acc": 0.0}]
    with pytest.raises(ValueError, match="7"):
        align(base, arm, metric="acc")
    with pytest.raises(KeyError, match="acc_norm"):
        align(base[:1], arm[:1], metric="acc_norm")


def test_perplexity_drift():
    base = {"word_perplexity": 10.0, "byte_perplexity": 1.5, "bits_per_byte": 0.6, "alias": "wikitext"}
    arm = {"word_perplexity": 12.0, "byte_perplexity": 1.5}
    r = perplexity_drift(base, arm)
    assert set(r) == {"word_perplexity", "byte_perplexity"}
    assert r["word_perplexity"] == {"base": 10.0, "arm": 12.0, "delta": 2.0, "rel_pct": pytest.approx(20.0)}
    assert r["byte_perplexity"]["delta"] == 0.0 and r["byte_perplexity"]["rel_pct"] == 0.0


def test_count_bootstrap_has_the_index_bootstraps_distribution(monkeypatch):
    """Few distinct differences: resampled counts (multinomial) instead of resampled indices give the
    same distribution of bootstrap means (checked on moments and the CI's quantiles)."""
    import harness.stats as st

    d = np.random.default_rng(1).choice([-1.0, 0.0, 1.0], size=700, p=[0.2, 0.65, 0.15])
    fast = st._boot_means(d, 40_000, np.random.default_rng(2))
    monkeypatch.setattr(st, "_FEW_VALUES", 0)  # force the index resampling
    slow = st._boot_means(d, 40_000, np.random.default_rng(3))
    assert fast.mean() == pytest.approx(d.mean(), abs=1e-3) and slow.mean() == pytest.approx(d.mean(), abs=1e-3)
    assert fast.std() == pytest.approx(slow.std(), rel=0.03)
    assert fast.std() == pytest.approx(d.std() / np.sqrt(d.size), rel=0.03)
    np.testing.assert_allclose(np.quantile(fast, [0.025, 0.975]), np.quantile(slow, [0.025, 0.975]), atol=2e-3)


def test_weighted_detectable_delta_is_the_bootstrap_se_times_the_power_factor():
    """Bits per byte (weighted by bytes): no closed-form sd, so (z_.975 + z_.8) x bootstrap SE; four
    times the documents, half the detectable Δ."""
    from scipy.stats import norm

    rng = np.random.default_rng(3)
    factor = norm.ppf(0.975) + norm.ppf(0.8)
    out = {}
    for n in (200, 800):
        w = rng.integers(50, 500, n).astype(float)
        base = rng.normal(1.0, 0.2, n)
        arm = base + rng.normal(0.0, 0.05, n)
        d = paired_delta(base, arm, weights=w, n_boot=4000, seed=0)
        se = np.sqrt(np.sum((w / w.sum()) ** 2 * ((arm - base) - d["delta"]) ** 2))  # the ratio estimator's SE
        assert d["detectable"] == pytest.approx(factor * se, rel=0.1)
        out[n] = d["detectable"]
    assert out[800] == pytest.approx(out[200] / 2, rel=0.2)


def test_matched_learning_reads_each_methods_frontier_at_the_common_level():
    from harness.stats import matched_learning

    points = {"full": [("f1", 10.0, -2.0), ("f2", 20.0, -6.0)],
              "lora": [("l1", 8.0, -1.0), ("l2", 15.0, -2.0), ("l3", 12.0, -5.0)]}  # l3: beaten by l2
    m = matched_learning(points)
    assert m["learning"] == 15.0  # lora's best; full reached more
    assert m["methods"]["full"] == {"forgetting": pytest.approx(-4.0), "between": ["f1", "f2"], "weight": 0.5}
    assert m["methods"]["lora"] == {"forgetting": pytest.approx(-2.0), "between": ["l1", "l2"], "weight": 1.0}
    # One arm per method (a plain compare): the line from the base to the arm.
    one = matched_learning({"full": [("full", 20.0, -4.0)], "qlora": [("qlora", 10.0, -1.0)]})
    assert one["learning"] == 10.0
    assert one["methods"]["full"]["forgetting"] == pytest.approx(-2.0)
    assert one["methods"]["full"]["between"] == ["base", "full"]
    assert matched_learning({"full": [("f", 5.0, 1.0)]}) is None  # one method: nothing to match
