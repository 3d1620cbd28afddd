"""Field tests: ckptd installed as the README says, under a real systemd in a container.

They take a minute or more and need root, so a plain `pytest` skips them (with the command that runs
them); `CKPTD_CONTAINER_TESTS=1` runs them. Each one's timings are printed at the end of the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

RUN_COMMAND = "sudo CKPTD_CONTAINER_TESTS=1 .venv/bin/python -m pytest -m slow tests/field"
TIMINGS = pytest.StashKey[list[str]]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("container") and os.environ.get("CKPTD_CONTAINER_TESTS") != "1":
        pytest.skip(f"boots systemd in a container (root, about a minute): run `{RUN_COMMAND}`")


@pytest.fixture
def timing(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Record a line for the summary at the end of the run (shown even when the test passes)."""
    lines = request.config.stash.setdefault(TIMINGS, [])

    def record(line: str) -> None:
        lines.append(f"{request.node.name}: {line}")
        print(line)

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(TIMINGS, [])
    if lines:
        terminalreporter.section("container test timings")
        for line in lines:
            terminalreporter.write_line(line)
