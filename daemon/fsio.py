"""The one small interface through which discovery and pruning touch the filesystem.

Everything that lists, stats, reads, renames or removes goes through a `FileSystem`. The real one
is `LocalFileSystem`; tests pass a subclass that misbehaves on purpose (a file vanishing between
listing and stat, EACCES, EROFS), and object storage later slots in behind the same methods.

Every path inside a training root is hostile: its owner may swap any entry for a symlink, a FIFO
or another folder at any moment (README, "Safety"). So:

- files ckptd reads there (markers, trackers, `trainer_state.json`, pins, trash entries) are
  opened with `O_NOFOLLOW|O_NONBLOCK`, must be regular files and are read up to a cap
  (`read_regular`, and `read_bytes` of the real filesystem): a symlink is refused, a FIFO
  neither blocks the reader nor is read; a file inside a checkpoint folder is read relative to
  the root's descriptor, its folder opened with `O_DIRECTORY|O_NOFOLLOW` (`read_regular_in`,
  or `open_dir` then `read_at`), so a folder swapped for a symlink is never read through;
- what pruning changes is named relative to open directory descriptors (`At`: a descriptor and
  a name), never by a path resolved again later: `rename_at` (never replacing), `mkdir_at`,
  `write_new_at` (`O_CREAT|O_EXCL|O_NOFOLLOW`), `remove_tree_at` (descends with
  `O_DIRECTORY|O_NOFOLLOW`, so neither a symlink nor a FIFO swapped in is followed or opened);
- discovery's walk opens each folder with `open_dir` relative to its parent and lists it with
  `scandir_at` (through the descriptor), so a folder swapped for a symlink out of the root is
  never listed (daemon/discovery/walker.py);
- `measure_at` counts what removing a tree gives back: allocated bytes (`st_blocks`) of its
  files, each inode once, none of an inode linked from outside the tree; the logical size
  apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat as stat_module
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

# The folder inside each root (and the snapshot folder) that deletions are renamed into first.
TRASH_DIRECTORY = ".ckptd-trash"

# The most ckptd reads of one small file inside a root (markers, trackers, journals).
READ_LIMIT = 1 << 20

# Reading a file a root's owner controls: no symlink followed, no FIFO waited on.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Opening a folder inside a root: a symlink (ELOOP) or anything but a folder (ENOTDIR) is refused
# before it is opened, so a FIFO swapped in for a folder is never waited on either.
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

OnError = Callable[[str, OSError], None]


class NotRegularFile(OSError):
    """A file ckptd reads that is not a regular file (a FIFO, a socket, a device, a folder)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat_module.S_ISDIR, "a folder"),
        (stat_module.S_ISFIFO, "a FIFO"),
        (stat_module.S_ISSOCK, "a socket"),
        (stat_module.S_ISCHR, "a character device"),
        (stat_module.S_ISBLK, "a block device"),
        (stat_module.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: str, limit: int = READ_LIMIT, *, dir_fd: int | None = None) -> bytes:
    """Given a file (relative to `dir_fd` if given), return its first `limit` bytes.

    Opened with `O_NOFOLLOW|O_NONBLOCK` (a symlink raises ELOOP, a FIFO does not block) and
    read only when it is a regular file; NotRegularFile (an OSError) otherwise.
    """
    descriptor = os.open(path, READ_FLAGS, dir_fd=dir_fd)
    try:
        status = os.fstat(descriptor)
        if not stat_module.S_ISREG(status.st_mode):
            raise NotRegularFile(
                errno.EINVAL, f"not a regular file ({_kind(status.st_mode)})", path
            )
        parts: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(descriptor, min(left, READ_LIMIT))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
            if limit - left >= status.st_size:
                break  # all of it: spare the read that would only say end of file
        return b"".join(parts)
    finally:
        os.close(descriptor)


