"""Task and suite configs: dataclasses from YAML, overrides, and one clear line per mistake."""

from __future__ import annotations

import pytest

from harness.config import HarnessError, load_suite, load_task


def test_finance_task_loads():
    task = load_task("finance")
    assert task.train.dataset == "zeroshot/twitter-financial-news-sentiment"
    assert [t.task for t in task.in_domain] == ["finance_tweets", "finance_phrasebank"]
    assert set(task.methods) == {"full", "lora", "qlora"}
    assert task.lora["r"] == 16 and task.lora["lora_alpha"] == 32
    assert task.quant["bnb_4bit_quant_type"] == "nf4" and task.quant["bnb_4bit_use_double_quant"] is True


def test_general_suite_lists_the_six_tasks():
    suite = load_suite("general")
    assert [t.task for t in suite.tasks] == ["hellaswag", "arc_easy", "arc_challenge", "winogrande", "piqa", "boolq"]
    assert suite.num_fewshot == 0


def test_dotted_overrides_apply_with_types():
    task = load_task("finance", ["training.epochs=2", "methods.full.learning_rate=1e-5", "profiles.quick.limit=null"])
    assert task.training.epochs == 2.0
    assert task.methods["full"].learning_rate == 1e-5
    assert task.profiles["quick"].limit is None


@pytest.mark.parametrize("override, message", [
    (["training.epoch=2"], "unknown key 'epoch' (did you mean 'epochs'?)"),
    (["methods.full.learning_rate=0"], "learning_rate: must be > 0"),
    (["methods.full.learning_rate=fast"], "expected float, got 'fast'"),
    (["training.batch_size=0"], "training.batch_size: must be > 0"),
    (["lora.r=0"], "lora.r: must be a positive integer"),
    (["profiles.quick.limit=-3"], "limit: must be a positive number or null"),
    (["methods.adapter.learning_rate=1"], "methods.adapter: unknown method"),
    (["training.epochs"], "expected key.path=value"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(HarnessError) as e:
        load_task("finance", override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_task_lists_what_exists():
    with pytest.raises(HarnessError) as e:
        load_task("medicine")
    assert "unknown task 'medicine'" in str(e.value) and "finance" in str(e.value)


def test_unknown_suite_lists_what_exists():
    with pytest.raises(HarnessError) as e:
        load_suite("everything")
    assert "unknown suite 'everything'" in str(e.value) and "general" in str(e.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: [unclosed\n")
    with pytest.raises(HarnessError) as e:
        load_task(str(bad))
    assert str(bad) in str(e.value) and "line" in str(e.value)


def test_task_suite_is_a_name_or_a_list_and_entries_take_their_own_fewshot():
    task = load_task("finance")
    assert task.suites == ["general", "instruct"]
    assert load_task("finance", ["suite=general"]).suites == ["general"]
    with pytest.raises(HarnessError) as e:
        load_task("finance", ["suite=[]"])
    assert "suite: a suite name or a non-empty list" in str(e.value)
    suite = load_suite("instruct")
    assert suite.apply_chat_template == "auto" and suite.tasks[0].metric == "prompt_level_strict_acc"
    assert suite.tasks[0].num_fewshot is None  # the suite's default applies
