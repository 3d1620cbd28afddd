"""The daily snapshot: the newest checkpoints, put aside under today's date, once per date.

The plan (which files, placed how, how many bytes it really writes) is built as a value first,
checked against the disk, then executed in one place: into `<dir>/.tmp-<date>-<pid>`, every file
and folder fsynced, `MANIFEST.json` written, then one rename to `<dir>/<YYYY-MM-DD>`. A failure at
any point (disk full, the source pruned away) removes the temporary folder: a date name only
ever holds a whole snapshot, and the date folder's existence is the record that it was taken.

Checksums (MANIFEST.json): a copied file's sha256 is computed from the copy just written, in a
worker thread that overlaps the next file's copy. A reflinked or hard-linked file shares its
blocks with the checkpoint, so hashing it proves nothing about what we wrote; it gets its size
and mtime now (which catch a rewrite in place) and its sha256 at the first `--verify`, which
records ("seals") it. `hash_shared=True` hashes them at snapshot time instead;
`hash_copies=False` leaves copies to be sealed the same way (the benchmark's comparison).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat as stat_module
import threading
import time as time_module
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo

import psutil

from daemon.config import Config, RootConfig
from daemon.discovery.scan import ScanResult
from daemon.fsio import LOCAL, TRASH_DIRECTORY
from daemon.history.events import (
    SnapshotFailed,
    SnapshotRemoved,
    SnapshotSkipped,
    SnapshotTaken,
)
from daemon.history.log import History
from daemon.snapshots import copying
from policies.model import Checkpoint, Plan

MANIFEST = "MANIFEST.json"
DATE_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}$")
TEMPORARY_NAME = re.compile(r"^\.tmp-(\d{4}-\d{2}-\d{2})-(\d+)$")
# The temporary folders this process is writing right now. A `.tmp-DATE-PID` carrying this
# process's PID but not in here is a leftover of an earlier process that had the same PID —
# always the case for ckptd as PID 1 of a container restarted after a kill.
_WRITING: set[str] = set()

Status = Literal["done", "exists", "not_due", "skipped", "failed", "stopped", "disabled"]
PlanFunction = Callable[..., tuple[ScanResult, Plan]]


# --- when ----------------------------------------------------------------------------------


def zone_for(config: Config) -> tzinfo:
    """Given the config, return its timezone (the machine's own when none is configured)."""
    if config.timezone:
        return ZoneInfo(config.timezone)
    local = datetime.now().astimezone().tzinfo
    assert local is not None
    return local


def _zone(timezone: str | tzinfo) -> tzinfo:
    return ZoneInfo(timezone) if isinstance(timezone, str) else timezone


def scheduled_instant(day: date, at: str, timezone: str | tzinfo) -> datetime:
    """Given a date, a wall-clock time "HH:MM" and a zone, return the aware instant it means.

    A wall time that happens twice (the autumn DST change) means its first occurrence. One that
    does not exist (inside the spring gap, e.g. 02:30 in Europe/Berlin on 2026-03-29) means the
    first moment after the gap, as cron does: 03:00 local.
    """
    zone = _zone(timezone)
    hours, minutes = (int(part) for part in at.split(":"))
    wall = datetime.combine(day, time(hours, minutes))
    for shift in range(0, 24 * 60):
        candidate = (wall + timedelta(minutes=shift)).replace(tzinfo=zone, fold=0)
        round_trip = candidate.astimezone(UTC).astimezone(zone)
        if round_trip.replace(tzinfo=None) == candidate.replace(tzinfo=None):
            return candidate
    raise ValueError(f"no valid local time at or after {at} on {day} in {zone}")


def snapshot_due(
    now: datetime, at: str, timezone: str | tzinfo, existing_dates: Collection[date]
) -> date | None:
    """Given the time, `snapshots.at`, the zone and the dates already taken, return the date
    whose snapshot should be taken now, or None.

    Today's (local date in the zone) is due once its scheduled instant has passed and no folder
    for it exists: at the scheduled time and at start-up after a missed one. A missed earlier
    day is not made up later under its own name: a snapshot is named for when it was taken.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    zone = _zone(timezone)
    today = now.astimezone(zone).date()
    if today in existing_dates:
        return None
    return today if now >= scheduled_instant(today, at, zone) else None


def next_snapshot_time(
    now: datetime, at: str, timezone: str | tzinfo, existing_dates: Collection[date]
) -> datetime:
    """Given the time, `snapshots.at`, the zone and the dates taken, return when the next
    snapshot runs (now, if one is due)."""
    zone = _zone(timezone)
    if snapshot_due(now, at, zone, existing_dates) is not None:
        return now
    today = now.astimezone(zone).date()
    today_at = scheduled_instant(today, at, zone)
    if now < today_at and today not in existing_dates:
        return today_at
    return scheduled_instant(today + timedelta(days=1), at, zone)


def existing_snapshot_dates(directory: str) -> list[date]:
    """Given the snapshots folder, return the dates of the snapshots in it, oldest first."""
    found: list[date] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if DATE_NAME.match(entry.name) and entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(ValueError):
                found.append(date.fromisoformat(entry.name))
    return sorted(found)


# --- what ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileItem:
    """One entry of the snapshot: where it comes from, where it goes, how it is placed."""

    source: str
    relative: str  # inside the snapshot: "<root name>/<checkpoint>/…"
    kind: Literal["file", "dir", "symlink"]
    size: int = 0
    mtime_ns: int = 0
    device: int = 0
    complete: bool = True
    mutable: bool = False
    method: copying.Method = "copy"
    link_target: str | None = None


@dataclass(frozen=True, slots=True)
class SnapshotPlan:
    """Given the roots: what the snapshot holds and what it would really write."""

    checkpoints: tuple[str, ...]  # "<root name>/<checkpoint>"
    items: tuple[FileItem, ...]
    bytes_total: int
    bytes_to_write: int  # what copies write; reflinks and hard links write (almost) nothing
    errors: tuple[str, ...] = ()


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


def root_names(roots: Sequence[RootConfig]) -> dict[str, str]:
    """Given the roots, return each root path's folder name in the snapshot, made unique."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for root in roots:
        base = os.path.basename(os.path.normpath(root.path)) or "root"
        name, counter = base, 2
        while name in taken:
            name, counter = f"{base}-{counter}", counter + 1
        taken.add(name)
        names[root.path] = name
    return names


def select_checkpoints(scan: ScanResult, plan: Plan, scope: str) -> list[Checkpoint]:
    """Given a root's scan and plan, return the checkpoints a snapshot takes.

    `latest`: the newest complete checkpoint of each series (one series in the common case);
    `all`: every complete checkpoint the plan keeps.
    """
    if scope == "all":
        return [d.checkpoint for d in plan.decisions if d.keep and d.checkpoint.complete]
    newest: dict[str, Checkpoint] = {}
    for checkpoint in scan.checkpoints:
        if not checkpoint.complete:
            continue
        current = newest.get(checkpoint.series)
        if current is None or checkpoint.step > current.step:
            newest[checkpoint.series] = checkpoint
    return sorted(newest.values(), key=lambda c: (c.series, c.step))


def _walk(
    source: str, relative: str, *, complete: bool, mutable: Sequence[str]
) -> Iterator[FileItem]:
    """Given a path and its name in the snapshot, yield it and everything below, never following
    a symlink (a link is recreated as a link)."""
    info = os.lstat(source)
    if stat_module.S_ISLNK(info.st_mode):
        yield FileItem(
            source, relative, "symlink", complete=complete, link_target=os.readlink(source)
        )
    elif stat_module.S_ISDIR(info.st_mode):
        yield FileItem(
            source,
            relative,
            "dir",
            mtime_ns=info.st_mtime_ns,
            device=info.st_dev,
            complete=complete,
        )
        with os.scandir(source) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            yield from _walk(
                os.path.join(source, name),
                f"{relative}/{name}",
                complete=complete,
                mutable=mutable,
            )
    elif stat_module.S_ISREG(info.st_mode):
        yield FileItem(
            source,
            relative,
            "file",
            size=info.st_size,
            mtime_ns=info.st_mtime_ns,
            device=info.st_dev,
            complete=complete,
            mutable=copying.is_mutable(relative.split("/", 1)[-1], mutable),
        )
    # Sockets, fifos and devices are not checkpoint data.


def reflink_probe(source: str, directory: str) -> bool:
    """Given a file and a folder, return whether a clone of the file can be made in the folder."""
    probe = os.path.join(directory, f".reflink-probe-{os.getpid()}-{threading.get_ident()}")
    try:
        copying.reflink(source, probe)
    except copying.ReflinkUnsupported:
        return False
    except OSError:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(probe)
    return True


def build_snapshot_plan(
    config: Config,
    *,
    now: float,
    plan: PlanFunction,
    method: copying.Requested | None = None,
) -> SnapshotPlan:
    """Given the config and the time, return what today's snapshot holds and how each file is
    placed. Raises `SnapshotError` when an explicit method cannot work here."""
    settings = config.snapshots
    assert settings.dir is not None
    requested: copying.Requested = method or settings.method
    names = root_names(config.roots)
    selected: list[tuple[RootConfig, Checkpoint]] = []
    errors: list[str] = []
    for root in config.roots:
        try:
            scan, root_plan = plan(config, root, now=now)
        except Exception as error:  # one unreadable root must not cost the others their snapshot
            errors.append(f"{root.path}: {error}")
            continue
        selected.extend(
            (root, checkpoint) for checkpoint in select_checkpoints(scan, root_plan, settings.scope)
        )

    raw: list[FileItem] = []
    for root, checkpoint in selected:
        for member in checkpoint.members:
            raw.extend(
                _walk(
                    os.path.join(root.path, member),
                    f"{names[root.path]}/{member}",
                    complete=checkpoint.complete,
                    mutable=settings.mutable,
                )
            )

    os.makedirs(settings.dir, exist_ok=True)
    target_device = os.stat(settings.dir).st_dev
    reflink_works: dict[int, bool] = {}
    if requested in ("auto", "reflink"):
        for item in raw:
            if item.kind == "file" and item.device not in reflink_works:
                reflink_works[item.device] = reflink_probe(item.source, settings.dir)
    items: list[FileItem] = []
    for item in raw:
        if item.kind != "file":
            items.append(item)
            continue
        same = item.device == target_device
        if requested == "reflink" and not reflink_works.get(item.device, False):
            raise SnapshotError(
                f"snapshots.method is reflink, but the filesystem of {settings.dir} cannot clone "
                f"{item.source} (no reflink support, or another filesystem); use method auto"
            )
        if requested == "hardlink" and not same and not item.mutable:
            raise SnapshotError(
                f"snapshots.method is hardlink, but {settings.dir} is on another filesystem "
                f"than {item.source}; use method auto or copy"
            )
        chosen = copying.choose_method(
            requested,
            mutable=item.mutable,
            complete=item.complete,
            reflink_works=reflink_works.get(item.device, False),
            same_filesystem=same,
        )
        items.append(replace(item, method=chosen))
    files = [item for item in items if item.kind == "file"]
    return SnapshotPlan(
        checkpoints=tuple(f"{names[root.path]}/{c.name}" for root, c in selected),
        items=tuple(items),
        bytes_total=sum(item.size for item in files),
        bytes_to_write=sum(item.size for item in files if item.method == "copy"),
        errors=tuple(errors),
    )


class SnapshotError(Exception):
    """The snapshot cannot be taken as configured (say why, take nothing)."""


# --- disk ----------------------------------------------------------------------------------


def would_pass_critical(config: Config, directory: str, bytes_to_write: int) -> str | None:
    """Given the config, the snapshots folder and the bytes a snapshot writes, return why it
    would push that filesystem past the critical threshold, or None when it fits."""
    usage = psutil.disk_usage(directory)
    used_after = usage.used + bytes_to_write
    # The same percent as `df` and the disk check: of the space usable by non-root users.
    usable = usage.used + usage.free
    percent_after = 100.0 * used_after / usable if usable else 100.0
    free_after = usage.free - bytes_to_write
    if percent_after > config.disk.critical_percent:
        return (
            f"would write {bytes_to_write} B and bring {directory} to {percent_after:.1f}% used "
            f"(critical: {config.disk.critical_percent:g}%)"
        )
    if free_after < 0:
        return f"would write {bytes_to_write} B with only {usage.free} B free"
    if config.disk.min_free is not None and free_after < config.disk.min_free:
        return (
            f"would write {bytes_to_write} B and leave {free_after} B free "
            f"(min_free: {config.disk.min_free} B)"
        )
    return None


# --- how -----------------------------------------------------------------------------------


class _Stopped(Exception):
    pass


class _Progress:
    """A rich progress bar by bytes, or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar: Any = None
        self._task: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("snapshot"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("snapshot", total=total)

    def advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def execute_snapshot_plan(
    snapshot_plan: SnapshotPlan,
    temporary: str,
    *,
    stop: threading.Event | None = None,
    progress: bool = False,
    between_files: Callable[[FileItem], None] | None = None,
    hash_shared: bool = False,
    hash_copies: bool = True,
    header: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, int], int]:
    """Given a snapshot plan and a new temporary folder, place every file in it, sync it and
    return (manifest, files per method, bytes written). Raises on any failure; the caller
    removes the temporary folder."""
    os.makedirs(temporary)
    by_method: dict[str, int] = {}
    written = 0
    records: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Future[str]]] = []
    directories = [temporary]
    files: list[str] = []
    made = {temporary}
    bar = _Progress(progress, snapshot_plan.bytes_total)
    # Two workers hash what was just written while the next file is placed (hashing is the
    # one CPU-bound part; copying and syncing wait on the kernel and the device).
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptd-snapshot-hash") as worker:
        try:
            for item in snapshot_plan.items:
                if stop is not None and stop.is_set():
                    raise _Stopped
                if between_files is not None:
                    between_files(item)
                destination = os.path.join(temporary, item.relative)
                if item.kind == "dir":
                    os.makedirs(destination, exist_ok=True)
                    directories.append(destination)
                    made.add(destination)
                    continue
                parent = os.path.dirname(destination)
                if parent not in made:
                    os.makedirs(parent, exist_ok=True)
                    made.add(parent)
                if item.kind == "symlink":
                    assert item.link_target is not None
                    os.symlink(item.link_target, destination)
                    records.append(
                        {"path": item.relative, "symlink": item.link_target, "method": "symlink"}
                    )
                    continue
                method = _place(item, destination, bar, stop)
                if method == "copy":
                    written += item.size
                else:
                    bar.advance(item.size)
                after = os.lstat(destination)
                if after.st_size != item.size:
                    raise OSError(
                        errno.EIO,
                        f"{item.source} changed while it was snapshotted "
                        f"({item.size} B planned, {after.st_size} B placed)",
                    )
                by_method[method] = by_method.get(method, 0) + 1
                record: dict[str, Any] = {
                    "path": item.relative,
                    "size": after.st_size,
                    "mtime_ns": after.st_mtime_ns,
                    "method": method,
                    "sha256": None,
                }
                records.append(record)
                files.append(destination)
                if method == "copy":
                    # The device starts writing it now; hashing reads it from the page cache.
                    copying.start_writeback(destination)
                if hash_copies if method == "copy" else hash_shared:
                    pending.append((record, worker.submit(copying.sha256_file, destination)))
            manifest: dict[str, Any] = {
                **(header or {}),
                "version": 1,
                "files": records,
                "bytes": snapshot_plan.bytes_total,
                "checkpoints": list(snapshot_plan.checkpoints),
            }
            manifest_path = os.path.join(temporary, MANIFEST)
            if not pending:
                _write_json(manifest_path, manifest, durable=False)
            # Flushing to the device waits on I/O while the worker is still hashing: overlap.
            synced = copying.sync_filesystem(temporary)
            for record, future in pending:
                record["sha256"] = future.result()
            if pending:
                _write_json(manifest_path, manifest, durable=True)
                LOCAL.fsync_dir(temporary)
        except BaseException:
            for _record, future in pending:
                future.cancel()
            bar.close()
            raise
    bar.close()
    # Everything durable before the rename: the syncfs above (one journal commit for the
    # whole snapshot, like `cp; sync`) where the C library has it, else every file, then every
    # folder deepest first.
    if not synced:
        for path in [*files, manifest_path]:
            copying.fsync_file(path)
        for directory in sorted(directories, key=lambda d: d.count(os.sep), reverse=True):
            LOCAL.fsync_dir(directory)
    return manifest, by_method, written


def _place(
    item: FileItem, destination: str, bar: _Progress, stop: threading.Event | None = None
) -> copying.Method:
    """Given a file and its destination, place it by its planned method (falling back from a
    reflink the filesystem refuses after all) and return the method used."""
    if item.method == "reflink":
        try:
            copying.reflink(item.source, destination)
            return "reflink"
        except copying.ReflinkUnsupported:
            if (
                item.complete
                and not item.mutable
                and item.device == os.stat(os.path.dirname(destination)).st_dev
            ):
                copying.hardlink(item.source, destination)
                return "hardlink"
    elif item.method == "hardlink":
        copying.hardlink(item.source, destination)
        return "hardlink"

    def on_bytes(count: int) -> None:
        bar.advance(count)
        # One big file takes minutes: SIGTERM must not wait for it (copy_file removes the
        # half-written file, the caller the temporary folder).
        if stop is not None and stop.is_set():
            raise _Stopped

    copying.copy_file(item.source, destination, on_bytes=on_bytes)
    return "copy"


def _json_text(value: dict[str, Any]) -> str:
    """Given a manifest, return it as JSON with one line per file record: readable, and
    made by the C encoder (`indent=` would fall back to the slow pure-Python one)."""
    head = {key: item for key, item in value.items() if key != "files"}
    lines = [json.dumps(record, sort_keys=True) for record in value.get("files", [])]
    body = json.dumps(head, sort_keys=True)[1:-1]
    files = '"files": [\n' + ",\n".join(lines) + "\n]"
    return "{" + (body + ",\n" if body else "") + files + "}\n"


def _write_json(path: str, value: dict[str, Any], *, durable: bool = True) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(_json_text(value))
        handle.flush()
        if durable:
            os.fsync(handle.fileno())


# --- retention and leftovers -----------------------------------------------------------------


def remove_snapshot(directory: str, name: str) -> None:
    """Given the snapshots folder and one entry of it, remove it the safe way: one rename into
    `<dir>/.ckptd-trash/`, then removal without following symlinks."""
    trash = os.path.join(directory, TRASH_DIRECTORY)
    os.makedirs(trash, exist_ok=True)
    parked = os.path.join(trash, f"{name}.{time_module.time_ns()}")
    LOCAL.rename(os.path.join(directory, name), parked)
    LOCAL.fsync_dir(directory)
    LOCAL.remove_tree(parked)


def remove_old_snapshots(directory: str, keep: int) -> list[str]:
    """Given the snapshots folder and `keep`, remove all but the newest `keep` date folders and
    return the names removed."""
    dates = existing_snapshot_dates(directory)
    removed: list[str] = []
    for old in dates[: max(0, len(dates) - keep)]:
        remove_snapshot(directory, old.isoformat())
        removed.append(old.isoformat())
    return removed


def clean_leftovers(directory: str) -> list[str]:
    """Given the snapshots folder, finish what a crash left: temporary folders of processes that
    are gone, and the trash. Return what was removed."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = TEMPORARY_NAME.match(entry.name)
        if match is None or os.path.join(directory, entry.name) in _WRITING:
            continue
        owner = int(match.group(2))
        if owner == os.getpid() or not psutil.pid_exists(owner):
            remove_snapshot(directory, entry.name)
            removed.append(entry.name)
    trash = os.path.join(directory, TRASH_DIRECTORY)
    if os.path.isdir(trash):
        for entry in list(os.scandir(trash)):
            LOCAL.remove_tree(entry.path)
            removed.append(f"{TRASH_DIRECTORY}/{entry.name}")
    return removed


# --- the job -------------------------------------------------------------------------------


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
    today = now.astimezone(zone_for(config)).date().isoformat()

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
    if not force and snapshot_due(now, settings.at, zone_for(config), []) is None:
        # Start-up before today's `at`: the scheduled run will take it.
        return SnapshotReport(
            date=today, status="not_due", reason=f"today's snapshot runs at {settings.at}"
        )

    requested = method or settings.method
    with contextlib.suppress(OSError):
        clean_leftovers(directory)
    try:
        snapshot_plan = build_snapshot_plan(
            config, now=now.timestamp(), plan=plan or _default_plan, method=requested
        )
    except (SnapshotError, OSError) as error:
        history.record(SnapshotFailed(date=today, reason=str(error), method=requested))
        return SnapshotReport(
            date=today,
            status="failed",
            reason=str(error),
            method=requested,
            seconds=time_module.monotonic() - started,
        )
    if not snapshot_plan.items:
        reason = "no complete checkpoint to snapshot"
        history.record(
            SnapshotSkipped(date=today, reason=reason, errors=tuple(snapshot_plan.errors))
        )
        return SnapshotReport(
            date=today, status="skipped", reason=reason, errors=snapshot_plan.errors
        )
    too_big = would_pass_critical(config, directory, snapshot_plan.bytes_to_write)
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

    temporary = os.path.join(directory, f".tmp-{today}-{os.getpid()}")
    _WRITING.add(temporary)
    try:
        _manifest, by_method, written = execute_snapshot_plan(
            snapshot_plan,
            temporary,
            stop=stop,
            progress=progress,
            between_files=between_files,
            hash_shared=hash_shared,
            hash_copies=hash_copies,
            header={"date": today, "created": datetime.now(UTC).isoformat(), "method": requested},
        )
        if os.path.lexists(final):
            raise FileExistsError(
                errno.EEXIST, "a snapshot for this date appeared meanwhile", final
            )
        LOCAL.rename(temporary, final)
        LOCAL.fsync_dir(directory)
    except _Stopped:
        _abandon(directory, temporary)
        history.record(SnapshotFailed(date=today, reason="stopped (shutting down)"))
        return SnapshotReport(
            date=today,
            status="stopped",
            reason="stopped (shutting down)",
            method=requested,
            seconds=time_module.monotonic() - started,
        )
    except Exception as error:  # a failed snapshot must never take the daemon down
        _abandon(directory, temporary)
        reason = _describe(error)
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
            seconds=time_module.monotonic() - started,
        )
    finally:
        _WRITING.discard(temporary)
    seconds = time_module.monotonic() - started
    history.record(
        SnapshotTaken(
            date=today,
            path=final,
            method=requested,
            checkpoints=tuple(snapshot_plan.checkpoints),
            files=sum(by_method.values()),
            bytes=snapshot_plan.bytes_total,
            bytes_written=written,
            by_method=by_method,
            seconds=round(seconds, 3),
        )
    )
    removed: list[str] = []
    try:
        removed = remove_old_snapshots(directory, settings.keep)
    except OSError as error:
        history.record(
            SnapshotFailed(date=today, reason=f"removing old snapshots: {_describe(error)}")
        )
    for name in removed:
        history.record(SnapshotRemoved(date=today, removed=name, keep=settings.keep))
    return SnapshotReport(
        date=today,
        status="done",
        path=final,
        method=requested,
        checkpoints=snapshot_plan.checkpoints,
        files=sum(by_method.values()),
        bytes_total=snapshot_plan.bytes_total,
        bytes_written=written,
        by_method=by_method,
        removed=tuple(removed),
        errors=snapshot_plan.errors,
        seconds=seconds,
    )


