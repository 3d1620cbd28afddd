"""The trash: where a checkpoint goes, atomically, before it is removed.

Layout: `<root>/.ckptd-trash/` is ckptd's own folder (mode 0700, never a symlink:
daemon/pruning/trashdir.py) holding one *trash item* per deleted checkpoint:

- a checkpoint of **one** root entry (every folder layout, single files) is that entry itself,
  renamed to `<deleted at, epoch seconds>-<n>.<its name>`: a single `rename(2)`, so before it
  the checkpoint is intact under its name and after it absent from the root; nothing is
  allocated, so it works on a full filesystem too. When that name would pass the filesystem's
  limit (255 bytes: names of 245 bytes and more), the entry goes into an item folder instead:
- an **item folder** `<seconds>-<n>/` of ckptd's (mode 0700) holds the members under their own
  names and `.ckptd-entry.json`: the checkpoint's name, its root entries (`members`), when it
  was deleted and what each member was when moved (kind, owner, inode). A checkpoint of
  **several** root entries (TensorFlow's `ckpt-5.index` + `ckpt-5.data-*`) always moves into
  one. Several renames cannot be atomic, so the entry is a journal, written and fsynced
  *before* the first rename, and the completion marker (`.index`) moves first (a half-moved
  checkpoint never looks complete to discovery). On recovery an item whose journal names
  members still in the root is **rolled back** (its members renamed back): the checkpoint is
  whole again and the next prune decides afresh. Removal renames the journal to
  `.ckptd-entry.removing.json` first (an item being removed is never rolled back), takes the
  members, then the entry.

Every path is hostile (README, "Against a hostile root owner"): every operation is relative to
the root's and the trash's open descriptors (`daemon.fsio.At`), renames never replace
(`RENAME_NOREPLACE`), and before each removal, restore or roll-back the item is checked again:
the same inode as listed, each member of the kind, owner and inode recorded when it moved
(an entry itself: as listed), an item folder ckptd's own.

Items of the previous layout, `<name>@<seconds>[-n]` (the entry itself, or a folder holding a
multi-entry checkpoint and its journal), are still listed, restored, rolled back and purged —
the same way, by descriptor.

Every function takes the injected `FileSystem`; a root is a path (opened for the call) or an
open `RootDir` (daemon/rootdir.py, as `prune_root` passes it: one descriptor for the whole run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import stat as stat_module
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from daemon.errors import UsageError
from daemon.fsio import LOCAL, TRASH_DIRECTORY, At, Dir, FileSystem, Usage, measure_names
from daemon.history.events import TrashPurge
from daemon.history.log import NULL_HISTORY, History
from daemon.pruning import slimtrash
from daemon.pruning.lock import root_lock
from daemon.pruning.slimtrash import SlimEntry
from daemon.pruning.trashdir import TrashRefused, open_trash_dir
from daemon.rootdir import RootDir, opened

__all__ = [
    "JOURNAL",
    "TRASH_DIRECTORY",
    "PurgeResult",
    "Restored",
    "Trash",
    "TrashItem",
    "TrashRefused",
    "empty_trash",
    "finish_leftovers",
    "list_trash",
    "move_to_trash",
    "open_trash",
    "parse_item_name",
    "pin_path",
    "purge",
    "recover",
    "restore",
    "restore_pinned",
    "trash_path",
    "undo_move",
]

JOURNAL = ".ckptd-entry.json"
REMOVING = ".ckptd-entry.removing.json"
ITEM_NAME = re.compile(r"(\d+)-(\d+)")
# A checkpoint moved in on a full filesystem, where no item folder could be made: the one entry
# itself, renamed to `<seconds>-<n>.<its name>` (see `Trash.move`).
BARE_NAME = re.compile(r"(\d+)-(\d+)\.(.+)", re.DOTALL)
ENTRY_LIMIT = 1 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
PIN_TEXT = b"restored from the ckptd trash; delete this file to unpin\n"


@dataclass(frozen=True, slots=True)
class MemberIdentity:
    """Given a member's status when it moved: its kind, owner and inode (checked again before
    anything is done to it)."""

    kind: str
    uid: int
    ino: int

    @classmethod
    def of(cls, status: os.stat_result) -> MemberIdentity:
        return cls(_kind(status.st_mode), status.st_uid, status.st_ino)

    def matches(self, status: os.stat_result) -> bool:
        return self == MemberIdentity.of(status)

    def describe(self) -> str:
        return f"{self.kind} of uid {self.uid}, inode {self.ino}"


def _kind(mode: int) -> str:
    if stat_module.S_ISDIR(mode):
        return "folder"
    if stat_module.S_ISREG(mode):
        return "file"
    if stat_module.S_ISLNK(mode):
        return "symlink"
    return "special"


@dataclass(frozen=True, slots=True)
class TrashItem:
    """Given one trash item: the checkpoint it holds, when it was deleted, its members.

    `bytes` is what removing it gives back (allocated bytes), `bytes_logical` the files' sizes.
    `state`: "trashed" (every member inside, or some already removed), "moving" (a crash
    interrupted the move of a multi-entry checkpoint: its journal names members still in the
    root), "empty" (a crash before anything moved in). `inode` is the item's as listed.
    """

    name: str  # the checkpoint's name
    item: str  # the item's name inside the trash
    path: str
    deleted_at: float
    members: tuple[str, ...]
    bytes: int = 0
    state: str = "trashed"
    bytes_logical: int = 0
    inode: int = 0
    identities: tuple[tuple[str, MemberIdentity], ...] = ()
    # "item": a folder of ckptd's holding the members and the entry; "bare": the one entry
    # itself (moved on a full filesystem); "legacy", "legacy-folder": `<name>@<seconds>` left
    # by an earlier version (the entry itself, or a folder holding several and a journal).
    layout: str = "item"
    # A slim's item (daemon/pruning/slimtrash.py): the resume state moved out of the
    # checkpoint `name`, which is still in the root; None for a deleted checkpoint.
    slim: SlimEntry | None = None

    @property
    def in_folder(self) -> bool:
        """Whether the members are inside a folder of the item's own."""
        return self.layout in ("item", "legacy-folder")

    def expires_at(self, grace: float) -> float:
        return self.deleted_at + grace

    def identity_of(self, member: str) -> MemberIdentity | None:
        return dict(self.identities).get(member)


