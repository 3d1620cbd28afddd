"""What a snapshot holds, as a value: which checkpoints, every file below them, how each is
placed (reflink, hard link, copy) and how many bytes that really writes; and whether writing it
would push the disk past the critical threshold. Reading the roots is all this does: nothing
is written but a one-file reflink probe, removed at once.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat as stat_module
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import psutil

from daemon.config import Config, RootConfig
from daemon.discovery.scan import ScanResult
from daemon.errors import CkptdError
from daemon.fsio import DIRECTORY_FLAGS, _kind
from daemon.rootdir import IdentityStore, open_root
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


# The deepest a checkpoint's folders are walked: each folder holds a descriptor while what is
# below it is listed, and no checkpoint any framework writes comes near it.
MAX_DEPTH = 64


class Place(NamedTuple):
    """Where a walk is: the root as configured, a path inside it ("/"-separated, what is
    opened name by name) and its name in the snapshot."""

    root: str
    inside: str
    relative: str

    def below(self, name: str) -> Place:
        return Place(self.root, f"{self.inside}/{name}", f"{self.relative}/{name}")

    @property
    def source(self) -> str:
        return os.path.join(self.root, self.inside)


class _Listed(NamedTuple):
    """A folder being walked: its descriptor, where it is, and its entries still to yield."""

    fd: int
    place: Place
    entries: Iterator[tuple[str, os.stat_result]]


def walk(
    root_fd: int,
    place: Place,
    *,
    complete: bool,
    mutable: Sequence[str],
    skipped: list[str],
) -> Iterator[FileItem]:
    """Given an open root and one of its entries (a checkpoint folder or file), yield it and
    everything below it, sorted by name, never following a symlink.

    Every folder is opened relative to the one above it (`O_DIRECTORY|O_NOFOLLOW`) and listed
    through that descriptor, every entry stat-ed without following it: a folder its owner swaps
    for a symlink out of the root, before or while it is listed, shows nothing from outside.
    A symlink inside a checkpoint is recreated as a link (its target is never read); a folder
    that is a symlink (or no folder) when opened, a checkpoint that is a symlink, and folders
    deeper than MAX_DEPTH are left out and said in `skipped`. Only names and sizes are read
    here: placing opens each file again, safely (`sources`)."""
    if "/" in place.inside or place.inside in ("", ".", ".."):
        skipped.append(f"{place.source}: skipped: not a name in the root")
        return
    status = os.stat(place.inside, dir_fd=root_fd, follow_symlinks=False)
    if stat_module.S_ISLNK(status.st_mode):
        # Discovery never takes a symlink for a checkpoint: this one was swapped in since.
        skipped.append(_skipped(place.source, status.st_mode))
    elif stat_module.S_ISREG(status.st_mode):
        yield _file_item(place, status, complete=complete, mutable=mutable)
    elif stat_module.S_ISDIR(status.st_mode):
        yield from _walk_folder(root_fd, place, complete=complete, mutable=mutable, skipped=skipped)
    # Sockets, fifos and devices are not checkpoint data.


def _walk_folder(
    root_fd: int, place: Place, *, complete: bool, mutable: Sequence[str], skipped: list[str]
) -> Iterator[FileItem]:
    """`walk` of a checkpoint folder: depth first, one descriptor open per level."""
    stack: list[_Listed] = []
    try:
        top = _open_folder(root_fd, place.inside, place, skipped)
        if top is None:
            return
        stack.append(top)  # closed below however the walk ends, as every folder opened
        yield _dir_item(top, place, complete=complete)
        while stack:
            folder = stack[-1]
            listed = next(folder.entries, None)
            if listed is None:
                os.close(stack.pop().fd)
                continue
            name, status = listed
            below = folder.place.below(name)
            if stat_module.S_ISREG(status.st_mode):
                yield _file_item(below, status, complete=complete, mutable=mutable)
            elif stat_module.S_ISLNK(status.st_mode):
                link = _link_item(folder.fd, name, below, complete=complete, skipped=skipped)
                if link is not None:
                    yield link
            elif not stat_module.S_ISDIR(status.st_mode):
                continue  # sockets, fifos and devices are not checkpoint data
            elif len(stack) >= MAX_DEPTH:
                skipped.append(f"{below.source}: skipped: more than {MAX_DEPTH} folders deep")
            else:
                opened = _open_folder(folder.fd, name, below, skipped)
                if opened is not None:
                    stack.append(opened)
                    yield _dir_item(opened, below, complete=complete)
    finally:
        for folder in stack:
            os.close(folder.fd)


def _open_folder(parent: int, name: str, place: Place, skipped: list[str]) -> _Listed | None:
    """Given an open folder, the name of a folder in it and where that is, open and list it;
    None, said in `skipped`, when a symlink or anything but a folder stands there now."""
    try:
        descriptor = os.open(name, DIRECTORY_FLAGS, dir_fd=parent)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            error.filename = place.source
            raise
        try:
            mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        except OSError:
            mode = stat_module.S_IFLNK if error.errno == errno.ELOOP else 0
        skipped.append(_skipped(place.source, mode))
        return None
    try:
        with os.scandir(descriptor) as entries:
            found = sorted((entry.name, entry.stat(follow_symlinks=False)) for entry in entries)
    except BaseException:
        os.close(descriptor)
        raise
    return _Listed(descriptor, place, iter(found))


def _skipped(source: str, mode: int) -> str:
    """Given an entry the walk leaves out and what stands there, say so (a plan's errors)."""
    what = "a file" if stat_module.S_ISREG(mode) else _kind(mode)
    return f"{source}: skipped: {what} where a folder was listed, never followed inside a root"


def _dir_item(folder: _Listed, place: Place, *, complete: bool) -> FileItem:
    status = os.fstat(folder.fd)  # the folder opened and listed, not whatever has its name now
    return FileItem(
        place.source,
        place.relative,
        "dir",
        mtime_ns=status.st_mtime_ns,
        device=status.st_dev,
        complete=complete,
        root=place.root,
        inside=place.inside,
    )


def _link_item(
    folder: int, name: str, place: Place, *, complete: bool, skipped: list[str]
) -> FileItem | None:
    """Given a symlink listed in an open folder, return it as an item (its target is read, never
    followed); None, said in `skipped`, when it is no symlink any more."""
    try:
        target = os.readlink(name, dir_fd=folder)
    except OSError as error:
        if error.errno != errno.EINVAL:
            error.filename = place.source
            raise
        skipped.append(f"{place.source}: skipped: no longer a symlink when its target was read")
        return None
    return FileItem(
        place.source,
        place.relative,
        "symlink",
        complete=complete,
        link_target=target,
        root=place.root,
        inside=place.inside,
    )


def _file_item(
    place: Place, status: os.stat_result, *, complete: bool, mutable: Sequence[str]
) -> FileItem:
    return FileItem(
        place.source,
        place.relative,
        "file",
        size=status.st_size,
        mtime_ns=status.st_mtime_ns,
        device=status.st_dev,
        complete=complete,
        mutable=copying.is_mutable(place.relative.split("/", 1)[-1], mutable),
        root=place.root,
        inside=place.inside,
    )


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
    walked = _walk_roots(config, selected, names, errors)
    os.makedirs(settings.dir, exist_ok=True)
    with Sources(walked.roots) as sources:
        items = _choose_methods(walked.items, settings.dir, requested, sources)
    files = [item for item in items if item.kind == "file"]
    return SnapshotPlan(
        checkpoints=tuple(walked.checkpoints),
        items=tuple(items),
        bytes_total=sum(item.size for item in files),
        bytes_to_write=sum(item.size for item in files if item.method == "copy"),
        errors=tuple(errors),
        roots=tuple(walked.roots),
    )


@dataclass(frozen=True, slots=True)
class _Walked:
    """What the walks of the selected checkpoints found: the items, the checkpoints that have
    some, and the roots read, each as the folder its descriptor was."""

    items: list[FileItem] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    roots: list[PlannedRoot] = field(default_factory=list)


def _walk_roots(
    config: Config, selected: Sequence[Selected], names: dict[str, str], errors: list[str]
) -> _Walked:
    """Given the checkpoints selected (grouped by root), walk each root's through one
    descriptor of that root (checked against its recorded identity, as a prune does); add to
    `errors` the roots that cannot be opened and the entries the walks leave out."""
    settings = config.snapshots
    store = IdentityStore.in_state_dir(config.state_dir)
    walked = _Walked()
    for path, group in itertools.groupby(selected, key=lambda chosen: chosen.root.path):
        try:
            root_dir = open_root(path, store=store)
        except (OSError, CkptdError) as error:  # gone, or swapped: the other roots go on
            errors.append(f"{path}: {error}")
            continue
        with root_dir:
            walked.roots.append(PlannedRoot(path, root_dir.identity))
            for _root, checkpoint in group:
                before = len(walked.items)
                for member in checkpoint.members:
                    walked.items.extend(
                        walk(
                            root_dir.fd,
                            Place(path, member, f"{names[path]}/{member}"),
                            complete=checkpoint.complete,
                            mutable=settings.mutable,
                            skipped=errors,
                        )
                    )
                if len(walked.items) > before:
                    walked.checkpoints.append(f"{names[path]}/{checkpoint.name}")
    return walked


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
