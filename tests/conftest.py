"""Fixtures shared by every test: a thread-leak check and the installed CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running: a daemon that leaks threads leaks forever."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [
            thread for thread in threading.enumerate() if thread not in before and thread.is_alive()
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads leaked by this test: {[t.name for t in leaked]}"


@pytest.fixture(scope="session")
def ckptd_command() -> list[str]:
    """The CLI as an installed user runs it: the `ckptd` console script beside this Python."""
    script = Path(sys.executable).parent / "ckptd"
    if script.exists():
        return [str(script)]
    found = shutil.which("ckptd")
    if found:
        return [found]
    # Not installed (a developer running from the checkout): the same entry point as a module.
    return [sys.executable, "-m", "daemon"]


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """An environment for CLI subprocesses that never reads the machine's real config."""
    environment = dict(os.environ)
    environment["CKPTD_CONFIG"] = str(tmp_path / "no-such-config.yaml")
    environment.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    environment["NO_COLOR"] = "1"
    environment["COLUMNS"] = "120"
    return environment


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount small tmpfs filesystems under tmp_path: `tmpfs(size_bytes) -> mount point`.

    A real, small filesystem for disk-full and disk-pressure tests; skipped (with the reason)
    where not root or where mount fails. Every mount is lazily unmounted afterwards.
    """
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
