"""The one module that deletes: carry out a guarded plan (DESIGN.md, "Deleting").

Three phases, so that deleting costs about what `rm -rf` costs (bench/bench_delete.py):

1. **Move.** One pass over the processes looks for holders of the checkpoints about to go
   (`safety.facts.recheck`), then each unheld checkpoint is renamed into the trash
   (`daemon.pruning.trash`: one atomic rename per entry; several entries are journalled and
   rolled back). Renames take microseconds; if this phase runs longer than `RECHECK_SECONDS`
   the processes are looked at again, so no checkpoint is renamed more than that long after
   its last check. Any holder vetoes its checkpoint (kept, `in-use:pid N (cmd)`). `stop` is
   honoured between renames.
   After the renames one more look at the trash items catches a file opened between a check
   and its rename (after the rename nobody can open it by its old path): that checkpoint is
   renamed back, vetoed.
2. **Make the moves durable before removing anything.** A power cut must never bring a
   checkpoint back under its name half-removed. On ext4, XFS, btrfs and ZFS the journal
   commits metadata operations in order, so no unlink below a renamed folder can reach the disk
   before the rename does, and no fsync is needed (tmpfs loses everything anyway). On any other
   filesystem (NFS, ext2, FUSE ...) the root, the trash and each journalled item are fsynced
   here, once for all moves. (kill -9 needs no fsync at all: a rename is atomic either way.)
3. **Remove** each trash item without following symlinks, two at a time (unless the trash
   grace keeps it).

Errors (permission denied, a file vanishing, a read-only filesystem) are recorded for that
checkpoint and the run goes on with the rest. Bytes freed are only ever what the trash item
held unshared (measured right before its removal) for a removal that finished; a checkpoint
left in the trash (grace, or `stop` set before its removal) frees nothing yet, and a partly
removed one is reported as failed with its remains in the trash, finished by the next run's
purge.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from daemon.disk.mounts import filesystem_type
from daemon.errors import UsageError
from daemon.fsio import LOCAL, FileSystem, Usage
from daemon.history.events import Delete
from daemon.history.log import NULL_HISTORY, History
from daemon.pruning import trash
from daemon.pruning.vetoes import DELETION, record_veto
from daemon.rootdir import RootDir, opened
from daemon.safety import facts as proc_facts
from policies.model import Decision, Plan

log = logging.getLogger("ckptd.prune")

HoldersCheck = Callable[[str, Iterable[str]], proc_facts.Facts]
Progress = Callable[[int, int, str], None]

# The longest a checkpoint may be renamed after the process check that cleared it.
RECHECK_SECONDS = 0.1
# Trash items removed at once: two overlap the filesystem's journal waits; more only contend.
REMOVAL_WORKERS = 2


# Filesystems whose journal commits metadata operations in the order they were made: a
# rename can never be lost while a later unlink below it survives a power cut.
ORDERED_METADATA = frozenset({"ext3", "ext4", "xfs", "btrfs", "zfs", "tmpfs", "ramfs"})


def orders_metadata(path: str) -> bool:
    """Given a root, return whether its filesystem keeps metadata operations in order."""
    return filesystem_type(path) in ORDERED_METADATA


def _no_holders(root_path: str, _entries: Iterable[str]) -> proc_facts.Facts:
    return proc_facts.Facts(root_path=root_path, now=0.0)


@dataclass(frozen=True)
class ApplyResult:
    """Given one apply: what was deleted, vetoed, failed, and the bytes really freed.

    `deleted` are checkpoints gone from the root (removed, or in the trash awaiting the grace);
    `trashed` the subset still in the trash; `partial` failed removals whose remains are in the
    trash. With `dry_run`, `would_delete` and `would_free` say what a real run would do.
    """

    deleted: tuple[str, ...] = ()
    trashed: tuple[str, ...] = ()
    vetoed: tuple[tuple[str, str], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    partial: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # not attempted: `stop` was set
    bytes_freed: int = 0  # allocated bytes the filesystem got back
    bytes_in_trash: int = 0  # allocated bytes waiting in the trash
    would_delete: tuple[str, ...] = ()
    would_free: int = 0
    bytes_logical: int = 0  # the logical size of what `bytes_freed` counts


@dataclass(frozen=True)
class _Deletion:
    """Given one apply: the root, the time and everything each phase needs."""

    root_path: str
    now: float
    fs: FileSystem
    trash: trash.Trash
    history: History
    check: HoldersCheck
    stop: threading.Event | None
    trash_grace: float
    policy: dict[str, object]

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


@dataclass
class _Tally:
    """What the phases did so far (each appends to it)."""

    vetoed: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    trashed: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    freed: Usage = field(default_factory=Usage)
    bytes_in_trash: int = 0

    def result(self) -> ApplyResult:
        return ApplyResult(
            deleted=tuple(self.deleted),
            trashed=tuple(self.trashed),
            vetoed=tuple(self.vetoed),
            failed=tuple(self.failed),
            partial=tuple(self.partial),
            skipped=tuple(self.skipped),
            bytes_freed=self.freed.allocated,
            bytes_in_trash=self.bytes_in_trash,
            bytes_logical=self.freed.logical,
        )


class _Moved(NamedTuple):
    """A checkpoint renamed into the trash, and its trash item (name, and path for messages)."""

    decision: Decision
    item: str
    item_path: str


class _Removal(NamedTuple):
    """A trash item removed: what it held unshared just before, and the errors."""

    measured: Usage
    errors: list[str]


def apply(
    plan: Plan,
    root: str | RootDir,
    *,
    dry_run: bool,
    now: float,
    fs: FileSystem = LOCAL,
    history: History = NULL_HISTORY,
    trash_grace: float = 0.0,
    stop: threading.Event | None = None,
    holders_check: HoldersCheck | None = proc_facts.recheck,
    progress: Progress | None = None,
    policy: Mapping[str, object] | None = None,
) -> ApplyResult:
    """Given a guarded plan and its root, carry out its deletions and return what happened.

    `root` is a path (opened here) or the root `prune_root` opened and checked: every rename
    and removal is relative to its descriptor and its trash's. `holders_check(root, entries)`
    is the last-moment veto (None skips it: only for tests of the deleter itself); `policy` is
    recorded with each deletion; `stop` set means finish the deletion in progress and start no
    other. Raises TrashRefused when the root's trash is not ckptd's.
    """
    deletions = plan.deleted
    if dry_run:
        return ApplyResult(
            would_delete=tuple(d.checkpoint.name for d in deletions),
            would_free=sum(d.checkpoint.freeable_bytes for d in deletions),
        )
    tally = _Tally()
    if not deletions:
        return tally.result()
    with opened(root) as root_dir:
        try:
            with trash.open_trash(root_dir, create=True, fs=fs) as opened_trash:
                assert opened_trash is not None
                run = _Deletion(
                    root_path=root if isinstance(root, str) else root.path,
                    now=now,
                    fs=fs,
                    trash=opened_trash,
                    history=history,
                    check=holders_check or _no_holders,
                    stop=stop,
                    trash_grace=trash_grace,
                    policy=dict(policy or {}),
                )
                moved = _move(run, deletions, tally)
                moved = _recheck_in_trash(run, moved, tally)
                _make_durable(run, moved)
                _remove(run, moved, tally, progress)
        except OSError as error:
            # No trash can be made (a read-only filesystem): nothing can be deleted.
            message = f"{error.strerror or error} ({error.filename or trash.TRASH_DIRECTORY})"
            for decision in deletions[len(tally.deleted) + len(tally.failed) :]:
                tally.failed.append((decision.checkpoint.name, message))
    return tally.result()


def _move(run: _Deletion, deletions: tuple[Decision, ...], tally: _Tally) -> list[_Moved]:
    """Phase 1: check for holders, then rename each unheld checkpoint into the trash."""
    moved: list[_Moved] = []
    facts: proc_facts.Facts | None = None
    checked_at = 0.0
    for index, decision in enumerate(deletions):
        checkpoint = decision.checkpoint
        if run.stopped():
            tally.skipped.extend(d.checkpoint.name for d in deletions[index:])
            break
        if facts is None or time.monotonic() - checked_at > RECHECK_SECONDS:
            remaining = [m for d in deletions[index:] for m in d.checkpoint.members]
            facts = run.check(run.root_path, remaining)
            checked_at = time.monotonic()
        holders = facts.holders_of(checkpoint)
        if holders:
            tally.vetoed.append(
                record_veto(DELETION, run.history, run.root_path, checkpoint, holders[0])
            )
            continue
        try:
            item = run.trash.move(checkpoint.name, checkpoint.members, now=run.now, durable=False)
        except (OSError, UsageError) as error:
            if isinstance(error, OSError):
                message = f"{error.strerror or error} ({error.filename or checkpoint.name})"
            else:
                message = str(error)
            log.warning("could not delete %s: %s", checkpoint.name, message)
            tally.failed.append((checkpoint.name, message))
            continue
        moved.append(_Moved(decision, item, run.trash.dir.at(item).path))
    return moved


def _recheck_in_trash(run: _Deletion, moved: list[_Moved], tally: _Tally) -> list[_Moved]:
    """After the renames, look at the trash items once more; return the unheld ones.

    A process that opened a file between the check and the rename holds it inside the trash
    now (and no process can open it by its old path any more): this look closes that window.
    A held checkpoint goes back under its name, vetoed. The trash is looked up where it is now
    (its descriptor's path), not where it was: the root's owner may have renamed it.
    """
    if not moved:
        return moved
    facts = run.check(run.trash.real_path(), [item.item for item in moved])
    unheld: list[_Moved] = []
    for item in moved:
        checkpoint = item.decision.checkpoint
        holders = facts.holders.get(item.item, ()) + facts.everywhere
        if not holders:
            unheld.append(item)
            continue
        try:
            described = run.trash.describe(item.item)
            if described is None:
                raise UsageError(f"{item.item_path}: not a trash item")
            run.trash.put_back(described, pin=False)
        except (OSError, UsageError) as error:
            # Its name was taken meanwhile: it stays restorable in the trash, not removed.
            where = os.path.relpath(item.item_path, run.root_path)
            message = f"in-use:{holders[0].describe()}; left in {where}: {error}"
            log.warning("could not put back %s: %s", checkpoint.name, message)
            tally.failed.append((checkpoint.name, message))
            continue
        tally.vetoed.append(
            record_veto(DELETION, run.history, run.root_path, checkpoint, holders[0])
        )
    return unheld


def _make_durable(run: _Deletion, moved: list[_Moved]) -> None:
    """Phase 2: the moves reach the disk before anything is removed (see the module's doc)."""
    if not moved or orders_metadata(run.root_path):
        return
    with contextlib.suppress(OSError):
        run.fs.fsync_fd(run.trash.root.fd)
        run.fs.fsync_fd(run.trash.dir.fd)
        for item in moved:
            if len(item.decision.checkpoint.members) > 1:
                descriptor = run.fs.open_dir(run.trash.dir.at(item.item))
                try:
                    run.fs.fsync_fd(descriptor)
                finally:
                    os.close(descriptor)


def _remove(run: _Deletion, moved: list[_Moved], tally: _Tally, progress: Progress | None) -> None:
    """Phase 3: remove the trash items, two at a time, and record each deletion.

    Unlinking waits on the filesystem's journal, and two workers overlap those waits: about
    what `rm -rf` costs, including the checks above. Unless the grace keeps them, or `stop`
    asks to start nothing more (the next run's purge removes those; they are restorable
    meanwhile).
    """

    def remove(item: str) -> _Removal | None:
        if run.stopped():
            return None
        # Measured on the item right before it goes: the checkpoint's `freeable_bytes` may
        # come from the size cache, from before a hard-link snapshot that now shares its
        # files (only their link counts changed, which the cache cannot see).
        described = run.trash.describe(item)
        if described is None:
            return _Removal(Usage(), [f"{run.trash.dir.at(item).path}: no longer a trash item"])
        measured = Usage(described.bytes, described.bytes_logical)
        return _Removal(measured, run.trash.remove(described))

    keep_all = run.trash_grace > 0 or not moved
    with ThreadPoolExecutor(
        max_workers=1 if keep_all else REMOVAL_WORKERS, thread_name_prefix="ckptd-remove"
    ) as pool:
        futures = [None if keep_all else pool.submit(remove, item.item) for item in moved]
        for index, (item, future) in enumerate(zip(moved, futures, strict=True)):
            if progress is not None:
                progress(index, len(moved), item.decision.checkpoint.name)
            _record(run, item, None if future is None else future.result(), tally)
    if progress is not None:
        progress(len(moved), len(moved), "")


def _record(run: _Deletion, item: _Moved, removal: _Removal | None, tally: _Tally) -> None:
    """Given one trash item and its removal (None: kept in the trash), tally and record it."""
    checkpoint = item.decision.checkpoint
    errors = removal.errors if removal is not None else []
    freed = Usage()
    in_trash = 0
    if errors:
        where = os.path.relpath(item.item_path, run.root_path)
        tally.partial.append(checkpoint.name)
        tally.failed.append((checkpoint.name, f"partly removed, remains in {where}: {errors[0]}"))
        log.warning("partly removed %s: %s", checkpoint.name, errors[0])
    elif removal is None:
        in_trash = run.trash.measure(item.item).allocated
        tally.trashed.append(checkpoint.name)
        tally.bytes_in_trash += in_trash
    else:
        freed = removal.measured
        tally.freed += freed
    if not errors:
        tally.deleted.append(checkpoint.name)
    run.history.record(
        Delete(
            root=run.root_path,
            checkpoint=checkpoint.name,
            step=checkpoint.step,
            series=checkpoint.series,
            bytes_freed=freed.allocated,
            bytes_in_trash=in_trash,
            trash_grace=run.trash_grace,
            partial=bool(errors),
            errors=tuple(errors[:3]),
            why=item.decision.reasons,
            tier=item.decision.tier,
            policy=run.policy,
            bytes_logical=freed.logical,
        )
    )
