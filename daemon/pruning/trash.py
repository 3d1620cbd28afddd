"""The trash: where a checkpoint goes, atomically, before it is removed.

Layout: `<root>/.ckptd-trash/` holds one *trash item* per deleted checkpoint, named
`<name>@<deleted at, epoch seconds>[-n]` (the deletion time is in the name, so no sidecar can
disagree with it):

- a checkpoint of **one** root entry (every folder layout, single files) is that entry itself,
  renamed to `<entry>@<time>`: a single `rename(2)`, so before it the checkpoint is intact under
  its name and after it it is absent from the root;
- a checkpoint of **several** root entries (TensorFlow's `ckpt-5.index` + `ckpt-5.data-*`) is a
  folder `<name>@<time>/` holding its entries under their own names plus a journal
  `.ckptd-entry.json` listing them. Several renames cannot be atomic, so the journal is written
  and fsynced *before* the first rename, and the completion marker (`.index`) moves first (a
  half-moved checkpoint never looks complete to discovery). On recovery an item whose journal
  names members still in the root is **rolled back** (its members renamed back): the checkpoint
  is whole again and the next prune decides afresh. Removal takes the members first and the
  journal last, so a half-removed item is always recognisable and is finished on recovery.

Every function takes the injected `FileSystem`; the journal is written with `fs.write_bytes`
where the filesystem offers it, else with `os`.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat as stat_module
from collections.abc import Iterable
from dataclasses import dataclass, field

from daemon.errors import UsageError
from daemon.fsio import LOCAL, TRASH_DIRECTORY, FileSystem
from daemon.history.events import TrashPurge
from daemon.history.log import NULL_HISTORY, History
from daemon.pruning.lock import root_lock

JOURNAL = ".ckptd-entry.json"


@dataclass(frozen=True, slots=True)
class TrashItem:
    """Given one trash item: the checkpoint it holds, when it was deleted, its members."""

    name: str  # the checkpoint's name
    item: str  # the item folder's name inside the trash
    path: str
    deleted_at: float
    members: tuple[str, ...]
    bytes: int = 0
    # "trashed": every member inside; "moving": a crash interrupted the move (journal says so).
    state: str = "trashed"

    def expires_at(self, grace: float) -> float:
        return self.deleted_at + grace


@dataclass(frozen=True)
class PurgeResult:
    """Given a purge: items removed, bytes really freed, items that failed (with the error)."""

    removed: tuple[str, ...] = ()
    bytes_freed: int = 0
    failed: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = field(default=())


def trash_path(root_path: str) -> str:
    return os.path.join(root_path, TRASH_DIRECTORY)


def parse_item_name(item: str) -> tuple[str, float] | None:
    """Given an item folder name `NAME@SECONDS[-n]`, return (NAME, SECONDS), or None."""
    name, separator, tail = item.rpartition("@")
    if not separator or not name:
        return None
    try:
        return name, float(tail.split("-", 1)[0])
    except ValueError:
        return None


def _write_file(fs: FileSystem, path: str, data: bytes) -> None:
    writer = getattr(fs, "write_bytes", None)
    if writer is not None:
        writer(path, data)
        return
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _exists(fs: FileSystem, path: str) -> bool:
    try:
        fs.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _listdir(fs: FileSystem, path: str) -> list[str]:
    try:
        return sorted(entry.name for entry in fs.scandir(path))
    except FileNotFoundError:
        return []


def measure_freeable(path: str, fs: FileSystem = LOCAL) -> int:
    """Given a path, return the bytes removing it frees: each inode once, skipping files with
    links outside the path (a snapshot shares them)."""
    # inode -> [links seen below the path, links in all, size]
    seen: dict[tuple[int, int], list[int]] = {}
    pending = [path]
    while pending:
        current = pending.pop()
        try:
            status = fs.lstat(current)
        except OSError:
            continue
        if stat_module.S_ISDIR(status.st_mode):
            try:
                pending.extend(entry.path for entry in fs.scandir(current))
            except OSError:
                continue
        elif stat_module.S_ISREG(status.st_mode):
            key = (status.st_dev, status.st_ino)
            if key in seen:
                seen[key][0] += 1
            else:
                seen[key] = [1, status.st_nlink, status.st_size]
    return sum(size for links_here, links, size in seen.values() if links_here >= links)


def _read_journal(fs: FileSystem, item_path: str) -> tuple[str, ...] | None:
    try:
        data = json.loads(fs.read_bytes(os.path.join(item_path, JOURNAL)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    members = data.get("members") if isinstance(data, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        return None
    return tuple(members)


def _is_multi_item(fs: FileSystem, path: str) -> bool:
    """Given an item path, return whether it is a journalled folder of several members."""
    try:
        if not stat_module.S_ISDIR(fs.lstat(path).st_mode):
            return False
    except OSError:
        return False
    return any(entry.startswith(JOURNAL) for entry in _listdir(fs, path))


def describe_item(root_path: str, item: str, fs: FileSystem = LOCAL) -> TrashItem | None:
    """Given a root and an item name, return what the item holds, or None if not ours."""
    parsed = parse_item_name(item)
    if parsed is None:
        return None
    name, deleted_at = parsed
    path = os.path.join(trash_path(root_path), item)
    state = "trashed"
    members: tuple[str, ...] = (name,)
    if _is_multi_item(fs, path):
        journal = _read_journal(fs, path)
        inside = tuple(entry for entry in _listdir(fs, path) if not entry.startswith(JOURNAL))
        members = journal if journal is not None else inside
        if journal is not None and any(
            _exists(fs, os.path.join(root_path, member)) for member in journal
        ):
            state = "moving"
    return TrashItem(
        name=name,
        item=item,
        path=path,
        deleted_at=deleted_at,
        members=members,
        bytes=measure_freeable(path, fs),
        state=state,
    )


def list_trash(root_path: str, fs: FileSystem = LOCAL) -> list[TrashItem]:
    """Given a root, return its trash items, oldest deletion first."""
    items = []
    for item in _listdir(fs, trash_path(root_path)):
        described = describe_item(root_path, item, fs)
        if described is not None:
            items.append(described)
    return sorted(items, key=lambda entry: (entry.deleted_at, entry.item))


def move_to_trash(
    root_path: str,
    name: str,
    members: Iterable[str],
    *,
    now: float,
    fs: FileSystem = LOCAL,
    durable: bool = True,
) -> str:
    """Given a checkpoint's name and root entries, move them into a new trash item; return it.

    `durable=False` leaves the fsync of the root and the item to the caller (the deleter
    fsyncs once for all its moves).

    Raises OSError when the move could not start or, for several members, after rolling back
    what had moved; the checkpoint is then whole under its name again.
    """
    ordered = sorted(members, key=lambda member: (not member.endswith(".index"), member))
    folder = trash_path(root_path)
    fs.makedirs(folder)
    base = f"{ordered[0] if len(ordered) == 1 else name}@{int(now)}"
    item, counter = base, 1
    while _exists(fs, os.path.join(folder, item)):
        item, counter = f"{base}-{counter}", counter + 1
    item_path = os.path.join(folder, item)
    if len(ordered) == 1:
        fs.rename(os.path.join(root_path, ordered[0]), item_path)
        if durable:
            fs.fsync_dir(root_path)
            fs.fsync_dir(folder)
        return item_path
    fs.makedirs(item_path)
    journal = json.dumps({"name": name, "members": ordered, "deleted_at": now}).encode()
    _write_file(fs, os.path.join(item_path, JOURNAL + ".tmp"), journal)
    fs.rename(os.path.join(item_path, JOURNAL + ".tmp"), os.path.join(item_path, JOURNAL))
    fs.fsync_dir(item_path)
    moved: list[str] = []
    try:
        for member in ordered:
            fs.rename(os.path.join(root_path, member), os.path.join(item_path, member))
            moved.append(member)
    except OSError:
        # What cannot be moved back now, recovery at the next run rolls back from the journal.
        for member in reversed(moved):
            with contextlib.suppress(OSError):
                fs.rename(os.path.join(item_path, member), os.path.join(root_path, member))
        _remove_empty_item(item_path, fs)
        raise
    if durable:
        fs.fsync_dir(root_path)
        fs.fsync_dir(item_path)
    return item_path


def _remove_empty_item(item_path: str, fs: FileSystem) -> None:
    remaining = [entry for entry in _listdir(fs, item_path) if not entry.startswith(JOURNAL)]
    if remaining:
        return
    with contextlib.suppress(OSError):
        fs.remove_tree(item_path)


def remove_item(item_path: str, fs: FileSystem = LOCAL) -> list[str]:
    """Given a trash item, remove it (a folder item: members first, journal last); return errors."""
    errors: list[str] = []

    def record(path: str, error: OSError) -> None:
        errors.append(f"{path}: {error.strerror or error}")

    if _is_multi_item(fs, item_path):
        for member in _listdir(fs, item_path):
            if not member.startswith(JOURNAL):
                fs.remove_tree(os.path.join(item_path, member), on_error=record)
        if errors:
            return errors
    fs.remove_tree(item_path, on_error=record)
    return errors


def _remove_measured(item: TrashItem, fs: FileSystem) -> tuple[int, list[str]]:
    """Given an item, remove it; return the bytes really freed and the errors."""
    before = item.bytes
    errors = remove_item(item.path, fs)
    if not errors:
        return before, errors
    return max(0, before - measure_freeable(item.path, fs)), errors


def restore(root_path: str, name: str, *, fs: FileSystem = LOCAL) -> TrashItem:
    """Given a checkpoint name (or an item name), rename it back into the root; return the item.

    Refuses (UsageError) when no such item exists or a member's name is taken in the root.
    The restored checkpoint is pinned (`.keep` inside a folder, `<name>.keep` beside anything
    else, as discovery reads pins): the policy that deleted it has not changed, and without
    the pin the next prune would delete it again.
    """
    items = [item for item in list_trash(root_path, fs) if name in (item.name, item.item)]
    if not items:
        raise UsageError(f"no checkpoint named {name!r} in the trash of {root_path}")
    item = items[-1]  # the most recent deletion of that name
    _put_back(root_path, item, fs)
    _pin(root_path, item.name, fs)
    fs.fsync_dir(root_path)
    return item


def undo_move(root_path: str, item_path: str, fs: FileSystem = LOCAL) -> None:
    """Given a trash item just moved there, rename it back under its name (not pinned).

    Raises UsageError when its name was taken meanwhile, OSError when a rename fails.
    """
    item = describe_item(root_path, os.path.basename(item_path), fs)
    if item is None:
        raise UsageError(f"{item_path}: not a trash item")
    _put_back(root_path, item, fs)
    fs.fsync_dir(root_path)


def _put_back(root_path: str, item: TrashItem, fs: FileSystem) -> None:
    if not _is_multi_item(fs, item.path):
        target = os.path.join(root_path, item.name)
        if _exists(fs, target):
            raise UsageError(f"cannot restore {item.name}: it already exists in {root_path}")
        fs.rename(item.path, target)
        return
    inside = [member for member in _listdir(fs, item.path) if not member.startswith(JOURNAL)]
    taken = [member for member in inside if _exists(fs, os.path.join(root_path, member))]
    if taken:
        raise UsageError(
            f"cannot restore {item.name}: {', '.join(taken)} already exists in {root_path}"
        )
    # The completion marker goes back last: the checkpoint only looks complete once whole.
    for member in sorted(inside, key=lambda member: (member.endswith(".index"), member)):
        fs.rename(os.path.join(item.path, member), os.path.join(root_path, member))
    fs.fsync_dir(root_path)
    fs.remove_tree(item.path)


def pin_path(root_path: str, name: str, fs: FileSystem = LOCAL) -> str:
    """Given a root and a checkpoint entry or name, return the pin file that protects it."""
    target = os.path.join(root_path, name)
    try:
        if stat_module.S_ISDIR(fs.lstat(target).st_mode):
            return os.path.join(target, ".keep")
    except OSError:
        pass
    return target + ".keep"


def _pin(root_path: str, name: str, fs: FileSystem) -> None:
    path = pin_path(root_path, name, fs)
    if not _exists(fs, path):
        _write_file(fs, path, b"restored from the ckptd trash; delete this file to unpin\n")


def purge(
    root_path: str,
    *,
    now: float,
    grace: float,
    everything: bool = False,
    fs: FileSystem = LOCAL,
    history: History = NULL_HISTORY,
) -> PurgeResult:
    """Given a root and the grace, remove trash items past it (all with `everything`)."""
    removed: list[str] = []
    failed: list[tuple[str, str]] = []
    freed = 0
    for item in list_trash(root_path, fs):
        if item.state != "trashed":
            continue  # a crashed move: `recover` rolls it back, purge never removes it
        if not everything and item.expires_at(grace) > now:
            continue
        bytes_freed, errors = _remove_measured(item, fs)
        freed += bytes_freed
        if errors:
            failed.append((item.name, "; ".join(errors[:3])))
        else:
            removed.append(item.name)
        history.record(
            TrashPurge(
                root=root_path,
                checkpoint=item.name,
                bytes_freed=bytes_freed,
                deleted_at=item.deleted_at,
                partial=bool(errors),
                errors=tuple(errors[:3]),
            )
        )
    return PurgeResult(tuple(removed), freed, tuple(failed))


def empty_trash(root_path: str, *, fs: FileSystem = LOCAL, history: History = NULL_HISTORY) -> int:
    """Given a root, remove everything in its trash regardless of grace; return bytes freed.

    The disk check calls this first under disk pressure (before pruning anything more).
    Crashed moves are rolled back first, so nothing half-moved is lost. While a prune holds
    the root (its moves in progress look like crashed ones) nothing is touched and 0 returned:
    that prune is freeing space already.
    """
    with root_lock(root_path) as acquired:
        if not acquired:
            return 0
        recover(root_path, fs=fs)
        result = purge(root_path, now=0.0, grace=0.0, everything=True, fs=fs, history=history)
        return result.bytes_freed


def recover(root_path: str, *, fs: FileSystem = LOCAL) -> list[str]:
    """Given a root, finish what a crash left in its trash; return a note per repair.

    A half-moved multi-entry checkpoint is rolled back into the root; an empty item (a crash
    between creating the item and the rename) is removed; temporary journals are dropped.
    Half-removed items stay trashed and are finished by the purge that follows.
    """
    notes: list[str] = []
    for item in list_trash(root_path, fs):
        try:
            note = _recover_item(root_path, item, fs)
        except OSError as error:
            note = f"could not repair {item.item}: {error.strerror or error}"
        if note:
            notes.append(note)
    return notes


def _recover_item(root_path: str, item: TrashItem, fs: FileSystem) -> str | None:
    if not _is_multi_item(fs, item.path):
        return None  # one entry: whole, or half-removed (the purge finishes it)
    inside = [member for member in _listdir(fs, item.path) if not member.startswith(JOURNAL)]
    if item.state == "moving":
        taken = [m for m in inside if _exists(fs, os.path.join(root_path, m))]
        if taken:
            # Never overwrite and never drop: leave both for a person to sort out.
            return f"left {item.item} in the trash: {', '.join(taken)} exists in the root too"
        for member in inside:
            fs.rename(os.path.join(item.path, member), os.path.join(root_path, member))
        fs.fsync_dir(root_path)
        fs.remove_tree(item.path)
        return f"rolled back the interrupted deletion of {item.name}"
    if not inside and _read_journal(fs, item.path) is None:
        fs.remove_tree(item.path)
        return f"removed the unfinished trash item {item.item}"
    return None


def finish_leftovers(
    root_path: str,
    *,
    now: float,
    grace: float,
    fs: FileSystem = LOCAL,
    history: History = NULL_HISTORY,
) -> PurgeResult:
    """Given a root, finish a trash a crash left behind: repair, then purge what is past grace.

    What the daemon calls at start-up for each root (every prune run does the same first).
    """
    notes = recover(root_path, fs=fs)
    result = purge(root_path, now=now, grace=grace, fs=fs, history=history)
    return PurgeResult(result.removed, result.bytes_freed, result.failed, tuple(notes))