@dataclass(frozen=True)
class PurgeResult:
    """Given a purge: items removed, bytes really freed (allocated; `bytes_logical` the files'
    sizes), items that failed (with the error), and the repairs of a crash (`notes`)."""

    removed: tuple[str, ...] = ()
    bytes_freed: int = 0
    failed: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = field(default=())
    bytes_logical: int = 0


def trash_path(root_path: str) -> str:
    return os.path.join(root_path, TRASH_DIRECTORY)


def parse_item_name(item: str) -> tuple[str, float] | None:
    """Given an item name of the earlier layout `NAME@SECONDS[-n]`, return (NAME, SECONDS)."""
    name, separator, tail = item.rpartition("@")
    if not separator or not name:
        return None
    try:
        return name, float(tail.split("-", 1)[0])
    except ValueError:
        return None


def _plain_name(name: object) -> bool:
    """Given a member name from an entry file, return whether it names an entry of one folder
    (a journal naming `../x` must never move anything outside)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\0" not in name
    )


@dataclass(frozen=True)
class _Entry:
    """An item's entry file, parsed."""

    name: str
    members: tuple[str, ...]
    deleted_at: float | None
    identities: tuple[tuple[str, MemberIdentity], ...]
    removing: bool
    slim: SlimEntry | None = None


def _parse_identities(value: object) -> tuple[tuple[str, MemberIdentity], ...]:
    if not isinstance(value, dict):
        return ()
    parsed = []
    for member, identity in value.items():
        if not isinstance(identity, dict):
            continue
        kind, uid, ino = identity.get("kind"), identity.get("uid"), identity.get("ino")
        if isinstance(kind, str) and isinstance(uid, int) and isinstance(ino, int):
            parsed.append((str(member), MemberIdentity(kind, uid, ino)))
    return tuple(parsed)


def _parse_entry(data: bytes, removing: bool) -> _Entry | None:
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    members = document.get("members")
    slim = SlimEntry.parse(document) if document.get("kind") == slimtrash.KIND else None
    if document.get("kind") == slimtrash.KIND and slim is None:
        return None
    # A slim's members are paths inside its checkpoint; a deletion's, entries of the root.
    plain = slimtrash.plain_path if slim is not None else _plain_name
    if not isinstance(members, list) or not members or not all(map(plain, members)):
        return None
    name = document.get("name")
    deleted_at = document.get("deleted_at")
    return _Entry(
        name=name if isinstance(name, str) and _plain_name(name) else str(members[0]),
        members=tuple(members),
        deleted_at=float(deleted_at) if isinstance(deleted_at, int | float) else None,
        identities=_parse_identities(document.get("identities")),
        removing=removing,
        slim=slim,
    )


def _is_entry_file(name: str) -> bool:
    return name.startswith(".ckptd-entry")


@dataclass(frozen=True)
class _Pin:
    """The pin of a restored checkpoint: its path (None: none), the file made in the root (to
    remove if the restore fails), or why there is none."""

    path: str | None
    made: At | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Restored:
    """Given a restore: the item put back, its pin file (None: none made), and why not."""

    item: TrashItem
    pin: str | None
    problem: str | None = None