def read_regular_in(dir_fd: int, folder: str, name: str, limit: int = READ_LIMIT) -> bytes:
    """Given an open folder, the name of a folder in it and a file's name in that, return the
    file's first `limit` bytes, following no symlink below `dir_fd`.

    The folder is opened relative to `dir_fd` with `O_DIRECTORY|O_NOFOLLOW` (a symlink swapped
    in for it raises ENOTDIR or ELOOP, as anything but a folder does; neither is opened), the
    file relative to that as `read_regular` opens it. A by-path read (`<root>/<folder>/<name>`)
    would refuse a symlink at `name` only, and follow one at `folder` out of the root.
    """
    descriptor = os.open(folder, DIRECTORY_FLAGS, dir_fd=dir_fd)
    try:
        return read_regular(name, limit, dir_fd=descriptor)
    finally:
        os.close(descriptor)


def list_in(dir_fd: int, folder: str) -> list[str]:
    """Given an open folder and the name of a folder in it, return the names in that folder,
    opened relative to `dir_fd` with `O_DIRECTORY|O_NOFOLLOW` (see `read_regular_in`) and
    listed through its descriptor: a symlink swapped in for it is refused, never listed."""
    descriptor = os.open(folder, DIRECTORY_FLAGS, dir_fd=dir_fd)
    try:
        return os.listdir(descriptor)
    finally:
        os.close(descriptor)


# --- names relative to open folders ----------------------------------------------------------


class At(NamedTuple):
    """A name inside an open folder, and the path it stood for (for messages, and for tests
    that inject failures by path). Operations use only `fd` and `name`."""

    fd: int
    name: str
    path: str


@dataclass(frozen=True)
class Dir:
    """An open folder and the path it was opened under; `at(name)` names an entry of it."""

    fd: int
    path: str

    def at(self, name: str) -> At:
        return At(self.fd, name, os.path.join(self.path, name))


def _with_path(error: OSError, path: str) -> OSError:
    """Given an error of an fd-relative call, return it naming the whole path (for messages)."""
    error.filename = path
    return error


@dataclass(frozen=True)
class Usage:
    """What removing a tree gives back: `allocated` bytes (st_blocks) and `logical` bytes."""

    allocated: int = 0
    logical: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.allocated + other.allocated, self.logical + other.logical)


