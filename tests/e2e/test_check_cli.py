"""`ckptd check` through the real CLI, against a real `ckptd run` subprocess: one Nagios line,
exit codes 0 OK / 1 WARNING / 2 CRITICAL / 3 UNKNOWN, --json and --quiet.

The daemon runs with one config; `ckptd check` is given variants of it (same roots and
state_dir, other thresholds) to reach each finding without waiting for days or filling a disk.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.state import read_state
from tests.configs import rotation, write_config
from tests.layouts_fixtures import well_formed_bytes

OLD = time.time() - 3600


def make_checkpoint(root: Path, step: int) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "optimizer.pt"):
        (folder / name).write_bytes(well_formed_bytes(name, 1000))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (OLD, OLD))
    return folder


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


class Setup:
    """A root of 6 old checkpoints, a state folder, the daemon's config, and helpers to run
    `ckptd check` with that config changed."""

    def __init__(self, tmp_path: Path, command: list[str], env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.command = command
        self.env = dict(env)
        repository = str(Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = os.pathsep.join([repository, env.get("PYTHONPATH", "")])
        self.root, self.state = tmp_path / "run", tmp_path / "state"
        self.root.mkdir()
        for step in range(10, 70, 10):
            make_checkpoint(self.root, step)
        # The daemon's config (tests/configs.py writes it); `check` varies it.
        self.settings: dict[str, Any] = {
            "state_dir": self.state,
            "timezone": "UTC",
            "log": {"level": "info", "format": "json"},
            "policy": rotation(3),
            "settle_seconds": 0.5,
            "grace": "0s",
            "layout": "hf",
            "disk": {"interval": "1h"},
        }
        self.config = write_config(tmp_path / "config.yaml", [self.root], **self.settings)
        self.daemon: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.tmp_path / "daemon.log").open("w")
        self.daemon = subprocess.Popen(
            [*self.command, "run", "--config", str(self.config)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.tmp_path,
        )
        log.close()

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            assert self.daemon.wait(30) == 0

    def check(self, *options: str, **changes: Any) -> subprocess.CompletedProcess[str]:
        """Run `ckptd check` with the daemon's config, its sections in `changes` replaced."""
        config = self.config
        if changes:
            settings = {**self.settings, **changes}
            config = write_config(self.tmp_path / "check.yaml", [self.root], **settings)
        return subprocess.run(
            [*self.command, "check", "--config", str(config), *options],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def log(self) -> str:
        return (self.tmp_path / "daemon.log").read_text()[-3000:]


@pytest.fixture
def setup(tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]) -> Iterator[Setup]:
    prepared = Setup(tmp_path, ckptd_command, cli_env)
    try:
        yield prepared
    finally:
        prepared.stop()


