"""Adversarial checks of the long-running daemon: resources running out, reloads, stopping."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]

_WATCH_WITHOUT_INOTIFY = textwrap.dedent(
    """
    import json, os, queue, sys, time
    from daemon.logs import configure_logging
    from daemon.watcher import Watcher, WatchEvent
    configure_logging("info", "json")
    root = sys.argv[1]
    events = queue.Queue()
    watcher = Watcher(events)
    watcher.set_roots([(root, "inotify")])
    for _ in range(20):  # ten seconds' worth of the service's ticks
        watcher.check()
        time.sleep(0.02)
    os.mkdir(os.path.join(root, "checkpoint-1"))
    seen = False
    deadline = time.monotonic() + 8
    while not seen and time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            watcher.check()
            continue
        seen = isinstance(event, WatchEvent) and event.path.endswith("checkpoint-1")
    watcher.stop()
    print(json.dumps({"seen": seen, "present": watcher.roots_present()}))
    """
)


def test_inotify_watch_limit_falls_back_to_polling_and_logs_once(tmp_path: Path) -> None:
    """inotify_add_watch failing with ENOSPC (a real limit of 0 watches, set in a user namespace
    of our own so the machine's limit is untouched): the root is polled, a new checkpoint is
    still noticed, and the failure is logged once, not at every tick."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is missing")
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            "echo 0 > /proc/sys/user/max_inotify_watches",
        ],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with its own inotify limit: {probe.stderr!r}")
    root = tmp_path / "run"
    root.mkdir()
    result = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            'echo 0 > /proc/sys/user/max_inotify_watches && exec "$0" -c "$1" "$2"',
            sys.executable,
            _WATCH_WITHOUT_INOTIFY,
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPOSITORY,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    log_events = [json.loads(line)["event"] for line in result.stderr.splitlines() if line]
    assert "inotify watch limit reached" in result.stderr
    assert outcome["seen"], result.stderr
    # One fallback line per folder (the root and its parent), not one per tick.
    assert log_events.count("watch_fallback") == 2, log_events
    assert "watch_failed" not in log_events, log_events
