"""Notice new checkpoints: watchdog observers that only turn filesystem events into queue items.

Handlers run on watchdog's dispatcher thread; they build one immutable `WatchEvent` and put it
on the service's queue, and never raise (an exception there would kill the observer thread).
Everything else, including deciding what an event means, happens on the service's worker.

Choices (watchdog 7):
- Non-recursive watches: checkpoints are the entries directly in a root. A new checkpoint
  folder gets a watch of its own while it is being written (`watch_checkpoint`), so the
  completion marker one level down (`trainer_state.json`) is an event too; after each look at
  the root the service keeps exactly the watches of the saves still in flight
  (`follow_checkpoints`), also those a scan found incomplete (a save begun before the start).
- Our own deletions are renames into the unwatched trash: watchdog's wait for the other half of
  a move is cut to 20 ms, or every later event of the root would come 0.5 s late.
- inotify on local filesystems; polling where inotify sees nothing of other clients' writes
  (NFS, Lustre, CIFS, FUSE, ...), judged from the mount type (`daemon.disk.mounts`, the
  longest mount point containing the root); a root's `watch: inotify|poll` overrides.
- A root's parent is watched too: watchdog's inotify emitter stops for good when its folder is
  deleted (IN_DELETE_SELF), so a root deleted and made again is found through the parent, and
  `check()` (called every tick) compares the root's inode with the watched one as a backstop.
- A missing root is not an error: it is logged and waited for.
- A dead observer or emitter thread is noticed by `check()` and rebuilt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import threading
from dataclasses import dataclass
from typing import Literal

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
from watchdog.observers.polling import PollingObserver

from daemon.disk.mounts import filesystem_type as mount_type
from daemon.disk.mounts import is_network_filesystem
from daemon.fsio import TRASH_DIRECTORY
from daemon.logs import get_logger

log = get_logger(__name__)

POLL_INTERVAL_SECONDS = 2.0
EventKind = Literal["created", "modified", "deleted", "moved", "config"]

_INOTIFY_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileClosedEvent,
]
_POLL_FILTER: list[type[FileSystemEvent]] = [*_INOTIFY_FILTER, FileModifiedEvent]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One filesystem event, as a value: the root (or config file) it concerns, where, what."""

    root: str  # the configured root path; the config file's path for kind "config"
    path: str
    kind: EventKind
    dest_path: str = ""
    is_directory: bool = False


def choose_mode(path: str, setting: str) -> Literal["inotify", "poll"]:
    """Given a root and its `watch:` setting, return how to watch it."""
    if setting == "inotify":
        return "inotify"
    if setting == "poll":
        return "poll"
    return "poll" if is_network_filesystem(mount_type(path)) else "inotify"


