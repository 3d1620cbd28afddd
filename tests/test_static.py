"""The code stays formatted, lint-clean and type-checked: ruff and mypy run as part of the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def _tool(name: str) -> list[str]:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return [str(beside_python)]
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it is part of the [test] extra")
    return [found]


def test_ruff_lint_is_clean() -> None:
    result = subprocess.run(
        [*_tool("ruff"), "check", "."], cwd=REPOSITORY, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = subprocess.run(
        [*_tool("ruff"), "format", "--check", "."], cwd=REPOSITORY, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run(
        [*_tool("mypy")], cwd=REPOSITORY, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
