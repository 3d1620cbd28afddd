"""`--quiet` for cron: nothing on stdout when the command succeeds; the usual output when it
does not (so cron mails only trouble); a prune that would have to ask is refused instead."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

OLD = time.time() - 3600


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    for step in range(10, 310, 10):
        checkpoint = folder / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "model.safetensors").write_bytes(b"x" * 100)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for path in [*checkpoint.iterdir(), checkpoint]:
            os.utime(path, (OLD, OLD))
    return folder


def run(
    command: list[str], env: dict[str, str], *arguments: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *arguments], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_quiet_prune_prints_nothing_and_deletes(
    root: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    loud = run(ckptd_command, cli_env, "prune", str(root), "--dry-run")
    assert loud.returncode == 0 and loud.stdout.strip()
    for arguments in (("--quiet", "prune", str(root), "-y"), ("prune", str(root), "-y", "-q")):
        before = len(list(root.glob("checkpoint-*")))
        result = run(ckptd_command, cli_env, *arguments)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        assert arguments[0] != "--quiet" or len(list(root.glob("checkpoint-*"))) < before


def test_quiet_prune_without_yes_is_refused_before_anything(
    root: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    before = sorted(p.name for p in root.iterdir())
    result = run(ckptd_command, cli_env, "prune", str(root), "--quiet")
    assert result.returncode == 2
    assert "--quiet needs -y" in result.stderr
    assert sorted(p.name for p in root.iterdir()) == before


def test_quiet_shows_the_output_of_a_command_that_did_not_succeed(
    root: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    # This process holds the newest checkpoint: the prune is refused (exit 3), and the quiet
    # run prints what a loud one would have.
    with (root / "checkpoint-300" / "model.safetensors").open("rb"):
        loud = run(ckptd_command, cli_env, "prune", str(root), "-y")
        quiet = run(ckptd_command, cli_env, "--quiet", "prune", str(root), "-y")
    assert loud.returncode == quiet.returncode == 3
    assert (
        quiet.stdout == loud.stdout and "holds the newest checkpoint" in quiet.stdout + quiet.stderr
    )
