"""The one module that deletes: carry out a guarded plan (DESIGN.md, "Deleting").

For each deletion of the plan, in order: re-check which processes hold the checkpoint (any
holder vetoes it), rename its root entries into the trash (`daemon.trash`: atomic for one entry,
journalled and rolled back for several), fsync, then — with no trash grace — remove the trash
item without following symlinks. Errors (permission denied, a file vanishing, a read-only
filesystem) are recorded for that checkpoint and the run goes on with the rest.

Bytes freed are only ever the checkpoint's `freeable_bytes` for a removal that finished; a
checkpoint left in the trash (grace) frees nothing yet, and a partly removed one is reported as
failed with its remains in the trash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from daemon import safety, trash
from daemon.fsio import LOCAL, FileSystem
from daemon.history import HistoryLog
from policies.model import Plan

log = logging.getLogger("ckptd.prune")

HoldersCheck = Callable[[str, Iterable[str]], tuple[safety.Holder, ...]]
Progress = Callable[[int, int, str], None]


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
    holders_check: HoldersCheck | None = safety.holders_of,
    progress: Progress | None = None,
    policy: Mapping[str, object] | None = None,
) -> ApplyResult:
    """Given a guarded plan and its root, carry out its deletions and return what happened.

    `holders_check(root, members)` is the last-moment veto (None skips it: only for tests of
    the deleter itself); `policy` is recorded with each deletion; `stop` set means finish the
    deletion in progress and start no other.
    """
    deletions = plan.deleted
    if dry_run:
        return ApplyResult(
            would_delete=tuple(d.checkpoint.name for d in deletions),
            would_free=sum(d.checkpoint.freeable_bytes for d in deletions),
        )
    deleted: list[str] = []
    trashed: list[str] = []
    vetoed: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    partial: list[str] = []
    skipped: list[str] = []
    freed = 0
    in_trash = 0
    for index, decision in enumerate(deletions):
        checkpoint = decision.checkpoint
        if stop is not None and stop.is_set():
            skipped.extend(d.checkpoint.name for d in deletions[index:])
            break
        if progress is not None:
            progress(index, len(deletions), checkpoint.name)
        holders = holders_check(root_path, checkpoint.members) if holders_check else ()
        if holders:
            reason = f"in-use:{holders[0].describe()}"
            vetoed.append((checkpoint.name, reason))
            log.info("veto %s: %s", checkpoint.name, reason)
            if history is not None:
                history.write(
                    "veto",
                    root=root_path,
                    checkpoint=checkpoint.name,
                    step=checkpoint.step,
                    reason=reason,
                    pid=holders[0].pid,
                    cmdline=holders[0].cmdline,
                )
            continue
        try:
            item_path = trash.move_to_trash(
                root_path, checkpoint.name, checkpoint.members, now=now, fs=fs
            )
        except OSError as error:
            message = f"{error.strerror or error} ({error.filename or checkpoint.name})"
            log.warning("could not delete %s: %s", checkpoint.name, message)
            failed.append((checkpoint.name, message))
            continue
        removal_errors: list[str] = []
        if trash_grace <= 0:
            removal_errors = trash.remove_item(item_path, fs)
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
        elif trash_grace > 0:
            trashed.append(checkpoint.name)
            in_trash += checkpoint.freeable_bytes
        else:
            bytes_freed = checkpoint.freeable_bytes
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
                bytes_in_trash=checkpoint.freeable_bytes if trash_grace > 0 else 0,
                trash_grace=trash_grace,
                partial=bool(removal_errors),
                errors=removal_errors[:3],
                why=list(decision.reasons),
                tier=decision.tier,
                policy=dict(policy or {}),
            )
    if progress is not None:
        progress(len(deletions), len(deletions), "")
    # No trash folder (nothing moved), or a filesystem that cannot fsync folders: nothing to do.
    with contextlib.suppress(OSError):
        fs.fsync_dir(trash.trash_path(root_path))
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
