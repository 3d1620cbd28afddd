"""The invariants no policy can override (DESIGN.md, "Safety").

Two steps, both taking values:

- `gather_facts(root_path, now=, trainer_pid_file=, trainer_cmdline=)` makes **one pass** over
  /proc (fd links, `maps`, cwd of every process) and records every process that holds
  something under the root, which of them is the trainer, and who could not be inspected.
- `guard(plan, facts, settings)` returns the plan with every deletion the invariants forbid
  turned into a keep (with the reason), or raises `RootRefused` when the whole root must be left
  alone (the trainer holds the newest checkpoint, it is still settling, a limit tripped).

Right before deleting, the deleter calls `recheck(root_path, entries)`: a second pass that looks
only for the entries about to go (about 2 ms for 80 processes here), and renames them within
`prune.RECHECK_SECONDS` of it.

Who counts as holding when a process cannot be inspected (`PermissionError` on /proc/PID/fd,
maps or cwd — when ckptd does not run as root, or lacks a capability the process has):

- kernel threads (PF_KTHREAD) and zombies never hold files: they have no file table to read;
- PID 1 (init, or a sandbox's init that is more privileged than ckptd and so unreadable even
  to root) never opens a training checkpoint, nor does a fork of it that has not exec'd yet
  (same command line);
- a process caught mid-exec is briefly unreadable: unreadable processes are looked at once more
  after 50 ms, and only one that stays unreadable counts;
- any other process counts as holding **every** checkpoint of the root if its user could reach
  the root at all: uid 0, the root's owner, a member of the root's group with `g+x`, or anyone
  when the root has `o+x`. A process of a user who cannot even enter the root cannot hold a file
  in it, so it does not veto. As root (with CAP_SYS_PTRACE) ckptd reads every process but
  PID 1 of a sandbox, so in practice the rule only matters for an unprivileged ckptd.

Processes in another mount namespace (containers) report paths in their own namespace; ckptd
compares them as given, so a container that mounts the root elsewhere is not seen. Run ckptd in
the trainer's namespace, or name the trainer with `trainer.pid_file`.
"""

from __future__ import annotations

import logging
import os
import re
import stat as stat_module
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import psutil

from daemon.fsio import TRASH_DIRECTORY, read_regular
from policies.model import Checkpoint

log = logging.getLogger("ckptd.safety")
# (pid file, problem) pairs already logged: a missing pid file is said once, not every prune.
_NOTED: set[tuple[str, str]] = set()

PF_KTHREAD = 0x00200000
PROC = "/proc"
UNSEEN_RETRY_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class Holder:
    """One process holding something under the root, and how ("open", "mmap", "cwd", "unknown")."""

    pid: int
    create_time: float
    cmdline: str
    how: str
    path: str  # the path held, or "" when the process could not be inspected

    def describe(self) -> str:
        """Given a holder, return `pid N (cmd)` as used in reasons and messages."""
        command = self.cmdline if len(self.cmdline) <= 60 else self.cmdline[:57] + "..."
        return f"pid {self.pid} ({command})"


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """A process as the trainer: PID plus create time, so a reused PID is someone else."""

    pid: int
    create_time: float


@dataclass(frozen=True)
class Facts:
    """Given one pass over the processes at `now`: who holds what under `root_path`.

    `holders` maps a name directly inside the root (a checkpoint entry) to the processes
    holding something in it; `everywhere` lists processes that could not be inspected and so
    count as holding every entry; `trainers` the processes identified as the trainer.
    """

    root_path: str
    now: float
    holders: Mapping[str, tuple[Holder, ...]] = field(default_factory=lambda: MappingProxyType({}))
    everywhere: tuple[Holder, ...] = ()
    trainers: frozenset[ProcessIdentity] = frozenset()
    notes: tuple[str, ...] = ()

    def holders_of(self, checkpoint: Checkpoint) -> tuple[Holder, ...]:
        """Given a checkpoint, return every process known to hold one of its entries."""
        found: list[Holder] = []
        for member in checkpoint.members:
            found.extend(self.holders.get(member, ()))
        found.extend(self.everywhere)
        return tuple(found)

    def is_trainer(self, holder: Holder) -> bool:
        return ProcessIdentity(holder.pid, holder.create_time) in self.trainers


