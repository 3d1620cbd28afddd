"""A slim in the trash: one checkpoint's resume state as one trash item (issue 11).

The item is a folder of the trash like any other (`<seconds>-<n>/`, mode 0700, its entry
`.ckptd-entry.json`), with `"kind": "slim"`: its members are paths *inside* a checkpoint
folder (`optimizer.pt`, `mp_rank_00/distrib_optim.pt`, `global_step400`), kept under the same
paths inside the item. Listing, purging and the checks before each change are the trash's own
(daemon/pruning/trash.py); what differs is where members go back to, and when a slim is done.

Crash safety: the entry is a journal, written and fsynced before the first rename; then each
path is renamed out (never replacing, each checked to be what was looked at); then, after every
move, `.ckptd-slim.json` is written into the checkpoint (a temporary file, fsynced, renamed:
atomic). The slim is done exactly when that record names the item. Until then the item is
"moving", and recovery rolls it back: every member renamed back into the checkpoint, the item
removed. So a kill at any moment leaves the checkpoint whole, or slimmed with its record, never
with half its optimizer shards. `ckptd trash restore` removes the record first (the slim is
then unfinished) and rolls back the same way, so a crash during a restore is finished by it.

Moving files out changes the folders' modification times, and discovery reads the newest
mtime inside a checkpoint to tell restarted runs apart (policies/lineage.py): an old checkpoint
that looked freshly written would look like a restart. The folders' mtimes (and the record's)
are therefore set back to what they were; the entry keeps them, so recovery sets them again
after a crash between the record and that step. The slim's real time is in the record.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat as stat_module
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon import slimming
from daemon.errors import UsageError
from daemon.fsio import At, Dir
from daemon.slimming import PIN_TEXT, SLIM_RECORD, SlimRecord

if TYPE_CHECKING:
    from daemon.pruning.trash import Trash, TrashItem

KIND = "slim"
JOURNAL = ".ckptd-entry.json"
RECORD_TEMPORARY = SLIM_RECORD + ".tmp"
RECORD_LIMIT = 1 << 20


def plain_path(path: object) -> bool:
    """Given a member path from an entry, return whether it names something inside one folder
    (`a/b`: no empty, `.` or `..` part, no leading `/`)."""
    if not isinstance(path, str) or not path or "\0" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


@dataclass(frozen=True)
class SlimEntry:
    """The slim-specific part of an item's entry: the checkpoint folder (name and inode), the
    paths moved out of it, and the folders' mtimes (ns) before, by path ("" the folder)."""

    checkpoint: str
    paths: tuple[str, ...]
    inode: int
    mtimes: Mapping[str, int]

    @classmethod
    def parse(cls, document: Mapping[str, Any]) -> SlimEntry | None:
        paths = document.get("members")
        name = document.get("name")
        inode = document.get("checkpoint_inode")
        mtimes = document.get("mtimes")
        if not isinstance(paths, list) or not all(map(plain_path, paths)) or not paths:
            return None
        if not isinstance(name, str) or not plain_path(name) or "/" in name:
            return None
        if not isinstance(inode, int) or not isinstance(mtimes, dict):
            return None
        clean = {str(k): v for k, v in mtimes.items() if plain_path(k) or k == ""}
        return cls(name, tuple(paths), inode, {k: v for k, v in clean.items() if type(v) is int})


# --- folders by descriptor ---------------------------------------------------------------------


@contextlib.contextmanager
def _opened(trash: Trash, at: At) -> Iterator[Dir]:
    descriptor = trash.fs.open_dir(at)
    try:
        yield Dir(descriptor, at.path)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _parent_of(trash: Trash, top: Dir, path: str, *, create: bool = False) -> Iterator[At]:
    """Given an open folder and a path inside it, yield the path's last part in its parent,
    each folder on the way opened without following a symlink (made, 0700, with `create`)."""
    *folders, name = path.split("/")
    with contextlib.ExitStack() as stack:
        current = top
        for folder in folders:
            if create:
                with contextlib.suppress(FileExistsError):
                    trash.fs.mkdir_at(current.at(folder), 0o700)
            current = stack.enter_context(_opened(trash, current.at(folder)))
        yield current.at(name)


def _identity(status: os.stat_result) -> dict[str, object]:
    kind = "folder" if stat_module.S_ISDIR(status.st_mode) else "file"
    if stat_module.S_ISLNK(status.st_mode):
        kind = "symlink"
    elif not stat_module.S_ISDIR(status.st_mode) and not stat_module.S_ISREG(status.st_mode):
        kind = "special"
    return {"kind": kind, "uid": status.st_uid, "ino": status.st_ino}