class DirEntryLike(Protocol):
    """What discovery needs of a directory entry; `os.DirEntry` is one."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...

    def is_dir(self, *, follow_symlinks: bool = True) -> bool: ...

    def is_file(self, *, follow_symlinks: bool = True) -> bool: ...

    def is_symlink(self) -> bool: ...

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result: ...

    def inode(self) -> int: ...


class FileSystem(Protocol):
    # By path: discovery's listing and reading, and the snapshot folder (ckptd's own).
    def scandir(self, path: str) -> Iterator[DirEntryLike]: ...

    def lstat(self, path: str) -> os.stat_result: ...

    def stat(self, path: str) -> os.stat_result: ...

    def read_bytes(self, path: str, limit: int = READ_LIMIT) -> bytes: ...

    def readlink(self, path: str) -> str: ...

    def rename(self, source: str, destination: str) -> None: ...

    def makedirs(self, path: str) -> None: ...

    def remove_tree(self, path: str, on_error: OnError | None = None) -> None: ...

    def unlink(self, path: str) -> None: ...

    def fsync_dir(self, path: str) -> None: ...

    # Relative to open folders: everything pruning changes inside a root and its trash.
    def open_dir(self, at: At) -> int: ...

    def lstat_at(self, at: At) -> os.stat_result: ...

    def list_dir(self, directory: Dir) -> list[str]: ...

    def scandir_at(self, directory: Dir) -> Iterator[DirEntryLike]: ...

    def mkdir_at(self, at: At, mode: int = 0o700) -> None: ...

    def rename_at(self, source: At, destination: At) -> None: ...

    def remove_tree_at(self, at: At, on_error: OnError | None = None) -> None: ...

    def unlink_at(self, at: At) -> None: ...

    def rmdir_at(self, at: At) -> None: ...

    def write_new_at(
        self, at: At, data: bytes, *, mode: int = 0o644, durable: bool = True
    ) -> None: ...

    def read_at(self, at: At, limit: int = READ_LIMIT) -> bytes: ...

    def fsync_fd(self, descriptor: int) -> None: ...


# renameat2(2) with RENAME_NOREPLACE: a rename that never replaces what is at the destination,
# in one call (a check before a plain rename leaves a window). glibc >= 2.28 has it.
RENAME_NOREPLACE = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
_RENAMEAT2 = getattr(_LIBC, "renameat2", None)
if _RENAMEAT2 is not None:
    _RENAMEAT2.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    _RENAMEAT2.restype = ctypes.c_int


def rename_noreplace(source: At, destination: At) -> None:
    """Given two names in open folders, rename the first to the second; FileExistsError if the
    second exists. Never follows a symlink (rename(2) never does)."""
    if _RENAMEAT2 is not None:
        result = _RENAMEAT2(
            source.fd,
            os.fsencode(source.name),
            destination.fd,
            os.fsencode(destination.name),
            RENAME_NOREPLACE,
        )
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), source.path, None, destination.path)
    # A filesystem without RENAME_NOREPLACE (NFS, FUSE): check, then rename. A name created in
    # the window is replaced by the rename; nothing is followed either way.
    try:
        os.stat(destination.name, dir_fd=destination.fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), destination.path)
    try:
        os.rename(source.name, destination.name, src_dir_fd=source.fd, dst_dir_fd=destination.fd)
    except OSError as error:
        raise _with_path(error, source.path) from None


@dataclass
class _Frame:
    """One folder being emptied by `remove_tree_at`: its descriptor (-1 while closed to bound
    the descriptors a deep tree holds), path, identity and what is left."""

    fd: int
    path: str
    name: str  # its name in the folder of the frame below
    pending: list[tuple[str, bool]] = field(default_factory=list)  # (name, is a folder)
    identity: tuple[int, int] = (0, 0)  # (st_dev, st_ino), noted when its descriptor closes


# The most folder descriptors one removal keeps open: deeper, the ancestors' are closed and
# opened again through ".." (checked to be the same folder) on the way back up.
MAX_OPEN_FOLDERS = 64


class _TreeChanged(Exception):
    """A folder's ".." is not the folder it was: the tree moved under the removal."""


def _entries(descriptor: int) -> list[tuple[str, bool]]:
    with os.scandir(descriptor) as entries:
        return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]


def _report(on_error: OnError | None, path: str, error: OSError) -> None:
    if isinstance(error, FileNotFoundError):
        return  # gone already: what removal wanted
    if on_error is None:
        raise _with_path(error, path)
    on_error(path, _with_path(error, path))


def _unlink_entry(
    frame: _Frame, name: str, path: str, on_error: OnError | None, *, retry: bool
) -> None:
    try:
        os.unlink(name, dir_fd=frame.fd)
    except IsADirectoryError as error:
        if retry:
            frame.pending.append((name, True))  # swapped for a folder meanwhile: empty it
        else:
            _report(on_error, path, error)
    except OSError as error:
        _report(on_error, path, error)


def _open_child(frame: _Frame, name: str, path: str, on_error: OnError | None) -> _Frame | None:
    """Given a folder being emptied and a sub-folder's name, open it (never following); None
    when it is gone, or was swapped for something else (which is then unlinked)."""
    try:
        descriptor = os.open(name, DIRECTORY_FLAGS, dir_fd=frame.fd)
    except OSError as error:
        if error.errno in (errno.ENOTDIR, errno.ELOOP):
            _unlink_entry(frame, name, path, on_error, retry=False)
        else:
            _report(on_error, path, error)
        return None
    try:
        return _Frame(descriptor, path, name, _entries(descriptor))
    except OSError as error:
        os.close(descriptor)
        _report(on_error, path, error)
        return None