def test_unknown_without_a_readable_config(setup: Setup) -> None:
    result = subprocess.run(
        [*setup.command, "check"], env=setup.env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 3, result
    assert result.stdout.startswith("CKPTD UNKNOWN - config "), result.stdout
    assert "no-such-config.yaml" in result.stdout
    assert len(result.stdout.splitlines()) == 1


def test_critical_when_the_daemon_never_ran(setup: Setup) -> None:
    result = setup.check()
    assert result.returncode == 2, result
    assert result.stdout.startswith("CKPTD CRITICAL - daemon not running (no "), result.stdout
    assert "state.json" in result.stdout


@pytest.mark.slow
def test_ok_then_each_finding_then_critical_when_stopped(setup: Setup) -> None:
    setup.start()
    assert wait_until(lambda: bool(read_state(str(setup.state)).get("prune_success")), 30), (
        setup.log()
    )

    # Readable by a monitoring user, not only by the daemon's.
    assert (setup.state / "state.json").stat().st_mode & 0o777 == 0o644
    result = setup.check()
    assert result.returncode == 0, (result, setup.log())
    line = result.stdout.strip()
    assert re.fullmatch(
        r"CKPTD OK - 1 root, disk \d+% \(/[^)]*\), last prune \d+s ago, daemon up \d+s"
        r" \| '/[^']*'=[\d.]+%;85;95;0;100",
        line,
    ), line

    document = json.loads(setup.check("--json").stdout)
    assert document["status"] == "OK" and document["exit_code"] == 0
    assert document["problems"] == []
    assert document["daemon"]["running"] is True
    assert setup.daemon is not None and document["daemon"]["pid"] == setup.daemon.pid
    assert document["roots"][0]["root"] == str(setup.root.resolve())

    quiet = setup.check("--quiet")
    assert (quiet.returncode, quiet.stdout) == (0, "")

    # No successful prune for longer than check.max_prune_age: WARNING (printed even --quiet).
    time.sleep(1.2)
    stale = setup.check("--quiet", check={"max_prune_age": "1s"})
    assert stale.returncode == 1, stale
    assert stale.stdout.startswith(f"CKPTD WARNING - no successful prune of {setup.root} for "), (
        stale.stdout
    )
    assert "(check.max_prune_age 1s)" in stale.stdout

    # The disk above warn_percent, then above critical_percent.
    for disk, code, word in (
        ({"interval": "1h", "warn_percent": 0.001}, 1, "WARNING"),
        ({"interval": "1h", "warn_percent": 0.001, "critical_percent": 0.002}, 2, "CRITICAL"),
    ):
        result = setup.check("--json", disk=disk)
        document = json.loads(result.stdout)
        assert (result.returncode, document["status"]) == (code, word), result
        assert re.match(rf"CKPTD {word} - disk \d+% used on /", document["line"])

    # No snapshot today after snapshots.at (+ grace): WARNING; today's folder there: OK.
    snapshots = setup.tmp_path / "snapshots"
    snapshots.mkdir()
    enabled = {"dir": snapshots, "at": "00:00"}
    grace = {"snapshot_grace": "0s"}
    missing = setup.check(check=grace, snapshots=enabled)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert missing.returncode == 1, missing
    assert f"no snapshot for {today} (due 00:00)" in missing.stdout
    (snapshots / today).mkdir()
    present = setup.check(check=grace, snapshots=enabled)
    assert present.returncode == 0, present
    assert f"snapshot {today}" in present.stdout

    # The daemon stopped: its pid is gone. CRITICAL.
    pid = setup.daemon.pid if setup.daemon else 0
    setup.stop()
    stopped = setup.check()
    assert stopped.returncode == 2, stopped
    assert stopped.stdout.startswith(f"CKPTD CRITICAL - daemon not running (pid {pid} is gone)")


@pytest.mark.slow
def test_a_root_refused_for_longer_than_max_refused_age(setup: Setup) -> None:
    # This test process holds the newest checkpoint: with no trainer configured, any holder is
    # the trainer, and the daemon refuses the root until it lets go.
    newest = setup.root / "checkpoint-60" / "model.safetensors"
    with newest.open("rb"):
        setup.start()
        assert wait_until(lambda: bool(read_state(str(setup.state)).get("refused")), 30), (
            setup.log()
        )
        within = setup.check(check={"max_refused_age": "1h"})
        assert within.returncode == 0, within
        time.sleep(1.2)
        refused = setup.check("--json", check={"max_refused_age": "1s"})
        document = json.loads(refused.stdout)
        assert refused.returncode == 1, refused
        assert document["status"] == "WARNING"
        [problem] = document["problems"]
        assert problem["level"] == "WARNING"
        assert problem["message"].startswith(f"{setup.root} refused for ")
        assert "holds the newest checkpoint checkpoint-60" in problem["message"]
    # Let go: the daemon's retry prunes, the refusal clears.
    assert wait_until(lambda: not read_state(str(setup.state)).get("refused"), 30), setup.log()
    cleared = setup.check(check={"max_refused_age": "1s"})
    assert cleared.returncode == 0, cleared
    assert sorted(p.name for p in setup.root.glob("checkpoint-*")) == [
        "checkpoint-40",
        "checkpoint-50",
        "checkpoint-60",
    ]
