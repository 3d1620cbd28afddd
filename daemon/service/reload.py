"""When to reload the config file: never while it may be half-written.

A prefix of a config that is being written often parses (`keep_last: 2` of `keep_last: 20`),
and applying it deletes what the finished file keeps. So:

- file events (an edit saved in place, a new file, a rename into place) only arm a timer: the
  file is reloaded once nothing has happened to it for `CONFIG_SETTLE_SECONDS`, its size, mtime
  and inode are what they were at the last event, no process has it open for writing, and its
  content differs from what was last read;
- SIGHUP reloads at once, unless a process has the file open for writing right now: then as
  soon as it closes it.

"Open for writing" is read from /proc (`/proc/PID/fd` links, `/proc/PID/fdinfo` flags), this
process included; processes ckptd may not inspect are not seen, and the settle covers them.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass

from daemon.logs import get_logger

log = get_logger("ckptd.service")

CONFIG_SETTLE_SECONDS = 2.0
# While SIGHUP waits for a writer, /proc is looked at no more often than this.
WRITER_CHECK_SECONDS = 0.25
PROC = "/proc"


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What a file looks like from outside: changes whenever it is written or replaced."""

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


def stamp_of(path: str) -> FileStamp | None:
    """Given a path, return its stamp, or None when it cannot be stat'ed."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return FileStamp(status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def file_digest(path: str) -> str | None:
    """Given a path, return the sha256 of its content, or None when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None


def _opened_for_writing(pid: str, descriptor: str) -> bool:
    try:
        with open(f"{PROC}/{pid}/fdinfo/{descriptor}", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
    except (OSError, ValueError, IndexError):
        return False
    return False


def writers_of(path: str) -> tuple[int, ...]:
    """Given a file, return the PIDs that have it open for writing now (this one included)."""
    target = os.path.realpath(path)
    found: list[int] = []
    try:
        pids = [name for name in os.listdir(PROC) if name.isdigit()]
    except OSError:
        return ()
    for pid in pids:
        folder = f"{PROC}/{pid}/fd"
        try:
            descriptors = os.listdir(folder)
        except OSError:
            continue  # gone, or not ours to inspect
        for descriptor in descriptors:
            try:
                if os.readlink(f"{folder}/{descriptor}") != target:
                    continue
            except OSError:
                continue
            if _opened_for_writing(pid, descriptor):
                found.append(int(pid))
                break
    return tuple(found)


class ConfigWatch:
    """Given the config path and the digest of the text in force, decide when to reload it.

    `touched()` is called for every file event on the config (the worker's thread); `due()` and
    `loaded()` by the main thread, which reloads.
    """

    def __init__(
        self, path: str, digest: str | None, *, settle_seconds: float | None = None
    ) -> None:
        self.path = path
        self.settle_seconds = CONFIG_SETTLE_SECONDS if settle_seconds is None else settle_seconds
        self._lock = threading.Lock()
        self._digest = digest
        self._touched_at: float | None = None
        self._stamp: FileStamp | None = None
        self._writer_checked_at = 0.0
        self._writer_logged = False

    def touched(self, now: float | None = None) -> None:
        """Given a file event on the config (created, written, closed, moved, deleted), start
        its settle period again from now."""
        stamp = stamp_of(self.path)
        with self._lock:
            self._touched_at = time.monotonic() if now is None else now
            self._stamp = stamp

    def due(self, *, signalled: bool, now: float | None = None) -> bool:
        """Given whether SIGHUP asked for a reload, return whether to reload now."""
        now = time.monotonic() if now is None else now
        if signalled:
            return self._nobody_writing(now)
        with self._lock:
            touched_at, stamp = self._touched_at, self._stamp
        if touched_at is None or now - touched_at < self.settle_seconds:
            return False
        if stamp_of(self.path) != stamp:
            self.touched(now)  # written since the last event we saw (a missed one): wait again
            return False
        if not self._nobody_writing(now):
            return False
        with self._lock:
            self._touched_at = None
        # Our own reads, a touch, or an edit back to the text in force: nothing to apply.
        return file_digest(self.path) != self._digest

    def loaded(self, digest: str | None) -> None:
        """Given the digest of the text just read (good or bad), remember it as the one seen:
        an edit back to the old text is a change too."""
        with self._lock:
            self._digest = digest
            self._touched_at = None
            self._writer_logged = False

    def _nobody_writing(self, now: float) -> bool:
        if now - self._writer_checked_at < WRITER_CHECK_SECONDS:
            return False
        self._writer_checked_at = now
        writers = writers_of(self.path)
        if not writers:
            return True
        if not self._writer_logged:
            self._writer_logged = True
            log.info(
                "config_being_written",
                file=self.path,
                pids=list(writers),
                note="reloading once it is closed",
            )
        return False