def _parents(paths: Sequence[str]) -> list[str]:
    """Given paths, return every folder above them inside the checkpoint, outermost first."""
    found: set[str] = set()
    for path in paths:
        parts = path.split("/")[:-1]
        found.update("/".join(parts[: depth + 1]) for depth in range(len(parts)))
    return sorted(found, key=lambda folder: (folder.count("/"), folder))


def _mtimes(trash: Trash, folder: Dir, paths: Sequence[str]) -> dict[str, int]:
    mtimes = {"": os.fstat(folder.fd).st_mtime_ns}
    for parent in _parents(paths):
        with _parent_of(trash, folder, parent) as at:
            mtimes[parent] = trash.fs.lstat_at(at).st_mtime_ns
    return mtimes


def set_mtimes(trash: Trash, folder: Dir, mtimes: Mapping[str, int]) -> None:
    """Given a checkpoint folder and its folders' mtimes from before a slim, set them back (and
    the record's, to the folder's): the checkpoint keeps the age discovery saw."""
    for path, mtime in sorted(mtimes.items(), key=lambda pair: -pair[0].count("/")):
        with contextlib.suppress(OSError):
            if path == "":
                os.utime(folder.fd, ns=(mtime, mtime))
                continue
            with _parent_of(trash, folder, path) as at, _opened(trash, at) as inner:
                os.utime(inner.fd, ns=(mtime, mtime))
    if "" in mtimes:
        # A file's times are its own: setting them leaves the folder's as set above.
        with contextlib.suppress(OSError):
            os.utime(
                SLIM_RECORD, ns=(mtimes[""], mtimes[""]), dir_fd=folder.fd, follow_symlinks=False
            )


# --- moving in ---------------------------------------------------------------------------------


def move_in(
    trash: Trash, checkpoint: str, paths: Sequence[str], *, now: float, durable: bool = True
) -> tuple[str, SlimRecord]:
    """Given a checkpoint folder's name and paths inside it, move them into a new slim item,
    then record the slim in the checkpoint; return the item's name and the record.

    Raises OSError when a path could not move (what had moved is renamed back, the item
    removed: the checkpoint is whole), or when the record could not be written (the same)."""
    if not paths or not all(map(plain_path, paths)):
        raise UsageError(f"{checkpoint}: not paths inside it: {list(paths)!r}")
    with _opened(trash, trash.root.at(checkpoint)) as folder:
        sizes = slimming.measure(folder.fd, paths)
        identities: dict[str, dict[str, object]] = {}
        for path in paths:
            with _parent_of(trash, folder, path) as at:
                identities[path] = _identity(trash.fs.lstat_at(at))
        mtimes = _mtimes(trash, folder, paths)
        entry = {
            "version": 2,
            "kind": KIND,
            "name": checkpoint,
            "members": list(paths),
            "deleted_at": now,
            "checkpoint_inode": os.fstat(folder.fd).st_ino,
            "mtimes": mtimes,
            "identities": identities,
        }
        item = trash.new_item(now)
        record = SlimRecord(checkpoint, now, tuple(sizes), item)
        with _opened(trash, trash.dir.at(item)) as box:
            try:
                # The journal is on disk before the first rename: recovery can always undo.
                trash.fs.write_new_at(box.at(JOURNAL), json.dumps(entry).encode(), durable=True)
                trash.fs.fsync_fd(box.fd)
                trash.fs.fsync_fd(trash.dir.fd)
                _move_paths(trash, folder, box, paths, identities, durable)
                write_record(trash, folder, record)
            except BaseException:
                _undo(trash, folder, box, item, paths)
                set_mtimes(trash, folder, mtimes)
                raise
        set_mtimes(trash, folder, mtimes)
    return item, record


def _undo(trash: Trash, folder: Dir, box: Dir, item: str, paths: Sequence[str]) -> None:
    """Given a slim that failed midway, put back what moved, drop a record that names it (or
    its temporary file) and remove the item; what cannot be undone now, recovery undoes from
    the journal."""
    with contextlib.suppress(OSError, UsageError):
        if _record_names(trash, folder, item):
            trash.fs.unlink_at(folder.at(SLIM_RECORD))
        with contextlib.suppress(FileNotFoundError):
            trash.fs.unlink_at(folder.at(RECORD_TEMPORARY))
        if _roll_back_paths(trash, folder, box, paths):
            return  # a name taken meanwhile: the item stays, for recovery to report
        _remove_made_folders(trash, box, paths)
        trash.discard(item, box)


