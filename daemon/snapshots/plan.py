"""What a snapshot holds, as a value: which checkpoints, every file below them, how each is
placed (reflink, hard link, copy) and how many bytes that really writes; and whether writing it
would push the disk past the critical threshold. Reading the roots is all this does: nothing
is written but a one-file reflink probe, removed at once.
"""

from __future__ import annotations

import contextlib
import os
import stat as stat_module
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import psutil

from daemon.config import Config, RootConfig
from daemon.discovery.scan import ScanResult
from daemon.errors import CkptdError
from daemon.rootdir import Identity, root_key
from daemon.snapshots import copying
from daemon.snapshots.sources import PlannedRoot, Sources, opened
from daemon.storage.url import is_remote
from policies.model import Checkpoint, Plan

PlanFunction = Callable[..., tuple[ScanResult, Plan]]


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
    root: str = ""  # the root it is read from, as configured
    inside: str = ""  # its path inside that root, "/"-separated: what is opened, name by name


@dataclass(frozen=True, slots=True)
class SnapshotPlan:
    """Given the roots: what the snapshot holds and what it would really write."""

    checkpoints: tuple[str, ...]  # "<root name>/<checkpoint>"
    items: tuple[FileItem, ...]
    bytes_total: int
    bytes_to_write: int  # what copies write; reflinks and hard links write (almost) nothing
    errors: tuple[str, ...] = ()
    roots: tuple[PlannedRoot, ...] = ()  # the roots read, as the plan saw them


class SnapshotError(Exception):
    """The snapshot cannot be taken as configured (say why, take nothing)."""


class Selected(NamedTuple):
    """One checkpoint a snapshot takes, with the root it is in."""

    root: RootConfig
    checkpoint: Checkpoint


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


def walk(
    root: str, inside: str, relative: str, *, complete: bool, mutable: Sequence[str]
) -> Iterator[FileItem]:
    """Given a root, a path inside it and its name in the snapshot, yield it and everything
    below, never following a symlink (a link is recreated as a link). Only names and sizes are
    read here: placing opens each file again, safely (`sources`)."""
    source = os.path.join(root, inside)
    info = os.lstat(source)
    if stat_module.S_ISLNK(info.st_mode):
        yield FileItem(
            source,
            relative,
            "symlink",
            complete=complete,
            link_target=os.readlink(source),
            root=root,
            inside=inside,
        )
    elif stat_module.S_ISDIR(info.st_mode):
        yield FileItem(
            source,
            relative,
            "dir",
            mtime_ns=info.st_mtime_ns,
            device=info.st_dev,
            complete=complete,
            root=root,
            inside=inside,
        )
        with os.scandir(source) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            yield from walk(
                root, f"{inside}/{name}", f"{relative}/{name}", complete=complete, mutable=mutable
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
            root=root,
            inside=inside,
        )
    # Sockets, fifos and devices are not checkpoint data.


def reflink_probe(item: FileItem, directory: str, sources: Sources) -> bool:
    """Given a file, the roots open for reading and a folder, return whether a clone of the
    file can be made in the folder (no: also when the file is refused, or its root changed)."""
    probe = os.path.join(directory, f".reflink-probe-{os.getpid()}-{threading.get_ident()}")
    try:
        with opened(sources.find(item.root, item.inside, item.source)) as descriptor:
            copying.reflink_fd(descriptor, probe)
    except (OSError, CkptdError):  # refused, vanished, or its root changed or went away
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
    selected, errors = _select(config, plan, now=now)
    raw: list[FileItem] = []
    roots: dict[str, PlannedRoot] = {}
    for root, checkpoint in selected:
        if root.path not in roots:
            roots[root.path] = PlannedRoot(root.path, Identity.of(os.stat(root_key(root.path))))
        for member in checkpoint.members:
            raw.extend(
                walk(
                    root.path,
                    member,
                    f"{names[root.path]}/{member}",
                    complete=checkpoint.complete,
                    mutable=settings.mutable,
                )
            )
    os.makedirs(settings.dir, exist_ok=True)
    with Sources(roots.values()) as sources:
        items = _choose_methods(raw, settings.dir, requested, sources)
    files = [item for item in items if item.kind == "file"]
    return SnapshotPlan(
        checkpoints=tuple(f"{names[root.path]}/{c.name}" for root, c in selected),
        items=tuple(items),
        bytes_total=sum(item.size for item in files),
        bytes_to_write=sum(item.size for item in files if item.method == "copy"),
        errors=tuple(errors),
        roots=tuple(roots.values()),
    )


def _select(config: Config, plan: PlanFunction, *, now: float) -> tuple[list[Selected], list[str]]:
    """Given the config, return the checkpoints of every root the snapshot takes, and the
    errors of roots that could not be planned."""
    selected: list[Selected] = []
    errors: list[str] = []
    for root in config.roots:
        if is_remote(root.path):
            continue  # snapshots are local copies of local roots (README, object storage)
        try:
            scan, root_plan = plan(config, root, now=now)
        except Exception as error:  # one unreadable root must not cost the others their snapshot
            errors.append(f"{root.path}: {error}")
            continue
        selected.extend(
            Selected(root, checkpoint)
            for checkpoint in select_checkpoints(scan, root_plan, config.snapshots.scope)
        )
    return selected, errors


def _choose_methods(
    raw: Sequence[FileItem], directory: str, requested: copying.Requested, sources: Sources
) -> list[FileItem]:
    """Given the walked items, the snapshots folder and the configured method, return the items
    with each file's placing method; raise `SnapshotError` when an explicit one cannot work."""
    target_device = os.stat(directory).st_dev
    reflink_works: dict[int, bool] = {}
    if requested in ("auto", "reflink"):
        for item in raw:
            if item.kind == "file" and item.device not in reflink_works:
                reflink_works[item.device] = reflink_probe(item, directory, sources)
    items: list[FileItem] = []
    for item in raw:
        if item.kind != "file":
            items.append(item)
            continue
        same = item.device == target_device
        if requested == "reflink" and not reflink_works.get(item.device, False):
            raise SnapshotError(
                f"snapshots.method is reflink, but the filesystem of {directory} cannot clone "
                f"{item.source} (no reflink support, or another filesystem); use method auto"
            )
        if requested == "hardlink" and not same and not item.mutable:
            raise SnapshotError(
                f"snapshots.method is hardlink, but {directory} is on another filesystem "
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
    return items


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
