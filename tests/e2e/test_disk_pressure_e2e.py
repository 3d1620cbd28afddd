"""Disk pressure end to end: a trainer (its own process) fills a 64 MB tmpfs far faster than
any weekly prune, the disk checks keep it below critical, the trainer never sees ENOSPC, and the
history shows the escalation (disk_critical -> disk_prune -> emergency_prune).

Twice: with the daemon (`ckptd run`, its 1 s disk-check job) and with `check_disks` called in a
loop, as that job calls it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.configs import write_config

MB = 1 << 20
SAVES = 40  # 80 MB into 64 MB: without the disk checks, ENOSPC after about 8 s
# Only the disk checks act: the weekly prune is days away and new checkpoints trigger nothing
# (tests/configs.py writes the rest; the disk's `interval` is given by each test).
PRESSURE: dict[str, Any] = {
    "timezone": "UTC",
    "log": {"level": "warning"},
    "settle_seconds": 0.05,
    "min_keep": 3,
    "grace": "0s",
    "layout": "hf",
    "prune": {"schedule": "0 4 * * sun", "on_new_checkpoint": False},
}
LADDER = {"warn_percent": 60, "critical_percent": 75, "emergency": {"preset": "aggressive"}}


REPOSITORY = Path(__file__).resolve().parents[2]

# The weights are a well-formed file (tests/layouts_fixtures.py): ckptd keeps a corrupt one.
TRAINER = f"import sys; sys.path.insert(0, {str(REPOSITORY)!r})\n" + textwrap.dedent(
    """
    import errno, json, os, sys, time
    from tests.layouts_fixtures import well_formed_bytes
    root, count = sys.argv[1], int(sys.argv[2])
    interval, size = float(sys.argv[3]), int(sys.argv[4])
    payload = well_formed_bytes("model.safetensors", size, random=True)
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
def tmpfs64(tmpfs: Callable[[int], Path]) -> Path:
    return tmpfs(64 * 1024 * 1024)


def start_trainer(root: Path, tmp_path: Path) -> subprocess.Popen[str]:
    # 2 MB every 0.25 s: 64 MB would be full in 8 s, a weekly prune comes in 7 days; the
    # balanced policy alone keeps 30 checkpoints (60 MB, 94 %): only the emergency policy fits.
    return subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(root), str(SAVES), "0.25", str(2 * MB)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )


def check_outcome(
    trainer: subprocess.Popen[str], output: str, highest: float, root: Path, history: Path
) -> None:
    assert trainer.returncode == 0, output
    assert "done" in output
    assert highest < 100.0
    records = [json.loads(line) for line in history.read_text().splitlines()]
    events = [record["event"] for record in records]
    first_critical = events.index("disk_critical")
    first_emergency = events.index("emergency_prune")
    assert first_critical < events.index("disk_prune", first_critical) < first_emergency
    # Pruning deleted real checkpoints, each one a history record.
    assert sum(1 for event in events if event == "delete") >= 10
    # The newest checkpoint survived, and never fewer than min_keep.
    remaining = sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*"))
    assert remaining[-1] == SAVES * 100
    assert len(remaining) >= 3


def test_the_daemon_keeps_a_fast_trainer_off_enospc(
    tmpfs64: Path, tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    """`ckptd run` with a 1 s disk check (the scheduler's shortest interval)."""
    root = tmpfs64 / "current_model"
    root.mkdir()
    config_file = write_config(
        tmp_path / "config.yaml",
        [root],
        history_file=tmp_path / "history.jsonl",
        disk={"interval": "1s", **LADDER},
        **PRESSURE,
    )
    daemon = subprocess.Popen(
        [*ckptd_command, "run", "--config", str(config_file)],
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "state" / "state.json").exists() and time.monotonic() < deadline:
            assert daemon.poll() is None, daemon.communicate()[1]
            time.sleep(0.05)
        trainer = start_trainer(root, tmp_path)
        highest = 0.0
        deadline = time.monotonic() + 40
        while trainer.poll() is None and time.monotonic() < deadline:
            usage = shutil.disk_usage(tmpfs64)
            highest = max(highest, 100.0 * usage.used / usage.total)
            time.sleep(0.05)
        if trainer.poll() is None:
            trainer.kill()
        output = trainer.communicate(timeout=10)[0]
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    check_outcome(trainer, output, highest, root, tmp_path / "history.jsonl")


def test_disk_checks_keep_a_fast_trainer_off_enospc(tmpfs64: Path, tmp_path: Path) -> None:
    """`check_disks` called every 0.1 s, as the daemon's job does, with the real prune_root."""
    from daemon.config import load_config
    from daemon.disk.pressure import check_disks
    from daemon.history.log import HistoryLog
    from daemon.pruning.pipeline import prune_root

    root = tmpfs64 / "current_model"
    root.mkdir()
    config = load_config(
        str(
            write_config(
                tmp_path / "config.yaml",
                [root],
                history_file=tmp_path / "history.jsonl",
                disk={"interval": "0.1s", **LADDER},
                **PRESSURE,
            )
        )
    )
    history = HistoryLog(config.history_path)
    trainer = start_trainer(root, tmp_path)
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
    check_outcome(trainer, output, highest, root, tmp_path / "history.jsonl")