def _move_paths(
    trash: Trash,
    folder: Dir,
    box: Dir,
    paths: Sequence[str],
    identities: Mapping[str, Mapping[str, object]],
    durable: bool,
) -> None:
    moved: list[str] = []
    try:
        for path in paths:
            with (
                _parent_of(trash, folder, path) as source,
                _parent_of(trash, box, path, create=True) as target,
            ):
                trash.fs.rename_at(source, target)
                moved.append(path)
                if _identity(trash.fs.lstat_at(target)) != identities[path]:
                    raise OSError(errno.EBUSY, "changed while being moved into the trash", path)
        if durable:
            for directory in (box, folder):
                trash.fs.fsync_fd(directory.fd)
                for parent in _parents(paths):
                    with _parent_of(trash, directory, parent) as at, _opened(trash, at) as inner:
                        trash.fs.fsync_fd(inner.fd)
    except BaseException:
        _roll_back_paths(trash, folder, box, moved)
        raise


def write_record(trash: Trash, folder: Dir, record: SlimRecord) -> None:
    """Given an open checkpoint folder, write its `.ckptd-slim.json` atomically: a temporary
    file (a leftover one removed first, never followed), fsynced, renamed into place."""
    with contextlib.suppress(FileNotFoundError):
        trash.fs.unlink_at(folder.at(RECORD_TEMPORARY))
    data = json.dumps(record.to_json(), indent=2).encode() + b"\n"
    trash.fs.write_new_at(folder.at(RECORD_TEMPORARY), data, durable=True)
    trash.fs.rename_at(folder.at(RECORD_TEMPORARY), folder.at(SLIM_RECORD))
    trash.fs.fsync_fd(folder.fd)


def _roll_back_paths(trash: Trash, folder: Dir, box: Dir, paths: Sequence[str]) -> list[str]:
    """Rename each path that is in the item back into the checkpoint (never replacing);
    return those whose name is taken there (left in the item)."""
    taken = []
    for path in reversed(paths):
        try:
            with (
                _parent_of(trash, box, path) as source,
                _parent_of(trash, folder, path) as target,
            ):
                trash.fs.lstat_at(source)
                trash.fs.rename_at(source, target)
        except FileNotFoundError:
            continue  # never moved, or back already
        except FileExistsError:
            taken.append(path)
    trash.fs.fsync_fd(folder.fd)
    return taken


# --- state, roll back, restore ----------------------------------------------------------------


def is_done(trash: Trash, entry: SlimEntry, item: str) -> bool | None:
    """Given a slim item's entry, return whether its slim is done: its checkpoint (the same
    folder) holds a record naming the item. None when the checkpoint is gone or is another
    folder now (then there is nothing to roll back into: the item stays trashed)."""
    try:
        with _opened(trash, trash.root.at(entry.checkpoint)) as folder:
            if os.fstat(folder.fd).st_ino != entry.inode:
                return None
            return _record_names(trash, folder, item)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno in (errno.ENOTDIR, errno.ELOOP):
            return None
        return False  # cannot tell: never purge what may be half a checkpoint


def _record_names(trash: Trash, folder: Dir, item: str) -> bool:
    try:
        data = trash.fs.read_at(folder.at(SLIM_RECORD), RECORD_LIMIT)
    except FileNotFoundError:
        return False
    try:
        record = SlimRecord.from_json(json.loads(data))
    except ValueError:
        return False
    return record is not None and record.trash_item == item


def state(trash: Trash, entry: SlimEntry, item: str, inside: Sequence[str], removing: bool) -> str:
    """Given a slim item, return its state: "empty", "moving" (unfinished: recovery rolls it
    back) or "trashed" (done, or its checkpoint gone: restorable while there, then purged)."""
    if not inside:
        return "empty"
    if removing:
        return "trashed"
    return "moving" if is_done(trash, entry, item) is False else "trashed"


