"""The daemon's Prometheus metrics, its `/metrics` endpoint and textfile, and what `ckptd check`
reads back from state.json.

`Monitor` is fed by the daemon's one worker thread after each prune, snapshot and disk check
(`pruned`, `snapshot_taken`, `disk_checked`); it never raises into the daemon: a metric that
cannot be updated is logged, and pruning goes on.

Naming follows Prometheus practice: a `ckptd_` prefix, base units (`_bytes`, `_seconds`,
`_ratio`), `_total` for counters, `_timestamp_seconds` for "when". Labels are the root path, the
tier, the mount point and a reason from a small fixed set; never a checkpoint name, a step or a
pid, which would make a new series for every save. The registry is our own, not the library's
global one, so no other code's metrics (nor the process collector's) mix in.

Besides the metrics, `pruned` keeps two records in state.json that a running daemon knows and
`ckptd check` needs: `prune_success` (root -> UTC ISO time of its last prune that was neither
refused nor failed) and `refused` (root -> since when its prunes are refused, and why).
`snapshot_success` is the time of the last snapshot taken, `snapshot_result` the last attempt.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, disable_created_metrics
from prometheus_client import Counter as PromCounter
from prometheus_client.exposition import generate_latest, start_wsgi_server

from daemon import __version__, clock
from daemon.config import Config
from daemon.config.models import parse_listen
from daemon.disk import pressure
from daemon.disk.mounts import mount_point
from daemon.errors import CkptdError
from daemon.jsonfile import replace_file
from daemon.logs import get_logger
from daemon.pruning import trash
from daemon.pruning.pipeline import PruneReport
from daemon.snapshots.daily import SnapshotReport
from daemon.state import read_state, update_state
from daemon.storage.url import report_key

log = get_logger("ckptd.metrics")

TIERS = ("1", "2", "3", "none")  # "none": an incomplete checkpoint has no tier
VETO_REASONS = (
    "in_use",
    "tracked",
    "pinned",
    "newest",
    "incomplete",
    "min_keep",
    "outside_root",
    "other",
)
REFUSAL_REASONS = (
    "settling",
    "trainer_holds_newest",
    "max_delete_fraction",
    "locked",
    "lease",
    "other",
)
# Seconds: a prune of a quiet root takes milliseconds; one with thousands of checkpoints or a
# slow network filesystem minutes.
PRUNE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
# Snapshot statuses that are no trouble: taken, or nothing complete to copy yet.
SNAPSHOT_TAKEN = ("done", "exists")


def veto_reason(reasons: str) -> str:
    """Given a veto's reasons as the prune report joins them ("in-use:pid 7 (python), tracked"),
    return the first one as a label from `VETO_REASONS`."""
    first = reasons.split(",")[0].strip().split(":")[0].replace("-", "_")
    return first if first in VETO_REASONS else "other"


def refusal_reason(reason: str) -> str:
    """Given why a root was refused (the safety guard's or the root lock's sentence), return a
    label from `REFUSAL_REASONS`."""
    if "still settling" in reason:
        return "settling"
    if "holds the newest checkpoint" in reason:
        return "trainer_holds_newest"
    if "max_delete_fraction" in reason:
        return "max_delete_fraction"
    if "another prune of this root is running" in reason:
        return "locked"
    if "shared root's lease" in reason:
        return "lease"
    return "other"


def utc_iso(epoch_seconds: float) -> str:
    """Given epoch seconds, return the state file's UTC ISO time (to the second)."""
    return clock.utc_iso(epoch_seconds, timespec="seconds")


