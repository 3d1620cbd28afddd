"""Writing a snapshot: every file of a plan placed into `<dir>/.tmp-<date>-<pid>`, everything
synced, `MANIFEST.json` written, then one rename to `<dir>/<YYYY-MM-DD>`. A failure at any point
(disk full, the source pruned away) removes the temporary folder: a date name only ever holds a
whole snapshot. Also the snapshots folder's upkeep: old dates past `keep`, and what a crash left.

Checksums (MANIFEST.json): a copied file's sha256 is computed from the copy just written, in a
worker thread that overlaps the next file's copy. A reflinked or hard-linked file shares its
blocks with the checkpoint, so hashing it proves nothing about what we wrote; it gets its size
and mtime now (which catch a rewrite in place) and its sha256 at the first `--verify`, which
records ("seals") it. `hash_shared=True` hashes them at snapshot time instead;
`hash_copies=False` leaves copies to be sealed the same way (the benchmark's comparison).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psutil

from daemon.fsio import LOCAL, TRASH_DIRECTORY
from daemon.snapshots import copying
from daemon.snapshots.plan import FileItem, SnapshotPlan
from daemon.snapshots.schedule import dates_to_remove, snapshot_dates, temporary_owner
from daemon.snapshots.sources import Entry, RefusedSource, Sources, opened

MANIFEST = "MANIFEST.json"


class Stopped(Exception):
    """A stop was requested (the daemon shuts down) while the snapshot was being written."""


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


@dataclass(frozen=True)
class Written:
    """Given one executed plan: its manifest, the files placed per method, the bytes copied."""

    manifest: dict[str, Any]
    by_method: dict[str, int]
    bytes_written: int


@dataclass
class _Placing:
    """What placing the files of one plan has done so far."""

    temporary: str
    bar: _Progress
    stop: threading.Event | None
    sources: Sources
    records: list[dict[str, Any]] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    made: set[str] = field(default_factory=set)
    by_method: dict[str, int] = field(default_factory=dict)
    written: int = 0


# The temporary folders this process is writing right now. A `.tmp-DATE-PID` carrying this
# process's PID but not in here is a leftover of an earlier process that had the same PID —
# always the case for ckptd as PID 1 of a container restarted after a kill.
WRITING: set[str] = set()


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
) -> Written:
    """Given a snapshot plan and a new temporary folder, place every file in it, sync it and
    return what was written. Raises on any failure (`Stopped` when `stop` is set); the caller
    removes the temporary folder."""
    os.makedirs(temporary)
    WRITING.add(temporary)
    try:
        return _execute(
            snapshot_plan,
            temporary,
            stop,
            progress,
            between_files,
            hash_shared,
            hash_copies,
            header,
        )
    finally:
        WRITING.discard(temporary)


def _execute(
    snapshot_plan: SnapshotPlan,
    temporary: str,
    stop: threading.Event | None,
    progress: bool,
    between_files: Callable[[FileItem], None] | None,
    hash_shared: bool,
    hash_copies: bool,
    header: dict[str, Any] | None,
) -> Written:
    """`execute_snapshot_plan`, once its temporary folder is made and marked as this one's."""
    bar = _Progress(progress, snapshot_plan.bytes_total)
    state = _Placing(temporary, bar, stop, Sources(snapshot_plan.roots))
    state.directories.append(temporary)
    state.made.add(temporary)
    pending: list[tuple[dict[str, Any], Future[str]]] = []
    # Two workers hash what was just written while the next file is placed (hashing is the
    # one CPU-bound part; copying and syncing wait on the kernel and the device).
    with (
        state.sources,
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptd-snapshot-hash") as worker,
    ):
        try:
            for item in snapshot_plan.items:
                if stop is not None and stop.is_set():
                    raise Stopped
                if between_files is not None:
                    between_files(item)
                record = _place_item(state, item)
                if record is not None and (
                    hash_copies if record["method"] == "copy" else hash_shared
                ):
                    destination = os.path.join(temporary, item.relative)
                    pending.append((record, worker.submit(copying.sha256_file, destination)))
            manifest: dict[str, Any] = {
                **(header or {}),
                "version": 1,
                "files": state.records,
                "bytes": snapshot_plan.bytes_total,
                "checkpoints": list(snapshot_plan.checkpoints),
            }
            synced = _write_manifest_and_sync(temporary, manifest, pending)
        except BaseException:
            for _record, future in pending:
                future.cancel()
            state.bar.close()
            raise
    state.bar.close()
    # Everything durable before the rename: the syncfs above (one journal commit for the
    # whole snapshot, like `cp; sync`) where the C library has it, else every file, then every
    # folder deepest first.
    if not synced:
        for path in [*state.files, os.path.join(temporary, MANIFEST)]:
            copying.fsync_file(path)
        for directory in sorted(state.directories, key=lambda d: d.count(os.sep), reverse=True):
            LOCAL.fsync_dir(directory)
    return Written(manifest, state.by_method, state.written)


