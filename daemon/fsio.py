"""The one small interface through which discovery and pruning touch the filesystem.

Everything that lists, stats, reads, renames or removes goes through a `FileSystem`. The real one
is `LocalFileSystem`; tests pass a subclass that misbehaves on purpose (a file vanishing between
listing and stat, EACCES, EROFS), and object storage later slots in behind the same methods.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat as stat_module
from collections.abc import Callable, Iterator
from typing import Protocol

# The folder inside each root (and the snapshot folder) that deletions are renamed into first.
TRASH_DIRECTORY = ".ckptd-trash"


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
    def scandir(self, path: str) -> Iterator[DirEntryLike]: ...

    def lstat(self, path: str) -> os.stat_result: ...

    def stat(self, path: str) -> os.stat_result: ...

    def read_bytes(self, path: str, limit: int = 1 << 20) -> bytes: ...

    def readlink(self, path: str) -> str: ...

    def rename(self, source: str, destination: str) -> None: ...

    def makedirs(self, path: str) -> None: ...

    def remove_tree(
        self, path: str, on_error: Callable[[str, OSError], None] | None = None
    ) -> None: ...

    def unlink(self, path: str) -> None: ...

    def fsync_dir(self, path: str) -> None: ...


class LocalFileSystem:
    """The real filesystem, through `os`."""

    def scandir(self, path: str) -> Iterator[DirEntryLike]:
        with os.scandir(path) as entries:
            yield from entries

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(path)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path)

    def read_bytes(self, path: str, limit: int = 1 << 20) -> bytes:
        with open(path, "rb") as handle:
            return handle.read(limit)

    def readlink(self, path: str) -> str:
        return os.readlink(path)

    def rename(self, source: str, destination: str) -> None:
        os.rename(source, destination)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def remove_tree(
        self, path: str, on_error: Callable[[str, OSError], None] | None = None
    ) -> None:
        """Given a path, remove it and everything below it without following any symlink.

        A symlink (to a file or a folder, inside or outside the root) loses only the link.
        `on_error(path, error)` is told of each failure and removal goes on with the rest;
        without it the first failure is raised.
        """
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat_module.S_ISDIR(mode):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                if on_error is None:
                    raise
                on_error(path, error)
            return

        def report(_function: object, failed_path: str, excinfo: tuple[object, ...]) -> None:
            error = excinfo[1]
            if isinstance(error, FileNotFoundError):
                return
            if not isinstance(error, OSError) or on_error is None:
                raise error  # type: ignore[misc]
            on_error(failed_path, error)

        # rmtree never follows symlinks (fd-based traversal on Linux); `onerror` is 3.11's hook.
        shutil.rmtree(path, onerror=report)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, path: str) -> None:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        except OSError as error:
            # Some filesystems (tmpfs on old kernels, FUSE) reject fsync on a directory.
            if error.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(descriptor)


LOCAL = LocalFileSystem()