def _abandon(directory: str, temporary: str) -> None:
    if os.path.lexists(temporary):
        try:
            remove_snapshot(directory, os.path.basename(temporary))
        except OSError:
            # The rename into trash failed (e.g. ENOSPC for the trash folder): remove in place.
            LOCAL.remove_tree(temporary, on_error=lambda _path, _error: None)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"disk full: {error}"
    if isinstance(error, FileNotFoundError):
        return f"source vanished (pruned away?): {error}"
    return f"{type(error).__name__}: {error}"


# --- verify --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """Given one snapshot checked against its manifest: every difference found."""

    path: str
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    size: tuple[str, ...] = ()
    checksum: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()  # shared files not yet hashed whose mtime changed
    sealed: int = 0  # checksums recorded by this verify
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.size or self.checksum or self.modified)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def resolve_snapshot(directory: str, which: str) -> str:
    """Given the snapshots folder and a DATE or "latest", return the snapshot's path."""
    if which == "latest":
        dates = existing_snapshot_dates(directory)
        if not dates:
            raise FileNotFoundError(errno.ENOENT, "no snapshot yet", directory)
        return os.path.join(directory, dates[-1].isoformat())
    path = os.path.join(directory, which)
    if not DATE_NAME.match(which) or not os.path.isdir(path):
        raise FileNotFoundError(errno.ENOENT, "no snapshot for that date", path)
    return path


