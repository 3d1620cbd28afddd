"""Issue 10: a training user attacks ckptd (root) through the root she owns; nothing outside
any root may change.

Each test runs one attack of tests/hostile/attacks.py as a real unprivileged user — the races
for `CKPTD_RACE_SECONDS` (default 1.5 s) of tight swapping loops, at least five trials — and
checks the checksums of a sentinel tree outside the root after every trial; then what ckptd
told about it (the refusal, in the history once, in `ckptd status`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from daemon.history.log import HistoryLog, read_records
from daemon.pruning import trash
from daemon.rootdir import IdentityStore
from tests.configs import write_config
from tests.hostile.attacks import (
    ATTACKS,
    RACES,
    Arena,
    fill_root,
    fingerprint,
)
from tests.hostile.conftest import RACE_SECONDS

pytestmark = pytest.mark.hostile


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_no_attack_changes_anything_outside_the_root(arena: Arena, name: str) -> None:
    outcome = ATTACKS[name](arena, RACE_SECONDS if name in RACES else 0.0)
    assert outcome.trials >= 1
    assert outcome.outside_changes == 0, (
        f"{name}: {outcome.outside_changes} of {outcome.trials} trials changed files outside "
        f"the root: {outcome.changes[:10]}"
    )


def test_a_symlinked_trash_is_refused_once_in_the_history_and_shown_in_status(
    arena: Arena, ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    fill_root(arena, range(100, 500, 100))
    arena.as_attacker(
        "import os, sys; os.symlink(sys.argv[1], 'run/.ckptd-trash')",
        str(arena.outside / "decoy-trash"),
    )
    history = HistoryLog(str(arena.state / "history.jsonl"))
    first = arena.prune(history)
    second = arena.prune(history)
    history.close()
    for report in (first, second):
        assert report.refused is not None and not report.refusal_transient
        assert ".ckptd-trash is a symlink to" in report.refused
        assert report.deleted == ()
    assert sorted(p.name for p in arena.root.iterdir() if p.name.startswith("checkpoint")) == [
        f"checkpoint-{step}" for step in range(100, 500, 100)
    ]
    # Recorded once, not on every retry of the daemon.
    refusals = [r for r in read_records(history.path) if r["event"] == "prune_refused"]
    assert len(refusals) == 1 and ".ckptd-trash" in refusals[0]["reason"]
    assert not (arena.outside / "decoy-trash" / ".lock").exists()
    # `ckptd status` says it until it is fixed.
    config = write_config(
        tmp_path / "config.yaml", [arena.root], state_dir=arena.state, layout="hf"
    )
    shown = subprocess.run(
        [*ckptd_command, "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=60,
    )
    assert shown.stdout, shown.stderr
    (root_status,) = json.loads(shown.stdout)["roots"]
    assert ".ckptd-trash is a symlink" in root_status["refused"]
    # Moved away by a person: ckptd makes its own trash and prunes again.
    os.unlink(arena.root / ".ckptd-trash")
    third = arena.prune()
    assert third.refused is None and len(third.deleted) == 3
    status = os.lstat(arena.root / ".ckptd-trash")
    assert status.st_uid == os.geteuid() and status.st_mode & 0o777 == 0o700
    assert IdentityStore(str(arena.state)).refusals() == {}


def test_a_trash_folder_of_the_root_owner_is_never_used(arena: Arena) -> None:
    fill_root(arena, range(100, 500, 100))
    arena.as_attacker(
        "import os, sys; os.mkdir('run/.ckptd-trash'); "
        "os.symlink(sys.argv[1], 'run/.ckptd-trash/.lock')",
        str(arena.outside / "etc" / "nologin"),
    )
    report = arena.prune()
    assert report.refused is not None
    assert f"owned by uid {arena.attacker.uid}" in report.refused
    assert not os.path.lexists(arena.outside / "etc" / "nologin")
    with pytest.raises(trash.TrashRefused):
        trash.list_trash(str(arena.root))


def test_a_root_swapped_for_a_symlink_is_refused_with_its_identities(
    arena: Arena, ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    fill_root(arena, range(100, 400, 100))
    config = write_config(
        tmp_path / "config.yaml",
        [arena.root],
        state_dir=arena.state,
        settle_seconds=1,
        max_delete_fraction=1.0,
        layout="hf",
    )
    command = [*ckptd_command, "prune", "--config", str(config), "-y"]
    first = subprocess.run(command, capture_output=True, text=True, env=cli_env, timeout=60)
    assert first.returncode == 0, first.stderr
    before = fingerprint(arena.outside)
    arena.as_attacker(
        "import os, sys; os.rename('run', 'run.real'); os.symlink(sys.argv[1], 'run')",
        str(arena.outside / "other-run"),
    )
    swapped = subprocess.run(command, capture_output=True, text=True, env=cli_env, timeout=60)
    assert swapped.returncode == 3
    assert "root identity changed" in swapped.stderr
    assert f"owned by uid {arena.attacker.uid}" in swapped.stderr  # what it was
    assert "owned by uid 0" in swapped.stderr  # what it is now
    assert "ckptd forget-root" in swapped.stderr
    assert fingerprint(arena.outside) == before
    # An admin who re-created the root on purpose acknowledges it; then it is pruned again.
    os.unlink(arena.home / "run")
    (arena.home / "run").mkdir()
    fill_root(arena, range(500, 800, 100))
    refused = subprocess.run(command, capture_output=True, text=True, env=cli_env, timeout=60)
    assert refused.returncode == 3
    forget = subprocess.run(
        [*ckptd_command, "forget-root", str(arena.root), "--config", str(config)],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=60,
    )
    assert forget.returncode == 0, forget.stderr
    assert "forgot" in forget.stdout
    again = subprocess.run(command, capture_output=True, text=True, env=cli_env, timeout=60)
    assert again.returncode == 0, again.stderr


def test_a_restored_checkpoint_is_pinned_before_it_reappears(arena: Arena) -> None:
    fill_root(arena, range(100, 200, 100))
    trash.move_to_trash(str(arena.root), "checkpoint-100", ["checkpoint-100"], now=time.time())
    # She plants a .keep symlink in the trashed folder through a descriptor she kept open (the
    # only way in: the trash is 0700). The pin is not written through it, and not truncated.
    keep = arena.root / ".ckptd-trash"
    (item,) = [p for p in keep.iterdir() if p.name != ".lock"]  # the folder itself, renamed
    os.symlink(arena.outside / "victim.txt", item / ".keep")
    before = fingerprint(arena.outside)
    trash.restore(str(arena.root), "checkpoint-100")
    assert fingerprint(arena.outside) == before
    # Without her link the pin is there (a regular file) the moment the folder is back.
    os.unlink(arena.root / "checkpoint-100" / ".keep")
    trash.move_to_trash(str(arena.root), "checkpoint-100", ["checkpoint-100"], now=time.time())
    trash.restore(str(arena.root), "checkpoint-100")
    pin = os.lstat(arena.root / "checkpoint-100" / ".keep")
    assert pin.st_size > 0 and (pin.st_mode & 0o170000) == 0o100000