# --- reading /proc -----------------------------------------------------------------------------


def _process_ids() -> list[int]:
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


def _stat_fields(pid: int) -> list[str] | None:
    """Given a PID, return the fields of /proc/PID/stat after the command name, or None."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as handle:
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses; it ends at the last ")".
    return text[text.rfind(")") + 2 :].split()


def _is_kernel_thread_or_zombie(fields: list[str] | None) -> bool:
    if fields is None:
        return True  # gone already
    state, flags = fields[0], int(fields[6])
    return state in ("Z", "X") or bool(flags & PF_KTHREAD)


def _create_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return 0.0


def _cmdline(pid: int) -> str:
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return "?"
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    if text:
        return text
    try:
        with open(f"{PROC}/{pid}/comm", "rb") as handle:
            return "[" + handle.read().decode(errors="replace").strip() + "]"
    except OSError:
        return "?"


def _held_paths(pid: int, prefix: bytes) -> tuple[list[tuple[str, str]], bool]:
    """Given a PID, return ([(how, path)], inspectable) for its cwd, open files and maps.

    Only map lines containing `prefix` (the root) are parsed: a big process maps thousands of
    libraries, and splitting every line would cost more than the whole rest of the pass.
    """
    held: list[tuple[str, str]] = []
    denied = False
    try:
        held.append(("cwd", os.readlink(f"{PROC}/{pid}/cwd")))
    except PermissionError:
        denied = True
    except OSError:
        pass
    fd_folder = f"{PROC}/{pid}/fd"
    try:
        descriptors = os.listdir(fd_folder)
    except PermissionError:
        denied = True
        descriptors = []
    except OSError:
        descriptors = []
    for descriptor in descriptors:
        try:
            held.append(("open", os.readlink(f"{fd_folder}/{descriptor}")))
        except PermissionError:
            denied = True
        except OSError:
            pass
    try:
        with open(f"{PROC}/{pid}/maps", "rb") as handle:
            maps = handle.read()
    except PermissionError:
        denied = True
        maps = b""
    except OSError:
        maps = b""
    if prefix not in maps:
        return held, not denied
    for line in maps.splitlines():
        if prefix not in line:
            continue
        # address perms offset dev inode pathname — the path is the sixth field and may hold spaces.
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith(b"/"):
            # Decoded as every other path is (surrogateescape): a name that is not UTF-8 must
            # match the name the root listing gave. The kernel writes a newline in a name as
            # `\012`; both readings are kept, so neither spelling hides a holder.
            held.append(("mmap", os.fsdecode(parts[5])))
            if b"\\012" in parts[5]:
                held.append(("mmap", os.fsdecode(parts[5].replace(b"\\012", b"\n"))))
    return held, not denied


def _entry_under(root_path: str, path: str) -> str | None:
    """Given the root and a path a process holds, return the root entry containing it, or None."""
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    prefix = root_path.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    return path[len(prefix) :].split("/", 1)[0]


def _uid_could_reach(pid: int, root_status: os.stat_result) -> bool:
    """Given an uninspectable process, return whether its user could enter the root at all."""
    try:
        with open(f"{PROC}/{pid}/status", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return True
    ids: dict[str, list[int]] = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids[key] = [int(number) for number in value.split()]
    uids = ids.get("Uid", [0])
    gids = ids.get("Gid", []) + ids.get("Groups", [])
    mode = root_status.st_mode
    if 0 in uids or root_status.st_uid in uids:
        return True
    if root_status.st_gid in gids and mode & stat_module.S_IXGRP:
        return True
    return bool(mode & stat_module.S_IXOTH)


# --- the trainer -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PidFile:
    """What a trainer pid file says: the running process it names, or why it names none."""

    identity: ProcessIdentity | None
    problem: str | None


def _read_pid_file(pid_file: str, create_time: float | None) -> _PidFile:
    try:
        # It may lie in the root, where its owner can make it a FIFO or a symlink.
        text = read_regular(pid_file, 4096).decode(errors="replace")
    except FileNotFoundError:
        return _PidFile(None, "does not exist")
    except OSError as error:
        return _PidFile(None, f"cannot be read ({error.strerror})")
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        return _PidFile(None, "holds no pid")
    started = _create_time(pid)
    if started == 0.0:
        return _PidFile(None, f"names pid {pid}, which is not running")
    if create_time is not None and abs(started - create_time) > 0.01:
        return _PidFile(None, f"names pid {pid}, which is now another process")
    return _PidFile(ProcessIdentity(pid, started), None)


def pid_file_problem(pid_file: str, create_time: float | None = None) -> str | None:
    """Given the trainer's pid file (and the create time remembered for its process), return
    why it names no running trainer ("does not exist", a dead or reused pid), else None."""
    return _read_pid_file(pid_file, create_time).problem


def find_trainers(
    holders: Iterable[Holder],
    *,
    pid_file: str | None,
    cmdline_pattern: str | None,
    pid_file_create_time: float | None = None,
) -> frozenset[ProcessIdentity]:
    """Given the root's holders and the trainer config, return the trainer's identities.

    `pid_file`: the PID in it, if that process is alive; its create time is read now (or taken
    from `pid_file_create_time`, which a caller remembered from when it first saw the trainer —
    then a PID reused by another program does not match). A missing or stale pid file names no
    one, so the trainer is found as if it were not configured: by `cmdline`, every process
    whose command line matches the regex; neither: every process holding something under the
    root. (A pid file left over from the last run must not switch off "the trainer holds the
    newest, the root waits".)
    """
    if pid_file is not None:
        named = _read_pid_file(pid_file, pid_file_create_time).identity
        if named is not None:
            return frozenset({named})
    if cmdline_pattern is not None:
        pattern = re.compile(cmdline_pattern)
        identities: set[ProcessIdentity] = set()
        for pid in _process_ids():
            command = _cmdline(pid)
            if pattern.search(command):
                create_time = _create_time(pid)
                if create_time:
                    identities.add(ProcessIdentity(pid, create_time))
        return frozenset(identities)
    return frozenset(ProcessIdentity(holder.pid, holder.create_time) for holder in holders)


def trainer_note(
    pid_file: str | None, cmdline_pattern: str | None, create_time: float | None = None
) -> str | None:
    """Given the trainer config, return the note that its pid file is not used and how the
    trainer is found instead, or None when the pid file names a running process (or none is
    configured). Logged once per pid file and problem."""
    if pid_file is None:
        return None
    problem = pid_file_problem(pid_file, create_time)
    if problem is None:
        return None
    instead = (
        f"by trainer.cmdline /{cmdline_pattern}/"
        if cmdline_pattern is not None
        else "automatically (processes using files under the root)"
    )
    note = f"trainer.pid_file {pid_file} {problem}: the trainer is found {instead}"
    if (pid_file, problem) not in _NOTED:
        _NOTED.add((pid_file, problem))
        log.warning("%s", note)
    return note


# --- gathering facts ---------------------------------------------------------------------------


def _match(
    root_path: str, wanted: frozenset[str] | None, held: list[tuple[str, str]]
) -> list[tuple[str, str, str]]:
    matches: list[tuple[str, str, str]] = []
    for how, path in held:
        entry = _entry_under(root_path, path)
        if entry is None or entry == TRASH_DIRECTORY:
            continue
        if wanted is not None and entry not in wanted:
            continue
        matches.append((entry, how, path))
    return matches


def _could_hold_unseen(pid: int, root_status: os.stat_result | None, init_command: str) -> bool:
    """Given a process that could not be inspected, return whether it counts as holding."""
    if pid == 1 or _is_kernel_thread_or_zombie(_stat_fields(pid)):
        return False
    if _cmdline(pid) == init_command:
        return False  # a fork of init that has not exec'd yet
    return root_status is None or _uid_could_reach(pid, root_status)


def _scan_processes(
    root_path: str, wanted: frozenset[str] | None
) -> tuple[dict[str, list[Holder]], list[Holder]]:
    """Given the root (and optionally only some of its entries), return holders by entry."""
    own_pid = os.getpid()
    try:
        root_status: os.stat_result | None = os.stat(root_path)
    except OSError:
        root_status = None
    init_command = _cmdline(1)
    prefix = os.fsencode(root_path.rstrip("/") + "/")
    by_entry: dict[str, list[Holder]] = {}
    unseen: list[int] = []

    def add(pid: int, matches: list[tuple[str, str, str]]) -> None:
        create_time = _create_time(pid)
        command = _cmdline(pid)
        seen: set[tuple[str, str]] = set()
        for entry, how, path in matches:
            if (entry, how) not in seen:
                seen.add((entry, how))
                by_entry.setdefault(entry, []).append(Holder(pid, create_time, command, how, path))

    for pid in _process_ids():
        if pid == own_pid:
            continue
        held, inspectable = _held_paths(pid, prefix)
        matches = _match(root_path, wanted, held)
        if matches:
            add(pid, matches)
        elif not inspectable and _could_hold_unseen(pid, root_status, init_command):
            unseen.append(pid)

    everywhere: list[Holder] = []
    if unseen:
        # A process caught mid-exec (credentials changing) is briefly unreadable; look again
        # once. Only one that stays unreadable counts as holding.
        time.sleep(UNSEEN_RETRY_SECONDS)
        for pid in unseen:
            held, inspectable = _held_paths(pid, prefix)
            matches = _match(root_path, wanted, held)
            if matches:
                add(pid, matches)
            elif not inspectable and _could_hold_unseen(pid, root_status, init_command):
                everywhere.append(Holder(pid, _create_time(pid), _cmdline(pid), "unknown", ""))
    return by_entry, everywhere


def gather_facts(
    root_path: str,
    *,
    now: float,
    trainer_pid_file: str | None = None,
    trainer_cmdline: str | None = None,
    trainer_create_time: float | None = None,
) -> Facts:
    """Given a root and the trainer config, return who holds what under it, in one pass."""
    root_path = os.path.realpath(root_path)
    by_entry, everywhere = _scan_processes(root_path, None)
    all_holders = [holder for holders in by_entry.values() for holder in holders]
    trainers = find_trainers(
        all_holders,
        pid_file=trainer_pid_file,
        cmdline_pattern=trainer_cmdline,
        pid_file_create_time=trainer_create_time,
    )
    notes: list[str] = []
    note = trainer_note(trainer_pid_file, trainer_cmdline, trainer_create_time)
    if note is not None:
        notes.append(note)
    if everywhere:
        notes.append(
            f"{len(everywhere)} process(es) could not be inspected and count as holding: "
            + ", ".join(holder.describe() for holder in everywhere[:5])
        )
    return Facts(
        root_path=root_path,
        now=now,
        holders=MappingProxyType({key: tuple(value) for key, value in by_entry.items()}),
        everywhere=tuple(everywhere),
        trainers=trainers,
        notes=tuple(notes),
    )


def recheck(root_path: str, entries: Iterable[str], *, now: float = 0.0) -> Facts:
    """Given a root and the entries about to be deleted, return who holds any of them now.

    The deleter's last-moment check: one pass over the processes that looks only for these
    entries (no trainer identification, no notes).
    """
    real_root = os.path.realpath(root_path)
    by_entry, everywhere = _scan_processes(real_root, frozenset(entries))
    return Facts(
        root_path=real_root,
        now=now,
        holders=MappingProxyType({key: tuple(value) for key, value in by_entry.items()}),
        everywhere=tuple(everywhere),
    )


def holders_of(root_path: str, members: Iterable[str]) -> tuple[Holder, ...]:
    """Given a root and a checkpoint's entries, return every process holding one of them now."""
    by_entry, everywhere = _scan_processes(os.path.realpath(root_path), frozenset(members))
    return tuple(holder for holders in by_entry.values() for holder in holders) + tuple(everywhere)


# --- the guard ---------------------------------------------------------------------------------
