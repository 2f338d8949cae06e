"""lm-eval wrapping: tasks re-pointed at a mirror, and the shared training/evaluation prompt."""

from __future__ import annotations

import pytest

from harness import evaluate, lm_eval_patches
from harness.config import HarnessError


def test_mirror_rewrite_points_at_jsonl_and_nulls_missing_splits(mirror):
    cfg = evaluate.task_config("arc_easy", mirror=mirror)
    assert cfg["dataset_path"] == "json" and cfg["dataset_name"] is None
    assert list(cfg["dataset_kwargs"]["data_files"]) == ["test"]
    assert cfg["training_split"] is None and cfg["validation_split"] is None
    assert cfg["test_split"] == "test"


def test_without_mirror_the_registered_name_is_used():
    assert evaluate.task_config("arc_easy", mirror=None) == "arc_easy"


def test_unknown_task_suggests_near_names():
    with pytest.raises(HarnessError) as e:
        evaluate.check_tasks(["hellaswagg"])
    assert "did you mean" in str(e.value) and "hellaswag" in str(e.value)


def test_index_of_only_the_needed_tasks_loads_them_as_the_whole_registry(monkeypatch, mirror):
    """need_tasks: lm-eval indexes only the named tasks' registry directories (plus tasks/), from a
    map of its registry built once; the tasks load exactly as from the whole registry's index."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(evaluate, "_NEEDED", frozenset())
    evaluate._task_manager.cache_clear()
    evaluate.need_tasks(["arc_easy", "boolq", "finance_tweets"])
    small = evaluate.task_manager().task_index
    assert {"arc_easy", "arc_challenge", "boolq", "finance_tweets", "finance_phrasebank"} <= set(small)
    assert len(small) < 50 and "hellaswag" not in small
    whole = TaskManager(include_path=[str(evaluate.TASKS_DIR)]).task_index
    for name in ("arc_easy", "boolq", "finance_tweets"):
        assert small[name].yaml_path == whole[name].yaml_path and small[name].cfg == whole[name].cfg
    # A task asked for later widens the index; a group (or tag) takes the whole registry.
    evaluate.task_config("hellaswag", mirror=None)
    assert "hellaswag" in evaluate.task_manager().task_index
    evaluate.need_tasks(["ai2_arc"])  # a tag over arc_easy and arc_challenge
    assert len(evaluate.task_manager().task_index) == len(whole)
    monkeypatch.setattr(evaluate, "_NEEDED", frozenset())
    evaluate._task_manager.cache_clear()


def test_formatter_is_lm_evals_own_prompt(mirror):
    fmt, _ = evaluate.formatter("finance_tweets", mirror=mirror)
    assert fmt({"text": "Shares rise", "label": 1}) == ("Financial news: Shares rise\nSentiment:", " bullish")
    phrase, _ = evaluate.formatter("finance_phrasebank", mirror=mirror)
    # PhraseBank: 0 negative, 1 neutral, 2 positive -> the shared label words.
    assert phrase({"sentence": "x", "label": 0})[1] == " bearish"
    assert phrase({"sentence": "x", "label": 1})[1] == " neutral"
    assert phrase({"sentence": "x", "label": 2})[1] == " bullish"


def test_label_outside_choices_is_an_error(mirror):
    fmt, _ = evaluate.formatter("finance_tweets", mirror=mirror)
    with pytest.raises(HarnessError, match="outside the choices"):
        fmt({"text": "x", "label": 7})


def test_limit_is_a_seeded_random_subset_not_the_first_documents(mirror):
    a = evaluate.subsample(["finance_tweets", "arc_easy"], 5, mirror=mirror, seed=0)
    assert a == evaluate.subsample(["arc_easy", "finance_tweets"], 5, mirror=mirror, seed=0)  # order-free
    assert len(a["finance_tweets"]) == 5 and a["finance_tweets"] != [0, 1, 2, 3, 4]
    assert a != evaluate.subsample(["finance_tweets", "arc_easy"], 5, mirror=mirror, seed=1)
    assert evaluate.subsample(["arc_easy"], 100, mirror=mirror, seed=0)["arc_easy"] == list(range(12))


def test_cached_templates_render_as_lm_eval_does_and_restore_it():
    import jinja2
    import lm_eval.utils as lm_utils

    original = lm_utils.apply_template
    doc = {"question": "Is it up?", "choices": ["yes", "no"]}
    template = "{{question}} {{choices | join(', ')}}"
    want = original(template, doc)
    lm_eval_patches._compiled.cache_clear()
    with lm_eval_patches.cached_templates():
        assert lm_utils.apply_template is not original
        with lm_eval_patches.cached_templates():  # a nested block leaves the outer one's in place
            got = [lm_utils.apply_template(template, doc) for _ in range(3)]
        assert lm_utils.apply_template is not original
        with pytest.raises(jinja2.UndefinedError):  # lm-eval's StrictUndefined environment
            lm_utils.apply_template("{{missing}}", doc)
    assert lm_utils.apply_template is original
    assert got == [want] * 3
    info = lm_eval_patches._compiled.cache_info()
    assert info.misses == 2 and info.hits == 2  # compiled once per distinct template


def test_eval_task_is_built_once_and_again_when_its_data_changes(mirror, tmp_path):
    import shutil

    m = tmp_path / "mirror"
    shutil.copytree(mirror, m)
    task = evaluate.eval_task("arc_easy", mirror=m)
    assert evaluate.eval_task("arc_easy", mirror=m) is task
    # the documents lm-eval itself reads, in its order
    assert list(task.eval_docs) == list(evaluate.load_task_object("arc_easy", mirror=m).eval_docs)
    data = m / "allenai/ai2_arc/ARC-Easy/test.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:5]))
    again = evaluate.eval_task("arc_easy", mirror=m)
    assert again is not task and len(again.eval_docs) == 5