def verify_snapshot(path: str, *, seal: bool = True) -> VerifyResult:
    """Given a snapshot folder, return how it differs from its MANIFEST.json.

    Shared (linked) files recorded without a checksum are hashed now and, with `seal`, their
    checksum is written into the manifest so later verifies compare against it.
    """
    manifest_path = os.path.join(path, MANIFEST)
    with open(manifest_path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    expected = {record["path"]: record for record in manifest["files"]}
    present: set[str] = set()
    for current, folders, files in os.walk(path):
        relative_folder = os.path.relpath(current, path)
        for name in files + [f for f in folders if os.path.islink(os.path.join(current, f))]:
            relative = name if relative_folder == "." else f"{relative_folder}/{name}"
            if relative != MANIFEST:
                present.add(relative)
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    size: list[str] = []
    checksum: list[str] = []
    modified: list[str] = []
    sealed = 0
    for relative in sorted(set(expected) & present):
        record = expected[relative]
        full = os.path.join(path, relative)
        if "symlink" in record:
            if not os.path.islink(full) or os.readlink(full) != record["symlink"]:
                checksum.append(relative)
            continue
        info = os.lstat(full)
        if info.st_size != record["size"]:
            size.append(f"{relative}: {record['size']} B in manifest, {info.st_size} B on disk")
            continue
        actual = copying.sha256_file(full)
        if record.get("sha256") is None:
            if info.st_mtime_ns != record.get("mtime_ns"):
                modified.append(f"{relative}: rewritten since the snapshot (mtime changed)")
                continue
            record["sha256"] = actual
            sealed += 1
        elif actual != record["sha256"]:
            checksum.append(f"{relative}: sha256 {actual[:12]}… ≠ {record['sha256'][:12]}…")
    if seal and sealed:
        temporary = manifest_path + ".tmp"
        _write_json(temporary, manifest)
        os.replace(temporary, manifest_path)
    return VerifyResult(
        path=path,
        missing=tuple(missing),
        extra=tuple(extra),
        size=tuple(size),
        checksum=tuple(checksum),
        modified=tuple(modified),
        sealed=sealed,
        checked=len(expected),
    )