def _close_frame(frames: list[_Frame], on_error: OnError | None) -> None:
    """Given the stack of folders being emptied, close the top one and remove it."""
    frame = frames.pop()
    parent = frames[-1]
    if parent.fd < 0:
        _reopen(parent, frame)
    os.close(frame.fd)
    try:
        os.rmdir(frame.name, dir_fd=parent.fd)
    except OSError as error:
        _report(on_error, frame.path, error)


def _reopen(parent: _Frame, child: _Frame) -> None:
    """Given a frame whose descriptor was closed, open it again as its child's "..": it must
    be the same folder (it is, unless someone holding a descriptor inside moved it)."""
    descriptor = os.open("..", DIRECTORY_FLAGS, dir_fd=child.fd)
    status = os.fstat(descriptor)
    if (status.st_dev, status.st_ino) != parent.identity:
        os.close(descriptor)
        raise _TreeChanged(parent.path)
    parent.fd = descriptor


def _push(frames: list[_Frame], child: _Frame) -> None:
    """Given the stack and a folder just opened, push it, closing the descriptor of the
    ancestor MAX_OPEN_FOLDERS up (never the caller's folder at the bottom)."""
    frames.append(child)
    if len(frames) > MAX_OPEN_FOLDERS + 1:
        ancestor = frames[-MAX_OPEN_FOLDERS - 1]
        if ancestor.fd >= 0:
            status = os.fstat(ancestor.fd)
            ancestor.identity = (status.st_dev, status.st_ino)
            os.close(ancestor.fd)
            ancestor.fd = -1


def remove_tree_at(at: At, on_error: OnError | None = None) -> None:
    """Given a name in an open folder, remove it and everything below it, following nothing.

    Depth first, each folder opened with `O_DIRECTORY|O_NOFOLLOW` relative to its parent's
    descriptor, each entry unlinked relative to its folder's: a symlink loses only the link,
    and a symlink or FIFO swapped in for a folder meanwhile is unlinked, never followed or
    opened. `on_error(path, error)` is told of each failure and removal goes on with the rest;
    without it the first failure is raised. Entries already gone are not errors.
    """
    # The bottom frame is the parent (never closed or removed here); its one pending entry is
    # the tree to remove.
    frames = [_Frame(at.fd, os.path.dirname(at.path), "", [(at.name, True)])]
    try:
        while frames:
            frame = frames[-1]
            if not frame.pending:
                if len(frames) == 1:
                    break
                _close_frame(frames, on_error)
                continue
            name, is_folder = frame.pending.pop()
            path = at.path if len(frames) == 1 else f"{frame.path}/{name}"
            if not is_folder:
                _unlink_entry(frame, name, path, on_error, retry=True)
                continue
            child = _open_child(frame, name, path, on_error)
            if child is not None:
                _push(frames, child)
    except _TreeChanged as changed:
        moved = OSError(errno.EBUSY, "moved during its removal; left alone", str(changed))
        _report(on_error, str(changed), moved)
    finally:
        for frame in frames[1:]:
            if frame.fd >= 0:
                os.close(frame.fd)


@dataclass
class _Inode:
    """An inode met while measuring: how many of its links are inside the tree, its status."""

    links_here: int
    status: os.stat_result


def _open_quietly(name: str, parent: int) -> int | None:
    try:
        return os.open(name, DIRECTORY_FLAGS, dir_fd=parent)
    except OSError:
        return None


def measure_at(at: At) -> Usage:
    """Given a name in an open folder, return what removing it gives back (`measure_names`)."""
    return measure_names(at.fd, (at.name,))


