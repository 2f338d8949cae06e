"""The CLI: help for every command (user mistakes: tests/test_bad_input.py)."""

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
