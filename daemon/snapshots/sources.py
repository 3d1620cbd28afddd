"""Opening the files a snapshot reads inside the training roots, following nothing.

ckptd runs as root and a root's owner may race it: between planning and placing she can swap a
checkpoint's file for a FIFO (an `open` would wait on it for ever), for a symlink to a file she
cannot read (`/etc/shadow`, which root would then copy or hard-link into the snapshot), or swap
a folder on its path for a symlink out of the root. So a snapshot never opens a source by path:
each root is opened once (and must be the folder the plan saw), each folder below it relative
to its parent with `O_DIRECTORY|O_NOFOLLOW`, the file with `O_NOFOLLOW|O_NONBLOCK` after an
`lstat` that it is a regular file (a FIFO or device is never even opened), and the snapshot
reflinks or copies through that descriptor, or hard-links the checked inode relative to its
folder (and checks the new name is that inode). Anything else is a `RefusedSource`: that item,
and so that snapshot, fails with the reason; the daemon goes on.
"""

from __future__ import annotations

import errno
import os
import stat as stat_module
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from daemon.fsio import DIRECTORY_FLAGS, NotRegularFile, _kind
from daemon.rootdir import Identity, RootChanged, RootDir, open_root
from daemon.snapshots.copying import READ_SOURCE, require_regular


class RefusedSource(OSError):
    """A file a snapshot will not read: a symlink, a FIFO, a device, a folder swapped for a
    link, or a file swapped for another while it was opened."""


class PlannedRoot(NamedTuple):
    """A root a snapshot reads, and the folder (identity) it was when the plan was made."""

    path: str
    identity: Identity


class Entry(NamedTuple):
    """One source file found: its folder's descriptor (held by `Sources`, valid until its next
    `find`) and its name there, its status (a regular file when found) and its full path (for
    messages)."""

    folder: int
    name: str
    status: os.stat_result
    path: str


@dataclass
class _Folder:
    """The folder whose files are being placed: which one, and its descriptor (the root's own
    descriptor, not to be closed here, for a file right in the root)."""

    root: str
    inside: tuple[str, ...]
    fd: int
    owned: bool


def _refused(error: OSError, path: str) -> OSError:
    """Given why opening part of a source failed, return what to raise: a refusal for a
    symlink (ELOOP) or a non-folder on its path (ENOTDIR), the error naming `path` else."""
    if error.errno == errno.ELOOP:
        return RefusedSource(errno.ELOOP, "a symlink: never followed inside a root", path)
    if error.errno == errno.ENOTDIR:
        return RefusedSource(errno.ENOTDIR, "a folder on its path is not a folder", path)
    error.filename = path
    return error


def _parts(inside: str, path: str) -> list[str]:
    """Given a source's path inside its root, return its names; refuse `..`, `.` and empties
    (a name that would climb out of the root)."""
    parts = inside.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise RefusedSource(errno.EINVAL, "not a plain path inside the root", path)
    return parts


def open_folder(root: int, names: Iterable[str], path: str) -> int:
    """Given an open root and the folder names leading down from it, open the last folder,
    one name at a time relative to the one above, following no symlink; return its
    descriptor (the caller closes it)."""
    current = os.dup(root)
    for name in names:
        try:
            below = os.open(name, DIRECTORY_FLAGS, dir_fd=current)
        except OSError as error:
            refusal = _not_a_folder(error, current, name, path)
            os.close(current)
            raise refusal from None
        os.close(current)
        current = below
    return current


def _not_a_folder(error: OSError, folder: int, name: str, path: str) -> OSError:
    """Given why a folder on a source's path did not open, return what to raise: a refusal
    saying what stands there instead (a symlink, a FIFO, a file), else the error."""
    if error.errno not in (errno.ELOOP, errno.ENOTDIR):
        return _refused(error, path)
    try:
        mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
        kind = "a file" if stat_module.S_ISREG(mode) else _kind(mode)
    except OSError:
        kind = "not a folder"
    return RefusedSource(error.errno, f"{name!r} on its path is {kind}: never followed", path)


def find_file(folder: int, name: str, path: str) -> Entry:
    """Given an open folder and a file's name in it, return it as an Entry when it is a
    regular file (its lstat: a symlink, FIFO or device is refused without being opened)."""
    try:
        status = os.stat(name, dir_fd=folder, follow_symlinks=False)
        require_regular(status, path)
    except NotRegularFile as error:
        raise RefusedSource(errno.EINVAL, error.strerror, path) from None
    except OSError as error:
        raise _refused(error, path) from None
    return Entry(folder, name, status, path)


def open_entry(entry: Entry) -> int:
    """Given a file found, open it for reading (never following, never waiting) and return its
    descriptor, blocking again; refuse it when it is no longer the file found."""
    try:
        descriptor = os.open(entry.name, READ_SOURCE, dir_fd=entry.folder)
    except OSError as error:
        raise _refused(error, entry.path) from None
    try:
        status = os.fstat(descriptor)
        if (status.st_dev, status.st_ino) != (entry.status.st_dev, entry.status.st_ino):
            raise RefusedSource(errno.ESTALE, "swapped for another file while opened", entry.path)
        os.set_blocking(descriptor, True)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


@contextmanager
def opened(entry: Entry) -> Iterator[int]:
    """Given a file found, yield its descriptor (`open_entry`), closed after."""
    descriptor = open_entry(entry)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


class Sources:
    """The roots one snapshot reads, each opened once, and the folder being read, kept open
    while its files are placed one after the other (the plan lists them folder by folder)."""

    def __init__(self, roots: Iterable[PlannedRoot]) -> None:
        self._planned = {root.path: root.identity for root in roots}
        self._roots: dict[str, RootDir] = {}
        self._folder: _Folder | None = None

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._drop_folder()
        for root in self._roots.values():
            root.close()
        self._roots.clear()

    def root(self, path: str) -> int:
        """Given a planned root's path, return its descriptor, opening it the first time:
        RootChanged when it is not the folder the plan read."""
        root_dir = self._roots.get(path)
        if root_dir is None:
            root_dir = open_root(path)
            planned = self._planned.get(path)
            if planned is None or root_dir.identity != planned:
                was = planned.describe() if planned is not None else "not planned"
                root_dir.close()
                raise RootChanged(
                    f"root changed since the snapshot was planned: {path} was {was}, now "
                    f"{root_dir.identity.describe()}; nothing read from it"
                )
            self._roots[path] = root_dir
        return root_dir.fd

    def find(self, root: str, inside: str, path: str) -> Entry:
        """Given a root, a file's path inside it and its full path (for messages), return the
        file found the safe way (module docstring); RefusedSource when it cannot be."""
        *folders, name = _parts(inside, path)
        return find_file(self._folder_fd(root, tuple(folders), path), name, path)

    def _folder_fd(self, root: str, inside: tuple[str, ...], path: str) -> int:
        """Given a folder of a root, return its descriptor: the one kept open when it is the
        folder of the previous file (a folder renamed meanwhile, into the trash say, is still
        the folder the plan listed), else opened name by name."""
        current = self._folder
        if current is not None and (current.root, current.inside) == (root, inside):
            return current.fd
        self._drop_folder()
        root_fd = self.root(root)
        if not inside:
            self._folder = _Folder(root, inside, root_fd, owned=False)
        else:
            self._folder = _Folder(root, inside, open_folder(root_fd, inside, path), owned=True)
        return self._folder.fd

    def _drop_folder(self) -> None:
        if self._folder is not None and self._folder.owned:
            os.close(self._folder.fd)
        self._folder = None