def _place_item(state: _Placing, item: FileItem) -> dict[str, Any] | None:
    """Given the placing so far and one item, make it in the temporary folder and return the
    file's manifest record (None for a folder)."""
    destination = os.path.join(state.temporary, item.relative)
    if item.kind == "dir":
        os.makedirs(destination, exist_ok=True)
        state.directories.append(destination)
        state.made.add(destination)
        return None
    parent = os.path.dirname(destination)
    if parent not in state.made:
        os.makedirs(parent, exist_ok=True)
        state.made.add(parent)
    if item.kind == "symlink":
        assert item.link_target is not None
        os.symlink(item.link_target, destination)
        state.records.append(
            {"path": item.relative, "symlink": item.link_target, "method": "symlink"}
        )
        return None
    entry = state.sources.find(item.root, item.inside, item.source)
    method = place(item, entry, destination, state.bar, state.stop)
    if method == "copy":
        state.written += item.size
    else:
        state.bar.advance(item.size)
    after = os.lstat(destination)
    if after.st_size != item.size:
        raise OSError(
            errno.EIO,
            f"{item.source} changed while it was snapshotted "
            f"({item.size} B planned, {after.st_size} B placed)",
        )
    state.by_method[method] = state.by_method.get(method, 0) + 1
    record: dict[str, Any] = {
        "path": item.relative,
        "size": after.st_size,
        "mtime_ns": after.st_mtime_ns,
        "method": method,
        "sha256": None,
    }
    state.records.append(record)
    state.files.append(destination)
    if method == "copy":
        # The device starts writing it now; hashing reads it from the page cache.
        copying.start_writeback(destination)
    return record


def _write_manifest_and_sync(
    temporary: str,
    manifest: dict[str, Any],
    pending: list[tuple[dict[str, Any], Future[str]]],
) -> bool:
    """Given the temporary folder, its manifest and the checksums still being computed, write
    the manifest and flush the filesystem; return whether that flush covered everything."""
    manifest_path = os.path.join(temporary, MANIFEST)
    if not pending:
        write_manifest(manifest_path, manifest, durable=False)
    # Flushing to the device waits on I/O while the worker is still hashing: overlap.
    synced = copying.sync_filesystem(temporary)
    for record, future in pending:
        record["sha256"] = future.result()
    if pending:
        write_manifest(manifest_path, manifest, durable=True)
        LOCAL.fsync_dir(temporary)
    return synced


def place(
    item: FileItem,
    entry: Entry,
    destination: str,
    bar: _Progress,
    stop: threading.Event | None = None,
) -> copying.Method:
    """Given a file, its source found (`sources`) and its destination, place it by its planned
    method (falling back from a reflink the filesystem refuses after all) and return the
    method used. A hard link needs no descriptor; the others read the file through one."""
    if item.method == "hardlink":
        _hardlink(entry, destination)
        return "hardlink"
    with opened(entry) as source:
        return _clone_or_copy(item, entry, source, destination, bar, stop)


def _clone_or_copy(
    item: FileItem,
    entry: Entry,
    source: int,
    destination: str,
    bar: _Progress,
    stop: threading.Event | None,
) -> copying.Method:
    """`place` for a reflink or a copy, given the source's open descriptor."""
    if item.method == "reflink":
        try:
            copying.reflink_fd(source, destination)
            return "reflink"
        except copying.ReflinkUnsupported:
            if (
                item.complete
                and not item.mutable
                and entry.status.st_dev == os.stat(os.path.dirname(destination)).st_dev
            ):
                _hardlink(entry, destination)
                return "hardlink"

    def on_bytes(count: int) -> None:
        bar.advance(count)
        # One big file takes minutes: SIGTERM must not wait for it (copy_fd removes the
        # half-written file, the caller the temporary folder).
        if stop is not None and stop.is_set():
            raise Stopped

    copying.copy_fd(source, destination, on_bytes=on_bytes)
    return "copy"


