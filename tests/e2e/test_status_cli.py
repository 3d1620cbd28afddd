"""`ckptd status` through the real CLI: tables for people, JSON for scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.configs import write_config
from tests.layouts_fixtures import well_formed_bytes


def write_checkpoints(root: Path, steps: range, *, size: int = 100_000) -> None:
    now = time.time()
    for index, step in enumerate(steps):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(
            well_formed_bytes("model.safetensors", size, random=True)
        )
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        # One save an hour, the newest an hour ago.
        moment = now - 3600.0 * (len(steps) - index)
        for path in [*folder.iterdir(), folder]:
            os.utime(path, (moment, moment))
    incomplete = root / f"checkpoint-{steps.stop}"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"partial")


def test_status_json_and_tables(
    ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "current_model"
    write_checkpoints(root, range(100, 5100, 100))  # 50 checkpoints at a 100-step cadence
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        timezone="Europe/Berlin",
        layout="hf",
        snapshots={"dir": tmp_path / "snapshots"},
    )
    result = subprocess.run(
        [*ckptd_command, "status", "--config", str(config), "--json"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    (root_status,) = document["roots"]
    assert root_status["root"] == str(root)
    assert root_status["checkpoints"] == 51
    # Balanced: 20 in tier 1, every other one of the next 20 in tier 2, 1000-step tier 3.
    assert root_status["tiers"]["1"] == 20
    assert root_status["tiers"]["2"] == 10
    assert root_status["incomplete"] == ["checkpoint-5100"]
    assert root_status["cadence"] == {"default": 100} or 100 in root_status["cadence"].values()
    forecast = root_status["forecast"]
    assert forecast["saves_per_day"] == pytest_approx(24.0)
    assert forecast["days_until_full_without"] > 0
    # 100 KB a save and tens of GB free: with the policy not within the 100-year horizon.
    with_policy = forecast["days_until_full_with"]
    assert with_policy is None or with_policy > forecast["days_until_full_without"]
    assert 0 < forecast["bytes_per_day_with"] < forecast["bytes_per_day_without"]
    (filesystem,) = document["filesystems"]
    usage = shutil.disk_usage(root)
    # Other processes write meanwhile: the same filesystem, roughly the same free space.
    assert filesystem["total_bytes"] == usage.total
    assert abs(filesystem["free_bytes"] - usage.free) < 0.05 * usage.total
    assert 0 < filesystem["used_percent"] < 100
    schedule = document["schedule"]
    assert schedule["daemon_running"] is False
    assert schedule["next"]["snapshot"]

    tables = subprocess.run(
        [*ckptd_command, "status", "--config", str(config)],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tables.returncode == 0, tables.stderr
    for expected in (str(root), "tier 1 20", "filesystems", "days to full", "snapshot"):
        assert expected in tables.stdout, expected


def test_status_shows_the_running_daemons_state(
    ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "run"
    write_checkpoints(root, range(1, 4))
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text(
        json.dumps(
            {
                "pid": os.getpid(),  # a live process stands in for the daemon
                "last_prune": {"time": "2026-06-01T02:00:00+00:00", "deleted": 7},
                "last_snapshot": {"time": "2026-06-01T01:00:00+00:00", "date": "2026-06-01"},
                "last_disk_check": {"time": "2026-06-01T02:55:00+00:00", "level": "ok"},
                "next": {
                    "prune": "2026-06-07T02:00:00+00:00",
                    "snapshot": "2026-06-02T01:00:00+00:00",
                },
            }
        )
    )
    config = write_config(tmp_path / "config.yaml", [root], state_dir=state)
    result = subprocess.run(
        [*ckptd_command, "status", "--config", str(config), "--json"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    schedule = json.loads(result.stdout)["schedule"]
    assert schedule["daemon_running"] is True
    assert schedule["last_prune"]["deleted"] == 7
    assert schedule["next"]["prune"] == "2026-06-07T02:00:00+00:00"
    assert schedule["next"]["snapshot"] == "2026-06-02T01:00:00+00:00"


def pytest_approx(value: float) -> object:
    import pytest

    return pytest.approx(value, rel=0.01)


def test_status_names_checkpoints_a_process_holds(
    ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    import sys

    root = tmp_path / "run"
    write_checkpoints(root, range(100, 600, 100))
    config = write_config(tmp_path / "config.yaml", [root], state_dir=tmp_path)
    held = root / "checkpoint-300" / "model.safetensors"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time; f = open({str(held)!r}, 'rb'); print('open', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        result = subprocess.run(
            [*ckptd_command, "status", "--config", str(config), "--json"],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["roots"][0]["in_use"] == ["checkpoint-300"]
