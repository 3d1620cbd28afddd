"""The daemon: `serve()` watches the roots, prunes after each new checkpoint, runs the schedule.

Threads and who does what:
- the caller's thread (main) runs `while not stop.wait(tick)`: reloads, sd_notify pings, the
  watcher's health check, state.json;
- watchdog's threads only put `WatchEvent`s on the work queue;
- APScheduler's single "files" executor thread only puts a `Task` on the same queue and waits;
- ONE worker thread (daemon/service/worker.py) takes everything off that queue and is the only
  thread that changes files (prunes, snapshots, disk escalation), so no two of them ever run at
  once.

`stop` is passed into `prune_root`: SIGTERM finishes the deletion in progress, starts no other,
and `serve` returns 0.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable

from daemon.config import Config, load_config
from daemon.config.changes import config_changes
from daemon.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CkptdError, ConfigError
from daemon.logs import configure_logging, get_logger
from daemon.metrics import Monitor
from daemon.pruning import leasing
from daemon.service.reload import ConfigWatch, file_digest
from daemon.service.scheduler import Schedule, build_triggers
from daemon.service.sdnotify import Notifier
from daemon.service.watcher import Watcher, WatchEvent
from daemon.service.worker import Task, Worker, utc_iso
from daemon.storage.url import is_remote

log = get_logger("ckptd.service")

STOP_TIMEOUT_SECONDS = 30.0
# The worker shows life at least every second when idle, and between files and chunks (every
# `stop.is_set()`) in a long prune or snapshot. Silent this long, it is wedged (a hung mount, a
# deadlock): WATCHDOG=1 stops, so systemd restarts the daemon instead of it never pruning again.
WORKER_STUCK_SECONDS = 1800.0


def _problems(error: Exception, path: str) -> list[str]:
    """Given a config that failed to load, return its problems, one line each."""
    if isinstance(error, ConfigError) and error.problems:
        return error.problems
    return [f"{path}: {error}"]


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
        self.config_watch = ConfigWatch(self.config_path, file_digest(self.config_path))
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
        # metrics: Prometheus figures and what `ckptd check` reads (daemon/metrics.py).
        self.monitor = Monitor(config, clock=clock)
        self.worker = Worker(
            config,
            work=self.work,
            stop=stop,
            clock=clock,
            watcher=self.watcher,
            monitor=self.monitor,
            config_path=self.config_path,
            on_config_event=self._on_config_event,
            on_status=self._status_changed,
            next_runs=self.schedule.next_run_times,
        )
        self.worker_stuck = False
        self.started = clock()

    # --- main thread ----------------------------------------------------------------------------

    def run(self) -> int:
        """Given a started service, serve until `stop`; return the exit code."""
        self.monitor.start()  # metrics: before the worker's first prune
        leasing.keep_leases()  # shared roots: held between prunes, released at a clean stop
        self.worker.thread.start()
        self.worker.deep.start()
        self.watcher.set_roots(self._root_watches(self.config), self.config_path)
        self.schedule.start(self.config)
        startup = Task("startup")
        self.worker.submit(startup)
        # Its own task after the start-up prune: READY=1 waits for the prune only, not for a copy
        # that may outlast systemd's start timeout (it would kill us, and the copy would restart).
        self.worker.submit(Task("startup-snapshot"))
        self.worker.write_state(
            pid=os.getpid(), started=utc_iso(self.started), next=self.schedule.next_run_times()
        )
        log.info(
            "started",
            config=self.config_path,
            roots=[root.path for root in self.config.roots],
            pid=os.getpid(),
            next=self.schedule.next_run_times(),
        )
        try:
            worker_died = self._serve(startup)
        finally:
            code = self.shutdown()
        return EXIT_FAILED if worker_died else code

    def _serve(self, startup: Task) -> bool:
        """Given the start-up task, tick until `stop`; return whether the worker died."""
        ready = False
        interval = self.notifier.watchdog_interval
        next_ping = 0.0
        tick = min(self.tick, interval / 2) if interval else self.tick
        while not self.stop.wait(tick):
            if not ready and startup.done.is_set():
                ready = True
                self.notifier.ready(self.status_line())
                log.info("ready", status=self.status_line())
            if ready and self.config_watch.due(signalled=self.reload.is_set()):
                self.reload.clear()
                self.do_reload()
            self.watcher.check()
            worker_alive = self.worker.thread.is_alive()
            due = interval is not None and time.monotonic() >= next_ping
            if interval and due and worker_alive and not self._worker_wedged():
                # A dead or wedged worker means no more pings: systemd's watchdog restarts us.
                self.notifier.watchdog()
                next_ping = time.monotonic() + interval
            if not worker_alive:
                log.error("worker_died")
                return True
        return False

    def _worker_wedged(self) -> bool:
        silent = time.monotonic() - self.worker.alive_at
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

    def do_reload(self) -> bool:
        """Given a request to reload, load the config; keep the old one if the new one is bad."""
        self.notifier.reloading()
        # What was read this time, good or bad: an edit back to the old text is a change too.
        self.config_watch = ConfigWatch(self.config_path, file_digest(self.config_path))
        try:
            config = load_config(self.config_path)
            build_triggers(config)  # a bad cron line is a config error too
        except (CkptdError, ValueError, OSError) as error:
            problems = _problems(error, self.config_path)
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
        self.worker.use_config(config)
        self.watcher.set_roots(self._root_watches(config), self.config_path)
        self.schedule.apply(build_triggers(config))
        # A new policy applies now, not at the next checkpoint.
        self.worker.submit(Task("prune"))
        self.worker.write_state(next=self.schedule.next_run_times())
        log.info(
            "config_reloaded",
            file=self.config_path,
            changed=config_changes(old, config) or ["nothing (the same settings)"],
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
        self.worker.thread.join(self.stop_timeout)
        self.worker.deep.stop()
        self.watcher.stop()
        self.monitor.close()  # metrics
        if not self.worker.thread.is_alive():
            self.worker.save_cache()
            self.worker.integrity.save()
        self.schedule.shutdown(wait=True)
        if not self.worker.thread.is_alive():
            # After the lease thread ended; and never while the worker may still delete (its
            # leases then expire on their own).
            leasing.LEASES.release_all()
        if self.worker.thread.is_alive():
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
        polled = self.worker.remote.polled()
        present += polled
        parts.append(f"watching {present}/{len(self.config.roots)} roots")
        if polled:
            parts[-1] += f" ({polled} on object storage, polled)"
        last = self.worker.last_prune
        if last is not None:
            parts.append(
                f"last prune {last.time[11:19]} UTC deleted "
                f"{last.deleted} in {os.path.basename(last.root)}"
            )
        if self.worker.disk_status:
            parts.append(self.worker.disk_status)
        upcoming = self.schedule.next_run_times()
        if "prune" in upcoming:
            parts.append(f"next prune {upcoming['prune'][:16]}")
        return "; ".join(parts)

    def _status_changed(self) -> None:
        self.notifier.status(self.status_line())

    # --- scheduler thread ---------------------------------------------------------------------

    def run_job(self, name: str) -> None:
        """Given a job name (on APScheduler's "files" thread), have the worker run it and wait;
        the user's test (on the "verify" thread) runs right there."""
        if name == "verify":
            self._user_tests()
            return
        if name == "lease":
            self._leases()
            return
        self.worker.run_and_wait(name)

    def _leases(self) -> None:
        """Renew the leases of shared roots (on the scheduler's own "lease" thread, never
        behind a prune); a lease taken over from a node gone has its roots pruned now."""
        if self.stop.is_set():
            return
        taken = leasing.LEASES.maintain(self.config)
        if taken:
            log.info("lease_taken_over", roots=taken)
            self.worker.submit(Task("prune"))

    def _user_tests(self) -> None:
        """The user's daily test (on the scheduler's own "verify" thread, not the worker: a test
        may take an hour, and pruning must not wait for it); it reads, and a failure keeps."""
        from daemon.usertest import run_daily_user_tests

        outcomes = run_daily_user_tests(
            self.config, now=self.clock(), history=self.worker.history, stop=self.stop
        )
        for outcome in outcomes:
            verdict = outcome.result.verdict if outcome.result is not None else None
            log.info("user_test", root=outcome.root, verdict=verdict, skipped=outcome.skipped)

    # --- worker thread ------------------------------------------------------------------------

    def _on_config_event(self, event: WatchEvent) -> None:
        """Given an event on the config file, start its settle period (the main thread reloads
        once the file is closed and unchanged; see daemon/service/reload.py)."""
        self.config_watch.touched()

    # --- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _root_watches(config: Config) -> list[tuple[str, str]]:
        # Object-storage roots are polled by the worker (daemon/service/remote_poll.py).
        return [
            (os.path.abspath(root.path), root.watch)
            for root in config.roots
            if not is_remote(root.path)
        ]


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
        problems = _problems(error, config_path)
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
