"""The run directory's typed records (harness/records.py) and the run context (harness/context.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness import context, models, records
from harness.cli import cli
from harness.config import HarnessError


def test_records_round_trip_with_their_schema_version(tmp_path):
    arm = records.ArmRecord(arm="full", inputs="abc", results={"arc_easy": {"acc": 0.5}}, n={"arc_easy": 4},
                            versions={"arc_easy": 1.0}, eval_seconds=1.5, train={"method": "full"})
    records.write(tmp_path / "full.json", arm)
    data = json.loads((tmp_path / "full.json").read_text())
    assert data["schema_version"] == records.SCHEMA_VERSION
    assert "kl" not in data and "point" not in data  # unset optional fields are not written
    assert records.read_arm(tmp_path / "full.json") == arm
    failed = records.FailedArm(arm="qlora", inputs="abc", stage="training", error_type="OutOfMemoryError",
                               error="CUDA out of memory", peak_rss_bytes=10)
    records.write(tmp_path / "qlora.json", failed)
    assert records.read_arm(tmp_path / "qlora.json") == failed


def test_a_version_1_run_record_is_migrated_explicitly(tmp_path):
    """config.json as harnesses before versioning wrote it (before 2026-12: no evaluation entries, no
    arms, no datasets): each missing part rebuilt by the migration, not guessed by the reader."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "run_id": "old", "methods": ["full"], "profile": {"name": "quick"}, "model": {"name": "m"},
        "environment": {}, "suite": {"name": "general", "tasks": [{"task": "arc_easy", "metric": "acc"}]},
        "task": {"name": "finance", "in_domain": [{"task": "finance_tweets", "metric": "acc"}]},
        "train_data": {"dataset": "d", "config": None, "split": "train", "rows": 48}}))
    run = records.read_run(path)
    assert run.schema_version == records.SCHEMA_VERSION
    assert [(e["task"], e["role"], e["leaves"]) for e in run.evaluation["entries"]] == [
        ("arc_easy", "suite", ["arc_easy"]), ("finance_tweets", "in_domain", ["finance_tweets"])]
    assert run.arms == {"full": {"method": "full", "overrides": []}}
    assert run.datasets == [{"id": "d", "config": None, "split": "train", "rows": 48, "sha256": None,
                             "used_for": "train"}]
    assert run.points == {} and run.overrides == [] and run.finished is None


@pytest.mark.parametrize("change,message", [
    ({"colour": "red"}, "unknown field 'colour' in a ArmRecord record"),
    ({"schema_version": 99}, "schema_version 99 is newer than this harness reads"),
    ({"inputs": None, "__drop__": "inputs"}, "field 'inputs' missing from a ArmRecord record"),
])
def test_a_record_this_harness_cannot_read_is_one_line_naming_the_file(tmp_path, change, message):
    data = {"arm": "base", "inputs": "x", "results": {}, "n": {}, "versions": {}, "eval_seconds": 0.0,
            "schema_version": 2, **change}
    data.pop(data.pop("__drop__", "__none__"), None)
    path = tmp_path / "base.json"
    path.write_text(json.dumps(data))
    with pytest.raises(HarnessError) as e:
        records.read_arm(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_the_report_of_a_run_with_an_unknown_record_field_is_one_line(run, tmp_path):
    import shutil

    run_dir = tmp_path / "t1"
    shutil.copytree(run[0] / "results" / "finance" / "t1", run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "methodz": []}))
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"Error: {run_dir}/config.json: unknown field 'methodz' in a RunRecord record "
                                     "(did you mean 'methods'?); written by another harness version?")


def test_a_runs_permissions_last_only_as_long_as_its_context(tmp_path):
    """What --allow-pickle grants is the run's: outside its block (after it ends, or fails) the safe
    defaults apply again, so `harness merge`, `harness adapters` and other runs never inherit it."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 64)
    with pytest.raises(HarnessError, match="only pickle weights"):
        models.check_model_dir(tmp_path)
    with pytest.raises(RuntimeError):
        with context.use(context.RunContext.checked(allow_pickle=True)):
            assert models.check_model_dir(tmp_path) == 32
            raise RuntimeError("the run fails")
    assert context.current() == context.RunContext()
    with pytest.raises(HarnessError, match="only pickle weights"):
        models.check_model_dir(tmp_path)


def test_a_compare_runs_in_its_own_context_and_leaves_none_behind(tmp_path, monkeypatch):
    """compare enters the spec's context for the run (the stages see --allow-pickle, --include-path)
    and leaves it however the run ends."""
    from harness import pipeline

    seen = []

    def prepare(spec, arms, **kw):
        seen.append(context.current())
        raise HarnessError("stop here")

    monkeypatch.setattr(pipeline, "prepare", prepare)
    spec = pipeline.CompareSpec(allow_pickle=True, trust_remote_code=True, include_path=(str(tmp_path),))
    with pytest.raises(HarnessError, match="stop here"):
        pipeline.compare(spec)
    assert seen == [context.RunContext("auto", True, True, (str(tmp_path.resolve()),))]
    assert context.current() == context.RunContext()


def test_context_checks_its_values():
    with pytest.raises(HarnessError, match="--device gpu: valid: auto, cpu, cuda"):
        context.RunContext.checked(device="gpu")
    with pytest.raises(HarnessError, match="--include-path /no/such/dir: not a directory"):
        context.RunContext.checked(include_paths=["/no/such/dir"])
