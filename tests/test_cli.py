"""The CLI: help for every command, and user mistakes as one line with exit code 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from harness.cli import cli


@pytest.mark.parametrize("command", [[], ["compare"], ["sweep"], ["profile"], ["merge"], ["adapters"], ["report"]])
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
    if command:
        assert "Example:" in result.output


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--methods", "full,adapter"], "unknown method 'adapter'"),
    (["--model", "not-a-model"], "--model not-a-model: not a local directory"),
    (["--mirror", "/does/not/exist"], "mirror directory /does/not/exist does not exist"),
    (["training.epochs=-1"], "training.epochs: must be > 0"),
    (["--run-id", "../escape"], "--run-id '../escape'"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, mirror):
    base = ["compare", "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")]
    if "--mirror" not in args:
        base += ["--mirror", str(mirror)]
    result = CliRunner().invoke(cli, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not list((tmp_path / "r").rglob("*.json"))  # nothing recorded as done


def test_mirror_without_the_dataset_names_it(tmp_path, tiny_model, tiny_task):
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["compare", "--task", str(tiny_task), "--model", str(tiny_model),
                                      "--mirror", str(empty), "--results-dir", str(tmp_path / "r"),
                                      "--work-dir", str(tmp_path / "w"), "--profile", "quick"])
    assert result.exit_code == 2, result.output
    assert "allenai/ai2_arc" in result.output and str(empty) in result.output
