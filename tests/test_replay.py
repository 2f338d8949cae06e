"""Replay on the tiny Llama: the mix has the stated fraction, replay is learned on every token, the
base's own samples are reproducible, and replay data that is evaluated is refused before training."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from harness import models, replay
from harness.cli import cli
from harness.config import HarnessError, Replay
from conftest import write_jsonl


def test_self_replay_is_the_stated_fraction_learned_on_every_token(tiny_model):
    tok = models.load_tokenizer(str(tiny_model))
    rep = Replay(fraction=0.2, source="self", max_new_tokens=12)
    a, rec = replay.examples(rep, 32, tok, seed=0, max_length=64, mirror=None, model_path=str(tiny_model))
    b, _ = replay.examples(rep, 32, tok, seed=0, max_length=64, mirror=None, model_path=str(tiny_model))
    assert replay.count(rep, 32) == 8 and len(a) == 8  # 8 / (32 + 8) = 0.2
    assert rec["examples"] == 8 and rec["source"] == "self"
    assert all(e["labels"] == e["input_ids"] and 2 <= len(e["input_ids"]) <= 12 for e in a)
    assert a == b  # seeded: the same samples again
    c, _ = replay.examples(rep, 32, tok, seed=1, max_length=64, mirror=None, model_path=str(tiny_model))
    assert c != a


@pytest.fixture
def general_mirror(tmp_path, mirror):
    """The fixture mirror plus a general-text dataset, one of whose rows quotes a boolq passage."""
    copy = tmp_path / "mirror"
    shutil.copytree(mirror, copy)
    passage = json.loads((mirror / "aps/super_glue/boolq/validation.jsonl").read_text().splitlines()[3])["passage"]
    clean = [{"text": f"general text number {i} about plants and water and the sun"} for i in range(40)]
    write_jsonl(copy / "tiny/general/default/train.jsonl", clean)
    write_jsonl(copy / "tiny/general/default/dirty.jsonl", clean[:5] + [{"text": f"as we read: {passage}. so"}])
    return copy


def _compare(tmp_path, tiny_model, tiny_task, mirror, *extra):
    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "full", "--profile", "quick",
            "--mirror", str(mirror), "--run-id", "r1", "--results-dir", str(tmp_path / "r"), "--work-dir",
            str(tmp_path / "w"), "profiles.quick.perplexity_limit=1", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_dataset_replay_trains_on_the_mix(tmp_path, tiny_model, tiny_task, general_mirror):
    result = _compare(tmp_path, tiny_model, tiny_task, general_mirror,
                      "mitigation.replay={fraction: 0.25, source: tiny/general, split: train}")
    assert result.exit_code == 0, result.output
    arm = json.loads((tmp_path / "r/finance/r1/arms/full.json").read_text())
    rec = arm["train"]["replay"]
    assert rec["examples"] == 11 and rec["source"] == "tiny/general"  # 0.25 / 0.75 x 32 domain examples
    assert "replay (tiny/general): 11 examples" in result.output


@pytest.mark.parametrize("setting, message", [
    ("{fraction: 0.1, source: aps/super_glue, config: boolq, split: validation}",
     "mitigation.replay: dataset aps/super_glue (boolq/validation): is the split that evaluated task boolq scores"),
    ("{fraction: 0.1, source: tiny/general, split: dirty}",
     "mitigation.replay: dataset tiny/general (default/dirty): row 5 contains text of document 3 of evaluated task boolq"),
    ("{fraction: 0.1, source: tiny/general, field: body}", "no field 'body'; its fields are text"),
    ("{fraction: 0.1, source: tiny/nothing}", "dataset tiny/nothing (default/train): not in the mirror"),
    ("{fraction: 1.0}", "mitigation.replay.fraction: must be in (0, 1), got 1.0"),
    ("{fraction: 0.9, source: tiny/general}",
     "tiny/general (default/train) has 40 non-empty rows; fraction 0.9 of 32 domain examples needs 288"),
])
def test_bad_replay_is_one_line_before_training(setting, message, tmp_path, tiny_model, tiny_task, general_mirror):
    result = _compare(tmp_path, tiny_model, tiny_task, general_mirror, f"mitigation.replay={setting}")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r/finance/r1/arms/base.json").exists()  # nothing evaluated, nothing recorded as done


def test_too_little_replay_data_is_refused(tiny_model, general_mirror):
    tok = models.load_tokenizer(str(tiny_model))
    with pytest.raises(HarnessError, match=r"has 40 non-empty rows; fraction 0.9 of 32 domain examples needs 288"):
        replay.examples(Replay(fraction=0.9, source="tiny/general"), 32, tok, seed=0, max_length=64,
                        mirror=general_mirror, model_path=str(tiny_model))
