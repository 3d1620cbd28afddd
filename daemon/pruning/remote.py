"""Pruning a root on object storage: the same plan and guard as a local root, deletion through
the journal of `daemon/storage/journal.py` (no rename exists there).

`prune_root` calls `prune_remote_root` for an `s3://` root. In order:
1. finish every deletion a crash left journalled (markers again first), then delete what the
   deferred-deletion list says fell due (the trash grace), both journalled;
2. plan from one listing (`planner.plan_remote`) and let the safety guard veto or refuse, with
   no process facts: object storage has none (no /proc veto; markers, settle time, min_keep,
   max_delete_fraction, trackers and the lease protect there);
3. with a trash grace: list the deleted checkpoints in a deferred-deletion list (the objects
   stay, `ckptd trash restore` cancels, the prune after the grace deletes them); without one:
   write the journal, delete each checkpoint's marker objects first, then the rest in batches
   of 1,000, remove the journal.

Only keys of the listing the plan was made from are deleted: an object written into a
checkpoint's prefix after the listing is left (the next prune lists and plans it again).
Bytes freed are counted honestly: 0 in a versioned bucket (the old versions stay billed until
a lifecycle rule expires them), with a note saying so.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from daemon.config import Config, RootConfig, policy_for, settings_for
from daemon.discovery.remote import RemoteScan, open_root_store
from daemon.discovery.walker import FINGERPRINT_MARKERS
from daemon.history.events import Delete, PruneRefused, TrashPurge, Veto
from daemon.history.log import History
from daemon.planner import plan_remote
from daemon.pruning import deleter
from daemon.pruning.deleter import ApplyResult
from daemon.pruning.pipeline import (
    Confirm,
    PruneReport,
    Refusal,
    did_nothing,
    only_confirmed,
    run_record,
    safety_settings,
)
from daemon.pruning.trash import PurgeResult
from daemon.safety import guard
from daemon.safety.facts import Facts
from daemon.storage import journal
from daemon.storage.base import DeleteFailure, ObjectStore
from daemon.storage.journal import CheckpointObjects, RunOutcome
from daemon.storage.url import StorageUrl
from policies.model import Decision, Plan, PolicySpec, policy_record

# Objects whose presence makes a checkpoint complete for its framework: deleted first, so a
# resume never takes a half-deleted checkpoint for a complete one. (`.index` of a TensorFlow
# checkpoint too: TF's reader needs it.) `checkpoint-is-incomplete.txt` is NOT one: deleting
# it first would make an HF checkpoint look complete.
MARKER_NAMES = frozenset(FINGERPRINT_MARKERS)
NO_PROCESS_NOTE = (
    "object storage: no process information (no open-file veto); markers, settle time,"
    " trackers and the lease protect this root"
)

KeepGoing = Callable[[], bool]


@dataclasses.dataclass(frozen=True)
class _RemoteJob:
    """Given one prune of one remote root: its settings, store and where it records."""

    config: Config
    root: RootConfig
    url: StorageUrl
    store: ObjectStore
    dry_run: bool
    force: bool
    policy_override: PolicySpec | None
    history: History
    safety: guard.SafetySettings
    grace: float
    policy: dict[str, object]
    keep_going: KeepGoing | None

    @property
    def name(self) -> str:
        return str(self.url)

    def look(self, now: float) -> tuple[Plan, RemoteScan]:
        """Given the time, list the root once and return its plan and the scan."""
        planned = plan_remote(
            self.config,
            self.root,
            now=now,
            policy_override=self.policy_override,
            store=self.store,
            url=self.url,
        )
        return planned.planned.plan, planned.scanned


def _is_marker(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return name in MARKER_NAMES or name.endswith(".index")


def deletion_units(
    scanned: RemoteScan, names: Iterable[str]
) -> tuple[list[CheckpointObjects], list[tuple[str, str]]]:
    """Given a scan and the checkpoints to delete, return them as the journal's units (every
    object listed under each of its members, markers named) and those that cannot be one
    (a folder with files beside it: the journal takes one prefix or top-level objects)."""
    by_name = {c.name: c for c in scanned.result.checkpoints}
    units: list[CheckpointObjects] = []
    refused: list[tuple[str, str]] = []
    for name in names:
        checkpoint = by_name.get(name)
        if checkpoint is None:
            continue
        keys = [key for member in checkpoint.members for key in scanned.fs.objects_under(member)]
        objects = tuple(scanned.fs.listed[key] for key in keys)
        markers = tuple(key for key in keys if _is_marker(key))
        folder = checkpoint.members == (name,) and scanned.fs.is_folder(name)
        prefix = scanned.url.key(name) + "/" if folder else None
        unit = CheckpointObjects(name, markers, objects, prefix)
        try:
            journal.encode_checkpoint(scanned.url, unit)
        except journal.JournalError as error:
            refused.append((name, f"not deletable on object storage: {error}"))
            continue
        units.append(unit)
    return units, refused


def _facts(job: _RemoteJob, now: float) -> Facts:
    return Facts(root_path=job.name, now=now, notes=(NO_PROCESS_NOTE,))


def _refused(job: _RemoteJob, report: PruneReport, refused: guard.RootRefused) -> PruneReport:
    if not job.dry_run:
        job.history.record(PruneRefused(root=job.name, reason=refused.reason, pids=(), cmdlines=()))
    return dataclasses.replace(report, refusal=Refusal(refused.reason, refused.transient))


def _guarded(job: _RemoteJob, plan: Plan, report: PruneReport, now: float) -> PruneReport:
    """Given a plan, let the guard veto or refuse (no process facts); record its vetoes."""
    try:
        guarded = guard.guard(plan, _facts(job, now), job.safety)
    except guard.RootRefused as refused:
        return _refused(job, dataclasses.replace(report, plan=plan), refused)
    vetoes = guard.vetoed(plan, guarded)
    if not job.dry_run:
        for decision in vetoes:
            if decision.checkpoint.name in dict(report.guard_vetoes):
                continue
            job.history.record(
                Veto(
                    root=job.name,
                    checkpoint=decision.checkpoint.name,
                    step=decision.checkpoint.step,
                    reason=", ".join(decision.reasons),
                )
            )
    reasons = tuple((d.checkpoint.name, ", ".join(d.reasons)) for d in vetoes)
    return dataclasses.replace(report, plan=guarded, guard_vetoes=reasons)


def _finish_leftovers(job: _RemoteJob, now: float, *, everything: bool = False) -> PurgeResult:
    """Given the time, finish crashed runs' journals and delete the deferred lists that fell
    due; return what that removed, with a note per crashed run finished."""
    notes: list[str] = []
    removed: list[str] = []
    failed: list[tuple[str, str]] = []
    freed = logical = 0
    crashed = journal.finish_pending(job.store, job.url, keep_going=job.keep_going)
    due = journal.purge_due(
        job.store, job.url, now, everything=everything, keep_going=job.keep_going
    )
    for run in crashed:
        names = ", ".join(outcome.name for outcome in run.outcomes)
        notes.append(f"finished the deletion journal {run.run_id} a crash left ({names})")
    for run in (*crashed, *due):
        for outcome in run.outcomes:
            if outcome.complete:
                removed.append(outcome.name)
            else:
                failed.append((outcome.name, _failure_text(outcome.failures)))
            freed += outcome.bytes_freed
            logical += outcome.bytes_listed if not run.versioned else 0
        if run.versioned and run.outcomes:
            notes.append(run.note)
    for run in due:
        for outcome in run.outcomes:
            job.history.record(
                TrashPurge(
                    root=job.name,
                    checkpoint=outcome.name,
                    bytes_freed=outcome.bytes_freed,
                    deleted_at=now,
                    partial=not outcome.complete,
                    errors=tuple(f.key + ": " + f.code for f in outcome.failures[:3]),
                    bytes_logical=outcome.bytes_freed,
                )
            )
    return PurgeResult(tuple(removed), freed, tuple(failed), tuple(dict.fromkeys(notes)), logical)


def _failure_text(failures: Sequence[DeleteFailure]) -> str:
    if not failures:
        return ""
    first = failures[0]
    more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
    return f"{first.key}: {first.code} {first.message}".strip() + more


def _apply(
    job: _RemoteJob,
    plan: Plan,
    scanned: RemoteScan,
    now: float,
    progress: deleter.Progress | None,
) -> tuple[ApplyResult, tuple[str, ...]]:
    """Given the guarded plan and the listing it was made from, delete (or, with a trash
    grace, defer) its deletions; return what was done and notes."""
    doomed = plan.deleted
    if job.dry_run:
        return ApplyResult(
            would_delete=tuple(d.checkpoint.name for d in doomed),
            would_free=sum(d.checkpoint.freeable_bytes for d in doomed),
        ), ()
    units, refused = deletion_units(scanned, [d.checkpoint.name for d in doomed])
    if not units:
        return ApplyResult(failed=tuple(refused)), ()
    for done, unit in enumerate(units):
        if progress is not None:
            progress(done, len(units), unit.name)
    decisions = {d.checkpoint.name: d for d in doomed}
    if job.grace > 0:
        journal.defer(job.store, job.url, units, due=now + job.grace)
        _record_deletes(job, decisions, units, None)
        names = tuple(unit.name for unit in units)
        in_trash = sum(unit.size for unit in units)
        return ApplyResult(
            deleted=names, trashed=names, failed=tuple(refused), bytes_in_trash=in_trash
        ), ()
    run = journal.delete_checkpoints(job.store, job.url, units, keep_going=job.keep_going)
    _record_deletes(job, decisions, units, run)
    return _applied(run, refused), (run.note,) if run.note else ()


def _applied(run: RunOutcome, refused: list[tuple[str, str]]) -> ApplyResult:
    deleted = tuple(o.name for o in run.outcomes if o.complete)
    failed = tuple((o.name, _failure_text(o.failures)) for o in run.outcomes if not o.complete)
    failed += tuple(refused)
    freed = sum(o.bytes_freed for o in run.outcomes)
    return ApplyResult(deleted=deleted, failed=failed, bytes_freed=freed, bytes_logical=freed)


def _record_deletes(
    job: _RemoteJob,
    decisions: dict[str, Decision],
    units: list[CheckpointObjects],
    run: RunOutcome | None,
) -> None:
    """Given what was deleted (run) or deferred (None), record one `delete` per checkpoint."""
    outcomes = {o.name: o for o in run.outcomes} if run is not None else {}
    for unit in units:
        decision = decisions[unit.name]
        outcome = outcomes.get(unit.name)
        freed = outcome.bytes_freed if outcome is not None else 0
        errors = tuple(f"{f.key}: {f.code}" for f in outcome.failures[:3]) if outcome else ()
        job.history.record(
            Delete(
                root=job.name,
                checkpoint=unit.name,
                step=decision.checkpoint.step,
                series=decision.checkpoint.series,
                bytes_freed=freed,
                bytes_in_trash=unit.size if run is None else 0,
                trash_grace=job.grace,
                partial=bool(errors),
                errors=errors,
                why=decision.reasons,
                tier=decision.tier,
                policy=job.policy,
                bytes_logical=freed,
            )
        )


def _record_run(job: _RemoteJob, report: PruneReport) -> None:
    if not did_nothing(report):
        job.history.record(run_record(report, root=job.name, force=job.force, policy=job.policy))


def _confirmed(
    job: _RemoteJob, preview: PruneReport, confirm: Confirm, now: float
) -> tuple[PruneReport, RemoteScan | None, float]:
    """Given the guarded plan's report, ask; on yes, list and plan again at the time of the
    answer and keep only deletions confirmed unchanged. Returns the report, the fresh scan
    (None: declined or refused) and the time."""
    asked_at = time.monotonic()
    if not confirm(preview):
        return dataclasses.replace(preview, aborted=True), None, now
    now += time.monotonic() - asked_at
    plan, scanned = job.look(now)
    fresh = _guarded(job, plan, dataclasses.replace(preview, plan=plan), now)
    if fresh.refusal is not None:
        return fresh, None, now
    report = dataclasses.replace(fresh, plan=only_confirmed(fresh.plan, preview.plan))
    return report, scanned, now


def prune_remote_root(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    dry_run: bool,
    force: bool = False,
    policy_override: PolicySpec | None = None,
    history: History,
    stop: threading.Event | None = None,
    confirm: Confirm | None = None,
    progress: deleter.Progress | None = None,
    keep_going: KeepGoing | None = None,
    store: ObjectStore | None = None,
) -> PruneReport:
    """Given the config, an object-storage root and the time, prune it (see the module
    docstring) and report as `prune_root` does. `keep_going()` is asked before each delete
    request (the lease still held; `stop` not set): when it says no, the run stops and its
    journal is finished by the next run."""
    url, opened = open_root_store(root)
    job = _job(config, root, url, store or opened, dry_run, force, policy_override, history)
    job = dataclasses.replace(job, keep_going=_combined(keep_going, stop))
    started = time.monotonic()
    purged = PurgeResult() if dry_run else _finish_leftovers(job, now)
    plan, scanned = job.look(now)
    report = PruneReport(
        root=job.name,
        plan=plan,
        dry_run=dry_run,
        purge=purged,
        notes=(NO_PROCESS_NOTE, *plan.warnings),
    )
    report = _guarded(job, plan, report, now)
    if report.refusal is None and confirm is not None and not dry_run and report.plan.deleted:
        report, fresh, now = _confirmed(job, report, confirm, now)
        if fresh is None:
            return dataclasses.replace(report, seconds=time.monotonic() - started)
        scanned = fresh
    if report.refusal is not None:
        return dataclasses.replace(report, seconds=time.monotonic() - started)
    applied, notes = _apply(job, report.plan, scanned, now, progress)
    report = dataclasses.replace(
        report,
        applied=applied,
        notes=(*report.notes, *notes),
        seconds=time.monotonic() - started,
    )
    _record_run(job, report)
    return report


def _combined(keep_going: KeepGoing | None, stop: threading.Event | None) -> KeepGoing | None:
    if stop is None:
        return keep_going
    if keep_going is None:
        return lambda: not stop.is_set()
    return lambda: not stop.is_set() and keep_going()


def _job(
    config: Config,
    root: RootConfig,
    url: StorageUrl,
    store: ObjectStore,
    dry_run: bool,
    force: bool,
    policy_override: PolicySpec | None,
    history: History,
) -> _RemoteJob:
    settings = settings_for(config, root)
    return _RemoteJob(
        config=config,
        root=root,
        url=url,
        store=store,
        dry_run=dry_run,
        force=force,
        policy_override=policy_override,
        history=history,
        safety=safety_settings(config, root, force=force),
        grace=settings.trash_grace,
        policy=policy_record(policy_override or policy_for(config, root)),
        keep_going=None,
    )


__all__ = ["deletion_units", "prune_remote_root"]


# --- the trash of a remote root: its deferred-deletion lists ---------------------------------


def deferred(root: RootConfig) -> tuple[StorageUrl, list[journal.DeferredItem]]:
    """Given an object-storage root, return its URL and the checkpoints waiting in its
    deferred-deletion lists (`ckptd trash list`), soonest due first."""
    url, store = open_root_store(root)
    return url, journal.list_deferred(store, url)


def restore_deferred(root: RootConfig, name: str) -> bool:
    """Given an object-storage root and a checkpoint name, cancel its deferred deletion (its
    objects never left); return whether it was waiting."""
    url, store = open_root_store(root)
    return journal.restore(store, url, name)


def purge_deferred(
    root: RootConfig, now: float, history: History, stop: threading.Event | None = None
) -> PurgeResult:
    """Given an object-storage root, finish crashed deletions and delete everything its
    deferred-deletion lists hold now, grace or not (`ckptd trash purge`; `stop` set, the
    root's lease lost: no further request); return what went."""
    url, store = open_root_store(root)
    job = _job(root_config_only(root), root, url, store, False, False, None, history)
    job = dataclasses.replace(job, keep_going=_combined(None, stop))
    return _finish_leftovers(job, now, everything=True)


def root_config_only(root: RootConfig) -> Config:
    """Given a root, return a config holding just it (what the trash commands need of one)."""
    return Config(roots=[root])
