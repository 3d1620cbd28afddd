"""A missing or stale `trainer.pid_file` falls back to finding the trainer automatically (or by
`trainer.cmdline`), says so in the facts' notes, and logs it once."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.safety import facts as proc_facts

NOW = 1_800_000_000.0


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process with its working folder in `run/checkpoint-300`."""
    folder = tmp_path / "run" / "checkpoint-300"
    folder.mkdir(parents=True)
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
        cwd=folder,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_missing_pid_file_finds_the_trainer_automatically_and_says_so_once(
    tmp_path: Path, holder: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    pid_file = tmp_path / "gone.pid"
    caplog.set_level(logging.WARNING, logger="ckptd.safety")
    for _ in range(2):
        facts = proc_facts.gather_facts(
            str(tmp_path / "run"), now=NOW, trainer_pid_file=str(pid_file)
        )
        assert holder.pid in {identity.pid for identity in facts.trainers}
        assert (
            f"trainer.pid_file {pid_file} does not exist: the trainer is found automatically "
            "(processes using files under the root)"
        ) in facts.notes
    logged = [record for record in caplog.records if str(pid_file) in record.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING


def test_a_pid_file_naming_a_dead_process_falls_back_to_the_cmdline(
    tmp_path: Path, holder: subprocess.Popen[bytes]
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file = tmp_path / "stale.pid"
    pid_file.write_text(f"{dead.pid}\n")
    facts = proc_facts.gather_facts(
        str(tmp_path / "run"),
        now=NOW,
        trainer_pid_file=str(pid_file),
        trainer_cmdline=r"time\.sleep\(60\)",
    )
    assert {identity.pid for identity in facts.trainers} == {holder.pid}
    assert any(
        f"names pid {dead.pid}, which is not running: the trainer is found by trainer.cmdline"
        in note
        for note in facts.notes
    )
    # A pid file naming the running trainer is used as it is, with nothing to say.
    pid_file.write_text(f"{holder.pid}\n")
    named = proc_facts.gather_facts(str(tmp_path / "run"), now=NOW, trainer_pid_file=str(pid_file))
    assert {identity.pid for identity in named.trainers} == {holder.pid}
    assert not any(note.startswith("trainer") for note in named.notes)
