"""Disk pressure end to end: a trainer fills a 64 MB tmpfs far faster than any weekly prune,
the disk checks keep it below critical, the trainer never sees ENOSPC, and the history shows
the escalation (disk_critical -> disk_prune -> emergency_prune)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MB = 1 << 20

TRAINER = textwrap.dedent(
    """
    import errno, json, os, sys, time
    root, count = sys.argv[1], int(sys.argv[2])
    interval, size = float(sys.argv[3]), int(sys.argv[4])
    payload = os.urandom(size)
    for index in range(1, count + 1):
        step = index * 100
        folder = os.path.join(root, f"checkpoint-{step}")
        try:
            os.makedirs(folder)
            with open(os.path.join(folder, "model.safetensors"), "wb") as handle:
                handle.write(payload)
            # Hugging Face writes trainer_state.json last: it marks the checkpoint complete.
            with open(os.path.join(folder, "trainer_state.json"), "w") as handle:
                json.dump({"global_step": step}, handle)
        except OSError as error:
            print(f"trainer: {error}", flush=True)
            sys.exit(3 if error.errno == errno.ENOSPC else 4)
        time.sleep(interval)
    print("trainer: done", flush=True)
    """
)


@pytest.fixture
def tmpfs64(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point = tmp_path / "tmpfs"
    point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_disk_checks_keep_a_fast_trainer_off_enospc(tmpfs64: Path, tmp_path: Path) -> None:
    from daemon.config import load_config
    from daemon.disk import check_disks
    from daemon.history import HistoryLog
    from daemon.pruning import prune_root

    root = tmpfs64 / "current_model"
    root.mkdir()
    history_file = tmp_path / "history.jsonl"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"""\
timezone: UTC
state_dir: {tmp_path / "state"}
history_file: {history_file}
defaults:
  settle_seconds: 0.05
  min_keep: 3
  trash: {{grace: 0s}}
roots:
  - path: {root}
    layout: hf
prune:
  schedule: "0 4 * * sun"
snapshots:
  enabled: false
disk:
  interval: 0.1s
  warn_percent: 60
  critical_percent: 75
  emergency: {{preset: aggressive}}
"""
    )
    config = load_config(str(config_file))
    history = HistoryLog(config.history_path)
    # 2 MB every 0.25 s: 64 MB would be full in 8 s, a weekly prune comes in 7 days; the
    # balanced policy alone keeps 30 checkpoints (60 MB, 94 %): only the emergency policy fits.
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(root), "60", "0.25", str(2 * MB)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    highest = 0.0
    deadline = time.monotonic() + 40
    try:
        while trainer.poll() is None and time.monotonic() < deadline:
            check_disks(config, now=time.time(), history=history, prune=prune_root)
            usage = shutil.disk_usage(tmpfs64)
            highest = max(highest, 100.0 * usage.used / usage.total)
            time.sleep(0.1)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        output = trainer.communicate(timeout=10)[0]
    assert trainer.returncode == 0, output
    assert "done" in output
    assert highest < 100.0

    records = [json.loads(line) for line in history_file.read_text().splitlines()]
    events = [record["event"] for record in records]
    first_critical = events.index("disk_critical")
    assert "disk_prune" in events[first_critical:]
    first_emergency = events.index("emergency_prune")
    assert first_critical < events.index("disk_prune", first_critical) < first_emergency
    # Pruning deleted real checkpoints, each one a history record.
    assert sum(1 for event in events if event == "delete") >= 10
    # The newest checkpoint survived, and never fewer than min_keep.
    remaining = sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*"))
    assert remaining[-1] == 6000
    assert len(remaining) >= 3
