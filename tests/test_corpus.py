"""Corpus-level metrics (F1, Matthews' correlation, BLEU, chrF, TER, perplexity): scored as lm-eval
aggregates them, paired per document by resampling documents, through evaluation, the samples file and
the report; a task's own aggregation function is one clear line."""

from __future__ import annotations

import random

import numpy as np
import pytest
import yaml

from harness import context, corpus, evaluate, models, report, stats
from harness.config import HarnessError
from harness.io import read_samples, write_samples
from conftest import WORDS


def _items(agg: str, rng: random.Random, n: int = 40):
    if agg == "f1":
        return [(rng.randint(0, 1), rng.randint(0, 1)) for _ in range(n)]
    if agg == "matthews_corrcoef":
        return [(rng.randint(0, 2), rng.randint(0, 2)) for _ in range(n)]
    if agg in corpus.SACREBLEU:
        def text():
            return " ".join(rng.choice(WORDS[:12]) for _ in range(rng.randint(3, 9)))
        return [(text(), text()) for _ in range(n)]
    if agg == "perplexity":
        return [-rng.uniform(0.5, 6.0) for _ in range(n)]
    return [(-rng.uniform(5.0, 60.0), float(rng.randint(3, 20))) for _ in range(n)]  # weighted_perplexity


@pytest.mark.parametrize("agg", corpus.AGGREGATIONS)
def test_summed_statistics_give_lm_evals_own_aggregate(agg):
    from lm_eval.api.registry import get_aggregation

    items = _items(agg, random.Random(3))
    rows = [corpus.doc_stats(agg, it) for it in items]
    m, _ = corpus.matrices(agg, rows, rows)
    assert corpus.score(agg, m.sum(axis=0)) == pytest.approx(float(get_aggregation(agg)(items)), rel=1e-9, abs=1e-12)
    # Vectorised: several sums at once give each one's score (the bootstrap's replicates).
    half = m[: len(items) // 2].sum(axis=0)
    assert corpus.score(agg, np.stack([m.sum(axis=0), half]))[1] == pytest.approx(
        float(get_aggregation(agg)(items[: len(items) // 2])), rel=1e-9, abs=1e-12)


def test_paired_corpus_delta_resamples_the_same_documents_on_both_sides():
    from sklearn.metrics import f1_score

    rng = random.Random(5)
    gold = [rng.randint(0, 1) for _ in range(60)]
    base = [g if rng.random() < 0.7 else 1 - g for g in gold]
    arm = [g if rng.random() < 0.9 else 1 - g for g in gold]
    sb, sa = corpus.matrices("f1", [[g, p] for g, p in zip(gold, base)], [[g, p] for g, p in zip(gold, arm)])
    d = stats.paired_corpus_delta(stats.CorpusPair(sb, sa, lambda x: corpus.score("f1", x)), n_boot=2000)
    assert d["base"] == pytest.approx(f1_score(gold, base)) and d["arm"] == pytest.approx(f1_score(gold, arm))
    assert d["delta"] == pytest.approx(f1_score(gold, arm) - f1_score(gold, base))
    assert d["ci_low"] <= d["delta"] <= d["ci_high"] and d["n"] == 60 and d["forgotten"] is None
    # The same predictions on both sides: every resample's Δ is 0 (an unpaired bootstrap would not give this).
    same = stats.paired_corpus_delta(stats.CorpusPair(sb, sb, lambda x: corpus.score("f1", x)), n_boot=500)
    assert (same["delta"], same["ci_low"], same["ci_high"], same["significant"]) == (0.0, 0.0, 0.0, False)
    # Inside the forgetting score a corpus task counts as one stratum like any other.
    agg = stats.aggregate_delta({"f1task": stats.CorpusPair(sb, sa, lambda x: corpus.score("f1", x)),
                                 "acc": (np.zeros(10), np.ones(10))}, n_boot=500)
    assert agg["delta"] == pytest.approx((d["delta"] + 1.0) / 2)


BINARY = {"task": "tiny_boolq_f1", "dataset_path": "aps/super_glue", "dataset_name": "boolq",
          "output_type": "multiple_choice", "validation_split": "validation", "test_split": None,
          "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
          "doc_to_choice": ["no", "yes"],
          "metric_list": [{"metric": "acc"}, {"metric": "f1"}, {"metric": "mcc"}], "metadata": {"version": 1.0}}
TRANSLATE = {"task": "tiny_echo", "dataset_path": "tiny/echo", "dataset_name": None, "output_type": "generate_until",
             "validation_split": "validation", "test_split": None, "doc_to_text": "repeat: {{text}} =",
             "doc_to_target": "{{text}}", "target_delimiter": " ",
             "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
             "metric_list": [{"metric": m} for m in ("bleu", "chrf", "ter")], "metadata": {"version": 1.0}}


@pytest.fixture(scope="module")
def include(tmp_path_factory, mirror):
    from conftest import write_jsonl

    rng = random.Random(2)
    write_jsonl(mirror / "tiny/echo/default/validation.jsonl",
                [{"text": " ".join(rng.choice(WORDS) for _ in range(4))} for _ in range(12)])
    d = tmp_path_factory.mktemp("corpus-include")
    (d / "tiny_boolq_f1.yaml").write_text(yaml.safe_dump(BINARY))
    (d / "tiny_echo.yaml").write_text(yaml.safe_dump(TRANSLATE))
    (d / "utils.py").write_text("def spread(items):\n    return max(items) - min(items)\n")
    (d / "tiny_custom.yaml").write_text(yaml.safe_dump({**BINARY, "task": "tiny_custom", "metric_list": []})
                                        + "metric_list:\n- metric: acc\n  aggregation: !function utils.spread\n")
    with context.use(context.RunContext.checked(include_paths=[str(d)])):
        yield d


@pytest.mark.slow  # two evaluations of the tiny model, generation included
def test_corpus_metrics_are_recorded_stored_and_paired_in_the_report(include, tiny_model, mirror, tmp_path):
    import torch

    tok = models.load_tokenizer(str(tiny_model))
    runs = [evaluate.TaskRun("tiny_boolq_f1"), evaluate.TaskRun("tiny_echo")]
    evs = []
    for scale in (None, 0.5):  # the base, and an "arm": the same model with its output layer scaled
        model = models.load_base(str(tiny_model))
        if scale is not None:
            with torch.no_grad():
                for p in model.model.layers[-1].parameters():
                    p.mul_(scale)
        evs.append(evaluate.evaluate(model, tok, runs, mirror=mirror, batch_size=4))
    for ev in evs:
        for task, metrics in (("tiny_boolq_f1", ("f1", "mcc")), ("tiny_echo", ("bleu", "chrf", "ter"))):
            recs = ev["samples"][task]
            for m in metrics:  # every document carries its statistics; no per-document value
                assert all(f"{m}:s" in r and m not in r for r in recs)
                agg = recs[0][f"{m}:s"][0]
                sums, _ = corpus.matrices(agg, [r[f"{m}:s"][1] for r in recs], [r[f"{m}:s"][1] for r in recs])
                assert corpus.score(agg, sums.sum(axis=0)) == pytest.approx(ev["results"][task][m], abs=1e-9)
        # The samples file keeps the statistics exactly.
        write_samples(tmp_path / "s.csv", ev["samples"])
        back = read_samples(tmp_path / "s.csv")
        for t, recs in ev["samples"].items():
            assert [{k: v for k, v in r.items() if k.endswith(":s")} for r in back[t]] == \
                [{k: v for k, v in r.items() if k.endswith(":s")} for r in recs]
    base, arm = ({"samples": ev["samples"], "perplexity": None} for ev in evs)
    comp = report._compare(base, arm, [], {}, seed=0)
    for task, metrics in (("tiny_boolq_f1", ("f1", "mcc")), ("tiny_echo", ("bleu", "chrf", "ter"))):
        for m in metrics:
            c = comp["tasks"][task][m]
            assert (c["base"], c["arm"]) == (pytest.approx(evs[0]["results"][task][m], abs=1e-9),
                                             pytest.approx(evs[1]["results"][task][m], abs=1e-9))
            assert c["ci_low"] <= c["delta"] <= c["ci_high"] and c["proportion"] == (m == "f1")
    assert comp["tasks"]["tiny_boolq_f1"]["acc"]["forgotten"] is not None  # the per-document metric beside them


def test_a_tasks_own_aggregation_is_one_line(include, mirror):
    info = evaluate.task_info("tiny_custom", mirror=mirror)
    with pytest.raises(HarnessError, match=r"suite x: task tiny_custom's metric 'acc' is aggregated by 'spread', a "
                                           r"function the harness cannot pair per document \(it pairs mean, nanmean, brier_score, f1"):
        evaluate.check_metric("tiny_custom", "acc", info, where="suite x")
    evaluate.check_metric("tiny_boolq_f1", "f1", evaluate.task_info("tiny_boolq_f1", mirror=mirror), where="suite x")


def test_cached_base_evaluations_of_corpus_tasks_are_keyed_apart(include, mirror):
    """Entries stored before documents kept their statistics cannot be paired: such a task's key says
    so; every other task's key is as before, so the committed baselines are still reused."""
    from harness import references

    assert references._records_extra("tiny_boolq_f1", mirror) == {"records": "corpus"}
    assert references._records_extra("tiny_echo", mirror) == {"records": "corpus"}
    assert references._records_extra("boolq", mirror) == {}


def test_a_group_of_corpus_scores_counts_with_its_weighted_delta():
    rng = random.Random(9)

    def recs(n, acc):
        out = []
        for i in range(n):
            gold = rng.randint(0, 1)
            out.append({"doc_id": i, "doc_hash": None, "f1:s": ["f1", [gold, gold if rng.random() < acc else 1 - gold]]})
        return out

    base = {"samples": {"l1": recs(30, 0.6), "l2": recs(10, 0.6)}, "perplexity": None}
    arm = {"samples": {"l1": recs(30, 0.9), "l2": recs(10, 0.9)}, "perplexity": None}
    for side in (base, arm):  # the same gold labels on both sides, as for one task's documents
        for leaf in ("l1", "l2"):
            for b, a in zip(base["samples"][leaf], side["samples"][leaf]):
                a["f1:s"][1][0] = b["f1:s"][1][0]
    e = {"task": "g", "metric": "f1", "role": "suite", "kind": "group", "leaves": ["l1", "l2"],
         "groups": {"g": {"children": ["l1", "l2"], "aggregate": [{"metric": "f1", "weight_by_size": True}]}}}
    comp = report._compare(base, arm, [e], {}, seed=0)
    leaf = {t: comp["tasks"][t]["f1"]["delta"] for t in ("l1", "l2")}
    assert comp["tasks"]["g"]["f1"]["delta"] == pytest.approx(0.75 * leaf["l1"] + 0.25 * leaf["l2"])  # by size
    # F1 is a proportion: the group counts in the forgetting score as one entry, its CI from its
    # subtasks' paired resamples, each within itself.
    assert comp["excluded"] == {}
    f = comp["forgetting"]
    assert f["delta"] == pytest.approx(comp["tasks"]["g"]["f1"]["delta"]) and f["n"] == {"g": 40}
    assert (f["ci_low"], f["ci_high"]) == (pytest.approx(comp["tasks"]["g"]["f1"]["ci_low"]),
                                           pytest.approx(comp["tasks"]["g"]["f1"]["ci_high"]))
