"""The trash folder itself: ckptd's own, or not used at all.

`<root>/.ckptd-trash` is created by ckptd (`mkdirat`, mode 0700), owned by ckptd's user, and
opened relative to the root's descriptor with `O_DIRECTORY|O_NOFOLLOW`. A root's owner can put
anything at that name before ckptd does — a symlink to `/etc`, a folder of her own holding a
`.lock` symlink or planted items — and ckptd must then use none of it: whatever is there and is
not a folder owned by ckptd's user is refused (`TrashRefused`, exit 3 / `prune_refused`), and
nothing is deleted from that root until a person moves it away. Inside ckptd's own 0700 folder
she can neither add, swap nor rename anything, which is what makes the trash safe to remove from.

A trash an earlier version made (owned by ckptd's user, mode 0755) is ckptd's: its mode is set
to 0700 on first use.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_module

from daemon.errors import SafetyRefusal
from daemon.fsio import LOCAL, TRASH_DIRECTORY, Dir, FileSystem
from daemon.rootdir import RootDir

TRASH_MODE = 0o700


class TrashRefused(SafetyRefusal):
    """Something at `<root>/.ckptd-trash` that ckptd did not make: never used."""


def _kind(mode: int) -> str:
    if stat_module.S_ISLNK(mode):
        return "a symlink"
    if stat_module.S_ISDIR(mode):
        return "a folder"
    if stat_module.S_ISREG(mode):
        return "a file"
    return "a special file"


def _refusal(root: RootDir, what: str) -> TrashRefused:
    path = os.path.join(root.path, TRASH_DIRECTORY)
    return TrashRefused(
        f"the trash {path} is {what}, not a folder ckptd made: ckptd will not use it and "
        "deletes nothing in this root until it is moved away (it may hold checkpoints an "
        "earlier run deleted by hand: move them back or remove them); ckptd then makes its own"
    )


def _describe_foreign(root: RootDir, fs: FileSystem) -> TrashRefused:
    """Given a root whose trash name holds something that is not a folder, say what."""
    try:
        status = fs.lstat_at(root.at(TRASH_DIRECTORY))
    except OSError as error:
        return _refusal(root, f"unusable ({error.strerror or error})")
    what = _kind(status.st_mode)
    if stat_module.S_ISLNK(status.st_mode):
        with contextlib.suppress(OSError):
            what += f" to {os.readlink(TRASH_DIRECTORY, dir_fd=root.fd)}"
    return _refusal(root, f"{what} owned by uid {status.st_uid}")


def _make_private(root: RootDir, descriptor: int, mode: int) -> None:
    """Given ckptd's own trash with another mode (an earlier version made it 0755), make it
    0700; where that fails (a read-only filesystem) a trash others may write to is refused."""
    try:
        os.fchmod(descriptor, TRASH_MODE)
    except OSError as error:
        if mode & 0o022:
            raise _refusal(
                root, f"writable by others (mode {stat_module.S_IMODE(mode):o}): {error}"
            ) from None


def open_trash_dir(root: RootDir, *, create: bool, fs: FileSystem = LOCAL) -> Dir | None:
    """Given an open root, return its trash folder opened (made first with `create`); None when
    there is none and `create` is False.

    Raises TrashRefused when something else is at the trash's name (a symlink, a file, a folder
    of another user); OSError when it cannot be made (a read-only filesystem).
    """
    at = root.at(TRASH_DIRECTORY)
    if create:
        with contextlib.suppress(FileExistsError):
            fs.mkdir_at(at, TRASH_MODE)
    try:
        descriptor = fs.open_dir(at)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink; a file, a FIFO ...
            raise _describe_foreign(root, fs) from None
        raise
    try:
        status = os.fstat(descriptor)
        if status.st_uid != os.geteuid():
            raise _refusal(
                root, f"a folder owned by uid {status.st_uid} (ckptd runs as uid {os.geteuid()})"
            )
        if stat_module.S_IMODE(status.st_mode) != TRASH_MODE:
            _make_private(root, descriptor, status.st_mode)
    except BaseException:
        os.close(descriptor)
        raise
    return Dir(descriptor, at.path)