def measure_names(parent: int, names: Iterable[str]) -> Usage:
    """Given names in an open folder, return what removing them gives back, following nothing.

    Allocated bytes (`st_blocks`: the space the filesystem gets back, so a sparse file counts
    what it holds, not its length) of every file below once; an inode with links outside these
    trees counts nothing (a snapshot shares it: "frees 0 B" is the honest answer then).
    Folders are not counted, as discovery does not count them. `logical` sums the regular
    files' sizes the same way. Depth first, as many descriptors open as `remove_tree_at`.
    """
    seen: dict[tuple[int, int], _Inode] = {}
    bottom = _Frame(parent, "", "")
    for name in names:
        try:
            status = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except OSError:
            continue
        if stat_module.S_ISDIR(status.st_mode):
            bottom.pending.append((name, True))
        else:
            _note_inode(seen, status)
    frames = [bottom]
    try:
        while frames:
            frame = frames[-1]
            if frame.pending:
                child = _open_quietly(frame.pending.pop()[0], frame.fd)
                if child is not None:
                    _push(frames, _Frame(child, "", "", _measure_folder(child, seen)))
            elif len(frames) == 1:
                break
            else:
                done = frames.pop()
                if frames[-1].fd < 0:
                    _reopen(frames[-1], done)
                os.close(done.fd)
    except (_TreeChanged, OSError):
        pass  # a tree moving under the measure: count what was seen (never more)
    finally:
        for frame in frames[1:]:
            if frame.fd >= 0:
                os.close(frame.fd)
    return _sum_inodes(seen)


def _measure_folder(descriptor: int, seen: dict[tuple[int, int], _Inode]) -> list[tuple[str, bool]]:
    """Given an open folder being measured, note its files' inodes; return its sub-folders."""
    folders: list[tuple[str, bool]] = []
    try:
        with os.scandir(descriptor) as entries:
            for entry in entries:
                try:
                    status = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat_module.S_ISDIR(status.st_mode):
                    folders.append((entry.name, True))
                else:
                    _note_inode(seen, status)
    except OSError:
        pass
    return folders


def _note_inode(seen: dict[tuple[int, int], _Inode], status: os.stat_result) -> None:
    key = (status.st_dev, status.st_ino)
    if key in seen:
        seen[key].links_here += 1
    else:
        seen[key] = _Inode(1, status)


def _sum_inodes(seen: dict[tuple[int, int], _Inode]) -> Usage:
    allocated = logical = 0
    for inode in seen.values():
        if inode.links_here < inode.status.st_nlink:
            continue  # linked from outside the tree too: removing it frees nothing
        allocated += inode.status.st_blocks * 512
        if stat_module.S_ISREG(inode.status.st_mode):
            logical += inode.status.st_size
    return Usage(allocated, logical)


