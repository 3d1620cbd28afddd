"""A `trainer.pid_file` that does not exist (or names a dead process) does not switch off "the
trainer holds the newest, the root waits": the trainer is found automatically instead, and
prune, status and check-config say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.configs import write_config

OLD = time.time() - 3 * 3600


def make_hf_root(root: Path, steps: range) -> None:
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"m" * 1000)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for path in (*folder.iterdir(), folder):
            os.utime(path, (OLD, OLD))


def run(
    command: list[str], arguments: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture
def trainer_in_newest(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """A root of 30 checkpoints, a process with its working folder in the newest, and a config
    whose pid file (kept from the example) does not exist."""
    root = tmp_path / "run"
    make_hf_root(root, range(100, 3100, 100))
    pid_file = tmp_path / "run" / ".." / "current_model.pid"
    config = write_config(
        tmp_path / "ckptd.yaml",
        [root],
        root_settings={"trainer": {"pid_file": os.path.normpath(pid_file)}},
    )
    trainer = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
        cwd=root / "checkpoint-3000",
        stdout=subprocess.PIPE,
    )
    assert trainer.stdout is not None and trainer.stdout.readline() == b"ready\n"
    try:
        yield root, config, trainer
    finally:
        trainer.kill()
        trainer.wait()


NOTE = "pid_file {} does not exist: the trainer is found automatically"


def test_a_missing_pid_file_still_refuses_while_the_trainer_holds_the_newest(
    trainer_in_newest: tuple[Path, Path, subprocess.Popen[bytes]],
    ckptd_command: list[str],
    cli_env: dict[str, str],
) -> None:
    root, config, trainer = trainer_in_newest
    pid_file = config.parent / "current_model.pid"
    for arguments in (["prune", "--dry-run"], ["prune", "-y"]):
        result = run(ckptd_command, [*arguments, "-c", str(config)], cli_env)
        assert result.returncode == 3, result.stdout + result.stderr
        assert f"the trainer pid {trainer.pid}" in result.stderr
        assert NOTE.format(pid_file) in " ".join(result.stdout.split())
    assert len(list(root.glob("checkpoint-*"))) == 30
    status = run(ckptd_command, ["status", "-c", str(config), "--json"], cli_env)
    assert status.returncode == 0, status.stderr
    (note,) = json.loads(status.stdout)["roots"][0]["trainer"]
    assert NOTE.format(pid_file) in note
    checked = run(ckptd_command, ["check-config", str(config)], cli_env)
    assert checked.returncode == 0, checked.stderr
    assert (
        "note: the pid file does not exist: until it names a running process the trainer is "
        "found automatically"
    ) in checked.stdout


def test_check_config_notes_missing_roots_and_an_alert_that_cannot_run(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    script = tmp_path / "notify-ops"
    script.write_text("#!/bin/sh\nexit 0\n")  # not executable
    (tmp_path / "here").mkdir()
    config = write_config(
        tmp_path / "ckptd.yaml",
        [tmp_path / "runs" / "not-yet", tmp_path / "here"],
        state_dir=None,
        disk={"alert": f"{script} --now"},
    )
    result = run(ckptd_command, ["check-config", str(config)], cli_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    missing = str(tmp_path / "runs" / "not-yet")
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(missing))
    assert lines[at + 1].strip().startswith("note: does not exist yet")
    assert sum("does not exist yet" in line for line in lines) == 1
    assert f"note: the alert command cannot run: {script} is not executable" in result.stdout
    script.chmod(0o755)
    assert "alert command" not in run(ckptd_command, ["check-config", str(config)], cli_env).stdout
    config.write_text(config.read_text().replace(str(script), str(tmp_path / "gone")))
    gone = run(ckptd_command, ["check-config", str(config)], cli_env)
    assert f"note: the alert command cannot run: {tmp_path / 'gone'} does not exist" in gone.stdout