def _hardlink(entry: Entry, destination: str) -> None:
    """Given a source found, hard-link the inode found (never what its name is now)."""
    try:
        copying.hardlink_at(entry.folder, entry.name, destination, entry.status)
    except copying.SourceChanged as changed:
        raise RefusedSource(changed.errno, str(changed.strerror), entry.path) from None


def manifest_text(value: dict[str, Any]) -> str:
    """Given a manifest, return it as JSON with one line per file record: readable, and
    made by the C encoder (`indent=` would fall back to the slow pure-Python one)."""
    head = {key: item for key, item in value.items() if key != "files"}
    lines = [json.dumps(record, sort_keys=True) for record in value.get("files", [])]
    body = json.dumps(head, sort_keys=True)[1:-1]
    files = '"files": [\n' + ",\n".join(lines) + "\n]"
    return "{" + (body + ",\n" if body else "") + files + "}\n"


def write_manifest(path: str, value: dict[str, Any], *, durable: bool = True) -> None:
    """Given a path and a manifest, write it there (and to the device when `durable`)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(manifest_text(value))
        handle.flush()
        if durable:
            os.fsync(handle.fileno())


def commit(directory: str, temporary: str, final: str) -> None:
    """Given the snapshots folder, a fully written temporary folder and its date name, give it
    that name (one rename, made durable); refuse when the name is taken meanwhile."""
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "a snapshot for this date appeared meanwhile", final)
    LOCAL.rename(temporary, final)
    LOCAL.fsync_dir(directory)


def abandon(directory: str, temporary: str) -> None:
    """Given the snapshots folder and a temporary folder of a failed snapshot, remove it."""
    if os.path.lexists(temporary):
        try:
            remove_snapshot(directory, os.path.basename(temporary))
        except OSError:
            # The rename into trash failed (e.g. ENOSPC for the trash folder): remove in place.
            LOCAL.remove_tree(temporary, on_error=lambda _path, _error: None)


def describe_failure(error: BaseException) -> str:
    """Given why a snapshot failed, return it as the history and the report say it."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"disk full: {error}"
    if isinstance(error, FileNotFoundError):
        return f"source vanished (pruned away?): {error}"
    if isinstance(error, RefusedSource):
        return f"refused a source file: {error.filename}: {error.strerror}"
    return f"{type(error).__name__}: {error}"


# --- the snapshots folder ----------------------------------------------------------------------


def existing_snapshot_dates(directory: str) -> list[date]:
    """Given the snapshots folder, return the dates of the snapshots in it, oldest first."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return snapshot_dates(entry.name for entry in entries if entry.is_dir(follow_symlinks=False))


def remove_snapshot(directory: str, name: str) -> None:
    """Given the snapshots folder and one entry of it, remove it the safe way: one rename into
    `<dir>/.ckptd-trash/`, then removal without following symlinks."""
    trash = os.path.join(directory, TRASH_DIRECTORY)
    os.makedirs(trash, exist_ok=True)
    parked = os.path.join(trash, f"{name}.{time.time_ns()}")
    LOCAL.rename(os.path.join(directory, name), parked)
    LOCAL.fsync_dir(directory)
    LOCAL.remove_tree(parked)


def remove_old_snapshots(directory: str, keep: int) -> list[str]:
    """Given the snapshots folder and `keep`, remove all but the newest `keep` date folders and
    return the names removed."""
    removed: list[str] = []
    for old in dates_to_remove(existing_snapshot_dates(directory), keep):
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
        owner = temporary_owner(entry.name)
        if owner is None or os.path.join(directory, entry.name) in WRITING:
            continue
        if owner == os.getpid() or not psutil.pid_exists(owner):
            remove_snapshot(directory, entry.name)
            removed.append(entry.name)
    trash = os.path.join(directory, TRASH_DIRECTORY)
    if os.path.isdir(trash):
        for entry in list(os.scandir(trash)):
            LOCAL.remove_tree(entry.path)
            removed.append(f"{TRASH_DIRECTORY}/{entry.name}")
    return removed
