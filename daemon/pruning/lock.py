"""The root lock: one prune, or change of its trash, per root at a time, across processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat as stat_module
from collections.abc import Iterator

from daemon.fsio import LOCAL, Dir, FileSystem
from daemon.pruning.trashdir import open_trash_dir
from daemon.rootdir import RootDir, opened

LOCK_FILE = ".lock"

_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_lock_file(trash: Dir) -> int:
    """Given ckptd's own trash folder, open its lock file (a regular file of ckptd's user).

    Nobody else can write in that folder, but a trash an earlier version made may have been
    writable: anything at the name that is not such a file is removed and made again.
    """
    for _attempt in range(2):
        descriptor = os.open(LOCK_FILE, _LOCK_FLAGS, 0o600, dir_fd=trash.fd)
        status = os.fstat(descriptor)
        if stat_module.S_ISREG(status.st_mode) and status.st_uid == os.geteuid():
            return descriptor
        os.close(descriptor)
        os.unlink(LOCK_FILE, dir_fd=trash.fd)
    raise OSError(f"{trash.path}/{LOCK_FILE}: not a lock file")


@contextlib.contextmanager
def root_lock(root: str | RootDir, fs: FileSystem = LOCAL) -> Iterator[bool]:
    """Given a root, hold its prune lock while inside; yield False if another prune holds it.

    An advisory `flock` on `<root>/.ckptd-trash/.lock`, opened relative to ckptd's own trash
    folder (`open_trash_dir`: never a symlink, never a folder of the root's owner — a trash that
    is not ckptd's raises TrashRefused): the daemon, a `ckptd prune` typed by hand and whatever
    else changes the trash (the disk check emptying it, `ckptd trash`) never work on the same
    root at once — recovering a half-moved item while a prune is still moving it would remove
    what the prune moves in next. Where the lock file cannot be made (a read-only filesystem)
    nothing can be deleted either, so the run goes on without it.
    """
    with opened(root) as root_dir:
        try:
            trash = open_trash_dir(root_dir, create=True, fs=fs)
        except OSError:
            yield True
            return
        assert trash is not None
        try:
            descriptor = _open_lock_file(trash)
        except OSError:
            os.close(trash.fd)
            yield True
            return
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(descriptor)
            os.close(trash.fd)
