"""Evaluation beyond multiple choice, on the tiny Llama: generate_until tasks and their filters, groups,
per-task few-shot, perplexity tasks paired per document, KL drift, the at-chance flag, and a free-text
domain trained end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from harness import context, drift, evalplan, evaluate, models, stats
from harness.cli import cli
from conftest import WORDS, write_jsonl

QA_TASK = {
    "task": "tiny_qa", "dataset_path": "tiny/qa", "dataset_name": None, "output_type": "generate_until",
    "training_split": "train", "validation_split": "validation", "test_split": None,
    "doc_to_text": "question: {{question}} answer:", "doc_to_target": "{{answer}}", "target_delimiter": " ",
    "generation_kwargs": {"until": ["?"], "max_gen_toks": 3, "do_sample": False},
    "filter_list": [{"name": "whole", "filter": [{"function": "take_first"}]},
                    {"name": "first-word", "filter": [{"function": "regex", "regex_pattern": r"(\w+)"},
                                                      {"function": "take_first"}]}],
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}
QA_TEXT = {"task": "tiny_qa_text", "dataset_path": "tiny/qa", "dataset_name": None,
           "output_type": "loglikelihood_rolling", "test_split": None, "validation_split": "validation",
           "doc_to_text": "", "doc_to_target": "{{question}} {{answer}}",
           "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
           "metadata": {"version": 1.0}}
GROUP = {"group": "tiny_group", "task": ["arc_easy", "boolq"],
         "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
         "metadata": {"version": 1.0}}


@pytest.fixture(scope="module")
def extra(tmp_path_factory, mirror):
    """A question-answer dataset in the mirror, its generate_until task and a group, in an include dir."""
    rng = random.Random(1)
    for split, n in (("train", 32), ("validation", 10)):
        write_jsonl(mirror / f"tiny/qa/default/{split}.jsonl",
                    [{"question": " ".join(rng.choice(WORDS) for _ in range(5)), "answer": rng.choice(WORDS)}
                     for _ in range(n)])
    d = tmp_path_factory.mktemp("include")
    (d / "tiny_qa.yaml").write_text(yaml.safe_dump(QA_TASK))
    (d / "tiny_group.yaml").write_text(yaml.safe_dump(GROUP))
    (d / "tiny_qa_text.yaml").write_text(yaml.safe_dump(QA_TEXT))
    with context.use(context.RunContext.checked(include_paths=[str(d)])):
        yield d


def test_group_expands_to_its_subtasks_with_lm_evals_weights(extra):
    ex = evaluate.expand("tiny_group")
    assert ex["kind"] == "group" and ex["leaves"] == ["arc_easy", "boolq"]
    assert ex["groups"]["tiny_group"]["aggregate"] == [{"metric": "acc", "filter_list": ["none"], "weight_by_size": True}]
    entry = {"task": "tiny_group", "groups": ex["groups"]}
    assert evalplan.leaf_weights(entry, {"arc_easy": 30, "boolq": 10}) == pytest.approx({"arc_easy": 0.75, "boolq": 0.25})
    unweighted = {"task": "g", "groups": {"g": {"children": ["a", "b"], "aggregate": [{"metric": "acc",
                                                                                       "weight_by_size": False}]}}}
    assert evalplan.leaf_weights(unweighted, {"a": 30, "b": 10}) == pytest.approx({"a": 0.5, "b": 0.5})


def test_generate_until_records_every_filter_as_its_own_metric(extra, tiny_model, mirror):
    model = models.load_base(str(tiny_model))
    tok = models.load_tokenizer(str(tiny_model))
    ev = evaluate.evaluate(model, tok, [evaluate.TaskRun("tiny_qa", max_gen_toks=2)], mirror=mirror, batch_size=4)
    recs = ev["samples"]["tiny_qa"]
    assert len(recs) == 10 and [r["doc_id"] for r in recs] == list(range(10))  # one record per document
    for r in recs:
        assert set(r) >= {"exact_match,whole", "exact_match,first-word"}
        assert r["exact_match,whole"] in (0.0, 1.0)
    # The aggregate is the mean of the per-document values, filter by filter.
    for key in ("exact_match,whole", "exact_match,first-word"):
        assert ev["results"]["tiny_qa"][key] == pytest.approx(np.mean([r[key] for r in recs]))


def test_answer_task_scores_the_reference_answer_in_bits_per_byte(extra, tiny_model, mirror):
    """`tiny_qa@answer`: per document, -log p(" " + answer | prompt) / (bytes ln 2), computed here by hand."""
    import math

    import torch

    model = models.load_base(str(tiny_model))
    tok = models.load_tokenizer(str(tiny_model))
    ev = evaluate.evaluate(model, tok, [evaluate.TaskRun("tiny_qa@answer", limit=6)], mirror=mirror, batch_size=4)
    recs = ev["samples"]["tiny_qa@answer"]
    # The same seeded documents as the generate_until task it derives from.
    assert [r["doc_id"] for r in recs] == evaluate.subsample(["tiny_qa"], 6, mirror=mirror, seed=0)["tiny_qa"]
    docs = evaluate.eval_task("tiny_qa", mirror=mirror).eval_docs
    for r in recs:
        doc = docs[r["doc_id"]]
        ctx, cont = f"question: {doc['question']} answer:", " " + doc["answer"]
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole], device=model.device)).logits[0].double(), -1)
        ll = sum(logp[i - 1, whole[i]].item() for i in range(len(ctx_ids), len(whole)))
        assert r["bits_per_byte:w"] == len(cont.encode())
        assert r["bits_per_byte"] == pytest.approx(-ll / (len(cont.encode()) * math.log(2)), rel=1e-4)
    weights = [r["bits_per_byte:w"] for r in recs]
    pooled = sum(r["bits_per_byte"] * w for r, w in zip(recs, weights)) / sum(weights)
    assert ev["results"]["tiny_qa@answer"]["bits_per_byte"] == pytest.approx(pooled, rel=1e-6)  # lm-eval's own


def test_answer_task_of_a_task_that_does_not_generate_is_one_clear_error(extra, mirror):
    with pytest.raises(evaluate.HarnessError, match=r"task boolq@answer: @answer scores a generate_until task.*boolq is multiple_choice"):
        evaluate.task_config("boolq@answer", mirror=mirror)
    with pytest.raises(evaluate.HarnessError, match="unknown lm-eval task 'tiny_qq'"):
        evaluate.check_tasks(["tiny_qq@answer"])


def test_known_exact_match_delta_is_paired_per_document():
    base = [{"doc_id": i, "doc_hash": None, "exact_match,strict-match": float(i < 6)} for i in range(10)]
    arm = [{"doc_id": i, "doc_hash": None, "exact_match,strict-match": float(i < 3 or i == 9)} for i in range(10)]
    b, a = stats.align(base, arm, metric="exact_match,strict-match")
    d = stats.paired_delta(b, a, n_boot=2000)
    assert d["delta"] == pytest.approx(-0.2) and d["forgotten"] == 3 and d["gained"] == 1


def test_per_task_fewshot_changes_the_prompt(extra, tiny_model, mirror):
    model = models.load_base(str(tiny_model))
    tok = models.load_tokenizer(str(tiny_model))
    runs = [evaluate.TaskRun("boolq", num_fewshot=0, limit=4), evaluate.TaskRun("arc_easy", num_fewshot=0, limit=4)]
    zero = evaluate.evaluate(model, tok, runs, mirror=mirror, batch_size=4, raw=True)["raw"]
    runs[0] = evaluate.TaskRun("boolq", num_fewshot=2, limit=4)
    two = evaluate.evaluate(model, tok, runs, mirror=mirror, batch_size=4, raw=True)["raw"]
    assert two["arc_easy"] == zero["arc_easy"]  # its own few-shot count, untouched
    assert two["boolq"] != zero["boolq"]  # two examples before each question
    assert evaluate.eval_task("boolq", mirror=mirror)._harness_dump == evaluate.eval_task(
        "boolq", mirror=mirror)._harness_dump  # the hashed config is the one built, not the run's setting
    from harness import baselines

    baselines.task_sha256.cache_clear()
    sha_after = baselines.task_sha256("boolq", mirror)
    evaluate.evaluate(model, tok, [evaluate.TaskRun("boolq", num_fewshot=0, limit=2)], mirror=mirror, batch_size=4)
    baselines.task_sha256.cache_clear()
    assert baselines.task_sha256("boolq", mirror) == sha_after


def test_a_suites_system_prompt_reaches_its_prompts_and_keys_but_no_other_suites(extra, tmp_path, tiny_model,
                                                                                tiny_task, mirror):
    from harness import config, references

    model = models.load_base(str(tiny_model))
    tok = models.load_tokenizer(str(tiny_model))
    runs = [evaluate.TaskRun("boolq", limit=4), evaluate.TaskRun("arc_easy", limit=4)]
    plain = evaluate.evaluate(model, tok, runs, mirror=mirror, batch_size=4, raw=True)["raw"]
    runs[0] = evaluate.TaskRun("boolq", limit=4, system_instruction="answer yes or no")
    told = evaluate.evaluate(model, tok, runs, mirror=mirror, batch_size=4, raw=True)["raw"]
    assert told["boolq"] != plain["boolq"]  # the instruction is in boolq's prompts ...
    assert told["arc_easy"] == plain["arc_easy"]  # ... and not in those of a task evaluated without it
    # From the suite file to each of its tasks' runs and baseline keys; the other suite's tasks keep none.
    told_suite = {"name": "told", "system_instruction": "answer yes or no", "tasks": [{"task": "boolq"}]}
    plain_suite = {"name": "plain", "tasks": [{"task": "arc_easy"}]}
    for suite in (told_suite, plain_suite):
        (tmp_path / f"{suite['name']}.yaml").write_text(yaml.safe_dump(suite))
    task = config.load_task(str(tiny_task))
    plan = evalplan.build(task, [str(tmp_path / "told.yaml"), str(tmp_path / "plain.yaml")], mirror=mirror)
    run_of = {r.task: r for r in plan.runs(task.profiles["quick"], has_chat_template=False)}
    assert run_of["boolq"].system_instruction == "answer yes or no" and run_of["arc_easy"].system_instruction is None
    assert references.run_extra(run_of["boolq"])["system_instruction"] == "answer yes or no"
    assert "system_instruction" not in references.run_extra(run_of["arc_easy"])
    # With a chat template, few-shot examples as turns or inside one user turn: other prompts.
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    shots = {turns: evaluate.evaluate(model, tok, [evaluate.TaskRun("boolq", limit=4, num_fewshot=2, chat_template=True,
                                                                    fewshot_as_multiturn=turns)],
                                      mirror=mirror, batch_size=4, raw=True)["raw"]["boolq"] for turns in (True, False)}
    assert shots[True] != shots[False]
    # Few-shot turns need a chat template: one line naming the suite.
    with pytest.raises(config.HarnessError, match="suite plain: fewshot_as_multiturn needs apply_chat_template"):
        config.build(config.SuiteConfig, {**plain_suite, "fewshot_as_multiturn": True}, "plain.yaml")


def test_weighted_paired_delta_is_the_ratio_of_sums():
    # bits per byte of two documents: 1.0 over 100 bytes, 3.0 over 300 bytes -> (100 + 900) / 400 = 2.5
    b = np.array([1.0, 3.0])
    a = np.array([1.5, 3.0])
    d = stats.paired_delta(b, a, weights=np.array([100.0, 300.0]), n_boot=500)
    assert d["base"] == pytest.approx(2.5) and d["arm"] == pytest.approx(2.625)
    assert d["delta"] == pytest.approx(0.125)


def test_at_chance_flag():
    rng = np.random.default_rng(0)
    guessing = rng.random(400) < 0.25  # four choices, answered at random
    assert not stats.above_chance(guessing, np.full(400, 4))["above_chance"]
    knowing = rng.random(400) < 0.45
    r = stats.above_chance(knowing, np.full(400, 4))
    assert r["above_chance"] and r["chance"] == pytest.approx(0.25)
    mixed = stats.above_chance(np.ones(10), np.array([2] * 5 + [4] * 5))
    assert mixed["chance"] == pytest.approx(0.375)


def test_kl_is_zero_for_the_same_model_and_positive_after_a_change(tiny_model):
    import torch

    base = models.load_base(str(tiny_model))
    same = models.load_base(str(tiny_model))
    tok = models.load_tokenizer(str(tiny_model))
    docs = [(0, "market rises on strong earnings"), (1, "the bank will cut the rate")]
    zero = drift.kl_per_document(base, same, tok, docs, max_tokens=64)
    assert [d[1] for d in zero] == [0.0, 0.0] and all(d[2] > 0 for d in zero)
    with torch.no_grad():
        same.model.layers[0].mlp.up_proj.weight.add_(0.5)
    moved = drift.kl_per_document(base, same, tok, docs, max_tokens=64)
    assert all(d[1] > 0 for d in moved)
    assert drift.mean_kl(moved) == pytest.approx(sum(d[1] for d in moved) / sum(d[2] for d in moved))


def test_label_word_target_is_accepted(tmp_path, mirror):
    from harness.evaluate import formatter

    d = tmp_path / "inc"
    d.mkdir()
    cfg = yaml.safe_load((evaluate.TASKS_DIR / "finance" / "finance_tweets.yaml").read_text())
    cfg.update(task="finance_words", doc_to_target="{{['bearish', 'bullish', 'neutral'][label]}}")
    (d / "finance_words.yaml").write_text(yaml.safe_dump(cfg))
    with context.use(context.RunContext.checked(include_paths=[str(d)])):
        fmt, _ = formatter("finance_words", mirror=mirror)
        assert fmt({"text": "up up", "label": 1}) == ("Financial news: up up\nSentiment:", " bullish")


@pytest.mark.slow
def test_free_text_domain_with_group_suite_trains_end_to_end(extra, tmp_path, tiny_model, tiny_task, mirror):
    """A question-answer domain (generate_until format task, exact_match learning), a group in the
    suite, a perplexity task in-domain (bits per byte), KL on both text sources."""
    suite = {"name": "grouped", "tasks": [{"task": "tiny_group", "metric": "acc"}],
             "perplexity": {"task": "wikitext", "batch_size": 1}}
    (tmp_path / "grouped.yaml").write_text(yaml.safe_dump(suite))
    task = yaml.safe_load(tiny_task.read_text())
    task.update(name="qa", suite=str(tmp_path / "grouped.yaml"),
                train={"dataset": "tiny/qa", "split": "train", "format_task": "tiny_qa"},
                in_domain=[{"task": "tiny_qa", "metric": "exact_match,first-word"},
                           {"task": "tiny_qa_text", "metric": "bits_per_byte"}])
    task["profiles"]["quick"].update(max_gen_toks=2, quant_reference=False)
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    args = ["compare", "--task", str(path), "--model", str(tiny_model), "--methods", "full", "--profile", "quick",
            "--mirror", str(mirror), "--run-id", "qa1", "--results-dir", str(tmp_path / "r"),
            "--work-dir", str(tmp_path / "w"), "--include-path", str(extra)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "r" / "qa" / "qa1"
    m = json.loads((run_dir / "metrics.json").read_text())
    comp = m["comparisons"]["full"]
    # The group: its subtasks evaluated, its aggregate weighted by their sizes, with its own paired Δ.
    g = m["arms"]["base"]["tasks"]["tiny_group"]
    sub = m["arms"]["base"]["tasks"]
    n = {t: sub[t]["n"] for t in ("arc_easy", "boolq")}
    assert g["score"] == pytest.approx(sum(sub[t]["score"] * n[t] for t in n) / sum(n.values()))
    assert "acc" in comp["tasks"]["tiny_group"]
    # Free text: trained on prompt + answer; learning read from the filtered exact match.
    assert json.loads((run_dir / "arms/full.json").read_text())["train"]["steps"] > 0
    assert "exact_match,first-word" in comp["tasks"]["tiny_qa"]
    # ... and from the reference answer's likelihood, on the same documents, beside the learning score.
    ans = comp["tasks"]["tiny_qa@answer"]["bits_per_byte"]
    assert ans["n"] == comp["tasks"]["tiny_qa"]["exact_match,first-word"]["n"] and ans["proportion"] is False
    assert comp["excluded"]["tiny_qa@answer"].startswith("not a proportion")
    # The perplexity task in-domain: bits per byte paired per document, not a percentage.
    bpb = comp["tasks"]["tiny_qa_text"]["bits_per_byte"]
    assert bpb["proportion"] is False and bpb["n"] == 8  # the quick profile's limit
    # Its word perplexity, a corpus-level figure (exp of the pooled mean), paired by resampling documents.
    wp = comp["tasks"]["tiny_qa_text"]["word_perplexity"]
    assert wp["corpus"] and wp["n"] == 8 and wp["base"] == pytest.approx(m["arms"]["base"]["tasks"]["tiny_qa_text"]["all"]["word_perplexity"])
    assert comp["excluded"]["tiny_qa_text"].startswith("not a proportion")
    # KL on WikiText and on the domain prompts, > 0 after training.
    kl = m["arms"]["full"]["kl"]
    assert kl["general"]["task"] == "wikitext" and kl["domain"]["task"] == "tiny_qa"
    assert kl["general"]["mean"] > 0 and kl["domain"]["mean"] > 0
    report = (run_dir / "report.md").read_text()
    assert "Distribution drift" in report and "tiny_group (group)" in report
    assert "| tiny_qa@answer |" in report or "| tiny_qa@answer (" in report
    # The plots are in percent: bits per byte is in the tables only, and the captions say so.
    assert report.count("Not a percentage, so in the tables only: tiny_qa@answer, tiny_qa_text.") == 1  # scores (no heat map: one arm)
    # samples/*.csv: one row per (document, filter, metric).
    rows = (run_dir / "samples/full.csv").read_text().splitlines()
    assert rows[0] == "task,doc_id,doc_hash,filter,metric,value,weight,stats"  # stats: the perplexity task's
    qa_rows = [r for r in rows if r.startswith("tiny_qa,")]
    assert len(qa_rows) == 8 * 2 and {r.split(",")[3] for r in qa_rows} == {"whole", "first-word"}


def test_adapters_evaluate_a_free_text_domain_and_a_group_suite_from_an_include_path(extra, tmp_path, tiny_model,
                                                                                     tiny_task, mirror):
    """`harness adapters` runs the evaluation plan compare runs: a generate_until in-domain task with a
    filtered metric (and its @answer twin), a group in the suite, tasks from --include-path."""
    import torch

    suite = {"name": "grouped", "tasks": [{"task": "tiny_group", "metric": "acc"}]}
    (tmp_path / "grouped.yaml").write_text(yaml.safe_dump(suite))
    task = yaml.safe_load(tiny_task.read_text())
    task.update(name="qa", suite=str(tmp_path / "grouped.yaml"),
                train={"dataset": "tiny/qa", "split": "train", "format_task": "tiny_qa"},
                in_domain=[{"task": "tiny_qa", "metric": "exact_match,first-word"}])
    task["profiles"]["quick"].update(max_gen_toks=2, generate_limit=6)
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    torch.manual_seed(0)
    model, _, _ = models.build_model("lora", str(tiny_model), lora={"r": 4, "lora_alpha": 8,
                                                                    "target_modules": "all-linear"}, quant=None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter = tmp_path / "lora" / "adapter"
    models.save_arm(model, models.load_tokenizer(str(tiny_model)), adapter,
                    record={"method": "lora", "base_model": str(tiny_model), "quant": None})
    args = ["adapters", str(adapter), "--task", str(path), "--suite", "--profile", "quick", "--mirror", str(mirror),
            "--out", str(tmp_path / "out"), "--device", "cpu"]
    # Its own context, not the caller's: without --include-path the domain's task is unknown.
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "unknown lm-eval task 'tiny_group'" in result.output, result.output
    result = CliRunner().invoke(cli, [*args, "--include-path", str(extra)])
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "out" / "adapters.json").read_text())
    assert [e["task"] for e in r["entries"]] == ["tiny_group", "tiny_qa", "tiny_qa@answer"]
    assert r["tasks"] == ["arc_easy", "boolq", "tiny_qa", "tiny_qa@answer"]
    row = r["adapters"][0]
    n, results, scores = row["n"], row["results"], row["scores"]
    assert n["tiny_qa"] == n["tiny_qa@answer"] == 6 and n["arc_easy"] == n["boolq"] == 8  # the profile's limits
    assert scores["tiny_qa"] == results["tiny_qa"]["exact_match,first-word"]
    assert scores["tiny_qa@answer"] == results["tiny_qa@answer"]["bits_per_byte"]
    weighted = sum(results[t]["acc"] * n[t] for t in ("arc_easy", "boolq")) / (n["arc_easy"] + n["boolq"])
    assert scores["tiny_group"] == pytest.approx(weighted)
    md = (tmp_path / "out" / "adapters.md").read_text()
    assert "tiny_group (group) acc" in md and "tiny_qa exact_match,first-word" in md
    assert "at most 8 documents per task, 6 per generation task" in md


def test_samples_round_trip_one_row_per_metric_plain_and_gzipped(tmp_path):
    import gzip
    import shutil

    from harness.io import read_samples, write_samples

    recs = {"ifeval": [{"doc_id": 1, "doc_hash": "ab" * 20, "target": 0, "prompt_level_strict_acc": 1.0,
                        "inst_level_strict_acc": 0.5, "inst_level_strict_acc:w": 2.0}],
            "gsm8k": [{"doc_id": 0, "doc_hash": None, "exact_match,strict-match": 0.0,
                       "exact_match,flexible-extract": 1.0}]}
    path = write_samples(tmp_path / "arm.csv", recs)
    lines = path.read_text().splitlines()
    assert "ifeval,1,abababababababab,none,inst_level_strict_acc,0.5,2.0" in lines
    assert "gsm8k,0,,strict-match,exact_match,0.0," in lines and len(lines) == 1 + 2 + 2
    back = read_samples(path)
    assert back["ifeval"][0]["inst_level_strict_acc:w"] == 2.0
    assert back["gsm8k"][0]["exact_match,flexible-extract"] == 1.0
    with open(path, "rb") as src, gzip.open(tmp_path / "arm.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    assert read_samples(tmp_path / "arm.csv") == back


def test_ifeval_language_checks_give_one_verdict_per_text():
    """langdetect samples at random on each call: unseeded, this text came back as no, sl, it or es."""
    langdetect = pytest.importorskip("langdetect")
    saved = langdetect.DetectorFactory.seed
    langdetect.DetectorFactory.seed = None  # as a fresh process has it, whatever ran before
    try:
        evaluate.seed_checks(0)
        text = "Ok ok. Yes, no - 3 4 fine la la"
        assert len({langdetect.detect(text) for _ in range(40)}) == 1
    finally:
        langdetect.DetectorFactory.seed = saved
