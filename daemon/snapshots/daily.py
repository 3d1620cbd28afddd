"""The daily snapshot job: the newest checkpoints, put aside under today's date, once per date.

The steps live in their own modules: `schedule` (pure: when it is due, which dates to keep),
`plan` (what to copy, as a value, checked against the disk), `execute` (write it under a
temporary name, sync, manifest, one rename), `copying` (the three ways a file is placed) and
`verify`. This module runs them in order, writes the history and returns the report.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time as time_module
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, tzinfo
from typing import Any, Literal

from daemon.clock import utc_iso, zone_for
from daemon.config import Config, RootConfig
from daemon.discovery.scan import ScanResult
from daemon.history.events import (
    SnapshotFailed,
    SnapshotRemoved,
    SnapshotSkipped,
    SnapshotTaken,
)
from daemon.history.log import History
from daemon.snapshots import copying
from daemon.snapshots.execute import (
    Stopped,
    abandon,
    clean_leftovers,
    commit,
    describe_failure,
    execute_snapshot_plan,
    remove_old_snapshots,
)
from daemon.snapshots.plan import (
    FileItem,
    PlanFunction,
    SnapshotError,
    SnapshotPlan,
    build_snapshot_plan,
    would_pass_critical,
)
from daemon.snapshots.schedule import snapshot_due, temporary_name
from policies.model import Plan

Status = Literal["done", "exists", "not_due", "skipped", "failed", "stopped", "disabled"]


@dataclass(frozen=True)
class SnapshotReport:
    """Given one snapshot run: what happened, to which date, with what figures."""

    date: str
    status: Status
    path: str | None = None
    reason: str | None = None
    method: str = "auto"
    checkpoints: tuple[str, ...] = ()
    files: int = 0
    bytes_total: int = 0
    bytes_written: int = 0
    by_method: dict[str, int] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("done", "exists", "not_due", "disabled")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WriteOptions:
    """How the files are written: stop flag, progress bar, test hook, what is hashed now."""

    stop: threading.Event | None = None
    progress: bool = False
    between_files: Callable[[FileItem], None] | None = None
    hash_shared: bool = False
    hash_copies: bool = True


@dataclass(frozen=True)
class _Job:
    """One run of the job: its config, date, folder, method and clock, and its history."""

    config: Config
    today: str
    directory: str
    requested: copying.Requested
    started: float
    history: History


def _default_plan(config: Config, root: RootConfig, *, now: float) -> tuple[ScanResult, Plan]:
    from daemon.planner import plan_root

    return plan_root(config, root, now=now)


def run_daily_snapshot(
    config: Config,
    *,
    now: datetime,
    history: History,
    stop: threading.Event | None = None,
    plan: PlanFunction | None = None,
    method: copying.Requested | None = None,
    progress: bool = False,
    between_files: Callable[[FileItem], None] | None = None,
    hash_shared: bool = False,
    hash_copies: bool = True,
    force: bool = False,
) -> SnapshotReport:
    """Given the config and the (aware) time, take today's snapshot unless it exists and report.

    The daemon calls it at `snapshots.at` and at start-up: before today's `at` it is not due
    yet (`not_due`); after it, today's is taken unless its date folder exists. Never raises for
    a failed snapshot (disk full, the source pruned away): the report says `failed`, the history
    has `snapshot_failed`, and nothing is left under a date name. `force` (`ckptd snapshot` by
    hand) takes it now, whatever the time and even with `snapshots.enabled: false`.
    """
    started = time_module.monotonic()
    settings = config.snapshots
    zone = zone_for(config)  # once: the machine's zone is read from its settings
    today = now.astimezone(zone).date().isoformat()
    early = _not_taken(config, now, zone, history, force=force)
    if early is not None:
        return early
    assert settings.dir is not None
    job = _Job(config, today, settings.dir, method or settings.method, started, history)
    with contextlib.suppress(OSError):
        clean_leftovers(job.directory)
    checked = _checked_plan(job, now=now, plan=plan or _default_plan)
    if isinstance(checked, SnapshotReport):
        return checked
    options = WriteOptions(stop, progress, between_files, hash_shared, hash_copies)
    return _take(job, checked, options)


def _not_taken(
    config: Config, now: datetime, zone: tzinfo, history: History, *, force: bool
) -> SnapshotReport | None:
    """Given the job's start, return the report when today's snapshot is not to be taken now
    (off, nowhere to put it, taken already, not due yet), else None."""
    settings = config.snapshots
    today = now.astimezone(zone).date().isoformat()
    if not settings.enabled and not force:
        return SnapshotReport(date=today, status="disabled", reason="snapshots.enabled is false")
    if settings.dir is None:
        reason = "snapshots.dir is not set"
        history.record(SnapshotSkipped(date=today, reason=reason))
        return SnapshotReport(date=today, status="skipped", reason=reason)
    directory = settings.dir
    final = os.path.join(directory, today)
    if os.path.lexists(final):
        return SnapshotReport(date=today, status="exists", path=final, reason="already taken")
    if not force and snapshot_due(now, settings.at, zone, []) is None:
        # Start-up before today's `at`: the scheduled run will take it.
        return SnapshotReport(
            date=today, status="not_due", reason=f"today's snapshot runs at {settings.at}"
        )
    return None


def _checked_plan(job: _Job, *, now: datetime, plan: PlanFunction) -> SnapshotPlan | SnapshotReport:
    """Given the job, return the snapshot's plan, or the report of why it is not taken (the
    plan cannot be made, holds nothing, or would fill the disk)."""
    history, today, requested = job.history, job.today, job.requested
    try:
        snapshot_plan = build_snapshot_plan(
            job.config, now=now.timestamp(), plan=plan, method=requested
        )
    except (SnapshotError, OSError) as error:
        history.record(SnapshotFailed(date=today, reason=str(error), method=requested))
        return SnapshotReport(
            date=today,
            status="failed",
            reason=str(error),
            method=requested,
            seconds=time_module.monotonic() - job.started,
        )
    if not snapshot_plan.items:
        reason = "no complete checkpoint to snapshot"
        history.record(
            SnapshotSkipped(date=today, reason=reason, errors=tuple(snapshot_plan.errors))
        )
        return SnapshotReport(
            date=today, status="skipped", reason=reason, errors=snapshot_plan.errors
        )
    too_big = would_pass_critical(job.config, job.directory, snapshot_plan.bytes_to_write)
    if too_big is not None:
        history.record(
            SnapshotSkipped(
                date=today,
                reason=too_big,
                bytes_to_write=snapshot_plan.bytes_to_write,
                checkpoints=tuple(snapshot_plan.checkpoints),
            )
        )
        return SnapshotReport(
            date=today,
            status="skipped",
            reason=too_big,
            method=requested,
            checkpoints=snapshot_plan.checkpoints,
            bytes_total=snapshot_plan.bytes_total,
        )
    return snapshot_plan


def _take(job: _Job, snapshot_plan: SnapshotPlan, options: WriteOptions) -> SnapshotReport:
    """Given the job and its checked plan, write the snapshot under its date, remove dates past
    `keep`, and report; a failure leaves nothing under the date name."""
    history, today, requested, directory = job.history, job.today, job.requested, job.directory
    final = os.path.join(directory, today)
    temporary = os.path.join(directory, temporary_name(today, os.getpid()))
    try:
        written = execute_snapshot_plan(
            snapshot_plan,
            temporary,
            stop=options.stop,
            progress=options.progress,
            between_files=options.between_files,
            hash_shared=options.hash_shared,
            hash_copies=options.hash_copies,
            header={
                "date": today,
                "created": utc_iso(time_module.time(), timespec="auto"),
                "method": requested,
            },
        )
        commit(directory, temporary, final)
    except Stopped:
        abandon(directory, temporary)
        history.record(SnapshotFailed(date=today, reason="stopped (shutting down)"))
        return SnapshotReport(
            date=today,
            status="stopped",
            reason="stopped (shutting down)",
            method=requested,
            seconds=time_module.monotonic() - job.started,
        )
    except Exception as error:  # a failed snapshot must never take the daemon down
        abandon(directory, temporary)
        reason = describe_failure(error)
        history.record(
            SnapshotFailed(
                date=today,
                reason=reason,
                method=requested,
                checkpoints=tuple(snapshot_plan.checkpoints),
            )
        )
        return SnapshotReport(
            date=today,
            status="failed",
            reason=reason,
            method=requested,
            checkpoints=snapshot_plan.checkpoints,
            bytes_total=snapshot_plan.bytes_total,
            seconds=time_module.monotonic() - job.started,
        )
    by_method = written.by_method
    seconds = time_module.monotonic() - job.started
    history.record(
        SnapshotTaken(
            date=today,
            path=final,
            method=requested,
            checkpoints=tuple(snapshot_plan.checkpoints),
            files=sum(by_method.values()),
            bytes=snapshot_plan.bytes_total,
            bytes_written=written.bytes_written,
            by_method=by_method,
            seconds=round(seconds, 3),
        )
    )
    removed = _remove_old(job)
    return SnapshotReport(
        date=today,
        status="done",
        path=final,
        method=requested,
        checkpoints=snapshot_plan.checkpoints,
        files=sum(by_method.values()),
        bytes_total=snapshot_plan.bytes_total,
        bytes_written=written.bytes_written,
        by_method=by_method,
        removed=tuple(removed),
        errors=snapshot_plan.errors,
        seconds=seconds,
    )


def _created() -> str:
    """Return the manifest's `created`: now, in UTC, to the microsecond."""
    return utc_iso(time_module.time(), timespec="auto")


def _remove_old(job: _Job) -> list[str]:
    """Given a job that took its snapshot, remove the dates past `keep` and return them."""
    history, settings, today = job.history, job.config.snapshots, job.today
    removed: list[str] = []
    try:
        removed = remove_old_snapshots(job.directory, settings.keep)
    except OSError as error:
        history.record(
            SnapshotFailed(date=today, reason=f"removing old snapshots: {describe_failure(error)}")
        )
    for name in removed:
        history.record(SnapshotRemoved(date=today, removed=name, keep=settings.keep))
    return removed
