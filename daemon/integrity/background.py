"""The deep pass in the background: one thread, idle I/O priority, stoppable at any chunk.

A new checkpoint gets its cheap check at once (milliseconds); its deep pass (every zip member's
CRC-32, every TensorFlow and OCDBT CRC-32C: gigabytes) is queued here. The thread sets its own
I/O priority to the idle class (`ioprio_set(IOPRIO_WHO_PROCESS, <this thread>, IDLE)`): the
kernel's I/O schedulers that honour it (BFQ; CFQ before it) then serve it only when no one else
wants the disk, so a trainer's reads and saves never wait for a verification. `stop()` ends the
pass within one chunk (8 MiB); an unfinished pass is not cached and is simply redone later.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from daemon.integrity.cache import IntegrityCache, check_cached
from daemon.integrity.result import IntegrityResult

log = logging.getLogger("ckptd.integrity")

# ioprio_set / ioprio_get system call numbers per architecture (asm-generic for the rest).
_SYSCALLS: Final = {
    "x86_64": (251, 252),
    "i386": (289, 290),
    "i686": (289, 290),
    "armv7l": (314, 315),
    "aarch64": (30, 31),
    "riscv64": (30, 31),
    "ppc64le": (273, 274),
    "s390x": (282, 283),
}
_IOPRIO_WHO_PROCESS: Final = 1
_IOPRIO_CLASS_SHIFT: Final = 13
IOPRIO_CLASS_IDLE: Final = 3


def _libc_syscall() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    function: Callable[..., int] | None = getattr(libc, "syscall", None)
    return function


def set_idle_io_priority() -> bool:
    """Put the calling thread into the idle I/O class; return whether the kernel accepted it."""
    numbers = _SYSCALLS.get(platform.machine())
    syscall = _libc_syscall()
    if numbers is None or syscall is None:
        return False
    value = IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
    return syscall(numbers[0], _IOPRIO_WHO_PROCESS, threading.get_native_id(), value) == 0


def io_priority_class() -> int | None:
    """Return the calling thread's I/O priority class (3 = idle), or None where unknown."""
    numbers = _SYSCALLS.get(platform.machine())
    syscall = _libc_syscall()
    if numbers is None or syscall is None:
        return None
    value = syscall(numbers[1], _IOPRIO_WHO_PROCESS, threading.get_native_id())
    return None if value < 0 else value >> _IOPRIO_CLASS_SHIFT


@dataclass(frozen=True, slots=True)
class Job:
    """One deep pass to do: a checkpoint of a root, and its layout."""

    root: str
    name: str
    layout: str


class BackgroundVerifier:
    """Given a cache and a callback, deep-check submitted checkpoints one at a time in a thread
    at idle I/O priority; `on_result(job, result)` is called from that thread for each."""

    def __init__(
        self,
        cache: IntegrityCache,
        on_result: Callable[[Job, IntegrityResult], None],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.cache = cache
        self.on_result = on_result
        self.progress = progress
        self.idle_priority: bool | None = None  # set once the thread has tried
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending: set[Job] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckptd-integrity", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, root: str, name: str, layout: str) -> bool:
        """Queue a deep pass of one checkpoint (once: a job already queued is not queued again);
        return whether it was queued."""
        job = Job(os.fspath(root), name, layout)
        with self._lock:
            if job in self._pending or self._stop.is_set():
                return False
            self._pending.add(job)
        self._jobs.put(job)
        return True

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def stop(self, timeout: float = 10.0) -> None:
        """End the pass in progress within a chunk, drop the queue, and join the thread."""
        self._stop.set()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        self.idle_priority = set_idle_io_priority()
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None or self._stop.is_set():
                break
            try:
                self._verify(job)
            except Exception:  # never let one checkpoint (or the callback) end the thread
                log.exception("deep integrity check of %s/%s failed", job.root, job.name)
            finally:
                with self._lock:
                    self._pending.discard(job)

    def _verify(self, job: Job) -> None:
        result = check_cached(
            self.cache,
            job.root,
            job.name,
            job.layout,
            deep=True,
            stop=self._stop,
            progress=self.progress,
        )
        if not result.stopped:
            self.on_result(job, result)
