"""The attacks of issue 10, by a real unprivileged user on a root she owns, against ckptd as root.

Each attack is a function `attack(arena, seconds) -> Outcome`: it sets the stage in the arena
(a root owned by the attacker, its parent owned by her too, and a sentinel tree outside every
root, owned by root), runs ckptd's side (in this process, as root) and the attacker's side (a
subprocess running as her user, `Arena.attack`) for up to `seconds`, trial after trial, and
counts the trials after which anything outside the root changed (any file, folder or link of
the sentinel tree: added, removed, or changed in content, kind, owner or mode). The goal is 0.

tests/hostile/ runs each for a couple of seconds; bench/bench_attacks.py for minutes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import Config
from daemon.errors import CkptdError
from daemon.history.log import NULL_HISTORY, History
from daemon.pruning import pipeline, trash
from tests.configs import make_config, rotation
from tests.layouts_fixtures import well_formed

ATTACKER_PYTHON = "/usr/bin/python3"
STALE = 3600.0


@dataclass(frozen=True)
class Attacker:
    """A real unprivileged user made for the attacks (removed afterwards)."""

    name: str
    uid: int
    gid: int


# The config every attack runs under besides its root (tests/configs.py builds it): keep only the
# newest checkpoint, delete all the others at once, so whatever survives survived the safety.
KEEP_NEWEST: dict[str, Any] = {
    "policy": rotation(1),
    "settle_seconds": 1,
    "min_keep": 1,
    "max_delete_fraction": 1.0,
}


def create_attacker() -> Attacker:
    """Given root, make a fresh unprivileged user with a random name; return it."""
    name = f"ckatk{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam(name)
    return Attacker(name, entry.pw_uid, entry.pw_gid)


def remove_attacker(attacker: Attacker) -> None:
    subprocess.run(["userdel", attacker.name], check=False, capture_output=True)


def attacker_unavailable() -> str | None:
    """Return why the attacks cannot run here (not root, no useradd, no python3), else None."""
    if os.geteuid() != 0:
        return "needs root: the attacks create a real unprivileged user"
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        return "needs useradd and userdel"
    if not os.access(ATTACKER_PYTHON, os.X_OK):
        return f"needs {ATTACKER_PYTHON} for the attacker's side"
    return None


@dataclass
class Outcome:
    """Given an attack run: trials, trials after which something outside changed, refusals."""

    name: str
    trials: int = 0
    outside_changes: int = 0
    refused: int = 0
    changes: list[str] = field(default_factory=list)


# --- the sentinel tree ------------------------------------------------------------------------


def _describe(path: str) -> tuple[object, ...]:
    status = os.lstat(path)
    kind = stat.S_IFMT(status.st_mode)
    digest: object = None
    if stat.S_ISREG(status.st_mode):
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
    elif stat.S_ISLNK(status.st_mode):
        digest = os.readlink(path)
    return (kind, stat.S_IMODE(status.st_mode), status.st_uid, status.st_size, digest)


def fingerprint(top: Path) -> dict[str, tuple[object, ...]]:
    """Given a folder, return every entry below it (no link followed) with its checksum."""
    found = {".": _describe(str(top))}
    for folder, folders, files in os.walk(top):
        for name in folders + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, top)] = _describe(path)
    return found


def differences(
    before: dict[str, tuple[object, ...]], after: dict[str, tuple[object, ...]]
) -> list[str]:
    changed = [f"changed {key}" for key in before if key in after and before[key] != after[key]]
    changed += [f"removed {key}" for key in before if key not in after]
    changed += [f"added {key}" for key in after if key not in before]
    return changed


# --- the arena ------------------------------------------------------------------------------


class Arena:
    """A folder world for the attacks: `home/` (the attacker's) holding `run/` (the root, hers),
    `outside/` (root's: the sentinel tree, with decoys the attacks point at) and `state/`
    (ckptd's state_dir). Everything lives under one base folder removed at the end."""

    def __init__(self, attacker: Attacker, base: Path | None = None) -> None:
        self.attacker = attacker
        self.base = Path(tempfile.mkdtemp(prefix="ckptd-hostile-", dir=base))
        os.chmod(self.base, 0o755)  # the attacker must reach her home through it
        self.home = self.base / "home"
        self.root = self.home / "run"
        self.outside = self.base / "outside"
        self.state = self.base / "state"
        self.state.mkdir()
        self.home.mkdir()
        self.root.mkdir()
        self.give(self.home)
        self.build_outside()
        self.baseline = fingerprint(self.outside)

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def give(self, path: Path) -> None:
        """Given a path, hand it and everything below to the attacker (as training does)."""
        for folder, folders, files in os.walk(path):
            for name in folders + files:
                os.lchown(os.path.join(folder, name), self.attacker.uid, self.attacker.gid)
        os.lchown(path, self.attacker.uid, self.attacker.gid)

    def build_outside(self) -> None:
        """(Re)build the sentinel tree: root's files, and the decoys the attacks aim at."""
        if self.outside.exists():
            shutil.rmtree(self.outside)
        self.outside.mkdir(mode=0o755)
        (self.outside / "victim.txt").write_text("root's file: must never change\n")
        (self.outside / "etc").mkdir()
        (self.outside / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        # A folder whose entries look like old trash items (`NAME@digits`).
        decoy = self.outside / "decoy-trash" / "checkpoint-50@1700000000"
        decoy.mkdir(parents=True)
        (decoy / "model.safetensors").write_bytes(b"root's data" * 100)
        # Members of a multi-entry checkpoint, where a swapped trash would lead a roll-back.
        fake = self.outside / "fake-trash" / "ckpt-5@1700000000"
        fake.mkdir(parents=True)
        for member in tf_members(5):
            (fake / member).write_bytes(b"root's tensor" * 10)
        (fake / trash.JOURNAL).write_text(json.dumps({"name": "ckpt-5", "members": tf_members(5)}))
        # Folders a swapped trash item would lead a removal into.
        for member in ("a", "b"):
            (self.outside / "victim-dir" / member).mkdir(parents=True)
            (self.outside / "victim-dir" / member / "data.bin").write_bytes(b"keep" * 100)
        # Another user's training run that is not a configured root.
        for step in (100, 200, 300, 400):
            make_hf_checkpoint(self.outside / "other-run", step)

    def check(self, outcome: Outcome) -> None:
        """Count a trial; if anything outside changed, count that and rebuild the sentinel."""
        outcome.trials += 1
        found = differences(self.baseline, fingerprint(self.outside))
        if found:
            outcome.outside_changes += 1
            outcome.changes.extend(found[:5])
            self.build_outside()
            self.baseline = fingerprint(self.outside)

    def attack(self, code: str, *arguments: str) -> subprocess.Popen[bytes]:
        """Given Python code, run it as the attacker (her uid and gid only), in her home."""
        return subprocess.Popen(
            [ATTACKER_PYTHON, "-c", code, *arguments],
            user=self.attacker.uid,
            group=self.attacker.gid,
            extra_groups=[],
            cwd=str(self.home),
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
            stdout=subprocess.DEVNULL,
        )

    def as_attacker(self, code: str, *arguments: str) -> None:
        """Given Python code, run it as the attacker to the end (it must succeed)."""
        process = self.attack(code, *arguments)
        assert process.wait(timeout=60) == 0, f"the attacker's setup failed: {code}"

    def config(self, *, grace: float = 0.0, root: Path | None = None) -> Config:
        root = root or self.root
        return make_config([root], state_dir=self.state, layout="hf", grace=grace, **KEEP_NEWEST)

    def prune(self, history: History = NULL_HISTORY, **options: object) -> pipeline.PruneReport:
        config = self.config(**options)  # type: ignore[arg-type]
        return pipeline.prune_root(
            config, config.roots[0], now=time.time(), dry_run=False, history=history
        )


@contextlib.contextmanager
def arena_for(attacker: Attacker, base: Path | None = None) -> Iterator[Arena]:
    arena = Arena(attacker, base)
    try:
        yield arena
    finally:
        arena.close()


def tf_members(step: int) -> list[str]:
    return [
        f"ckpt-{step}.index",
        f"ckpt-{step}.data-00000-of-00002",
        f"ckpt-{step}.data-00001-of-00002",
    ]


def make_hf_checkpoint(root: Path, step: int) -> Path:
    """Given a folder, write a small complete, settled Hugging Face checkpoint into it."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    # Well-formed (ckptd keeps a checkpoint its integrity check calls corrupt), its data a
    # byte of its own so that no two checkpoints hold the same bytes.
    head, _ = well_formed("model.safetensors", 2048)
    assert head is not None
    (folder / "model.safetensors").write_bytes(head + bytes([step % 251]) * (2048 - len(head)))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    moment = time.time() - STALE
    for path in (*folder.iterdir(), folder):
        os.utime(path, (moment, moment))
    return folder


def fill_root(arena: Arena, steps: range) -> None:
    for step in steps:
        make_hf_checkpoint(arena.root, step)
    arena.give(arena.root)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


def _trials(seconds: float, minimum: int) -> Iterator[int]:
    """Yield trial numbers until `seconds` passed (at least `minimum` trials)."""
    deadline = time.monotonic() + seconds
    number = 0
    while number < minimum or time.monotonic() < deadline:
        yield number
        number += 1


def _refusing(step: Callable[[], object], outcome: Outcome) -> None:
    """Run one ckptd step; a refusal for safety is a refusal, not a failure of the attack."""
    try:
        result = step()
    except (CkptdError, OSError):
        # Refused, or a path that vanished mid-run (the daemon logs it and retries).
        outcome.refused += 1
        return
    if isinstance(result, pipeline.PruneReport) and result.refused is not None:
        outcome.refused += 1


# --- the attacks -----------------------------------------------------------------------------


def trash_symlink(arena: Arena, seconds: float = 0.0) -> Outcome:
    """`ln -s /elsewhere ROOT/.ckptd-trash`, then prunes: a root-owned `.lock` and the pruned
    checkpoints would land in /elsewhere, and its `NAME@digits` entries be purged."""
    outcome = Outcome("trash is a symlink")
    code = "import os, sys; os.symlink(sys.argv[1], 'run/.ckptd-trash')"
    for trial in _trials(seconds, 1):
        fill_root(arena, range(100 + trial * 1000, 500 + trial * 1000, 100))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(arena.root / ".ckptd-trash")
        arena.as_attacker(code, str(arena.outside / "decoy-trash"))
        _refusing(arena.prune, outcome)
        arena.check(outcome)
    return outcome


def lock_symlink(arena: Arena, seconds: float = 0.0) -> Outcome:
    """Her own `.ckptd-trash` folder holding `.lock` as a symlink to a file that must not
    exist (`/etc/nologin` blocks logins): a prune would create it, empty and root's."""
    outcome = Outcome("trash .lock is a symlink")
    code = (
        "import os, sys; os.makedirs('run/.ckptd-trash', exist_ok=True); "
        "os.path.lexists('run/.ckptd-trash/.lock') or "
        "os.symlink(sys.argv[1], 'run/.ckptd-trash/.lock')"
    )
    for trial in _trials(seconds, 1):
        fill_root(arena, range(100 + trial * 1000, 500 + trial * 1000, 100))
        arena.as_attacker(code, str(arena.outside / "etc" / "nologin"))
        _refusing(arena.prune, outcome)
        arena.check(outcome)
    return outcome


# Her own trash with a planted multi-entry item; she swaps the item for a symlink to a folder
# of root's holding folders of the same names as the members, again and again.
PURGE_SWAP = r"""
import json, os, sys, time
target, deadline = sys.argv[1], time.time() + float(sys.argv[2])
os.makedirs("run/.ckptd-trash", exist_ok=True)
item, stage = "run/.ckptd-trash/x@1", "run/.ckptd-trash/stage"
while time.time() < deadline:
    try:
        if os.path.lexists(item + ".real"):  # her link was removed under her: put it back
            if os.path.islink(item):
                os.unlink(item)
            os.rename(item + ".real", item)
        if not os.path.lexists(item):
            os.mkdir(stage)
            for member in ("a", "b"):
                os.mkdir(f"{stage}/{member}")
                for number in range(300):  # slow to remove: a wide window between members
                    open(f"{stage}/{member}/f{number}", "w").close()
            with open(f"{stage}/.ckptd-entry.json", "w") as h:
                json.dump({"name": "x", "members": ["a", "b"]}, h)
            os.rename(stage, item)
        time.sleep(0.0005)
        os.rename(item, item + ".real")
        os.symlink(target, item)
        time.sleep(0.002)
        os.unlink(item)
        os.rename(item + ".real", item)
    except OSError:
        pass
"""


def purge_swap(arena: Arena, seconds: float = 2.0) -> Outcome:
    """Swap during purge: her trash item swapped for a symlink between member removals."""
    outcome = Outcome("trash item swapped during purge")
    for _trial in _trials(seconds, 2):
        process = arena.attack(PURGE_SWAP, str(arena.outside / "victim-dir"), "1")
        try:
            end = time.monotonic() + 1
            while time.monotonic() < end:
                _refusing(
                    lambda: trash.purge(str(arena.root), now=time.time(), grace=0, everything=True),
                    outcome,
                )
        finally:
            _stop(process)
        arena.check(outcome)
    return outcome


# She renames the root's trash away and puts a symlink to a folder of root's in its place, and
# back, again and again, while ckptd recovers a half-moved multi-entry checkpoint.
RECOVERY_SWAP = r"""
import os, sys, time
target, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        os.rename("run/.ckptd-trash", "run/.trash-real")
        os.symlink(target, "run/.ckptd-trash")
        os.unlink("run/.ckptd-trash")
        os.rename("run/.trash-real", "run/.ckptd-trash")
    except OSError:
        pass
if os.path.lexists("run/.trash-real"):
    if os.path.islink("run/.ckptd-trash"):
        os.unlink("run/.ckptd-trash")
    os.rename("run/.trash-real", "run/.ckptd-trash")
"""


def _half_moved(arena: Arena, stamp: int) -> None:
    """Leave what a kill -9 mid-move leaves: a journalled item with one member moved in (the
    layout of the earlier version, which this version must recover as safely)."""
    for member in tf_members(5):
        (arena.root / member).write_bytes(b"her tensor")
    folder = arena.root / ".ckptd-trash"
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o700)
    item = folder / f"ckpt-5@{stamp}"
    item.mkdir()
    (item / trash.JOURNAL).write_text(json.dumps({"name": "ckpt-5", "members": tf_members(5)}))
    os.rename(arena.root / "ckpt-5.index", item / "ckpt-5.index")
    arena.give(arena.root)
    os.lchown(folder, 0, 0)
    for path in (item, item / trash.JOURNAL):
        os.lchown(path, 0, 0)


def recovery_swap(arena: Arena, seconds: float = 2.0) -> Outcome:
    """Swap during crash recovery: the roll-back of a journalled item by a path she controls."""
    outcome = Outcome("trash swapped during crash recovery")
    for trial in _trials(seconds, 5):
        shutil.rmtree(arena.root)
        arena.root.mkdir()
        arena.give(arena.root)
        _half_moved(arena, 1700000000)
        del trial
        process = arena.attack(RECOVERY_SWAP, str(arena.outside / "fake-trash"), "0.3")
        try:
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                _refusing(lambda: trash.recover(str(arena.root)), outcome)
        finally:
            process.wait(timeout=30)
        arena.check(outcome)
    return outcome


# Whenever the restored checkpoint's folder is there, she plants `.keep` as a symlink to a file
# of root's (the restore writes its pin there with O_CREAT|O_TRUNC in the earlier version).
KEEP_RACE = r"""
import os, sys, time
target, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        os.symlink(target, "run/checkpoint-100/.keep")
    except OSError:
        pass
"""


def restore_keep(arena: Arena, seconds: float = 2.0) -> Outcome:
    """`trash restore` versus a `.keep` symlink raced into the restored folder."""
    outcome = Outcome("restore writes .keep through a symlink")
    for _trial in _trials(seconds, 5):
        shutil.rmtree(arena.root)
        arena.root.mkdir()
        fill_root(arena, range(100, 200, 100))
        process = arena.attack(KEEP_RACE, str(arena.outside / "victim.txt"), "0.3")
        try:
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                trash.move_to_trash(
                    str(arena.root), "checkpoint-100", ["checkpoint-100"], now=time.time()
                )
                with contextlib.suppress(OSError):
                    os.unlink(arena.root / "checkpoint-100" / ".keep")  # hers or ours: not there
                _refusing(lambda: trash.restore(str(arena.root), "checkpoint-100"), outcome)
                with contextlib.suppress(OSError):
                    os.unlink(arena.root / "checkpoint-100" / ".keep")
        finally:
            _stop(process)
        arena.check(outcome)
    return outcome


# She owns the root's parent: she swaps the root for a symlink to another user's run, and back.
ROOT_SWAP = r"""
import os, sys, time
target, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        os.rename("run", "run.real")
        os.symlink(target, "run")
        os.unlink("run")
        os.rename("run.real", "run")
    except OSError:
        pass
if os.path.lexists("run.real"):
    if os.path.islink("run"):
        os.unlink("run")
    os.rename("run.real", "run")
"""


def root_swap(arena: Arena, seconds: float = 2.0) -> Outcome:
    """The root swapped for a symlink to another user's unconfigured run (she owns the parent).

    The first prune sees the root as it is (and records it); then she swaps it, and back, in a
    tight loop while ckptd prunes."""
    outcome = Outcome("root swapped for a symlink")
    fill_root(arena, range(100, 300, 100))
    arena.prune()  # first seen: its identity is recorded in the state folder
    for trial in _trials(seconds, 5):
        fill_root(arena, range(1000 * (trial + 1), 1000 * (trial + 1) + 300, 100))
        process = arena.attack(ROOT_SWAP, str(arena.outside / "other-run"), "0.3")
        try:
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                _refusing(arena.prune, outcome)
        finally:
            process.wait(timeout=30)
        arena.check(outcome)
    return outcome


# Every checkpoint in turn: renamed away, a symlink to a folder of root's in its place, back.
ENTRY_SWAP = r"""
import os, sys, time
target, deadline = sys.argv[1], time.time() + float(sys.argv[2])
names = sys.argv[3:]
while time.time() < deadline:
    for name in names:
        try:
            os.rename(f"run/{name}", f"run/.{name}")
            os.symlink(target, f"run/{name}")
            os.unlink(f"run/{name}")
            os.rename(f"run/.{name}", f"run/{name}")
        except OSError:
            pass
"""


def entry_swap(arena: Arena, seconds: float = 2.0) -> Outcome:
    """Checkpoints swapped for symlinks to root's folders while they are moved and removed."""
    outcome = Outcome("checkpoints swapped during a prune")
    for trial in _trials(seconds, 5):
        steps = range(1000 * (trial + 1), 1000 * (trial + 1) + 600, 100)
        fill_root(arena, steps)
        names = [f"checkpoint-{step}" for step in steps]
        process = arena.attack(ENTRY_SWAP, str(arena.outside / "victim-dir"), "0.3", *names)
        try:
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                _refusing(arena.prune, outcome)
        finally:
            process.wait(timeout=30)
        arena.check(outcome)
    return outcome


# The attacks that are races (run for their time); the others are set up once per trial.
RACES = frozenset({"purge-swap", "recovery-swap", "restore-keep", "root-swap", "entry-swap"})

ATTACKS: dict[str, Callable[[Arena, float], Outcome]] = {
    "trash-symlink": trash_symlink,
    "lock-symlink": lock_symlink,
    "purge-swap": purge_swap,
    "recovery-swap": recovery_swap,
    "restore-keep": restore_keep,
    "root-swap": root_swap,
    "entry-swap": entry_swap,
}