def put_back(trash: Trash, item: TrashItem, entry: SlimEntry, *, pin: bool) -> str | None:
    """Given a listed slim item, put its files back into the checkpoint (never replacing) and
    remove the item and the checkpoint's record; with `pin`, pin the checkpoint (`.keep`)
    first, or the next prune slims it again. Return the pin's path (None: none made).

    Raises UsageError when the checkpoint is gone or a name is taken in it."""
    at = trash.root.at(entry.checkpoint)
    where = at.path
    try:
        descriptor = trash.fs.open_dir(at)
    except OSError:
        raise UsageError(
            f"cannot restore the resume state of {entry.checkpoint}: {where} is no longer there"
        ) from None
    folder = Dir(descriptor, where)
    try:
        if os.fstat(folder.fd).st_ino != entry.inode:
            raise UsageError(f"cannot restore into {where}: another folder is there now")
        with _opened(trash, trash.dir.at(item.item)) as box:
            taken = _taken(trash, folder, box, entry.paths)
            if taken:
                raise UsageError(f"cannot restore {', '.join(taken)}: already in {where}")
            made = _pin(trash, folder) if pin else None
            # The record goes first: from here a crash leaves an unfinished slim, which
            # recovery rolls back, finishing this restore.
            with contextlib.suppress(FileNotFoundError):
                trash.fs.unlink_at(folder.at(SLIM_RECORD))
            trash.fs.fsync_fd(folder.fd)
            _finish_roll_back(trash, folder, box, item, entry)
        if made is not None and "" in entry.mtimes:
            # The pin is dated like the checkpoint: a pin written now would make an old
            # checkpoint look freshly written (settling, or a restart to discovery).
            with contextlib.suppress(OSError):
                old = entry.mtimes[""]
                os.utime(".keep", ns=(old, old), dir_fd=folder.fd, follow_symlinks=False)
                os.utime(folder.fd, ns=(old, old))
        return made
    finally:
        os.close(descriptor)


def _taken(trash: Trash, folder: Dir, box: Dir, paths: Sequence[str]) -> list[str]:
    taken = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            with _parent_of(trash, box, path) as source:
                trash.fs.lstat_at(source)
            with _parent_of(trash, folder, path) as target:
                trash.fs.lstat_at(target)
                taken.append(path)
    return taken


def _pin(trash: Trash, folder: Dir) -> str:
    with contextlib.suppress(FileExistsError):
        trash.fs.write_new_at(folder.at(".keep"), PIN_TEXT, durable=False)
    return folder.at(".keep").path


def _finish_roll_back(
    trash: Trash, folder: Dir, box: Dir, item: TrashItem, entry: SlimEntry
) -> None:
    taken = _roll_back_paths(trash, folder, box, entry.paths)
    if taken:
        raise UsageError(f"{', '.join(taken)} appeared in {folder.path}; left in the trash")
    with contextlib.suppress(FileNotFoundError):
        trash.fs.unlink_at(folder.at(RECORD_TEMPORARY))
    _remove_made_folders(trash, box, entry.paths)
    trash.discard(item.item, box)
    set_mtimes(trash, folder, entry.mtimes)


def _remove_made_folders(trash: Trash, box: Dir, paths: Sequence[str]) -> None:
    """Remove the (now empty) folders the item made to hold nested paths."""
    for parent in reversed(_parents(paths)):
        with contextlib.suppress(OSError), _parent_of(trash, box, parent) as at:
            trash.fs.rmdir_at(at)


def roll_back(trash: Trash, item: TrashItem, entry: SlimEntry) -> str:
    """Given an unfinished slim item (a crash before its record), put every member back into
    the checkpoint and remove the item; return the note for the repair."""
    with (
        _opened(trash, trash.root.at(entry.checkpoint)) as folder,
        _opened(trash, trash.dir.at(item.item)) as box,
    ):
        taken = _roll_back_paths(trash, folder, box, entry.paths)
        if taken:
            return (
                f"left {item.item} in the trash: {', '.join(taken)} exists in "
                f"{entry.checkpoint} too"
            )
        with contextlib.suppress(FileNotFoundError):
            trash.fs.unlink_at(folder.at(RECORD_TEMPORARY))
        _remove_made_folders(trash, box, entry.paths)
        trash.discard(item.item, box)
        set_mtimes(trash, folder, entry.mtimes)
    return f"rolled back the interrupted slim of {entry.checkpoint}"


def settle(trash: Trash, item: TrashItem, entry: SlimEntry) -> None:
    """Given a done slim item, set its checkpoint's mtimes back if a crash came between the
    record and that step (a no-op otherwise)."""
    with contextlib.suppress(OSError), _opened(trash, trash.root.at(entry.checkpoint)) as folder:
        status = os.fstat(folder.fd)
        before = entry.mtimes.get("")
        if status.st_ino != entry.inode or before is None or status.st_mtime_ns == before:
            return
        if _record_names(trash, folder, item.item):
            set_mtimes(trash, folder, entry.mtimes)
