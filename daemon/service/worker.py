"""The worker: the one thread that changes files (prunes, snapshots, disk escalation).

Watchdog's threads put `WatchEvent`s on the work queue and APScheduler's "files" thread puts a
`Task` there and waits; the worker takes everything off that queue, in order, so no two jobs
that touch the disk ever run at once.

It also keeps the per-root prune timers (issue 9, point 3: a trainer that saves every second
must be pruned while it runs). A root is looked at:
- `EVENT_DEBOUNCE_SECONDS` after an event in it or in a checkpoint being written (a new
  checkpoint, a file the trainer closed), the burst's first event counting, so a trainer that
  never stops writing does not postpone it; at once when the event completes a save (a
  completion marker or a tracker file written, a save renamed into place);
- when one of its incomplete checkpoints will have settled (`settle_seconds` after its last
  write: layouts without a completion marker) or been abandoned (`abandoned_after`);
- after a refusal that clears by itself (the trainer holds the newest checkpoint), at the next
  event (the trainer closing its file) or with a backoff, whichever comes first.
Looking means planning (a scan and the policy, no /proc pass and no history); only a plan that
deletes something goes through `prune_root`, the safety-checked path of `ckptd prune -y`.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import gc
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

from daemon.clock import utc_iso as iso_time
from daemon.config import Config, RootConfig, RootSettings, settings_for
from daemon.discovery.layouts import DEEPSPEED_TRACKER, MEGATRON_TRACKER, TF_TRACKER
from daemon.discovery.sizecache import SizeCache
from daemon.discovery.walker import FINGERPRINT_MARKERS
from daemon.disk.pressure import check_disks
from daemon.fsio import TRASH_DIRECTORY
from daemon.history.log import NULL_HISTORY, History, HistoryLog
from daemon.integrity.cache import CACHE_FILE_NAME, IntegrityCache
from daemon.integrity.result import IntegrityResult
from daemon.lease import LEASE_NAME
from daemon.logs import get_logger
from daemon.metrics import Monitor, refusal_reason
from daemon.planner import plan_root
from daemon.pruning import pipeline
from daemon.pruning.pipeline import PruneReport
from daemon.service.deeppass import DeepPass
from daemon.service.remote_poll import RemotePolls
from daemon.service.watcher import Watcher, WatchEvent
from daemon.snapshots.daily import run_daily_snapshot
from daemon.state import update_state
from daemon.storage.url import is_remote
from daemon.verification import VerificationState, record_corrupt
from policies.model import Plan, PolicySpec

log = get_logger("ckptd.service")

# An event's root is looked at this long after the first event of its burst (the files of one
# save arrive together): soon enough that a trainer saving every 0.4 s is pruned between saves.
EVENT_DEBOUNCE_SECONDS = 0.1
# Files whose arrival completes a save (a completion marker written last, a tracker naming the
# newest step): the root is looked at at once, not after the debounce.
COMPLETING_NAMES = frozenset(
    {*FINGERPRINT_MARKERS, DEEPSPEED_TRACKER, MEGATRON_TRACKER, TF_TRACKER}
)
# A settle or abandon wake-up lands this far past the threshold, so mtimes are past it too.
WAKE_MARGIN_SECONDS = 0.3
MAX_RETRY_SECONDS = 300.0
# The size cache is written back at most this often (and at stop): sizes are cheap to relearn.
CACHE_SAVE_SECONDS = 300.0
# The worker waits at most this long on an empty queue, so it shows life at least this often.
IDLE_WAIT_SECONDS = 1.0


@dataclass(eq=False)
class Task:
    """A named job for the worker ("startup", "prune", "snapshot", "disk"); `done` when run."""

    name: str
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class LastPrune:
    """The last prune that ran through (state.json's `last_prune`, and the STATUS= line)."""

    time: str  # UTC ISO
    root: str
    trigger: str
    deleted: int
    vetoed: int
    failed: int
    bytes_freed: int

    def as_state(self) -> dict[str, object]:
        """Given the record, return it as state.json stores it."""
        return asdict(self)


class SignOfLife(threading.Event):
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


_LIBC = ctypes.CDLL(None)
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc's; absent elsewhere (musl)


def give_back_memory() -> None:
    """After a prune of every root (thousands of checkpoints scanned and checked, and then
    idle for hours): collect, and hand the heap's free pages back to the system, so the
    daemon's resident size is what it keeps, not the peak of that pass."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def utc_iso(epoch_seconds: float) -> str:
    """Given seconds since the epoch, return the UTC ISO time to the second (the state file's)."""
    return iso_time(epoch_seconds, timespec="seconds")


def open_history(config: Config) -> History:
    """Given the config, return its history log, or NULL_HISTORY (logged) when its folder is
    unusable."""
    try:
        os.makedirs(os.path.dirname(config.history_path) or ".", exist_ok=True)
        return HistoryLog(config.history_path)
    except OSError as error:
        log.warning("history_unavailable", path=config.history_path, error=str(error))
        return NULL_HISTORY


def open_size_cache(config: Config) -> SizeCache | None:
    """Given the config, return the discovery size cache kept in state_dir (None if absent)."""
    try:
        return SizeCache.in_state_dir(config.state_dir)
    except (OSError, ValueError) as error:
        log.warning("size_cache_unavailable", state_dir=config.state_dir, error=str(error))
        return None


@dataclass
class PruneTimers:
    """The worker's per-root prune timers: root path -> monotonic deadline, and how many
    refusals in a row (for the backoff)."""

    deadlines: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)

    def next_timeout(self, now: float) -> float:
        """Given the time, return how long the worker may wait for the queue."""
        if not self.deadlines:
            return IDLE_WAIT_SECONDS
        return max(0.02, min(IDLE_WAIT_SECONDS, min(self.deadlines.values()) - now))

    def wake(self, root: str, at: float) -> None:
        """Given a root and a monotonic time, look at the root then (or sooner, if due sooner)."""
        self.deadlines[root] = min(self.deadlines.get(root, at), at)

    def on_event(self, root: str, now: float) -> None:
        """Given an event in a root and the time, look at it `EVENT_DEBOUNCE_SECONDS` after the
        first event of this burst (a later event does not push that back)."""
        self.wake(root, now + EVENT_DEBOUNCE_SECONDS)

    def take_due(self, now: float) -> list[str]:
        """Given the time, return the roots whose deadline has passed, and forget their timers."""
        due = [root for root, deadline in self.deadlines.items() if deadline <= now]
        for root in due:
            del self.deadlines[root]
        return due

    def retry(self, root: str, settle_seconds: float, now: float) -> None:
        """Given a root refused for a while, schedule its next attempt with a backoff; an
        event (the holder closing its file) looks sooner."""
        attempt = self.attempts.get(root, 0) + 1
        self.attempts[root] = attempt
        delay = min(MAX_RETRY_SECONDS, max(settle_seconds, 0.5), 0.5 * 2 ** (attempt - 1))
        self.wake(root, now + delay)

    def settled(self, root: str) -> None:
        """Given a root that was pruned (or refused for good), forget its refusal count."""
        self.attempts.pop(root, None)


def timer_key(path: str) -> str:
    """Given a configured root path, return its key in the worker's timers and records: the
    absolute path (as the watcher reports it), or an object-storage root's URL as written."""
    return path if is_remote(path) else os.path.abspath(path)


def next_wake(plan: Plan, settings: RootSettings, now: float) -> float | None:
    """Given a root's plan, its settings and the time (epoch seconds), return when (epoch
    seconds) one of its incomplete checkpoints will have settled or been abandoned, or None."""
    times: list[float] = []
    for decision in plan.decisions:
        checkpoint = decision.checkpoint
        if checkpoint.complete or checkpoint.mtime <= 0:
            continue
        for threshold in (settings.settle_seconds, settings.abandoned_after):
            at = checkpoint.mtime + threshold + WAKE_MARGIN_SECONDS
            if at > now:
                times.append(at)
    return min(times, default=None)


class Worker:
    """Given the service's queue, stop event, clock, watcher and callbacks, run every job that
    touches the disk on one thread. The service swaps `config` and `history` on reload."""

    def __init__(
        self,
        config: Config,
        *,
        work: queue.Queue[object],
        stop: threading.Event,
        clock: Callable[[], float],
        watcher: Watcher,
        monitor: Monitor,
        config_path: str,
        on_config_event: Callable[[WatchEvent], None],
        on_status: Callable[[], None],
        next_runs: Callable[[], dict[str, str]],
    ) -> None:
        self.config = config
        self.history = open_history(config)
        self.work = work
        self.stop = stop
        self.clock = clock
        self.watcher = watcher
        self.monitor = monitor
        self.config_path = config_path
        self.on_config_event = on_config_event
        self.on_status = on_status
        self.next_runs = next_runs
        self.thread = threading.Thread(target=self._work, name="ckptd-worker", daemon=True)
        self.alive_at = time.monotonic()
        self.job_stop = SignOfLife(stop, self._alive)
        # One size cache for every root (keyed by root inside), persisted in state_dir.
        self.cache = open_size_cache(config)
        self.cache_state_dir = config.state_dir
        self.cache_saved_at = time.monotonic()
        # One integrity cache in memory, shared by the prunes (cheap checks) and the deep pass.
        self.integrity = IntegrityCache.in_state_dir(config.state_dir)
        self.deep = DeepPass(
            self.integrity, config=lambda: self.config, history=lambda: self.history
        )
        self.timers = PruneTimers()
        # Object-storage roots: polled every poll_interval (daemon/service/remote_poll.py).
        self.remote = RemotePolls()
        self.remote_scheduled: set[str] = set()
        self.last_prune: LastPrune | None = None
        self.disk_status: str | None = None

    # --- any thread ---------------------------------------------------------------------------

    def use_config(self, config: Config) -> None:
        """Given a config that was just loaded (main thread), run with it from the next job on."""
        old = self.config
        self.config = config
        if config.history_path != old.history_path:
            self.history = open_history(config)

    def submit(self, task: Task) -> None:
        """Given a task, queue it for the worker."""
        self.work.put(task)

    def run_and_wait(self, name: str) -> None:
        """Given a job name (on APScheduler's "files" thread), have the worker run it and wait;
        re-raise its error, so the scheduler logs it."""
        task = Task(name)
        self.work.put(task)
        while not task.done.wait(0.5):
            if self.stop.is_set():
                return
        if task.error is not None:
            raise task.error

    def write_state(self, **keys: object) -> None:
        """Given state.json keys, merge them in; an unwritable state folder is logged."""
        try:
            update_state(self.config.state_dir, **keys)
        except OSError as error:
            log.warning("state_unwritable", state_dir=self.config.state_dir, error=str(error))

    def save_cache(self) -> None:
        """Write the size cache back (at stop, and every `CACHE_SAVE_SECONDS`)."""
        self.cache_saved_at = time.monotonic()
        if self.cache is None:
            return
        try:
            self.cache.save()
        except OSError as error:
            log.warning("size_cache_unsaved", error=str(error))

    # --- the worker thread --------------------------------------------------------------------

    def _alive(self) -> None:
        self.alive_at = time.monotonic()

    def _work(self) -> None:
        while True:
            self._alive()
            try:
                item: object = self.work.get(timeout=self.timers.next_timeout(time.monotonic()))
            except queue.Empty:
                item = False
            self._alive()
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

    def _root_for(self, path: str) -> RootConfig | None:
        for root in self.config.roots:
            if timer_key(root.path) == path:
                return root
        return None

    def _on_event(self, event: WatchEvent) -> None:
        if event.root == self.config_path:
            self.on_config_event(event)
            return
        root = self._root_for(event.root)
        if root is None or not self._concerns_checkpoints(event):
            return
        landed = event.dest_path or event.path
        if event.is_directory and os.path.dirname(landed) == event.root:
            self.watcher.watch_checkpoint(event.root, landed)
        if not self.config.prune.on_new_checkpoint:
            return
        now = time.monotonic()
        written = event.kind in ("modified", "moved")  # closed after writing, or renamed
        if (written and os.path.basename(landed) in COMPLETING_NAMES) or (
            event.kind == "moved" and os.path.dirname(landed) == event.root
        ):
            # A marker landed, or a save renamed into place (Orbax): probably something to prune.
            self.timers.wake(event.root, now)
        else:
            self.timers.on_event(event.root, now)

    def _concerns_checkpoints(self, event: WatchEvent) -> bool:
        """Given an event in a root, return whether it may make something to prune (our own
        trash, a deletion and the root itself vanishing do not)."""
        trash = os.path.join(event.root, TRASH_DIRECTORY)
        paths = [p for p in (event.path, event.dest_path) if p]
        if any(p == trash or p.startswith(trash + os.sep) for p in paths[-1:]):
            return False  # our own deletions
        if any(os.path.basename(p).startswith(LEASE_NAME) for p in paths[-1:]):
            return False  # a shared root's lease renewed (ours or another node's)
        if event.path == event.root or event.dest_path == event.root:
            if event.kind == "deleted" or (event.kind == "moved" and event.path == event.root):
                log.warning("root_vanished", root=event.root)
                return False
            log.info("root_appeared", root=event.root)
            self.watcher.check()
            return True
        return event.kind != "deleted"  # a deletion never makes anything to prune

    def _prune_due_roots(self) -> None:
        if self.stop.is_set():
            return
        self._schedule_remote_polls()
        for path in self.timers.take_due(time.monotonic()):
            root = self._root_for(path)
            if root is not None and is_remote(root.path):
                self._poll_remote(root)
            elif root is not None and os.path.isdir(path):
                self._look(root)
            if self.stop.is_set():
                return

    def _schedule_remote_polls(self) -> None:
        """Give every object-storage root configured now a first poll (its timer keeps it
        polled from then on); forget the pollers of roots no longer configured."""
        remote = {root.path for root in self.config.roots if is_remote(root.path)}
        self.remote.retain(remote)
        self.remote_scheduled &= remote
        for path in remote - self.remote_scheduled:
            self.timers.wake(timer_key(path), time.monotonic())
            self.remote_scheduled.add(path)

    def _poll_remote(self, root: RootConfig) -> None:
        """Given an object-storage root whose timer fired, poll its listing, prune it when
        something new is complete (or the last prune was refused), and poll again after
        poll_interval."""
        key = timer_key(root.path)
        settings = settings_for(self.config, root)
        self.timers.wake(key, time.monotonic() + settings.poll_interval)
        try:
            news = self.remote.poll(root, now=self.clock(), settle_seconds=settings.settle_seconds)
        except Exception:
            log.exception("poll_failed", root=root.path)
            return
        if (news and self.config.prune.on_new_checkpoint) or key in self.timers.attempts:
            self._prune(root, trigger="new_checkpoint")

    def _run_task(self, task: Task) -> None:
        try:
            if task.name in ("startup", "prune"):
                self._prune_all(task.name)
                give_back_memory()
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
                self.write_state(next=self.next_runs())
            task.done.set()

    def _prune_all(self, trigger: str) -> None:
        for root in self.config.roots:
            if self.stop.is_set():
                break
            if is_remote(root.path) or os.path.isdir(root.path):
                self._prune(root, trigger=trigger)
            else:
                log.warning("root_missing", root=root.path, job=trigger)

    def prune_with(
        self,
        config: Config,
        root: RootConfig,
        *,
        now: float,
        dry_run: bool,
        history: History = NULL_HISTORY,
        policy_override: PolicySpec | None = None,
        deep_check: bool = False,
    ) -> PruneReport:
        """Given prune_root's own arguments (the disk check calls it so, on the worker thread),
        prune with the daemon's size cache and its `stop` added: SIGTERM is honoured there too.
        `deep_check`: the checkpoints this prune checks for the first time go on to the deep
        pass (the prune after a new checkpoint: not the start-up's backlog of old ones)."""
        key = os.path.realpath(root.path)  # how the prune keys the integrity cache
        report = pipeline.prune_root(
            config,
            root,
            now=now,
            dry_run=dry_run,
            history=history,
            policy_override=policy_override,
            cache=self._size_cache(),
            stop=self.job_stop,
            verification=VerificationState.sharing(config.state_dir, self._integrity_cache()),
            on_checked=partial(self.deep.take, key) if deep_check else None,
        )
        self.monitor.pruned(report)  # metrics: every real prune (the disk check's too)
        if time.monotonic() - self.cache_saved_at > CACHE_SAVE_SECONDS:
            self.save_cache()
        return report

    def _size_cache(self) -> SizeCache | None:
        if self.config.state_dir != self.cache_state_dir:
            # A reload moved state_dir: the cache lives there from now on (swapped here, on the
            # worker, the only thread that uses it).
            self.save_cache()
            self.cache = open_size_cache(self.config)
            self.cache_state_dir = self.config.state_dir
        return self.cache

    def _integrity_cache(self) -> IntegrityCache:
        if self.integrity.path != os.path.join(self.config.state_dir, CACHE_FILE_NAME):
            # A reload moved state_dir: the cache lives there from now on.
            self.integrity.save()
            self.integrity = IntegrityCache.in_state_dir(self.config.state_dir)
            self.deep.use_cache(self.integrity)
        return self.integrity

    def _look(self, root: RootConfig) -> None:
        """Given a root whose timer fired, plan it; prune it only if the plan deletes something
        or the last attempt was refused (the guard can only keep more, so a plan that deletes
        nothing needs no /proc pass, and leaves no record in the history every time a trainer
        closes a file)."""
        key = os.path.abspath(root.path)
        checked: list[IntegrityResult] = []
        try:
            _scan, plan = plan_root(
                self.config,
                root,
                now=self.clock(),
                cache=self._size_cache(),
                verification=VerificationState.sharing(
                    self.config.state_dir, self._integrity_cache()
                ),
                check_new=True,  # each new checkpoint is checked once it completes
                on_checked=checked.append,
            )
        except Exception:
            log.exception("plan_failed", root=key, trigger="new_checkpoint")
            self.timers.retry(key, settings_for(self.config, root).settle_seconds, time.monotonic())
            return
        self._checked(root, checked)
        # After a refusal or a failure, prune_root runs even if the plan now deletes nothing:
        # its success is what clears the refusal (`ckptd check`, the metrics).
        if plan.deleted or key in self.timers.attempts:
            self._prune(root, trigger="new_checkpoint")
        else:
            self._follow(root, plan)

    def _checked(self, root: RootConfig, checked: list[IntegrityResult]) -> None:
        """Given the integrity checks a look at a root made (its new checkpoints'), record the
        corrupt ones, hand the sound ones to the deep pass, and remember them."""
        if not checked:
            return
        key = os.path.realpath(root.path)  # how the prune keys the integrity cache
        record_corrupt(self.config, key, checked, self.history)
        for result in checked:
            self.deep.offer(key, result)
        self.integrity.save()

    def _follow(self, root: RootConfig, plan: Plan) -> None:
        """Given a root and its latest plan, watch the checkpoints still being written and wake
        up when one of them will have settled or been abandoned."""
        key = timer_key(root.path)
        if not is_remote(root.path):
            self._watch_writing(key, plan)
        if not self.config.prune.on_new_checkpoint:
            return
        now = self.clock()
        at = next_wake(plan, settings_for(self.config, root), now)
        if at is not None:
            self.timers.wake(key, time.monotonic() + (at - now))

    def _watch_writing(self, key: str, plan: Plan) -> None:
        """Given a local root and its plan, watch exactly the checkpoints being written."""
        writing: list[str] = []
        done: list[str] = []
        for decision in plan.decisions:
            checkpoint = decision.checkpoint
            for member in checkpoint.members:
                path = os.path.join(key, member)
                if checkpoint.complete:
                    done.append(path)  # no stat: a root may hold 10,000 of them
                elif os.path.isdir(path) and not os.path.islink(path):
                    writing.append(path)
        self.watcher.follow_checkpoints(key, writing=writing, done=done)

    def _prune(self, root: RootConfig, *, trigger: str) -> None:
        key = timer_key(root.path)
        started = time.monotonic()
        settle_seconds = settings_for(self.config, root).settle_seconds
        try:
            report = self.prune_with(
                self.config,
                root,
                now=self.clock(),
                dry_run=False,
                history=self.history,
                deep_check=trigger == "new_checkpoint",
            )
        except Exception:
            log.exception("prune_failed", root=key, trigger=trigger)
            self.timers.retry(key, settle_seconds, time.monotonic())
            return
        if report.plan.decisions:  # none when another prune held the root's lock
            self._follow(root, report.plan)
        if report.refused and not report.refusal_transient:
            # A limit only a person can lift: retrying on a timer would only repeat the refusal
            # in the history every settle period. The next checkpoint, the schedule or a disk
            # check tries again.
            # (Or another node holds a shared root's lease: normal on a standby node, and the
            # lease job prunes the root once it takes the lease over.)
            self.timers.settled(key)
            standby = refusal_reason(report.refused) == "lease"
            say = log.info if standby else log.warning
            say("prune_refused", root=key, reason=report.refused, trigger=trigger)
            return
        if report.refused:
            log.info("prune_deferred", root=key, reason=report.refused, trigger=trigger)
            self.timers.retry(key, settle_seconds, time.monotonic())
            return
        self.timers.settled(key)
        self._record_prune(key, trigger, report, time.monotonic() - started)

    def _record_prune(self, root: str, trigger: str, report: PruneReport, seconds: float) -> None:
        self.last_prune = LastPrune(
            time=utc_iso(self.clock()),
            root=root,
            trigger=trigger,
            deleted=len(report.deleted),
            vetoed=len(report.vetoed),
            failed=len(report.failed),
            bytes_freed=report.bytes_freed,
        )
        log.info(
            "prune_done",
            root=root,
            trigger=trigger,
            deleted=list(report.deleted),
            vetoed=list(report.vetoed),
            failed=list(report.failed),
            bytes_freed=report.bytes_freed,
            seconds=round(seconds, 3),
        )
        self.write_state(last_prune=self.last_prune.as_state())
        self.on_status()

    def _snapshot(self, *, startup: bool) -> None:
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        # hash_shared: hard-linked files get their checksum now, in the copy's worker thread,
        # so the first `snapshot --verify` compares content instead of only recording it.
        report = run_daily_snapshot(
            self.config, now=now, history=self.history, stop=self.job_stop, hash_shared=True
        )
        log.info("snapshot_job", startup=startup, report=report)
        self.monitor.snapshot_taken(report)  # metrics
        self.write_state(last_snapshot={"time": utc_iso(self.clock())})

    def _disk(self) -> None:
        result = check_disks(
            self.config, now=self.clock(), history=self.history, prune=self.prune_with
        )
        self.disk_status = result.status_line
        log.debug("disk_checked", result=result)
        self.monitor.disk_checked(result)  # metrics
        self.write_state(last_disk_check={"time": utc_iso(self.clock())})
