"""The tree keeps its style: ruff (lint and format) for Python, snakefmt for the Snakemake rules (pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's own ruff and snakefmt, at the lock's versions


@pytest.mark.parametrize(
    "command", [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["snakefmt", "--check", "workflow"]]
)
def test_style(command):
    result = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"`{' '.join(command)}` (run `ruff format .`, `snakefmt workflow`):\n" + (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