class _OpenItem:
    """A trash item opened for a change, checked first: where its members are (`container`)
    and each member's name there with the name it has in the root."""

    def __init__(self, container: Dir, owned: bool, inside: list[tuple[str, str]]) -> None:
        self.container = container
        self.owned = owned  # a folder of its own (closed after), else the trash folder itself
        self.inside = inside

    def close(self) -> None:
        if self.owned:
            os.close(self.container.fd)

    def __enter__(self) -> _OpenItem:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _changed(path: str, what: str) -> OSError:
    return OSError(errno.EBUSY, f"changed since it was listed ({what}); left alone", path)


class Trash:
    """An open root's trash (ckptd's own folder, opened by descriptor): list, move into,
    remove, restore, roll back, purge. Obtained from `open_trash`."""

    def __init__(self, root: RootDir, directory: Dir, fs: FileSystem = LOCAL) -> None:
        self.root = root
        self.dir = directory
        self.fs = fs
        self._next: dict[int, int] = {}
        try:
            self.name_max = os.fpathconf(directory.fd, "PC_NAME_MAX")
        except (OSError, ValueError):
            self.name_max = 255

    def real_path(self) -> str:
        """Given the open trash, return the path it is at now (from /proc; it may have been
        renamed by the root's owner since it was opened)."""
        with contextlib.suppress(OSError):
            real = os.readlink(f"/proc/self/fd/{self.dir.fd}")
            if real.startswith("/"):
                return real
        return self.dir.path

    # --- listing ---------------------------------------------------------------------------

    def items(self) -> list[TrashItem]:
        """Given the trash, return its items, oldest deletion first."""
        found = []
        for name in self.fs.list_dir(self.dir):
            described = self.describe(name)
            if described is not None:
                found.append(described)
        return sorted(
            found, key=lambda entry: (entry.deleted_at, _sequence(entry.item), entry.item)
        )

    def _layout(self, item: str, status: os.stat_result) -> str | None:
        """Given an entry of the trash and its status, return its layout; None: not an item."""
        folder = stat_module.S_ISDIR(status.st_mode)
        if ITEM_NAME.fullmatch(item):
            return "item" if folder else None  # ckptd makes only folders under such names
        if BARE_NAME.fullmatch(item):
            return "bare"
        if parse_item_name(item) is None:
            return None
        return "legacy-folder" if folder and self._has_entry_file(self.dir.at(item)) else "legacy"

    def describe(self, item: str) -> TrashItem | None:
        """Given an item's name, return what it holds, or None if it is not a trash item."""
        at = self.dir.at(item)
        try:
            status = self.fs.lstat_at(at)
        except OSError:
            return None
        layout = self._layout(item, status)
        if layout is None:
            return None
        usage = self._measure(item, layout)
        base = TrashItem(
            name=item,
            item=item,
            path=at.path,
            deleted_at=0.0,
            members=(item,),
            bytes=usage.allocated,
            bytes_logical=usage.logical,
            inode=status.st_ino,
            layout=layout,
        )
        new = ITEM_NAME.fullmatch(item) or BARE_NAME.fullmatch(item)
        if new is not None:
            base = _replace(base, deleted_at=float(new.group(1)))
        # An item that is the checkpoint's entry itself is checked before any change against
        # what it was when listed (a folder item's members against its entry file).
        listed = ((item, MemberIdentity.of(status)),)
        if layout == "bare":
            return _replace(base, name=new.group(3) if new else item, identities=listed)
        if layout == "item":
            return self._describe_folder(base)
        legacy = parse_item_name(item)
        assert legacy is not None
        base = _replace(base, name=legacy[0], deleted_at=legacy[1], members=(legacy[0],))
        if layout == "legacy-folder":
            return self._describe_folder(base)
        return _replace(base, identities=listed)

    def _has_entry_file(self, at: At) -> bool:
        try:
            with self._folder(at) as folder:
                return any(_is_entry_file(name) for name in self.fs.list_dir(folder))
        except OSError:
            return False

    @contextlib.contextmanager
    def _folder(self, at: At) -> Iterator[Dir]:
        descriptor = self.fs.open_dir(at)
        try:
            yield Dir(descriptor, at.path)
        finally:
            os.close(descriptor)

    def _read_entry(self, folder: Dir) -> _Entry | None:
        for file_name, removing in ((JOURNAL, False), (REMOVING, True)):
            try:
                data = self.fs.read_at(folder.at(file_name), ENTRY_LIMIT)
            except OSError:
                continue
            entry = _parse_entry(data, removing)
            if entry is not None:
                return entry
        return None

    def _describe_folder(self, base: TrashItem) -> TrashItem | None:
        """Given an item that is a folder (new, or an earlier multi-entry one), describe it."""
        try:
            with self._folder(self.dir.at(base.item)) as folder:
                entry = self._read_entry(folder)
                inside = sorted(n for n in self.fs.list_dir(folder) if not _is_entry_file(n))
        except OSError:
            return None
        if entry is None:
            members = tuple(inside) or base.members
            name = inside[0] if len(inside) == 1 and base.layout == "item" else base.name
            state = "trashed" if inside else "empty"
            return _replace(base, name=name, members=members, state=state)
        return _replace(
            base,
            name=entry.name,
            members=entry.members,
            deleted_at=entry.deleted_at if entry.deleted_at is not None else base.deleted_at,
            identities=entry.identities,
            state=(
                slimtrash.state(self, entry.slim, base.item, inside, entry.removing)
                if entry.slim is not None
                else self._state(entry, inside)
            ),
            slim=entry.slim,
        )

    def _state(self, entry: _Entry, inside: list[str]) -> str:
        if not inside:
            return "empty"
        if entry.removing:
            return "trashed"
        missing = [member for member in entry.members if member not in inside]
        return "moving" if any(self._in_root(member) for member in missing) else "trashed"

    def _in_root(self, name: str) -> bool:
        try:
            self.fs.lstat_at(self.root.at(name))
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot tell: never treat it as gone
        return True

    # --- checking an item again before changing it -----------------------------------------

    def _open_item(self, item: TrashItem) -> _OpenItem:
        """Given a listed item, open it for a change after checking it is still what was
        listed: the same inode, and (a folder item) a folder ckptd made."""
        at = self.dir.at(item.item)
        status = self.fs.lstat_at(at)
        if status.st_ino != item.inode:
            raise _changed(at.path, "another inode")
        if not item.in_folder:
            return _OpenItem(self.dir, owned=False, inside=[(item.item, item.name)])
        descriptor = self.fs.open_dir(at)
        container = Dir(descriptor, at.path)
        try:
            opened_status = os.fstat(descriptor)
            if opened_status.st_ino != item.inode:
                raise _changed(at.path, "another inode")
            if item.layout == "item" and opened_status.st_uid != os.geteuid():
                raise _changed(at.path, f"owned by uid {opened_status.st_uid}")
            names = sorted(n for n in self.fs.list_dir(container) if not _is_entry_file(n))
        except BaseException:
            os.close(descriptor)
            raise
        return _OpenItem(container, owned=True, inside=[(name, name) for name in names])

    def _check_member(self, item: TrashItem, container: Dir, member: str) -> None:
        """Raise OSError when a member is not what moved in (kind, owner, inode)."""
        expected = item.identity_of(member)
        if expected is None:
            return
        status = self.fs.lstat_at(container.at(member))
        if not expected.matches(status):
            now = MemberIdentity.of(status)
            raise _changed(
                container.at(member).path, f"was {expected.describe()}, now {now.describe()}"
            )

    def discard(self, item: str, container: Dir | None = None) -> None:
        """Given an item folder whose members are gone, remove its entry files and itself."""
        self._discard(item, container)

    def _discard(self, item: str, container: Dir | None = None) -> None:
        """Given an item folder whose members are gone, remove its entry files and itself.

        Raises OSError (and removes nothing) while a member is still inside: its entry is what
        says where that member belongs (a move interrupted midway is rolled back from it)."""
        at = self.dir.at(item)
        if container is None:
            with self._folder(at) as folder:
                self._discard(item, folder)
            return
        names = self.fs.list_dir(container)
        if any(not _is_entry_file(name) for name in names):
            raise OSError(errno.ENOTEMPTY, "members still inside", at.path)
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.fs.unlink_at(container.at(name))
        self.fs.rmdir_at(at)

    # --- moving in -------------------------------------------------------------------------

    def new_item(self, now: float) -> str:
        """Given the time, make a new empty item folder (0700) and return its name (a slim's
        item is filled by daemon/pruning/slimtrash.py)."""
        return self._new_item(now)

    def _new_item(self, now: float) -> str:
        """Given the time, make a new empty item folder (0700) and return its name."""
        seconds = int(now)
        number = self._next.get(seconds, 0)
        while True:
            item = f"{seconds}-{number}"
            number += 1
            try:
                self.fs.mkdir_at(self.dir.at(item), 0o700)
            except FileExistsError:
                continue
            self._next[seconds] = number
            return item

    def move(self, name: str, members: Iterable[str], *, now: float, durable: bool = True) -> str:
        """Given a checkpoint's name and root entries, move them into a new item; return the
        item's name. Raises OSError when the move could not start or, after rolling back what
        had moved, failed midway: the checkpoint is then whole under its name again."""
        ordered = sorted(members, key=lambda member: (not member.endswith(".index"), member))
        if not ordered or not all(map(_plain_name, ordered)):
            raise UsageError(f"{name}: not entries of the root: {ordered!r}")
        if len(ordered) == 1:
            bare = self._move_bare(ordered[0], now=now, durable=durable)
            if bare is not None:
                return bare
        item = self._new_item(now)
        with self._folder(self.dir.at(item)) as folder:
            try:
                self._move_into(folder, name, ordered, now)
            except BaseException:
                with contextlib.suppress(OSError):
                    self._discard(item, folder)
                raise
            if durable:
                self.fs.fsync_fd(self.root.fd)
                self.fs.fsync_fd(folder.fd)
        return item

    def _move_into(self, folder: Dir, name: str, ordered: list[str], now: float) -> None:
        identities = {m: MemberIdentity.of(self.fs.lstat_at(self.root.at(m))) for m in ordered}
        entry = {
            "version": 2,
            "name": name,
            "members": ordered,
            "deleted_at": now,
            "identities": {
                member: {"kind": ident.kind, "uid": ident.uid, "ino": ident.ino}
                for member, ident in identities.items()
            },
        }
        multi = len(ordered) > 1
        # A journal must be on disk before the first of several renames; one rename needs none.
        try:
            self.fs.write_new_at(folder.at(JOURNAL), json.dumps(entry).encode(), durable=multi)
        except OSError as error:
            # A full filesystem (the very reason to prune): one entry moves without its entry
            # file (the member inside names the item); several cannot move without a journal.
            if error.errno not in _NO_SPACE or multi:
                raise
        if multi:
            self.fs.fsync_fd(folder.fd)
        moved: list[str] = []
        try:
            for member in ordered:
                self.fs.rename_at(self.root.at(member), folder.at(member))
                moved.append(member)
            # What moved must be what was looked at: an entry swapped between the two goes back.
            changed = [
                m for m in moved if not identities[m].matches(self.fs.lstat_at(folder.at(m)))
            ]
            if changed:
                raise OSError(
                    errno.EBUSY, "changed while being moved into the trash", ", ".join(changed)
                )
        except OSError:
            # What cannot be moved back now, recovery at the next run rolls back from the journal.
            for member in reversed(moved):
                with contextlib.suppress(OSError):
                    self.fs.rename_at(folder.at(member), self.root.at(member))
            raise

    def _move_bare(self, member: str, *, now: float, durable: bool) -> str | None:
        """Given a checkpoint of one entry, rename it into the trash as `<seconds>-<n>.<name>`
        in one rename (nothing allocated: it works on a full filesystem too); return that
        name, or None when it would pass the filesystem's name limit (the caller makes an item
        folder instead)."""
        identity = MemberIdentity.of(self.fs.lstat_at(self.root.at(member)))
        seconds = int(now)
        number = self._next.get(seconds, 0)
        while True:
            item = f"{seconds}-{number}.{member}"
            number += 1
            if len(os.fsencode(item)) > self.name_max:
                return None
            try:
                self.fs.rename_at(self.root.at(member), self.dir.at(item))
            except FileExistsError:
                continue
            break
        self._next[seconds] = number
        if not identity.matches(self.fs.lstat_at(self.dir.at(item))):
            self.fs.rename_at(self.dir.at(item), self.root.at(member))
            raise OSError(errno.EBUSY, "changed while being moved into the trash", member)
        if durable:
            self.fs.fsync_fd(self.root.fd)
            self.fs.fsync_fd(self.dir.fd)
        return item

    # --- removing --------------------------------------------------------------------------

    def measure(self, item: str) -> Usage:
        """Given an item's name, return what removing its members would give back now (the
        item's own folder and entry are ckptd's, made and removed with it)."""
        try:
            layout = self._layout(item, self.fs.lstat_at(self.dir.at(item)))
        except OSError:
            return Usage()
        return self._measure(item, layout) if layout is not None else Usage()

    def _measure(self, item: str, layout: str) -> Usage:
        if layout not in ("item", "legacy-folder"):
            return measure_names(self.dir.fd, (item,))
        try:
            with self._folder(self.dir.at(item)) as folder:
                inside = [name for name in self.fs.list_dir(folder) if not _is_entry_file(name)]
                return measure_names(folder.fd, inside)
        except OSError:
            return Usage()

    def remove(self, item: TrashItem) -> list[str]:
        """Given a listed item, check it again and remove it (members first, entry last); return
        the errors (an item that changed since it was listed is left alone, as an error)."""
        errors: list[str] = []

        def record(path: str, error: OSError) -> None:
            errors.append(f"{path}: {error.strerror or error}")

        try:
            opened_item = self._open_item(item)
        except OSError as error:
            if isinstance(error, FileNotFoundError):
                return []  # removed already (another run)
            return [f"{error.filename or item.path}: {error.strerror or error}"]
        with opened_item:
            if opened_item.owned and len(item.members) > 1:
                with contextlib.suppress(OSError):  # being removed: never rolled back now
                    self.fs.rename_at(
                        opened_item.container.at(JOURNAL), opened_item.container.at(REMOVING)
                    )
            for source, _target in opened_item.inside:
                try:
                    self._check_member(item, opened_item.container, source)
                except OSError as error:
                    record(error.filename or source, error)
                    continue
                self.fs.remove_tree_at(opened_item.container.at(source), on_error=record)
            if errors or not opened_item.owned:
                return errors
            try:
                self._discard(item.item, opened_item.container)
            except OSError as error:
                record(error.filename or item.path, error)
        return errors

    def remove_measured(self, item: TrashItem) -> tuple[Usage, list[str]]:
        """Given a listed item, remove it; return what that really gave back, and the errors."""
        before = Usage(item.bytes, item.bytes_logical)
        errors = self.remove(item)
        if not errors:
            return before, errors
        after = self.measure(item.item)
        return Usage(
            max(0, before.allocated - after.allocated), max(0, before.logical - after.logical)
        ), errors

    # --- putting back ----------------------------------------------------------------------

    def put_back(self, item: TrashItem, *, pin: bool) -> _Pin:
        """Given a listed item, rename its members back into the root (never replacing), then
        remove the item; with `pin`, pin the checkpoint first (see `restore`).

        Raises UsageError when a member's name is taken in the root, OSError when a rename
        fails (what had moved back is moved into the item again). A slim's item goes back into
        its checkpoint (daemon/pruning/slimtrash.py)."""
        if item.slim is not None:
            self._open_item(item).close()  # checked again: the item listed, and ckptd's
            return _Pin(slimtrash.put_back(self, item, item.slim, pin=pin))
        with self._open_item(item) as opened_item:
            taken = [target for _, target in opened_item.inside if self._in_root(target)]
            if taken:
                raise UsageError(
                    f"cannot restore {item.name}: {', '.join(taken)} already exists in "
                    f"{self.root.path}"
                )
            made_pin = self._pin(item, opened_item) if pin else _Pin(None)
            try:
                self._rename_back(opened_item)
            except OSError as error:
                if made_pin.made is not None:
                    with contextlib.suppress(OSError):
                        self.fs.unlink_at(made_pin.made)
                if isinstance(error, FileExistsError):
                    raise UsageError(
                        f"cannot restore {item.name}: {error.filename} appeared in the root"
                    ) from None
                raise
            self.fs.fsync_fd(self.root.fd)
            if opened_item.owned:
                self._discard(item.item, opened_item.container)
        return made_pin

    def _rename_back(self, opened_item: _OpenItem) -> None:
        """Rename every member back, the completion marker last; undo all on a failure."""
        moved: list[tuple[At, At]] = []
        ordered = sorted(opened_item.inside, key=lambda pair: (pair[1].endswith(".index"), pair))
        try:
            for source, target in ordered:
                pair = (opened_item.container.at(source), self.root.at(target))
                self.fs.rename_at(*pair)
                moved.append(pair)
        except OSError:
            for source_at, target_at in reversed(moved):
                with contextlib.suppress(OSError):
                    self.fs.rename_at(target_at, source_at)
            raise

    def _pin(self, item: TrashItem, opened_item: _OpenItem) -> _Pin:
        """Given an item about to go back, pin it where discovery reads pins — `.keep` inside
        a folder, `<name>.keep` beside anything else — before it reappears (so no prune sees
        it unpinned), created with O_EXCL|O_NOFOLLOW (never through a link raced in)."""
        if len(opened_item.inside) == 1:
            source = opened_item.container.at(opened_item.inside[0][0])
            if stat_module.S_ISDIR(self.fs.lstat_at(source).st_mode):
                with self._folder(source) as folder, contextlib.suppress(FileExistsError):
                    self.fs.write_new_at(folder.at(".keep"), PIN_TEXT, durable=False)
                return _Pin(os.path.join(self.root.path, item.name, ".keep"))
        beside = self.root.at(f"{item.name}.keep")
        try:
            self.fs.write_new_at(beside, PIN_TEXT, durable=False)
        except FileExistsError:
            return _Pin(beside.path)  # something is there already (her pin, or a link)
        except OSError as error:
            if error.errno != errno.ENAMETOOLONG:
                raise
            return _Pin(
                None,
                problem=f"not pinned: {item.name}.keep would pass the filesystem's name limit; "
                "add a `protect:` glob matching it to the root's config, or the next prune "
                "deletes it again",
            )
        return _Pin(beside.path, made=beside)

    # --- crash recovery and purging --------------------------------------------------------

    def recover(self) -> list[str]:
        """Given the trash, finish what a crash left; return a note per repair.

        A half-moved multi-entry checkpoint is rolled back into the root; an item nothing moved
        into (a crash before the first rename) is removed. Half-removed items stay trashed and
        are finished by the purge that follows.
        """
        notes: list[str] = []
        for item in self.items():
            try:
                note = self._recover_item(item)
            except (OSError, UsageError) as error:
                message = error.strerror if isinstance(error, OSError) else str(error)
                note = f"could not repair {item.item}: {message or error}"
            if note:
                notes.append(note)
        return notes

    def _recover_item(self, item: TrashItem) -> str | None:
        if item.state == "empty":
            self._discard(item.item)
            return f"removed the unfinished trash item {item.item}"
        if item.slim is not None:
            if item.state == "moving":
                self._open_item(item).close()  # checked again: the item listed, and ckptd's
                return slimtrash.roll_back(self, item, item.slim)
            slimtrash.settle(self, item, item.slim)
            return None
        if item.state != "moving":
            return None
        with self._open_item(item) as opened_item:
            taken = [target for _, target in opened_item.inside if self._in_root(target)]
            if taken:
                # Never overwrite and never drop: leave both for a person to sort out.
                return f"left {item.item} in the trash: {', '.join(taken)} exists in the root too"
        self.put_back(item, pin=False)
        return f"rolled back the interrupted deletion of {item.name}"

    def purge(
        self,
        *,
        now: float,
        grace: float,
        everything: bool = False,
        history: History = NULL_HISTORY,
        stop: threading.Event | None = None,
    ) -> PurgeResult:
        """Given the time and the grace, remove items past it (all with `everything`); `stop`
        set (a shared root's lease lost) means: finish the item in progress, start no other."""
        removed: list[str] = []
        failed: list[tuple[str, str]] = []
        freed = Usage()
        for item in self.items():
            if stop is not None and stop.is_set():
                break
            if item.state != "trashed":
                continue  # a crashed move (`recover` rolls it back) or an empty item
            if not everything and item.expires_at(grace) > now:
                continue
            usage, errors = self.remove_measured(item)
            freed += usage
            if errors:
                failed.append((item.name, "; ".join(errors[:3])))
            else:
                removed.append(item.name)
            history.record(
                TrashPurge(
                    root=self.root.path,
                    checkpoint=item.name,
                    bytes_freed=usage.allocated,
                    deleted_at=item.deleted_at,
                    partial=bool(errors),
                    errors=tuple(errors[:3]),
                    bytes_logical=usage.logical,
                )
            )
        return PurgeResult(tuple(removed), freed.allocated, tuple(failed), (), freed.logical)


