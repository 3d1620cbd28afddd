"""The shape issue 8 gave discovery: `_scan` a short run of named phases, every function small.

In `daemon/discovery/`: no function longer than 120 lines, none above cyclomatic complexity
15 (radon; the project-wide limit is 25), `_scan` itself under 40 lines, and no value read by
position from a tuple of more than three items (`result[5]`), the shape the phases replaced.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

DISCOVERY = Path(__file__).resolve().parents[2] / "daemon" / "discovery"


def functions() -> Iterator[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for path in sorted(DISCOVERY.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node


def length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    return (node.end_lineno or node.lineno) - node.lineno + 1


def test_no_discovery_function_is_long_and_scan_is_short() -> None:
    long = {f"{path.name} {node.name}" for path, node in functions() if length(node) > 120}
    assert long == set()
    (scan,) = [node for path, node in functions() if node.name == "_scan"]
    assert length(scan) < 40


def test_no_discovery_function_is_above_complexity_15() -> None:
    radon = pytest.importorskip("radon.complexity", reason="pip install radon")
    complex_ = {
        f"{path.name} {function.name} {function.complexity}"
        for path in sorted(DISCOVERY.glob("*.py"))
        for block in radon.cc_visit(path.read_text())
        for function in [block, *getattr(block, "methods", [])]
        if function.complexity > 15
    }
    assert complex_ == set()


def test_no_discovery_value_is_read_by_a_position_past_the_third() -> None:
    by_position = {
        f"{path.name}:{node.lineno}"
        for path, function in functions()
        for node in ast.walk(function)
        if isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, int)
        and not isinstance(node.slice.value, bool)
        and node.slice.value >= 3
    }
    assert by_position == set()
