"""`policies/` is pure: no I/O, no clock, nothing from `daemon` (DESIGN.md, Layout).

Checked twice: statically (every module's imports and calls, parsed with `ast`) and at run time
(plan and forecast under an `open`, `os.stat`, `os.scandir` and clock that raise).
"""

from __future__ import annotations

import ast
import builtins
import os
import time
from pathlib import Path

import pytest

import policies
from policies import PRESETS, Checkpoint, KeepBest, PolicySpec, plan
from policies.forecast import forecast

POLICIES_DIR = Path(policies.__file__).resolve().parent
FORBIDDEN_MODULES = {
    "os",
    "pathlib",
    "shutil",
    "subprocess",
    "io",
    "socket",
    "time",
    "datetime",
    "daemon",
    "importlib",
    "tempfile",
    "glob",
    "sys",
}
FORBIDDEN_CALLS = {"open", "__import__", "eval", "exec", "input", "print"}


def policy_modules() -> list[Path]:
    return sorted(POLICIES_DIR.rglob("*.py"))


def impurities(source: str, filename: str) -> list[str]:
    """Given a module's source, return each forbidden import or call as `file:line what`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in FORBIDDEN_CALLS:
                found.append(f"{filename}:{node.lineno} calls {node.func.id}()")
            continue
        else:
            continue
        for module in modules:
            if module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{filename}:{node.lineno} imports {module}")
    return found


def test_the_package_has_the_modules_we_check() -> None:
    names = {path.name for path in policy_modules()}
    assert {"__init__.py", "model.py", "tiered.py", "forecast.py"} <= names


@pytest.mark.parametrize("path", policy_modules(), ids=lambda path: path.name)
def test_no_module_imports_io_clock_or_daemon_nor_calls_open(path: Path) -> None:
    assert impurities(path.read_text(), path.name) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os", ["m.py:1 imports os"]),
        ("from os.path import join", ["m.py:1 imports os.path"]),
        ("import datetime as dt", ["m.py:1 imports datetime"]),
        ("from daemon.config import parse_size", ["m.py:1 imports daemon.config"]),
        ("def f():\n    return open('x')", ["m.py:2 calls open()"]),
        ("from . import model\nimport math", []),
    ],
)
def test_the_static_check_catches_what_it_should(source: str, expected: list[str]) -> None:
    assert impurities(source, "m.py") == expected


@pytest.fixture
def no_io_no_clock(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every file access and clock read raise, and record any attempt."""
    attempts: list[str] = []

    def refuse(name: str) -> object:
        def refused(*args: object, **kwargs: object) -> object:
            attempts.append(name)
            raise AssertionError(f"policies called {name}")

        return refused

    for module, name in [
        (builtins, "open"),
        (os, "stat"),
        (os, "lstat"),
        (os, "scandir"),
        (os, "listdir"),
        (os, "open"),
        (time, "time"),
        (time, "time_ns"),
        (time, "monotonic"),
        (time, "perf_counter"),
    ]:
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    return attempts


def test_plan_and_forecast_run_without_io_or_clock(no_io_no_clock: list[str]) -> None:
    checkpoints = [
        Checkpoint(
            name=f"checkpoint-{step}",
            step=step,
            complete=step != 17000,
            pinned_by=(".keep",) if step == 500 else (),
            tracked_by=("latest",) if step == 16900 else (),
            metrics={"eval_loss": 1000 / step},
        )
        for step in range(100, 17001, 100)
    ]
    spec = PolicySpec(keep_best=KeepBest(2, "eval_loss"))

    result = plan(checkpoints, {"default": spec}, root="/data/run")
    outlook = forecast(100_000, 100, 3_600_000_000, PRESETS["conservative"])

    assert no_io_no_clock == []
    assert len(result.decisions) == 170
    assert outlook.saves == 1000
    # The guard itself works: the same calls outside policies/ are refused and recorded.
    with pytest.raises(AssertionError, match=r"builtins\.open"):
        open(os.devnull)  # noqa: SIM115
    assert no_io_no_clock == ["builtins.open"]