def _sequence(item: str) -> int:
    """Given an item's name, return its number among the items of the same second."""
    match = ITEM_NAME.fullmatch(item) or BARE_NAME.fullmatch(item)
    return int(match.group(2)) if match else -1


def _replace(item: TrashItem, **changes: object) -> TrashItem:
    return dataclasses.replace(item, **changes)  # type: ignore[arg-type]


@contextlib.contextmanager
def open_trash(
    root: str | RootDir, *, create: bool = False, fs: FileSystem = LOCAL
) -> Iterator[Trash | None]:
    """Given a root (a path, or an open root), yield its trash opened (made first with
    `create`), None when it has none. Raises TrashRefused when the trash is not ckptd's."""
    with opened(root) as root_dir:
        directory = open_trash_dir(root_dir, create=create, fs=fs)
        if directory is None:
            yield None
            return
        try:
            yield Trash(root_dir, directory, fs)
        finally:
            os.close(directory.fd)


def list_trash(root: str | RootDir, fs: FileSystem = LOCAL) -> list[TrashItem]:
    """Given a root, return its trash items, oldest deletion first."""
    with open_trash(root, fs=fs) as trash:
        return trash.items() if trash is not None else []


def move_to_trash(
    root: str | RootDir,
    name: str,
    members: Iterable[str],
    *,
    now: float,
    fs: FileSystem = LOCAL,
    durable: bool = True,
) -> str:
    """Given a checkpoint's name and root entries, move them into a new trash item; return its
    path. `durable=False` leaves the fsyncs to the caller. Raises OSError when the move could
    not start or, for several members, after rolling back what had moved; the checkpoint is
    then whole under its name again."""
    with open_trash(root, create=True, fs=fs) as trash:
        assert trash is not None
        item = trash.move(name, members, now=now, durable=durable)
        return trash.dir.at(item).path


