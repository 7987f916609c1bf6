"""The `blipbatch` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.cli import DEMO_PROMPTS, main


def test_demo_runs_the_whole_path(capsys):
    assert main(["demo", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights" in out
    for prompt in DEMO_PROMPTS:
        assert f"prompt: {prompt!r}" in out
    assert out.count("[red circle") == len(DEMO_PROMPTS)


def test_unknown_command_exits_2():
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out
