"""The daemon: `serve()` watches the roots, prunes after each new checkpoint, runs the schedule.

Threads and who does what:
- the caller's thread (main) runs `while not stop.wait(tick)`: reloads, sd_notify pings, the
  watcher's health check, state.json;
- watchdog's threads only put `WatchEvent`s on the work queue;
- APScheduler's single "files" executor thread only puts a `Task` on the same queue and waits;
- ONE worker thread takes everything off that queue and is the only thread that changes files
  (prunes, snapshots, disk escalation), so no two of them ever run at once.

A new checkpoint is pruned for after its root has been quiet for `settle_seconds` (every event
in the root or in a checkpoint being written pushes the deadline back); `prune_root` is the
safety-checked path of `ckptd prune -y`, and refuses the root while the newest checkpoint is
still being written, in which case it is retried with a backoff. `stop` is passed into
`prune_root`: SIGTERM finishes the deletion in progress, starts no other, and `serve` returns 0.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.clock import utc_iso
from daemon.config import Config, RootConfig, load_config, settings_for
from daemon.discovery.sizecache import SizeCache
from daemon.disk.pressure import check_disks
from daemon.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CkptdError, ConfigError
from daemon.fsio import TRASH_DIRECTORY
from daemon.history.log import NULL_HISTORY
from daemon.logs import configure_logging, get_logger
from daemon.metrics import Monitor
from daemon.service.scheduler import Schedule, build_triggers
from daemon.service.sdnotify import Notifier
from daemon.service.watcher import Watcher, WatchEvent
from daemon.snapshots.daily import run_daily_snapshot
from daemon.state import update_state

log = get_logger("ckptd.service")

STOP_TIMEOUT_SECONDS = 30.0
# Settled means "no event for settle_seconds"; a little more so mtimes are past the threshold.
SETTLE_MARGIN_SECONDS = 0.3
MAX_RETRY_SECONDS = 300.0
# A root that is never quiet (a log file appended in it, checkpoints faster than settle_seconds)
# is still pruned this many settle periods after its first unsettled event; prune_root's own
# safety checks keep whatever is still being written.
MAX_DEFER_SETTLES = 5
CONFIG_DEBOUNCE_SECONDS = 0.3
# The size cache is written back at most this often (and at stop): sizes are cheap to relearn.
CACHE_SAVE_SECONDS = 300.0
# The worker shows life at least every second when idle, and between files and chunks (every
# `stop.is_set()`) in a long prune or snapshot. Silent this long, it is wedged (a hung mount, a
# deadlock): WATCHDOG=1 stops, so systemd restarts the daemon instead of it never pruning again.
WORKER_STUCK_SECONDS = 1800.0


@dataclass(eq=False)
class Task:
    """A named job for the worker ("startup", "prune", "snapshot", "disk"); `done` when run."""

    name: str
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _SignOfLife(threading.Event):
    """Given the service's stop event and a callback, answer `is_set()` for that event and call
    the callback each time: the long jobs ask it between files and chunks, so asking is life."""

    def __init__(self, stop: threading.Event, alive: Callable[[], None]) -> None:
        super().__init__()
        self._stop = stop
        self._alive = alive

    def is_set(self) -> bool:
        self._alive()
        return self._stop.is_set()

    def set(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._alive()
        return self._stop.wait(timeout)


def _utc_iso(epoch_seconds: float) -> str:
    return utc_iso(epoch_seconds, timespec="seconds")  # the state file's times: whole seconds


def _file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None


class Service:
    """Given a config path and the two events, run the daemon until `stop` is set."""

    def __init__(
        self,
        config_path: str,
        config: Config,
        *,
        stop: threading.Event,
        reload: threading.Event,
        clock: Callable[[], float],
        notifier: Notifier,
        tick: float,
        stop_timeout: float,
    ) -> None:
        self.config_path = os.path.abspath(config_path)
        self.config = config
        self.config_digest = _file_digest(self.config_path)
        self.config_problem: str | None = None
        self.stop = stop
        self.reload = reload
        self.clock = clock
        self.notifier = notifier
        self.tick = tick
        self.stop_timeout = stop_timeout
        self.work: queue.Queue[object] = queue.Queue()
        self.watcher = Watcher(self.work)
        self.schedule = Schedule(self.run_job)
        self.worker = threading.Thread(target=self._work, name="ckptd-worker", daemon=True)
        self.worker_alive_at = time.monotonic()
        self.worker_stuck = False
        self.job_stop = _SignOfLife(stop, self._worker_alive)
        self.history = self._history(config)
        # One size cache for every root (keyed by root inside), persisted in state_dir.
        self.cache = self._size_cache(config)
        self.cache_state_dir = config.state_dir
        self.cache_saved_at = time.monotonic()
        # Worker-thread state: root path -> monotonic deadline / retry count.
        self.pending: dict[str, float] = {}
        self.pending_since: dict[str, float] = {}
        self.attempts: dict[str, int] = {}
        self.config_changed_at: float | None = None
        self.last_prune: dict[str, Any] | None = None
        self.disk_status: str | None = None
        self.started = clock()
        # metrics: Prometheus figures and what `ckptd check` reads (daemon/metrics.py).
        self.monitor = Monitor(config, clock=clock)

    # --- main thread ----------------------------------------------------------------------------

    def run(self) -> int:
        """Given a started service, serve until `stop`; return the exit code."""
        self.monitor.start()  # metrics: before the worker's first prune
        self.worker.start()
        self.watcher.set_roots(self._root_watches(self.config), self.config_path)
        self.schedule.start(self.config)
        startup = Task("startup")
        self.work.put(startup)
        # Its own task after the start-up prune: READY=1 waits for the prune only, not for a copy
        # that may outlast systemd's start timeout (it would kill us, and the copy would restart).
        self.work.put(Task("startup-snapshot"))
        self._write_state(
            pid=os.getpid(), started=_utc_iso(self.started), next=self.schedule.next_run_times()
        )
        log.info(
            "started",
            config=self.config_path,
            roots=[root.path for root in self.config.roots],
            pid=os.getpid(),
            next=self.schedule.next_run_times(),
        )
        ready = False
        interval = self.notifier.watchdog_interval
        next_ping = 0.0
        tick = min(self.tick, interval / 2) if interval else self.tick
        try:
            while not self.stop.wait(tick):
                if not ready and startup.done.is_set():
                    ready = True
                    self.notifier.ready(self.status_line())
                    log.info("ready", status=self.status_line())
                if ready and self._reload_due():
                    self.reload.clear()
                    self.config_changed_at = None
                    self.do_reload()
                self.watcher.check()
                if (
                    interval
                    and time.monotonic() >= next_ping
                    and self.worker.is_alive()
                    and not self._worker_wedged()
                ):
                    # A dead or wedged worker means no more pings: systemd's watchdog restarts us.
                    self.notifier.watchdog()
                    next_ping = time.monotonic() + interval
                if not self.worker.is_alive():
                    log.error("worker_died")
                    return EXIT_FAILED
        finally:
            code = self.shutdown()
        return code

    def _worker_wedged(self) -> bool:
        silent = time.monotonic() - self.worker_alive_at
        if silent < WORKER_STUCK_SECONDS:
            if self.worker_stuck:
                self.worker_stuck = False
                log.warning("worker_resumed", silent_seconds=round(silent, 1))
            return False
        if not self.worker_stuck:
            self.worker_stuck = True
            log.error(
                "worker_stuck",
                silent_seconds=round(silent, 1),
                note="no more WATCHDOG=1: systemd restarts the daemon",
            )
        return True

    def _worker_alive(self) -> None:
        self.worker_alive_at = time.monotonic()

    def _reload_due(self) -> bool:
        if self.reload.is_set():
            return True
        changed = self.config_changed_at
        return changed is not None and time.monotonic() - changed >= CONFIG_DEBOUNCE_SECONDS

    def do_reload(self) -> bool:
        """Given a request to reload, load the config; keep the old one if the new one is bad."""
        self.notifier.reloading()
        # What was read this time, good or bad: an edit back to the old text is a change too.
        self.config_digest = _file_digest(self.config_path)
        try:
            config = load_config(self.config_path)
            build_triggers(config)  # a bad cron line is a config error too
        except (ConfigError, CkptdError, ValueError, OSError) as error:
            problems = getattr(error, "problems", None) or [f"{self.config_path}: {error}"]
            self.config_problem = problems[0]
            log.error(
                "config_invalid",
                file=self.config_path,
                problems=problems,
                note="the previous config stays in force",
            )
            self.notifier.ready(self.status_line())
            return False
        self.config_problem = None
        old = self.config
        self.config = config
        self.monitor.apply(config)  # metrics: metrics.listen may have changed
        if config.log != old.log:
            configure_logging(config.log.level, config.log.format)
        if config.history_path != old.history_path:
            self.history = self._history(config)
        self.watcher.set_roots(self._root_watches(config), self.config_path)
        self.schedule.apply(build_triggers(config))
        # A new policy applies now, not at the next checkpoint.
        self.work.put(Task("prune"))
        self._write_state(next=self.schedule.next_run_times())
        log.info(
            "config_reloaded",
            file=self.config_path,
            roots=[root.path for root in config.roots],
            next=self.schedule.next_run_times(),
        )
        self.notifier.ready(self.status_line())
        return True

    def shutdown(self) -> int:
        """Stop everything; the deletion in progress finishes. Return 0, or 1 past the timeout."""
        self.notifier.stopping("stopping: finishing the deletion in progress")
        log.info("stopping")
        self.stop.set()
        self.schedule.shutdown()
        self.work.put(None)
        self.worker.join(self.stop_timeout)
        self.watcher.stop()
        self.monitor.close()  # metrics
        if not self.worker.is_alive():
            self._save_cache()
        self.schedule.shutdown(wait=True)
        if self.worker.is_alive():
            log.error("stop_timeout", seconds=self.stop_timeout)
            return EXIT_FAILED
        log.info("stopped")
        return EXIT_OK

    def status_line(self) -> str:
        """Given the service, return the one-line STATUS= summary."""
        parts = []
        if self.config_problem:
            parts.append(f"config error, previous config in force: {self.config_problem}")
        present = len(self.watcher.roots_present())
        parts.append(f"watching {present}/{len(self.config.roots)} roots")
        if self.last_prune:
            parts.append(
                f"last prune {self.last_prune['time'][11:19]} UTC deleted "
                f"{self.last_prune['deleted']} in {os.path.basename(self.last_prune['root'])}"
            )
        if self.disk_status:
            parts.append(self.disk_status)
        upcoming = self.schedule.next_run_times()
        if "prune" in upcoming:
            parts.append(f"next prune {upcoming['prune'][:16]}")
        return "; ".join(parts)

    # --- scheduler thread ---------------------------------------------------------------------

    def run_job(self, name: str) -> None:
        """Given a job name (on APScheduler's "files" thread), have the worker run it and wait."""
        task = Task(name)
        self.work.put(task)
        while not task.done.wait(0.5):
            if self.stop.is_set():
                return
        if task.error is not None:
            raise task.error

    # --- worker thread ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            self._worker_alive()
            timeout = self._next_timeout()
            try:
                item = self.work.get(timeout=timeout)
            except queue.Empty:
                item = False
            self._worker_alive()
            if item is None or self.stop.is_set():
                if isinstance(item, Task):
                    item.done.set()
                return
            try:
                if isinstance(item, WatchEvent):
                    self._on_event(item)
                elif isinstance(item, Task):
                    self._run_task(item)
                self._prune_due_roots()
            except Exception:
                # Nothing may kill the one worker: log with the traceback and go on.
                log.exception("worker_error")

    def _next_timeout(self) -> float:
        if not self.pending:
            return 1.0
        return max(0.02, min(1.0, min(self.pending.values()) - time.monotonic()))

    def _root_for(self, path: str) -> RootConfig | None:
        for root in self.config.roots:
            if os.path.abspath(root.path) == path:
                return root
        return None

    def _on_event(self, event: WatchEvent) -> None:
        if event.root == self.config_path:
            if _file_digest(self.config_path) != self.config_digest:
                self.config_changed_at = time.monotonic()
            return
        root = self._root_for(event.root)
        if root is None:
            return
        trash = os.path.join(event.root, TRASH_DIRECTORY)
        paths = [p for p in (event.path, event.dest_path) if p]
        if any(p == trash or p.startswith(trash + os.sep) for p in paths[-1:]):
            return  # our own deletions
        if event.path == event.root or event.dest_path == event.root:
            if event.kind == "deleted" or (event.kind == "moved" and event.path == event.root):
                log.warning("root_vanished", root=event.root)
                return
            log.info("root_appeared", root=event.root)
            self.watcher.check()
        elif event.kind == "deleted":
            return  # a deletion never makes anything to prune
        landed = event.dest_path or event.path
        if event.is_directory and os.path.dirname(landed) == event.root:
            self.watcher.watch_checkpoint(event.root, landed)
        if self.config.prune.on_new_checkpoint:
            settle = settings_for(self.config, root).settle_seconds + SETTLE_MARGIN_SECONDS
            now = time.monotonic()
            since = self.pending_since.setdefault(event.root, now)
            self.pending[event.root] = min(now + settle, since + MAX_DEFER_SETTLES * settle)
            self.attempts[event.root] = 0

    def _prune_due_roots(self) -> None:
        now = time.monotonic()
        for path, deadline in list(self.pending.items()):
            if deadline > now or self.stop.is_set():
                continue
            del self.pending[path]
            self.pending_since.pop(path, None)
            root = self._root_for(path)
            if root is not None and os.path.isdir(path):
                self._prune(root, reason="new_checkpoint")

    def _run_task(self, task: Task) -> None:
        try:
            if task.name in ("startup", "prune"):
                for root in self.config.roots:
                    if self.stop.is_set():
                        break
                    if os.path.isdir(root.path):
                        self._prune(root, reason=task.name)
                    else:
                        log.warning("root_missing", root=root.path, job=task.name)
            elif task.name == "startup-snapshot":
                if self.config.snapshots.enabled:
                    # One per date: the snapshot job skips a date it already has.
                    self._snapshot(startup=True)
            elif task.name == "snapshot":
                self._snapshot(startup=False)
            elif task.name == "disk":
                self._disk()
            else:
                log.error("unknown_task", task=task.name)
        except BaseException as error:
            task.error = error
            if task.name.startswith("startup"):
                log.exception("startup_task_failed", task=task.name)
        finally:
            if not self.stop.is_set():
                # At stop the scheduler is shut down: its empty schedule is not "nothing next".
                self._write_state(next=self.schedule.next_run_times())
            task.done.set()

    def prune_now(self, root: RootConfig) -> Any:
        """Given a root, prune it now through the safety-checked path (worker thread only)."""
        return self.prune_with(
            self.config, root, now=self.clock(), dry_run=False, history=self.history
        )

    def prune_with(self, config: Config, root: RootConfig, **keywords: Any) -> Any:
        """Given prune_root's own arguments (the disk check calls it so, on the worker thread),
        prune with the daemon's size cache and its `stop` added: SIGTERM is honoured there too."""
        from daemon.pruning.pipeline import prune_root

        if self.config.state_dir != self.cache_state_dir:
            # A reload moved state_dir: the cache lives there from now on (swapped here, on the
            # worker, the only thread that uses it).
            self._save_cache()
            self.cache = self._size_cache(self.config)
            self.cache_state_dir = self.config.state_dir
        keywords.setdefault("cache", self.cache)
        keywords.setdefault("stop", self.job_stop)
        report = prune_root(config, root, **keywords)
        self.monitor.pruned(report)  # metrics: every real prune (the disk check's too)
        if time.monotonic() - self.cache_saved_at > CACHE_SAVE_SECONDS:
            self._save_cache()
        return report

    def _prune(self, root: RootConfig, *, reason: str) -> None:
        key = os.path.abspath(root.path)
        started = time.monotonic()
        try:
            report = self.prune_now(root)
        except Exception:
            log.exception("prune_failed", root=key, trigger=reason)
            self._retry(root)
            return
        if report.refused and not report.refusal_transient:
            # A limit only a person can lift: retrying on a timer would only repeat the refusal
            # in the history every settle period. The next checkpoint, the schedule or a disk
            # check tries again.
            self.attempts.pop(key, None)
            log.warning("prune_refused", root=key, reason=report.refused, trigger=reason)
            return
        if report.refused:
            log.info("prune_deferred", root=key, reason=report.refused, trigger=reason)
            self._retry(root)
            return
        self.attempts.pop(key, None)
        self.watcher.forget_checkpoints(key)
        self.last_prune = {
            "time": _utc_iso(self.clock()),
            "root": key,
            "trigger": reason,
            "deleted": len(report.deleted),
            "vetoed": len(report.vetoed),
            "failed": len(report.failed),
            "bytes_freed": report.bytes_freed,
        }
        log.info(
            "prune_done",
            root=key,
            trigger=reason,
            deleted=list(report.deleted),
            vetoed=list(report.vetoed),
            failed=list(report.failed),
            bytes_freed=report.bytes_freed,
            seconds=round(time.monotonic() - started, 3),
        )
        self._write_state(last_prune=self.last_prune)
        self.notifier.status(self.status_line())

    def _retry(self, root: RootConfig) -> None:
        key = os.path.abspath(root.path)
        attempt = self.attempts.get(key, 0) + 1
        self.attempts[key] = attempt
        settle = settings_for(self.config, root).settle_seconds
        delay = min(MAX_RETRY_SECONDS, max(settle, 0.5), 0.5 * 2 ** (attempt - 1))
        deadline = time.monotonic() + delay
        # A newer event's deadline stands if it is sooner.
        self.pending[key] = min(self.pending.get(key, deadline), deadline)

    def _snapshot(self, *, startup: bool) -> None:
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        report = run_daily_snapshot(self.config, now=now, history=self.history, stop=self.job_stop)
        log.info("snapshot_job", startup=startup, report=str(report)[:300])
        self.monitor.snapshot_taken(report)  # metrics
        self._write_state(last_snapshot={"time": _utc_iso(self.clock())})

    def _disk(self) -> None:
        result = check_disks(
            self.config, now=self.clock(), history=self.history, prune=self.prune_with
        )
        line = getattr(result, "status_line", None)
        self.disk_status = line if isinstance(line, str) else None
        log.debug("disk_checked", result=str(result)[:300])
        self.monitor.disk_checked(result)  # metrics
        self._write_state(last_disk_check={"time": _utc_iso(self.clock())})

    # --- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _root_watches(config: Config) -> list[tuple[str, str]]:
        return [(os.path.abspath(root.path), root.watch) for root in config.roots]

    @staticmethod
    def _size_cache(config: Config) -> SizeCache | None:
        """Given the config, return the discovery size cache kept in state_dir (None if absent)."""
        try:
            return SizeCache.in_state_dir(config.state_dir)
        except (OSError, ValueError) as error:
            log.warning("size_cache_unavailable", state_dir=config.state_dir, error=str(error))
            return None

    def _save_cache(self) -> None:
        self.cache_saved_at = time.monotonic()
        if self.cache is None:
            return
        try:
            self.cache.save()
        except OSError as error:
            log.warning("size_cache_unsaved", error=str(error))

    @staticmethod
    def _history(config: Config) -> Any:
        try:
            from daemon.history.log import HistoryLog

            os.makedirs(os.path.dirname(config.history_path) or ".", exist_ok=True)
            return HistoryLog(config.history_path)
        except OSError as error:
            log.warning("history_unavailable", path=config.history_path, error=str(error))
            return NULL_HISTORY

    def _write_state(self, **keys: Any) -> None:
        try:
            update_state(self.config.state_dir, **keys)
        except OSError as error:
            log.warning("state_unwritable", state_dir=self.config.state_dir, error=str(error))


def serve(
    config_path: str,
    *,
    stop: threading.Event,
    reload: threading.Event,
    clock: Callable[[], float] = time.time,
    notifier: Notifier | None = None,
    tick: float = 0.5,
    stop_timeout: float = STOP_TIMEOUT_SECONDS,
    configure_logs: bool = True,
) -> int:
    """Given a config file and a stop and a reload event, run the daemon; return the exit code.

    Library users call this from any thread and set the events themselves; `ckptd run` sets them
    from SIGTERM/SIGINT and SIGHUP. Returns 2 if the config is invalid at start, 0 after `stop`.
    """
    if configure_logs:
        configure_logging("info", "auto")
    try:
        config = load_config(config_path)
        build_triggers(config)
    except (CkptdError, ValueError, OSError) as error:
        problems = getattr(error, "problems", None) or [f"{config_path}: {error}"]
        log.error("config_invalid", file=config_path, problems=problems)
        return EXIT_USAGE
    if configure_logs:
        configure_logging(config.log.level, config.log.format)
    notifier = Notifier() if notifier is None else notifier
    service = Service(
        config_path,
        config,
        stop=stop,
        reload=reload,
        clock=clock,
        notifier=notifier,
        tick=tick,
        stop_timeout=stop_timeout,
    )
    try:
        return service.run()
    finally:
        with contextlib.suppress(OSError):
            notifier.close()