def epoch_of(iso: object) -> float | None:
    """Given a UTC ISO time from state.json, return epoch seconds (None if it is not one)."""
    if not isinstance(iso, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


class Metrics:
    """Given nothing, return the ckptd metrics in a registry of their own."""

    def __init__(self) -> None:
        # No `_created` series beside each counter and histogram: they double the exposition for
        # a start time that `ckptd_start_time_seconds` gives once. (A process-wide switch of the
        # library; ckptd's process has no other metrics.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Gauge("ckptd_build_info", "ckptd's version; always 1", ["version"], registry=r)
        self.info.labels(__version__).set(1)
        self.start_time = Gauge(
            "ckptd_start_time_seconds", "when the daemon started (Unix time)", registry=r
        )
        self.checkpoints = Gauge(
            "ckptd_checkpoints",
            "checkpoints in the root after its last prune, by tier (none: incomplete)",
            ["root", "tier"],
            registry=r,
        )
        self.checkpoint_bytes = Gauge(
            "ckptd_checkpoint_bytes",
            "bytes of the checkpoints in the root after its last prune, by tier",
            ["root", "tier"],
            registry=r,
        )
        self.incomplete = Gauge(
            "ckptd_incomplete_checkpoints",
            "checkpoints that are not complete (being written, or a crashed save)",
            ["root"],
            registry=r,
        )
        self.trash_bytes = Gauge(
            "ckptd_trash_bytes",
            "bytes in the root's trash, awaiting its grace",
            ["root"],
            registry=r,
        )
        self.trash_checkpoints = Gauge(
            "ckptd_trash_checkpoints", "checkpoints in the root's trash", ["root"], registry=r
        )
        self.deleted_checkpoints = PromCounter(
            "ckptd_deleted_checkpoints",
            "checkpoints deleted (moved out of the root)",
            ["root"],
            registry=r,
        )
        self.deleted_bytes = PromCounter(
            "ckptd_deleted_bytes", "bytes of the checkpoints deleted", ["root"], registry=r
        )
        self.freed_bytes = PromCounter(
            "ckptd_freed_bytes",
            "bytes really freed (removed for good: from the root or the trash)",
            ["root"],
            registry=r,
        )
        self.failed_deletions = PromCounter(
            "ckptd_failed_deletions", "deletions that failed", ["root"], registry=r
        )
        self.vetoes = PromCounter(
            "ckptd_vetoes",
            "deletions the safety layer turned down, by the first reason",
            ["root", "reason"],
            registry=r,
        )
        self.refusals = PromCounter(
            "ckptd_refusals",
            "prunes refused for the whole root, by reason",
            ["root", "reason"],
            registry=r,
        )
        self.refused = Gauge(
            "ckptd_root_refused", "1 while the root's last prune was refused", ["root"], registry=r
        )
        self.last_prune = Gauge(
            "ckptd_last_prune_success_timestamp_seconds",
            "when the root was last pruned without refusal or failure (Unix time)",
            ["root"],
            registry=r,
        )
        self.last_snapshot = Gauge(
            "ckptd_last_snapshot_success_timestamp_seconds",
            "when the last daily snapshot was taken (Unix time)",
            registry=r,
        )
        self.last_disk_check = Gauge(
            "ckptd_last_disk_check_timestamp_seconds",
            "when the disks were last checked (Unix time)",
            registry=r,
        )
        self.used_ratio = Gauge(
            "ckptd_filesystem_used_ratio",
            "used share of a root's filesystem, 0 to 1, as df and disk.warn_percent count it",
            ["mount"],
            registry=r,
        )
        self.free_bytes = Gauge(
            "ckptd_filesystem_free_bytes",
            "bytes free on a root's filesystem for ckptd's user",
            ["mount"],
            registry=r,
        )
        self.size_bytes = Gauge(
            "ckptd_filesystem_size_bytes", "size of a root's filesystem", ["mount"], registry=r
        )
        self.prune_duration = Histogram(
            "ckptd_prune_duration_seconds",
            "how long one prune of one root took",
            buckets=PRUNE_BUCKETS,
            registry=r,
        )

    def forget(self, root: str) -> None:
        """Given a root no longer configured, remove every series labelled with it."""
        labelled: list[tuple[Any, tuple[str, ...]]] = [
            (self.checkpoints, TIERS),
            (self.checkpoint_bytes, TIERS),
            (self.vetoes, VETO_REASONS),
            (self.refusals, REFUSAL_REASONS),
        ]
        for metric, values in labelled:
            for value in values:
                with contextlib.suppress(KeyError):
                    metric.remove(root, value)
        for single in (
            self.incomplete,
            self.trash_bytes,
            self.trash_checkpoints,
            self.deleted_checkpoints,
            self.deleted_bytes,
            self.freed_bytes,
            self.failed_deletions,
            self.refused,
            self.last_prune,
        ):
            with contextlib.suppress(KeyError):
                single.remove(root)

    def text(self) -> bytes:
        """Given the metrics, return them in the Prometheus text format."""
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class Tally:
    """Given the checkpoints still in a root: their count and bytes by tier, and incomplete."""

    counts: Mapping[str, int]
    sizes: Mapping[str, int]
    incomplete: int


def tally(report: PruneReport) -> Tally:
    """Given a prune report, return what is in its root now: every checkpoint of its plan but
    those it deleted (a refused run deleted nothing)."""
    deleted = set(report.deleted)
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    incomplete = 0
    for decision in report.plan.decisions:
        checkpoint = decision.checkpoint
        if checkpoint.name in deleted:
            continue
        tier = str(decision.tier) if decision.tier else "none"
        counts[tier] += 1
        sizes[tier] += checkpoint.size_bytes
        incomplete += 0 if checkpoint.complete else 1
    return Tally(counts, sizes, incomplete)


def deleted_bytes(report: PruneReport) -> int:
    """Given a prune report, return the bytes of the checkpoints it deleted."""
    deleted = set(report.deleted)
    return sum(
        d.checkpoint.size_bytes for d in report.plan.decisions if d.checkpoint.name in deleted
    )


def write_atomically(path: str, data: bytes) -> None:
    """Given a path and bytes, replace the file with them in one rename: a reader (node_exporter)
    sees the old file or the new one, never half of one. Not fsynced: rewritten after every
    prune and disk check, and node_exporter reads it from the page cache."""
    replace_file(path, lambda handle: handle.write(data.decode()), durable=False)


class Endpoint:
    """Given `metrics.listen` and a registry, serve `/metrics` there until `close()`."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, port = parse_listen(listen)
        self.listen = listen
        self.server, self.thread = start_wsgi_server(port, host, registry)
        self.thread.name = "ckptd-metrics-http"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


def _safely(action: Callable[..., None]) -> Callable[..., None]:
    """Given a Monitor method, return it so that a failure is logged and never raised: metrics
    must never stop a prune, a snapshot or a disk check."""

    def run(*arguments: Any, **keywords: Any) -> None:
        try:
            action(*arguments, **keywords)
        except Exception as error:
            log.warning("metrics_failed", action=action.__name__, error=repr(error))

    run.__name__ = action.__name__
    run.__doc__ = action.__doc__
    return run


class Monitor:
    """Given the config, keep the metrics, serve or write them, and record in state.json what
    `ckptd check` needs. Every method but `start`/`apply`/`close` runs on the worker thread."""

    def __init__(self, config: Config, *, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        self.endpoint: Endpoint | None = None
        self.lock = threading.Lock()
        self.roots: set[str] = set()
        self.prune_success: dict[str, str] = {}
        self.refused: dict[str, dict[str, str]] = {}
        self.snapshot_success = 0.0
        self.mounts: set[str] = set()

    # --- lifetime (main thread) -----------------------------------------------------------

    def start(self) -> None:
        """Given a new monitor, seed it from the last daemon's state and start serving."""
        self.metrics.start_time.set(self.clock())
        self._seed(read_state(self.config.state_dir))
        self.apply(self.config)

    def _seed(self, state: Mapping[str, Any]) -> None:
        """Given the previous state.json, carry the "last success" times over a restart, so an
        alert on their age does not see a gap when the daemon restarts."""
        for root, when in dict(state.get("prune_success") or {}).items():
            seconds = epoch_of(when)
            if seconds is not None:
                self.prune_success[root] = when
                self.metrics.last_prune.labels(root).set(seconds)
                self.roots.add(root)
        self.refused = {
            root: dict(value)
            for root, value in dict(state.get("refused") or {}).items()
            if isinstance(value, dict)
        }
        seconds = epoch_of(state.get("snapshot_success"))
        if seconds is not None:
            self.snapshot_success = seconds
            self.metrics.last_snapshot.set(seconds)

    def apply(self, config: Config) -> None:
        """Given the (reloaded) config, serve where `metrics.listen` says; forget removed roots."""
        self.config = config
        listen = config.metrics.listen
        with self.lock:
            if self.endpoint is not None and self.endpoint.listen != listen:
                self.endpoint.close()
                self.endpoint = None
            if listen is not None and self.endpoint is None:
                try:
                    self.endpoint = Endpoint(listen, self.metrics.registry)
                except OSError as error:
                    # Pruning matters more than metrics: say so loudly and go on.
                    log.error("metrics_unavailable", listen=listen, error=str(error))
                else:
                    log.info("metrics_serving", listen=listen, path="/metrics")
        configured = {report_key(root.path) for root in config.roots}
        for root in self.roots - configured:
            self._forget(root)
        self.roots &= configured

    def close(self) -> None:
        """Stop serving (the textfile stays: node_exporter reports its age)."""
        with self.lock:
            if self.endpoint is not None:
                self.endpoint.close()
                self.endpoint = None

    def _forget(self, root: str) -> None:
        self.metrics.forget(root)
        self.prune_success.pop(root, None)
        self.refused.pop(root, None)

    # --- events (worker thread) -----------------------------------------------------------

    @_safely
    def pruned(self, report: PruneReport) -> None:
        """Given the report of one real (not dry-run) prune of one root, update its metrics and
        the state `ckptd check` reads."""
        if report.dry_run:
            return
        root = report.root
        self.roots.add(root)
        m = self.metrics
        now = self.clock()
        self._set_contents(root, report)
        m.deleted_checkpoints.labels(root).inc(len(report.deleted))
        m.deleted_bytes.labels(root).inc(deleted_bytes(report))
        m.freed_bytes.labels(root).inc(report.bytes_freed)
        m.failed_deletions.labels(root).inc(len(report.failed))
        for reasons in report.veto_reasons.values():
            m.vetoes.labels(root, veto_reason(reasons)).inc()
        m.prune_duration.observe(report.seconds)
        standby = report.refused is not None and refusal_reason(report.refused) == "lease"
        if standby:
            # Another node holds this shared root's lease and prunes it: standing by is no
            # trouble for `ckptd check` (counted under ckptd_refusals{reason="lease"} only).
            m.refusals.labels(root, "lease").inc()
        if report.refused and not standby:
            m.refusals.labels(root, refusal_reason(report.refused)).inc()
            m.refused.labels(root).set(1)
            since = self.refused.get(root, {}).get("since", utc_iso(now))
            self.refused[root] = {"since": since, "reason": report.refused}
        else:
            m.refused.labels(root).set(0)
            self.refused.pop(root, None)
            if not report.failed:
                m.last_prune.labels(root).set(now)
                self.prune_success[root] = utc_iso(now)
        self._measure_filesystem(root)
        self._save_state(prune_success=dict(self.prune_success), refused=dict(self.refused))
        self.write_textfile()

    def _set_contents(self, root: str, report: PruneReport) -> None:
        counted = tally(report)
        for tier in TIERS:
            self.metrics.checkpoints.labels(root, tier).set(counted.counts.get(tier, 0))
            self.metrics.checkpoint_bytes.labels(root, tier).set(counted.sizes.get(tier, 0))
        self.metrics.incomplete.labels(root).set(counted.incomplete)
        try:
            items = trash.list_trash(root)
        except (OSError, CkptdError) as error:  # a trash refused for safety is not measured
            log.debug("trash_unreadable", root=root, error=str(error))
            return
        self.metrics.trash_bytes.labels(root).set(sum(item.bytes for item in items))
        self.metrics.trash_checkpoints.labels(root).set(len(items))

    def _measure_filesystem(self, root: str) -> None:
        try:
            usage = pressure.measure(root)
            mount = mount_point(root)
        except OSError:
            return
        self._set_filesystem(mount, usage)

    def _set_filesystem(self, mount: str, usage: pressure.Usage) -> None:
        self.mounts.add(mount)
        self.metrics.used_ratio.labels(mount).set(usage.percent / 100.0)
        self.metrics.free_bytes.labels(mount).set(usage.free)
        self.metrics.size_bytes.labels(mount).set(usage.total)

    @_safely
    def snapshot_taken(self, report: SnapshotReport) -> None:
        """Given the report of one daily snapshot run, record its result and, when a snapshot
        was taken (or already there), its time."""
        now = self.clock()
        result = {
            "time": utc_iso(now),
            "date": str(report.date),
            "status": str(report.status),
            "reason": report.reason,
        }
        updates: dict[str, Any] = {"snapshot_result": result}
        taken: float | None = None
        if report.status == "done":
            taken = now
        elif report.status == "exists" and report.path:
            # Taken earlier today (by a previous daemon, or `ckptd snapshot` by hand).
            with contextlib.suppress(OSError):
                taken = os.stat(report.path).st_mtime
        if taken is not None and taken > self.snapshot_success:
            self.snapshot_success = taken
            self.metrics.last_snapshot.set(taken)
            updates["snapshot_success"] = utc_iso(taken)
        self._save_state(**updates)
        self.write_textfile()

    @_safely
    def disk_checked(self, report: pressure.DiskReport) -> None:
        """Given the report of one disk check, update every filesystem's figures and its time."""
        mounts = {check.mount for check in report.filesystems}
        for mount in self.mounts - mounts:
            # No root is on it any more: its figures would stay frozen at their last value.
            for gauge in (
                self.metrics.used_ratio,
                self.metrics.free_bytes,
                self.metrics.size_bytes,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(mount)
        self.mounts = mounts
        for check in report.filesystems:
            self._set_filesystem(check.mount, check.after)
        self.metrics.last_disk_check.set(self.clock())
        self.write_textfile()

    def write_textfile(self) -> None:
        """Given `metrics.textfile`, rewrite it atomically with the current metrics."""
        path = self.config.metrics.textfile
        if path is None:
            return
        try:
            write_atomically(path, self.metrics.text())
        except OSError as error:
            log.warning("metrics_textfile_unwritable", path=path, error=str(error))

    def _save_state(self, **keys: Any) -> None:
        try:
            update_state(self.config.state_dir, **keys)
        except OSError as error:
            log.warning("state_unwritable", state_dir=self.config.state_dir, error=str(error))