def _find(trash: Trash, name: str) -> TrashItem:
    """Given a checkpoint or item name, return the most recent restorable item of that name."""
    items = [
        item for item in trash.items() if name in (item.name, item.item) and item.state == "trashed"
    ]
    if not items:
        raise UsageError(f"no checkpoint named {name!r} in the trash of {trash.root.path}")
    return items[-1]


def restore(root: str | RootDir, name: str, *, fs: FileSystem = LOCAL) -> TrashItem:
    """Given a checkpoint name (or an item name), rename it back into the root, pinned; return
    the item (see `restore_pinned`)."""
    return restore_pinned(root, name, fs=fs).item


def restore_pinned(root: str | RootDir, name: str, *, fs: FileSystem = LOCAL) -> Restored:
    """Given a checkpoint name (or an item name), rename it back into the root; return it with
    its pin.

    Refuses (UsageError) when no such item exists or a member's name is taken in the root.
    The restored checkpoint is pinned (`.keep` inside a folder, `<name>.keep` beside anything
    else, as discovery reads pins) before it reappears: the policy that deleted it has not
    changed, and without the pin the next prune would delete it again. A name too long for a
    `<name>.keep` beside it is restored unpinned, and `problem` says so.
    """
    with open_trash(root, fs=fs) as trash:
        if trash is None:
            raise UsageError(f"no checkpoint named {name!r} in the trash of {root}")
        item = _find(trash, name)
        pin = trash.put_back(item, pin=True)
        return Restored(item, pin.path, pin.problem)


