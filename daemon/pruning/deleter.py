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
from dataclasses import dataclass

from daemon.disk.mounts import filesystem_type
from daemon.errors import UsageError
from daemon.fsio import LOCAL, FileSystem
from daemon.history.log import HistoryLog
from daemon.pruning import trash
from daemon.safety import facts as proc_facts
from policies.model import Checkpoint, Decision, Plan

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
    bytes_freed: int = 0
    bytes_in_trash: int = 0
    would_delete: tuple[str, ...] = ()
    would_free: int = 0


def apply(
    plan: Plan,
    root_path: str,
    *,
    dry_run: bool,
    now: float,
    fs: FileSystem = LOCAL,
    history: HistoryLog | None = None,
    trash_grace: float = 0.0,
    stop: threading.Event | None = None,
    holders_check: HoldersCheck | None = proc_facts.recheck,
    progress: Progress | None = None,
    policy: Mapping[str, object] | None = None,
) -> ApplyResult:
    """Given a guarded plan and its root, carry out its deletions and return what happened.

    `holders_check(root, entries)` is the last-moment veto (None skips it: only for tests of
    the deleter itself); `policy` is recorded with each deletion; `stop` set means finish the
    deletion in progress and start no other.
    """
    deletions = plan.deleted
    if dry_run:
        return ApplyResult(
            would_delete=tuple(d.checkpoint.name for d in deletions),
            would_free=sum(d.checkpoint.freeable_bytes for d in deletions),
        )
    check = holders_check or _no_holders
    vetoed: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    skipped: list[str] = []
    moved: list[tuple[Decision, str]] = []

    # Phase 1: check, then move.
    facts: proc_facts.Facts | None = None
    checked_at = 0.0
    for index, decision in enumerate(deletions):
        checkpoint = decision.checkpoint
        if stop is not None and stop.is_set():
            skipped.extend(d.checkpoint.name for d in deletions[index:])
            break
        if facts is None or time.monotonic() - checked_at > RECHECK_SECONDS:
            remaining = [m for d in deletions[index:] for m in d.checkpoint.members]
            facts = check(root_path, remaining)
            checked_at = time.monotonic()
        holders = facts.holders_of(checkpoint)
        if holders:
            vetoed.append(_veto(checkpoint, holders[0], root_path, history))
            continue
        try:
            item_path = trash.move_to_trash(
                root_path, checkpoint.name, checkpoint.members, now=now, fs=fs, durable=False
            )
        except OSError as error:
            message = f"{error.strerror or error} ({error.filename or checkpoint.name})"
            log.warning("could not delete %s: %s", checkpoint.name, message)
            failed.append((checkpoint.name, message))
            continue
        moved.append((decision, item_path))

    # A process that opened a file between the check and the rename holds it inside the trash
    # now (and no process can open it by its old path any more): one more look, at the trash
    # items, closes that window. A held checkpoint goes back under its name, vetoed.
    if moved:
        trash_facts = check(trash.trash_path(root_path), [os.path.basename(p) for _, p in moved])
        unheld: list[tuple[Decision, str]] = []
        for decision, item_path in moved:
            checkpoint = decision.checkpoint
            holders = (
                trash_facts.holders.get(os.path.basename(item_path), ()) + trash_facts.everywhere
            )
            if not holders:
                unheld.append((decision, item_path))
                continue
            reason = f"in-use:{holders[0].describe()}"
            try:
                trash.undo_move(root_path, item_path, fs)
            except (OSError, UsageError) as error:
                # Its name was taken meanwhile: it stays restorable in the trash, not removed.
                message = f"{reason}; left in {os.path.relpath(item_path, root_path)}: {error}"
                log.warning("could not put back %s: %s", checkpoint.name, message)
                failed.append((checkpoint.name, message))
                continue
            vetoed.append(_veto(checkpoint, holders[0], root_path, history))
        moved = unheld

    # Phase 2: the moves reach the disk before anything is removed.
    if moved and not orders_metadata(root_path):
        with contextlib.suppress(OSError):
            fs.fsync_dir(root_path)
            fs.fsync_dir(trash.trash_path(root_path))
            for decision, item_path in moved:
                if len(decision.checkpoint.members) > 1:
                    fs.fsync_dir(item_path)

    # Phase 3: remove, two at a time (unlinking waits on the filesystem's journal, and two
    # workers overlap those waits: about what `rm -rf` costs, including the checks above).
    # Unless the grace keeps them, or `stop` asks to start nothing more (the next run's purge
    # removes those; they are restorable meanwhile).
    # Bytes freed are measured on the item right before it goes: the checkpoint's
    # `freeable_bytes` may come from the size cache, from before a hard-link snapshot that now
    # shares its files (only their link counts changed, which the cache cannot see).
    def remove(item_path: str) -> tuple[int, list[str]] | None:
        if stop is not None and stop.is_set():
            return None
        freeable = trash.measure_freeable(item_path, fs)
        return freeable, trash.remove_item(item_path, fs)

    deleted: list[str] = []
    trashed: list[str] = []
    partial: list[str] = []
    freed = 0
    in_trash = 0
    keep_all = trash_grace > 0 or not moved
    with ThreadPoolExecutor(
        max_workers=1 if keep_all else REMOVAL_WORKERS, thread_name_prefix="ckptd-remove"
    ) as pool:
        futures = [None if keep_all else pool.submit(remove, item) for _, item in moved]
        for index, ((decision, item_path), future) in enumerate(zip(moved, futures, strict=True)):
            checkpoint = decision.checkpoint
            if progress is not None:
                progress(index, len(moved), checkpoint.name)
            outcome = None if future is None else future.result()
            kept_in_trash = outcome is None
            measured, removal_errors = outcome or (0, [])
            bytes_freed = 0
            if removal_errors:
                partial.append(checkpoint.name)
                failed.append(
                    (
                        checkpoint.name,
                        "partly removed, remains in "
                        f"{os.path.relpath(item_path, root_path)}: {removal_errors[0]}",
                    )
                )
                log.warning("partly removed %s: %s", checkpoint.name, removal_errors[0])
            elif kept_in_trash:
                trashed.append(checkpoint.name)
                in_trash += checkpoint.freeable_bytes
            else:
                bytes_freed = measured
                freed += bytes_freed
            if not removal_errors:
                deleted.append(checkpoint.name)
            if history is not None:
                history.write(
                    "delete",
                    root=root_path,
                    checkpoint=checkpoint.name,
                    step=checkpoint.step,
                    series=checkpoint.series,
                    bytes_freed=bytes_freed,
                    bytes_in_trash=checkpoint.freeable_bytes if kept_in_trash else 0,
                    trash_grace=trash_grace,
                    partial=bool(removal_errors),
                    errors=removal_errors[:3],
                    why=list(decision.reasons),
                    tier=decision.tier,
                    policy=dict(policy or {}),
                )
    if progress is not None:
        progress(len(moved), len(moved), "")
    return ApplyResult(
        deleted=tuple(deleted),
        trashed=tuple(trashed),
        vetoed=tuple(vetoed),
        failed=tuple(failed),
        partial=tuple(partial),
        skipped=tuple(skipped),
        bytes_freed=freed,
        bytes_in_trash=in_trash,
    )


def _veto(
    checkpoint: Checkpoint, holder: proc_facts.Holder, root_path: str, history: HistoryLog | None
) -> tuple[str, str]:
    """Given a checkpoint a process holds, log and record the veto; return (name, reason)."""
    reason = f"in-use:{holder.describe()}"
    log.info("veto %s: %s", checkpoint.name, reason)
    if history is not None:
        history.write(
            "veto",
            root=root_path,
            checkpoint=checkpoint.name,
            step=checkpoint.step,
            reason=reason,
            pid=holder.pid,
            cmdline=holder.cmdline,
        )
    return checkpoint.name, reason