class LocalFileSystem:
    """The real filesystem, through `os`."""

    def scandir(self, path: str) -> Iterator[DirEntryLike]:
        with os.scandir(path) as entries:
            yield from entries

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(path)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def read_bytes(self, path: str, limit: int = READ_LIMIT) -> bytes:
        """Given a file, return its first `limit` bytes: never through a symlink at its name,
        never from a FIFO or device (NotRegularFile), never blocking (see `read_regular`)."""
        return read_regular(path, limit)

    def readlink(self, path: str) -> str:
        return os.readlink(path)

    def rename(self, source: str, destination: str) -> None:
        os.rename(source, destination)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def remove_tree(self, path: str, on_error: OnError | None = None) -> None:
        """Given a path, remove it and everything below it without following any symlink.

        A symlink (to a file or a folder, inside or outside the root) loses only the link.
        `on_error(path, error)` is told of each failure and removal goes on with the rest;
        without it the first failure is raised.
        """
        parent = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.remove_tree_at(At(parent, os.path.basename(path), path), on_error)
        finally:
            os.close(parent)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.fsync_fd(descriptor)
        finally:
            os.close(descriptor)

    # --- relative to open folders ----------------------------------------------------------

    def open_dir(self, at: At) -> int:
        """Given a name in an open folder, open it as a folder: ELOOP for a symlink, ENOTDIR
        for anything else but a folder, without opening it."""
        try:
            return os.open(at.name, DIRECTORY_FLAGS, dir_fd=at.fd)
        except OSError as error:
            raise _with_path(error, at.path) from None

    def lstat_at(self, at: At) -> os.stat_result:
        try:
            return os.stat(at.name, dir_fd=at.fd, follow_symlinks=False)
        except OSError as error:
            raise _with_path(error, at.path) from None

    def list_dir(self, directory: Dir) -> list[str]:
        try:
            return os.listdir(directory.fd)
        except OSError as error:
            raise _with_path(error, directory.path) from None

    def scandir_at(self, directory: Dir) -> Iterator[DirEntryLike]:
        """Given an open folder, yield its entries (discovery's walk of a root). Each entry's
        `stat(follow_symlinks=False)` is relative to the folder's descriptor; its `path` is its
        bare name, as `os.scandir` of a descriptor gives it."""
        try:
            entries = os.scandir(directory.fd)
        except OSError as error:
            raise _with_path(error, directory.path) from None
        with entries:
            yield from entries

    def mkdir_at(self, at: At, mode: int = 0o700) -> None:
        try:
            os.mkdir(at.name, mode, dir_fd=at.fd)
        except OSError as error:
            raise _with_path(error, at.path) from None

    def rename_at(self, source: At, destination: At) -> None:
        """Given two names in open folders, rename; never replaces (FileExistsError)."""
        rename_noreplace(source, destination)

    def remove_tree_at(self, at: At, on_error: OnError | None = None) -> None:
        try:
            status = os.stat(at.name, dir_fd=at.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        except OSError as error:
            _report(on_error, at.path, error)
            return
        if stat_module.S_ISDIR(status.st_mode):
            remove_tree_at(at, on_error)
            return
        try:
            os.unlink(at.name, dir_fd=at.fd)
        except IsADirectoryError:
            remove_tree_at(at, on_error)  # swapped for a folder since the stat
        except OSError as error:
            _report(on_error, at.path, error)

    def unlink_at(self, at: At) -> None:
        try:
            os.unlink(at.name, dir_fd=at.fd)
        except OSError as error:
            raise _with_path(error, at.path) from None

    def rmdir_at(self, at: At) -> None:
        try:
            os.rmdir(at.name, dir_fd=at.fd)
        except OSError as error:
            raise _with_path(error, at.path) from None

    def write_new_at(self, at: At, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
        """Given a name that must not exist yet, create it (never through a symlink) holding
        `data`, fsynced when `durable`; FileExistsError when anything is at that name."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            descriptor = os.open(at.name, flags, mode, dir_fd=at.fd)
        except OSError as error:
            raise _with_path(error, at.path) from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            if durable:
                os.fsync(descriptor)
        except OSError as error:
            os.close(descriptor)
            with contextlib.suppress(OSError):
                os.unlink(at.name, dir_fd=at.fd)
            raise _with_path(error, at.path) from None
        os.close(descriptor)

    def read_at(self, at: At, limit: int = READ_LIMIT) -> bytes:
        try:
            return read_regular(at.name, limit, dir_fd=at.fd)
        except OSError as error:
            raise _with_path(error, at.path) from None

    def fsync_fd(self, descriptor: int) -> None:
        try:
            os.fsync(descriptor)
        except OSError as error:
            # Some filesystems (tmpfs on old kernels, FUSE) reject fsync on a directory.
            if error.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise


LOCAL = LocalFileSystem()

__all__ = [
    "LOCAL",
    "READ_LIMIT",
    "TRASH_DIRECTORY",
    "At",
    "Dir",
    "DirEntryLike",
    "FileSystem",
    "LocalFileSystem",
    "NotRegularFile",
    "Usage",
    "list_in",
    "measure_at",
    "measure_names",
    "read_regular",
    "read_regular_in",
    "remove_tree_at",
    "rename_noreplace",
]