def undo_move(root: str | RootDir, item_path: str, fs: FileSystem = LOCAL) -> None:
    """Given a trash item just moved there, rename it back under its name (not pinned).

    Raises UsageError when its name was taken meanwhile, OSError when a rename fails.
    """
    with open_trash(root, fs=fs) as trash:
        item = trash.describe(os.path.basename(item_path)) if trash is not None else None
        if trash is None or item is None:
            raise UsageError(f"{item_path}: not a trash item")
        trash.put_back(item, pin=False)


def pin_path(root_path: str, name: str, fs: FileSystem = LOCAL) -> str:
    """Given a root and a checkpoint entry or name, return the pin file that protects it."""
    target = os.path.join(root_path, name)
    try:
        if stat_module.S_ISDIR(fs.lstat(target).st_mode):
            return os.path.join(target, ".keep")
    except OSError:
        pass
    return target + ".keep"


def purge(
    root: str | RootDir,
    *,
    now: float,
    grace: float,
    everything: bool = False,
    fs: FileSystem = LOCAL,
    history: History = NULL_HISTORY,
    stop: threading.Event | None = None,
) -> PurgeResult:
    """Given a root and the grace, remove trash items past it (all with `everything`; none
    started once `stop` is set)."""
    with open_trash(root, fs=fs) as trash:
        if trash is None:
            return PurgeResult()
        return trash.purge(now=now, grace=grace, everything=everything, history=history, stop=stop)


