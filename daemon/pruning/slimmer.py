"""Carry out a guarded plan's slims (issue 11): each checkpoint's resume state into the trash.

The same path as a deletion (daemon/pruning/deleter.py), one checkpoint at a time (slims are
few, and each fsyncs its journal and its record):

1. a last look at the processes: any holder of a file in the checkpoint vetoes its slim;
2. the planned paths are moved into one trash item with a journal written first, then
   `.ckptd-slim.json` is written into the checkpoint (daemon/pruning/slimtrash.py: a crash
   leaves the checkpoint whole or slimmed with its record, never half of it). A planned path
   gone since the plan fails that slim, undone: the checkpoint changed, the next run plans it
   again;
3. one more look, at the item now: a file opened between the check and its rename is put back
   (the slim vetoed);
4. unless the trash's grace keeps it, the item is removed; each slim is one `slim` history
   record with the allocated bytes it freed.

Errors are recorded for that checkpoint and the run goes on with the rest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from daemon.discovery.sizecache import SizeCache
from daemon.errors import UsageError
from daemon.fsio import LOCAL, FileSystem
from daemon.history.events import Slim
from daemon.history.log import NULL_HISTORY, History
from daemon.pruning import slimtrash, trash
from daemon.pruning.vetoes import SLIM, record_veto
from daemon.rootdir import RootDir, opened
from daemon.safety import facts as proc_facts
from daemon.slimming import SlimRecord
from policies.model import Decision, Plan

log = logging.getLogger("ckptd.slim")

HoldersCheck = Callable[[str, Iterable[str]], proc_facts.Facts]


@dataclass(frozen=True)
class SlimResult:
    """Given one run of slims: the checkpoints slimmed (their resume state removed, or in the
    trash for its grace: `trashed`), vetoed and failed ones with why, those not attempted
    (`stop`), and the allocated bytes freed or waiting; with `dry_run`, what would be."""

    slimmed: tuple[str, ...] = ()
    trashed: tuple[str, ...] = ()
    vetoed: tuple[tuple[str, str], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    skipped: tuple[str, ...] = ()
    bytes_freed: int = 0
    bytes_in_trash: int = 0
    would_slim: tuple[str, ...] = ()
    would_free: int = 0


@dataclass
class _Tally:
    slimmed: list[str] = field(default_factory=list)
    trashed: list[str] = field(default_factory=list)
    vetoed: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    bytes_in_trash: int = 0

    def result(self) -> SlimResult:
        return SlimResult(
            slimmed=tuple(self.slimmed),
            trashed=tuple(self.trashed),
            vetoed=tuple(self.vetoed),
            failed=tuple(self.failed),
            skipped=tuple(self.skipped),
            bytes_freed=self.bytes_freed,
            bytes_in_trash=self.bytes_in_trash,
        )


@dataclass(frozen=True)
class _Run:
    """Given one apply: where, when, and what each slim needs."""

    root_path: str
    now: float
    trash: trash.Trash
    history: History
    check: HoldersCheck
    trash_grace: float
    policy: dict[str, object]
    cache: SizeCache | None


def _no_holders(root_path: str, _entries: Iterable[str]) -> proc_facts.Facts:
    return proc_facts.Facts(root_path=root_path, now=0.0)


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
    policy: Mapping[str, object] | None = None,
    cache: SizeCache | None = None,
) -> SlimResult:
    """Given a guarded plan and its root, carry out its slims and return what happened.

    `root` is a path or the root `prune_root` opened: every rename is relative to its
    descriptor and its trash's. `holders_check(root, entries)` is the last-moment veto (None
    skips it: only for tests of the slimmer itself); `stop` set means finish the slim in
    progress and start no other; `cache` forgets each slimmed checkpoint's size.
    """
    slims = [d for d in plan.slimmed if d.checkpoint.name in plan.slim_targets]
    if dry_run:
        return SlimResult(
            would_slim=tuple(d.checkpoint.name for d in slims),
            would_free=sum(plan.slim_targets[d.checkpoint.name].bytes_freed for d in slims),
        )
    tally = _Tally()
    if not slims:
        return tally.result()
    with opened(root) as root_dir:
        try:
            with trash.open_trash(root_dir, create=True, fs=fs) as opened_trash:
                assert opened_trash is not None
                run = _Run(
                    root_path=root_dir.path,
                    now=now,
                    trash=opened_trash,
                    history=history,
                    check=holders_check or _no_holders,
                    trash_grace=trash_grace,
                    policy=dict(policy or {}),
                    cache=cache,
                )
                for index, decision in enumerate(slims):
                    if stop is not None and stop.is_set():
                        tally.skipped.extend(d.checkpoint.name for d in slims[index:])
                        break
                    _slim_one(
                        run, decision, plan.slim_targets[decision.checkpoint.name].paths, tally
                    )
        except OSError as error:
            # No trash can be made (a read-only filesystem): nothing can be slimmed.
            message = f"{error.strerror or error} ({error.filename or trash.TRASH_DIRECTORY})"
            done = {*tally.slimmed, *(name for name, _ in tally.failed + tally.vetoed)}
            for decision in slims:
                if decision.checkpoint.name not in done:
                    tally.failed.append((decision.checkpoint.name, message))
    return tally.result()


def _slim_one(run: _Run, decision: Decision, paths: tuple[str, ...], tally: _Tally) -> None:
    """Given one slim decision and its planned paths: check, move, check again, remove."""
    checkpoint = decision.checkpoint
    holders = run.check(run.root_path, checkpoint.members).holders_of(checkpoint)
    if holders:
        tally.vetoed.append(record_veto(SLIM, run.history, run.root_path, checkpoint, holders[0]))
        return
    try:
        item, record = slimtrash.move_in(run.trash, checkpoint.name, paths, now=run.now)
    except (OSError, UsageError) as error:
        message = _message(error, checkpoint.name)
        log.warning("could not slim %s: %s", checkpoint.name, message)
        tally.failed.append((checkpoint.name, message))
        return
    if run.cache is not None:
        run.cache.forget(run.root_path, checkpoint.name)
    described = run.trash.describe(item)
    facts = run.check(run.trash.real_path(), [item])
    late = facts.holders.get(item, ()) + facts.everywhere
    if late and described is not None:
        try:
            run.trash.put_back(described, pin=False)
        except (OSError, UsageError) as error:
            where = run.trash.dir.at(item).path
            message = f"in-use:{late[0].describe()}; left in {where}: {_message(error, item)}"
            tally.failed.append((checkpoint.name, message))
            return
        tally.vetoed.append(record_veto(SLIM, run.history, run.root_path, checkpoint, late[0]))
        return
    _finish(run, decision, item, described, record, tally)


def _finish(
    run: _Run,
    decision: Decision,
    item: str,
    described: trash.TrashItem | None,
    record: SlimRecord,
    tally: _Tally,
) -> None:
    """Given a done slim, remove its item unless the grace keeps it; tally and record it."""
    checkpoint = decision.checkpoint
    errors: list[str] = []
    freed = 0
    in_trash = 0
    if run.trash_grace > 0 or described is None:
        in_trash = record.bytes_freed
        tally.trashed.append(checkpoint.name)
    else:
        usage, errors = run.trash.remove_measured(described)
        freed = usage.allocated
    tally.slimmed.append(checkpoint.name)
    tally.bytes_freed += freed
    tally.bytes_in_trash += in_trash
    run.history.record(
        Slim(
            root=run.root_path,
            checkpoint=checkpoint.name,
            step=checkpoint.step,
            series=checkpoint.series,
            files=tuple(entry.path for entry in record.files),
            bytes_freed=freed,
            bytes_in_trash=in_trash,
            trash_grace=run.trash_grace,
            partial=bool(errors),
            errors=tuple(errors[:3]),
            why=decision.reasons,
            tier=decision.tier,
            policy=run.policy,
        )
    )
    if errors:
        where = run.trash.dir.at(item).path
        tally.failed.append((checkpoint.name, f"slimmed, partly removed: {errors[0]} ({where})"))


def _message(error: OSError | UsageError, name: str) -> str:
    if isinstance(error, OSError):
        return f"{error.strerror or error} ({error.filename or name})"
    return str(error)