class _QuietStoppedEmitter(logging.Filter):
    """watchdog 7 logs an ERROR when a watch is removed while its emitter is reading: benign
    (the service drops a finished checkpoint's watch), and it must not look like a failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_QuietStoppedEmitter())

# watchdog holds every IN_MOVED_FROM for 0.5 s, waiting for its IN_MOVED_TO, and the events
# after it wait in the same queue. Each checkpoint the daemon moves into the trash is such a
# move (the trash is not watched): the root's next events (a new checkpoint folder) came 0.5 s
# late, its watch too late to see its completion marker. The kernel reports both halves of a
# rename together, so 20 ms still pairs every rename inside a watched folder.
MOVE_PAIRING_SECONDS = 0.02
InotifyMoveEventGrouper.delay = MOVE_PAIRING_SECONDS


class _Enqueue(FileSystemEventHandler):
    """Given targets (root, only-this-path or None) and a queue, put one WatchEvent per target
    an event concerns; never raise."""

    def __init__(
        self, targets: tuple[tuple[str, str | None], ...], events: queue.Queue[object]
    ) -> None:
        super().__init__()
        self.targets = targets
        self.events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            kind = _KINDS.get(event.event_type)
            if kind is None:
                return
            source = os.fsdecode(event.src_path)
            destination = os.fsdecode(event.dest_path) if event.dest_path else ""
            for root, only in self.targets:
                if only is not None and only not in (source, destination):
                    continue
                self.events.put_nowait(
                    WatchEvent(root, source, kind, destination, bool(event.is_directory))
                )
        except Exception:  # raising here would kill watchdog's dispatcher thread
            pass


_KINDS: dict[str, EventKind] = {
    "created": "created",
    "modified": "modified",
    "closed": "modified",
    "deleted": "deleted",
    "moved": "moved",
}


@dataclass(frozen=True, slots=True)
class _Want:
    """One watched folder: how, and for whom (root, only-this-path or None for everything)."""

    folder: str
    mode: Literal["inotify", "poll"]
    targets: tuple[tuple[str, str | None], ...]


class Watcher:
    """Given the service's queue, keep watches on roots, their parents, new checkpoints, config."""

    def __init__(self, events: queue.Queue[object]) -> None:
        self.events = events
        self._lock = threading.RLock()
        self._observers: dict[str, BaseObserver] = {}
        self._wanted: dict[str, _Want] = {}
        # folder -> (observer, watch, inode, the _Want it was scheduled for)
        self._active: dict[str, tuple[BaseObserver, ObservedWatch, int, _Want]] = {}
        self._roots: dict[str, Literal["inotify", "poll"]] = {}
        self._settings: dict[str, str] = {}
        self._config_path: str | None = None
        self._checkpoint_watches: dict[str, list[str]] = {}
        self._missing_logged: set[str] = set()
        # Folders where inotify failed (watch limit): watched by polling from then on.
        self._poll_fallback: set[str] = set()
        self._failure_logged: set[str] = set()

    # --- what to watch ------------------------------------------------------------------------

    def set_roots(self, roots: list[tuple[str, str]], config_path: str | None = None) -> None:
        """Given (root path, watch setting) pairs and the config file, watch exactly those."""
        with self._lock:
            self._roots = {}
            self._settings = {}
            for path, setting in roots:
                root = os.path.abspath(path)
                self._settings[root] = setting
                self._roots[root] = choose_mode(root, setting)
                if self._roots[root] == "poll":
                    log.info("watch_mode", root=root, mode="poll", fstype=mount_type(root))
            self._config_path = os.path.abspath(config_path) if config_path else None
            self._checkpoint_watches = {
                root: paths
                for root, paths in self._checkpoint_watches.items()
                if root in self._roots
            }
            self._rebuild_wanted()
            self._sync()

    def _rebuild_wanted(self) -> None:
        targets: dict[str, list[tuple[str, str | None]]] = {}
        modes: dict[str, Literal["inotify", "poll"]] = {}
        for root, mode in self._roots.items():
            for folder, only in ((root, None), (os.path.dirname(root), root)):
                targets.setdefault(folder, []).append((root, only))
                modes.setdefault(folder, mode)
            for checkpoint in self._checkpoint_watches.get(root, []):
                targets.setdefault(checkpoint, []).append((root, None))
                modes.setdefault(checkpoint, mode)
        if self._config_path is not None:
            folder = os.path.dirname(self._config_path)
            targets.setdefault(folder, []).append((self._config_path, self._config_path))
            modes.setdefault(folder, choose_mode(folder, "auto"))
        self._wanted = {
            folder: _Want(folder, modes[folder], tuple(found)) for folder, found in targets.items()
        }

    def watch_checkpoint(self, root: str, path: str) -> None:
        """Given a new checkpoint folder, watch it non-recursively until `forget_checkpoints`."""
        with self._lock:
            if root not in self._roots or path in self._wanted:
                return
            paths = self._checkpoint_watches.setdefault(root, [])
            paths.append(path)
            # A trainer that never completes must not pile up watches.
            del paths[:-8]
            self._rebuild_wanted()
            self._sync()

    def follow_checkpoints(self, root: str, *, writing: list[str], done: list[str]) -> None:
        """Given a root, the checkpoint folders a scan found still being written (oldest first)
        and those it found complete, watch the first (the newest 8 of them and of the folders
        already watched) and no longer the second nor folders that are gone: a save's
        completion marker must be an event even after a prune that ran while it was in flight,
        and a folder too new or too empty to be a checkpoint yet stays watched."""
        with self._lock:
            if root not in self._roots:
                return
            finished = set(done)
            current = self._checkpoint_watches.get(root, [])
            kept = [path for path in current if path not in finished and _inode(path) is not None]
            wanted = list(dict.fromkeys([*kept, *(p for p in writing if p not in self._roots)]))
            wanted = wanted[-8:]
            if wanted == current:
                return
            if wanted:
                self._checkpoint_watches[root] = wanted
            else:
                self._checkpoint_watches.pop(root, None)
            self._rebuild_wanted()
            self._sync()

    def forget_checkpoints(self, root: str) -> None:
        """Given a root that was just pruned (so nothing in it is incomplete), drop the watches on
        its checkpoints."""
        with self._lock:
            if self._checkpoint_watches.pop(root, None):
                self._rebuild_wanted()
                self._sync()

    def watched_folders(self) -> list[str]:
        """Given the watcher, return the folders watched right now."""
        with self._lock:
            return sorted(self._active)

    def roots_present(self) -> list[str]:
        with self._lock:
            return [root for root in self._roots if root in self._active]

    # --- keeping it alive ---------------------------------------------------------------------

    def check(self) -> None:
        """Restart dead observers and emitters, pick up roots that appeared or were replaced."""
        with self._lock:
            for mode, observer in list(self._observers.items()):
                if not observer.is_alive():
                    log.warning("observer_died", mode=mode, note="restarting it")
                    self._observers.pop(mode)
                    for folder, active in list(self._active.items()):
                        if active[0] is observer:
                            self._active.pop(folder)
            for folder, (observer, watch, inode, _) in list(self._active.items()):
                emitter_alive = any(
                    emitter.watch == watch and emitter.is_alive() for emitter in observer.emitters
                )
                if not emitter_alive or _inode(folder) != inode:
                    self._drop(folder)
            self._sync()

    def _judge_appeared_roots(self) -> None:
        """A root missing until now may have come with its mount (NFS mounted after the daemon
        started): its mode was judged from the folder above it, so judge it again."""
        changed = False
        for root in self._missing_logged & set(self._roots):
            if _inode(root) is None:
                continue
            mode = choose_mode(root, self._settings.get(root, "auto"))
            if mode != self._roots[root]:
                self._roots[root] = mode
                changed = True
                log.info("watch_mode", root=root, mode=mode, fstype=mount_type(root))
        if changed:
            self._rebuild_wanted()

    def _sync(self) -> None:
        self._judge_appeared_roots()
        # Forget folders no longer wanted (each finished checkpoint): no growth over weeks.
        self._poll_fallback.intersection_update(self._wanted)
        self._failure_logged.intersection_update(self._wanted)
        for folder, active in list(self._active.items()):
            if self._wanted.get(folder) != active[3]:
                self._drop(folder)
        for folder, want in self._wanted.items():
            if folder in self._active:
                continue
            inode = _inode(folder)
            if inode is None:
                if folder in self._roots and folder not in self._missing_logged:
                    self._missing_logged.add(folder)
                    log.warning("root_missing", root=folder, note="waiting for it to appear")
                continue
            mode = "poll" if folder in self._poll_fallback else want.mode
            try:
                observer, watch = self._schedule(folder, want, mode)
            except OSError as error:
                if mode == "poll":
                    self._log_failure(folder, error)
                    continue
                # Out of inotify watches or instances (ENOSPC/EMFILE): polling still sees every
                # new checkpoint, a little later; the next tick must not try inotify again.
                self._poll_fallback.add(folder)
                log.warning(
                    "watch_fallback",
                    folder=folder,
                    mode="poll",
                    error=str(error),
                    note="inotify unavailable (raise fs.inotify.max_user_watches); polling",
                )
                try:
                    observer, watch = self._schedule(folder, want, "poll")
                except OSError as poll_error:
                    self._log_failure(folder, poll_error)
                    continue
            self._failure_logged.discard(folder)
            self._active[folder] = (observer, watch, inode, want)
            if folder in self._missing_logged:
                self._missing_logged.discard(folder)
                log.info("root_appeared", root=folder)

    def _schedule(self, folder: str, want: _Want, mode: str) -> tuple[BaseObserver, ObservedWatch]:
        observer = self._observer(mode)
        watch = observer.schedule(
            _Enqueue(want.targets, self.events),
            folder,
            recursive=False,
            event_filter=_POLL_FILTER if mode == "poll" else _INOTIFY_FILTER,
        )
        return observer, watch

    def _log_failure(self, folder: str, error: OSError) -> None:
        # Retried every tick: logged once until it works, not twice a second.
        if folder not in self._failure_logged:
            self._failure_logged.add(folder)
            log.warning("watch_failed", folder=folder, error=str(error), note="retrying")

    def _drop(self, folder: str) -> None:
        observer, watch, _, _ = self._active.pop(folder)
        # Its folder may be gone and the emitter already stopped by itself.
        with contextlib.suppress(KeyError, OSError, ValueError):
            observer.unschedule(watch)

    def _observer(self, mode: str) -> BaseObserver:
        observer = self._observers.get(mode)
        if observer is None:
            observer = (
                PollingObserver(timeout=POLL_INTERVAL_SECONDS) if mode == "poll" else Observer()
            )
            observer.name = f"ckptd-watch-{mode}"
            observer.daemon = True
            observer.start()
            self._observers[mode] = observer
        return observer

    def stop(self) -> None:
        """Stop every observer and wait for their threads."""
        with self._lock:
            observers = list(self._observers.values())
            self._observers.clear()
            self._active.clear()
        for observer in observers:
            try:
                observer.stop()
                observer.join(timeout=5)
            except RuntimeError:
                pass


def _inode(path: str) -> int | None:
    try:
        result = os.stat(path)
    except OSError:
        return None
    return result.st_ino if stat.S_ISDIR(result.st_mode) else None


__all__ = [
    "TRASH_DIRECTORY",
    "WatchEvent",
    "Watcher",
    "choose_mode",
    "is_network_filesystem",
    "mount_type",
]