def recover(root: str | RootDir, *, fs: FileSystem = LOCAL) -> list[str]:
    """Given a root, finish what a crash left in its trash; return a note per repair."""
    with open_trash(root, fs=fs) as trash:
        return trash.recover() if trash is not None else []


def empty_trash(
    root: str | RootDir, *, fs: FileSystem = LOCAL, history: History = NULL_HISTORY
) -> int:
    """Given a root, remove everything in its trash regardless of grace; return bytes freed.

    The disk check calls this first under disk pressure (before pruning anything more).
    Crashed moves are rolled back first, so nothing half-moved is lost. While a prune holds
    the root (its moves in progress look like crashed ones) nothing is touched and 0 returned:
    that prune is freeing space already. A trash that is not ckptd's frees nothing (0).
    """
    with opened(root) as root_dir:
        try:
            with root_lock(root_dir, fs) as acquired:
                if not acquired:
                    return 0
                with open_trash(root_dir, fs=fs) as trash:
                    if trash is None:
                        return 0
                    trash.recover()
                    result = trash.purge(now=0.0, grace=0.0, everything=True, history=history)
                    return result.bytes_freed
        except TrashRefused:
            return 0


def finish_leftovers(
    root: str | RootDir,
    *,
    now: float,
    grace: float,
    fs: FileSystem = LOCAL,
    history: History = NULL_HISTORY,
) -> PurgeResult:
    """Given a root, finish a trash a crash left behind: repair, then purge what is past grace.

    What the daemon calls at start-up for each root (every prune run does the same first).
    """
    with open_trash(root, fs=fs) as trash:
        if trash is None:
            return PurgeResult()
        notes = trash.recover()
        result = trash.purge(now=now, grace=grace, history=history)
    return PurgeResult(
        result.removed, result.bytes_freed, result.failed, tuple(notes), result.bytes_logical
    )
