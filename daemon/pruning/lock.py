"""The root lock: one prune, or change of its trash, per root at a time, across processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from daemon.fsio import TRASH_DIRECTORY

LOCK_FILE = ".lock"


@contextlib.contextmanager
def root_lock(root_path: str) -> Iterator[bool]:
    """Given a root, hold its prune lock while inside; yield False if another prune holds it.

    An advisory `flock` on `<root>/.ckptd-trash/.lock`: the daemon, a `ckptd prune` typed by
    hand and whatever else changes the trash (the disk check emptying it, `ckptd trash`) never
    work on the same root at once — recovering a half-moved item while a prune is still moving
    it would remove what the prune moves in next. Where the lock file cannot be made (a
    read-only filesystem) nothing can be deleted either, so the run goes on without it.
    """
    folder = os.path.join(root_path, TRASH_DIRECTORY)
    try:
        os.makedirs(folder, exist_ok=True)
        descriptor = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    except OSError:
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
