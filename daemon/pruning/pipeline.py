"""Scan, plan, guard, delete, record: the one safety-checked prune path.

`ckptd prune`, the daemon's jobs and the disk check's escalation all call `prune_root`. In order:
finish a trash a crash left behind, purge trash past its grace, remove expired holds, scan and
plan the root (checking each checkpoint never checked before: a corrupt one is recorded and
alerted on, see `daemon/verification.py`), gather the process facts in one pass, let the safety
guard veto or refuse, then hand the guarded plan to `deleter.apply` and write one `prune_run`
record — unless the run did nothing at all (`did_nothing`): the daemon prunes after every
checkpoint, and a row per idle run would bury the rows that matter; those runs are counted, and
the root's next `prune_run` says how many (`quiet_runs`). A dry run writes no `prune_refused`:
it was asked to change nothing.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.clock import zone_for
from daemon.config import Config, RootConfig, policy_for, settings_for
from daemon.discovery.sizecache import SizeCache
from daemon.fsio import LOCAL, FileSystem
from daemon.history.events import PruneRefused, PruneRun, Veto
from daemon.history.log import NULL_HISTORY, History
from daemon.integrity.result import IntegrityResult
from daemon.planner import plan_root
from daemon.pruning import deleter, leasing, slimmer, trash
from daemon.pruning.deleter import ApplyResult
from daemon.pruning.lock import LOCK_FILE, root_lock
from daemon.pruning.slimmer import SlimResult
from daemon.pruning.trash import PurgeResult
from daemon.pruning.trashdir import TrashRefused
from daemon.rootdir import IdentityStore, RootChanged, RootDir, open_root, root_key
from daemon.safety import facts as proc_facts
from daemon.safety import guard
from daemon.storage.url import is_remote
from daemon.verification import VerificationState, expire_and_record, record_corrupt
from policies.model import Checkpoint, Decision, Plan, PolicySpec, policy_record
from policies.slim import unslim

__all__ = ["LOCK_FILE", "PruneReport", "Refusal", "prune_root", "root_lock"]


@dataclass(frozen=True)
class Refusal:
    """Given a root refused for this run: why, and whether that clears by itself (a save
    finishing, the newest checkpoint settling) or needs a person (a limit, `--force`)."""

    reason: str
    transient: bool = True


@dataclass(frozen=True)
class PruneReport:
    """Given one prune run of one root: what was planned, refused, deleted, vetoed, freed.

    Its parts: `refusal` (the whole root refused, exit 3), `aborted` (the person said no),
    `guard_vetoes` (deletions the safety guard turned down, with their reasons), `applied`
    (what the deleter did: deleted, vetoed at the last moment, failed, left in the trash; for
    a dry run what it would do), `purge` (the trash finished first: crash repairs in its notes,
    items past their grace removed), `notes` (what the process scan and the plan warned of).
    """

    root: str
    plan: Plan  # after the safety guard: vetoed checkpoints are kept with their reason
    dry_run: bool
    refusal: Refusal | None = None
    aborted: bool = False
    guard_vetoes: tuple[tuple[str, str], ...] = ()  # (name, reason)
    applied: ApplyResult = field(default_factory=ApplyResult)
    purge: PurgeResult = field(default_factory=PurgeResult)
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    # What the slims did (issue 11): slimmed, vetoed at the last moment, failed, in the trash.
    slims: SlimResult = field(default_factory=SlimResult)

    @property
    def refused(self) -> str | None:
        """Why the whole root was refused, else None."""
        return self.refusal.reason if self.refusal is not None else None

    @property
    def refusal_transient(self) -> bool:
        """Whether the refusal (if any) clears by itself; True when there is none."""
        return self.refusal.transient if self.refusal is not None else True

    @property
    def deleted(self) -> tuple[str, ...]:
        return self.applied.deleted

    @property
    def veto_reasons(self) -> dict[str, str]:
        """Every vetoed checkpoint (the guard's first, then the last moment's) with its reason."""
        reasons = dict(self.guard_vetoes)
        reasons.update(self.applied.vetoed)
        reasons.update(self.slims.vetoed)
        return reasons

    @property
    def vetoed(self) -> tuple[str, ...]:
        return tuple(self.veto_reasons)

    @property
    def failed(self) -> tuple[str, ...]:
        """The checkpoints whose deletion or slim failed (exit 1)."""
        return tuple(name for name, _ in (*self.applied.failed, *self.slims.failed))

    @property
    def errors(self) -> tuple[str, ...]:
        """One `name: error` line per failed deletion or slim."""
        failures = (*self.applied.failed, *self.slims.failed)
        return tuple(f"{name}: {message}" for name, message in failures)

    @property
    def bytes_freed(self) -> int:
        """Bytes really freed (allocated bytes the filesystem got back): by the deletions and
        by the purge of the trash before them."""
        return self.applied.bytes_freed + self.purge.bytes_freed

    @property
    def bytes_logical(self) -> int:
        """The logical size (the files' lengths) of what `bytes_freed` counts."""
        return self.applied.bytes_logical + self.purge.bytes_logical


# Given the report of the guarded plan (nothing deleted yet), return whether to go ahead.
Confirm = Callable[[PruneReport], bool]


@dataclass(frozen=True)
class _Job:
    """Given one prune of one root: its settings, resolved once, and where it records."""

    config: Config
    root: RootConfig
    root_path: str
    root_dir: RootDir
    dry_run: bool
    force: bool
    policy_override: PolicySpec | None
    history: History
    fs: FileSystem
    cache: SizeCache | None
    safety: guard.SafetySettings
    grace: float
    policy: dict[str, object]
    verification: VerificationState
    on_checked: Callable[[IntegrityResult], None] | None = None

    def look(self, now: float) -> tuple[Plan, proc_facts.Facts]:
        """Given the time, return the root's plan and the process facts (one pass each); record
        the checkpoints found corrupt by the checks this planning made (not in a dry run)."""
        checked: list[IntegrityResult] = []
        _scan, plan = plan_root(
            self.config,
            self.root,
            now=now,
            fs=self.fs,
            cache=self.cache,
            policy_override=self.policy_override,
            verification=self.verification,
            check_new=True,
            on_checked=checked.append,
        )
        if not self.dry_run:
            record_corrupt(self.config, self.root_path, checked, self.history)
            if self.on_checked is not None:
                for result in checked:
                    self.on_checked(result)
        facts = proc_facts.gather_facts(
            self.root_path,
            now=now,
            trainer_pid_file=self.root.trainer.pid_file,
            trainer_cmdline=self.root.trainer.cmdline,
        )
        return plan, facts


def safety_settings(
    config: Config, root: RootConfig, *, force: bool = False
) -> guard.SafetySettings:
    """Given a root (and the run's --force), return the safety knobs its prunes run under:
    local and object-storage prunes alike, and what `ckptd plan` warns by."""
    settings = settings_for(config, root)
    return guard.SafetySettings(
        min_keep=settings.min_keep,
        max_delete_fraction=settings.max_delete_fraction,
        force=force,
        abandoned_after=settings.abandoned_after,
    )


def _job_for(
    config: Config,
    root: RootConfig,
    root_dir: RootDir,
    *,
    dry_run: bool,
    force: bool,
    policy_override: PolicySpec | None,
    history: History,
    fs: FileSystem,
    cache: SizeCache | None,
    verification: VerificationState | None,
    on_checked: Callable[[IntegrityResult], None] | None,
) -> _Job:
    """Given prune_root's arguments, return the job with the root's settings resolved."""
    settings = settings_for(config, root)
    spec = policy_override or policy_for(config, root)
    return _Job(
        config=config,
        root=root,
        root_path=root_dir.path,
        root_dir=root_dir,
        dry_run=dry_run,
        force=force,
        policy_override=policy_override,
        history=history,
        fs=fs,
        cache=cache,
        safety=safety_settings(config, root, force=force),
        grace=settings.trash_grace,
        policy=policy_record(spec),
        verification=verification or VerificationState.in_folder(config.state_dir),
        on_checked=on_checked,
    )


def _same_content(before: Checkpoint, after: Checkpoint) -> bool:
    return (before.members, before.mtime, before.size_bytes, before.complete) == (
        after.members,
        after.mtime,
        after.size_bytes,
        after.complete,
    )


def only_confirmed(fresh: Plan, confirmed: Plan) -> Plan:
    """Given a fresh guarded plan and the one a person confirmed, return the fresh plan with
    every deletion that was not confirmed, or whose checkpoint changed since, kept instead;
    and every such slim kept whole."""
    shown = {d.checkpoint.name: d.checkpoint for d in confirmed.deleted}
    shown_slims = {d.checkpoint.name: d.checkpoint for d in confirmed.slimmed}
    decisions: list[Decision] = []
    for decision in fresh.decisions:
        checkpoint = decision.checkpoint
        if decision.slim:
            decisions.append(_slim_confirmed(decision, shown_slims.get(checkpoint.name)))
            continue
        before = shown.get(checkpoint.name)
        if decision.keep or (before is not None and _same_content(before, checkpoint)):
            decisions.append(decision)
        elif before is None:
            decisions.append(dataclasses.replace(decision, keep=True, reasons=("not-confirmed",)))
        else:
            reason = "changed-since-confirmed"
            decisions.append(dataclasses.replace(decision, keep=True, reasons=(reason,)))
    return dataclasses.replace(fresh, decisions=tuple(decisions))


def _slim_confirmed(decision: Decision, before: Checkpoint | None) -> Decision:
    """Given a fresh slim and the checkpoint as confirmed (None: not shown), return the slim
    if it was confirmed unchanged, else the checkpoint kept whole with why."""
    if before is None:
        return unslim(decision, "not-confirmed")
    if not _same_content(before, decision.checkpoint):
        return unslim(decision, "changed-since-confirmed")
    return decision


def _refuse(job: _Job, report: PruneReport, refused: guard.RootRefused) -> PruneReport:
    """Given the guard's refusal of the whole root, record it (not for a dry run: it refused
    nothing that was asked for); return the refused report."""
    if job.dry_run:
        return dataclasses.replace(report, refusal=Refusal(refused.reason, refused.transient))
    job.history.record(
        PruneRefused(
            root=job.root_path,
            reason=refused.reason,
            pids=tuple(holder.pid for holder in refused.holders),
            cmdlines=tuple(holder.cmdline for holder in refused.holders),
            dry_run=job.dry_run,
        )
    )
    return dataclasses.replace(report, refusal=Refusal(refused.reason, refused.transient))


def _record_vetoes(job: _Job, vetoes: tuple[Decision, ...], already: set[str]) -> None:
    """Given the guard's vetoes, record those not recorded yet (a dry run records none)."""
    if job.dry_run:
        return
    for decision in vetoes:
        if decision.checkpoint.name in already:
            continue
        job.history.record(
            Veto(
                root=job.root_path,
                checkpoint=decision.checkpoint.name,
                step=decision.checkpoint.step,
                reason=", ".join(decision.reasons),
            )
        )


def _reasons(vetoes: tuple[Decision, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((d.checkpoint.name, ", ".join(d.reasons)) for d in vetoes)


def _guarded(job: _Job, report: PruneReport, facts: proc_facts.Facts) -> PruneReport:
    """Given the report of a fresh plan, let the guard veto or refuse; record its vetoes."""
    try:
        guarded = guard.guard(report.plan, facts, job.safety)
    except guard.RootRefused as refused:
        return _refuse(job, report, refused)
    vetoes = guard.vetoed(report.plan, guarded)
    _record_vetoes(job, vetoes, set())
    return dataclasses.replace(report, plan=guarded, guard_vetoes=_reasons(vetoes))


@dataclass(frozen=True)
class _Answer:
    """Given a confirmation asked for: the report to go on with, at the time of the answer."""

    report: PruneReport
    now: float
    done: bool  # declined, or the fresh plan refused: `report` is final


def _confirmed(job: _Job, preview: PruneReport, confirm: Confirm, now: float) -> _Answer:
    """Given the guarded plan's report, ask; on yes, plan again at the time of the answer."""
    asked_at = time.monotonic()
    if not confirm(preview):
        return _Answer(dataclasses.replace(preview, aborted=True), now, done=True)
    # The answer may come minutes later: a new checkpoint, tracker or pin since, or a
    # checkpoint replaced under its name, must count. Plan again at the time of the answer
    # and delete only what both plans delete, unchanged (nothing the person was not shown).
    now += time.monotonic() - asked_at
    plan, facts = job.look(now)
    try:
        fresh = guard.guard(plan, facts, job.safety)
    except guard.RootRefused as refused:
        replanned = dataclasses.replace(preview, plan=plan, guard_vetoes=())
        return _Answer(_refuse(job, replanned, refused), now, done=True)
    guarded = only_confirmed(fresh, preview.plan)
    vetoes = guard.vetoed(plan, guarded)
    _record_vetoes(job, vetoes, {name for name, _ in preview.guard_vetoes})
    report = dataclasses.replace(preview, plan=guarded, guard_vetoes=_reasons(vetoes))
    return _Answer(report, now, done=False)


class _QuietRuns:
    """Given runs that did nothing (nothing deleted, vetoed, failed, purged or repaired): they
    write no `prune_run`; each history counts them per root (the daemon keeps one history for
    its life) and the root's next `prune_run` says how many there were (`quiet_runs`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: weakref.WeakKeyDictionary[History, Counter[str]] = weakref.WeakKeyDictionary()

    def add(self, history: History, root_path: str) -> None:
        with self._lock:
            self._counts.setdefault(history, Counter())[root_path] += 1

    def take(self, history: History, root_path: str) -> int:
        with self._lock:
            counts = self._counts.get(history)
            return counts.pop(root_path, 0) if counts is not None else 0


QUIET_RUNS = _QuietRuns()


def did_nothing(report: PruneReport) -> bool:
    """Given a finished run, return whether it changed and found nothing worth a history row:
    nothing deleted, vetoed, failed, purged or repaired (a dry run: nothing it would do)."""
    applied, purged = report.applied, report.purge
    if report.veto_reasons or applied.failed:
        return False
    if report.dry_run:
        return not applied.would_delete
    return not (
        applied.deleted or applied.trashed or purged.removed or purged.failed or purged.notes
    )


def _record_run(job: _Job, report: PruneReport) -> None:
    if did_nothing(report):
        if not job.dry_run:
            QUIET_RUNS.add(job.history, job.root_path)
        return
    quiet = 0 if job.dry_run else QUIET_RUNS.take(job.history, job.root_path)
    job.history.record(
        run_record(report, root=job.root_path, force=job.force, policy=job.policy, quiet=quiet)
    )


def run_record(
    report: PruneReport, *, root: str, force: bool, policy: dict[str, object], quiet: int = 0
) -> PruneRun:
    """Given a finished run's report, the root's name in the history, whether it was forced,
    its policy and the quiet runs before it, return its `prune_run` record (a local root's and
    an object-storage root's alike)."""
    applied = report.applied
    return PruneRun(
        root=root,
        dry_run=report.dry_run,
        checkpoints=len(report.plan.decisions),
        kept=len(report.plan.decisions) - len(applied.deleted),
        deleted=len(applied.deleted),
        would_delete=len(applied.would_delete),
        vetoed=len(report.veto_reasons),
        failed=len(applied.failed),
        trashed=len(applied.trashed),
        bytes_freed=report.bytes_freed,
        bytes_in_trash=applied.bytes_in_trash,
        seconds=round(report.seconds, 3),
        force=force,
        policy=policy,
        quiet_runs=quiet or None,
        bytes_logical=report.bytes_logical,
        **_slim_counts(report),
    )


def _slim_counts(report: PruneReport) -> dict[str, int]:
    """Given a run's report, return the `prune_run` record's slim figures: none unless the run
    slimmed or would slim anything (a run without slims keeps the record's earlier shape)."""
    slims = report.slims
    if not (slims.slimmed or slims.would_slim or slims.failed or slims.vetoed):
        return {}
    return {
        "slimmed": len(slims.slimmed) or len(slims.would_slim),
        "bytes_slimmed": slims.bytes_freed or slims.would_free,
    }


def _prune_unlocked(
    job: _Job,
    *,
    now: float,
    stop: threading.Event | None,
    confirm: Confirm | None,
    progress: deleter.Progress | None,
) -> PruneReport:
    """Given the job and the time, prune the root (the root lock held by the caller)."""
    started = time.monotonic()
    purged = PurgeResult()
    if not job.dry_run:
        purged = trash.finish_leftovers(
            job.root_dir, now=now, grace=job.grace, fs=job.fs, history=job.history
        )
        expire_and_record(
            job.root_path,
            now=now,
            tz=zone_for(job.config),
            history=job.history,
            opened=job.root_dir.fd,
        )
    plan, facts = job.look(now)
    report = PruneReport(
        root=job.root_path,
        plan=plan,
        dry_run=job.dry_run,
        purge=purged,
        notes=(*facts.notes, *plan.warnings),
    )
    report = _guarded(job, report, facts)
    changes = report.plan.deleted or report.plan.slimmed
    if report.refusal is None and confirm is not None and not job.dry_run and changes:
        answer = _confirmed(job, report, confirm, now)
        report, now = answer.report, answer.now
        if answer.done:
            return dataclasses.replace(report, seconds=time.monotonic() - started)
    if report.refusal is None and not job.dry_run:
        report = _still_the_root(job, report)
    if report.refusal is not None:
        return dataclasses.replace(report, seconds=time.monotonic() - started)
    applied = deleter.apply(
        report.plan,
        job.root_dir,
        dry_run=job.dry_run,
        now=now,
        fs=job.fs,
        history=job.history,
        trash_grace=job.grace,
        stop=stop,
        progress=progress,
        policy=job.policy,
    )
    slims = slimmer.apply(
        report.plan,
        job.root_dir,
        dry_run=job.dry_run,
        now=now,
        fs=job.fs,
        history=job.history,
        trash_grace=job.grace,
        stop=stop,
        policy=job.policy,
        cache=job.cache,
    )
    report = dataclasses.replace(
        report, applied=applied, slims=slims, seconds=time.monotonic() - started
    )
    _record_run(job, report)
    return report


def _still_the_root(job: _Job, report: PruneReport) -> PruneReport:
    """Given the guarded plan, refuse it when the root's path no longer leads to the folder
    opened at the start: discovery read the root by path, so the plan may be of another
    folder (deleting still goes by the opened descriptor, never by path)."""
    try:
        job.root_dir.verify_path()
    except RootChanged as changed:
        refused = guard.RootRefused(job.root_path, str(changed), transient=False)
        return _refuse(job, report, refused)
    return report


def _refused_early(
    root_path: str, reason: str, history: History, store: IdentityStore | None, key: str
) -> PruneReport:
    """Given a root refused before planning (its identity changed, its trash is not ckptd's),
    record that once (the same refusal again is only in `status`); return the report."""
    if store is None or store.note_refusal(key, reason):
        history.record(PruneRefused(root=root_path, reason=reason, pids=(), cmdlines=()))
    return PruneReport(
        root=root_path,
        plan=Plan(root=root_path, decisions=()),
        dry_run=False,
        refusal=Refusal(reason, transient=False),
    )


def prune_root(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    dry_run: bool,
    force: bool = False,
    policy_override: PolicySpec | None = None,
    history: History = NULL_HISTORY,
    fs: FileSystem = LOCAL,
    cache: SizeCache | None = None,
    stop: threading.Event | None = None,
    confirm: Confirm | None = None,
    progress: deleter.Progress | None = None,
    identities: IdentityStore | None = None,
    verification: VerificationState | None = None,
    on_checked: Callable[[IntegrityResult], None] | None = None,
) -> PruneReport:
    """Given the config, a root and the time, prune it through the safety guard and report.

    `stop` set means: finish the deletion in progress, start no other (SIGTERM). `confirm`
    (the CLI's `[y/N]`) sees the guarded plan before anything is deleted; False ends the run
    with nothing deleted. `progress(done, total, name)` is told before each removal. A second
    prune of the same root while one runs (daemon and CLI) is refused, not queued.

    The root is opened once and must be the folder recorded when it was first seen
    (`identities`, by default `<state_dir>/roots.json` when state_dir exists: see
    daemon/rootdir.py), and its trash ckptd's own; otherwise the root is refused (not
    transient: a person must look), recorded in the history once.
    `verification` is the integrity state to use and keep (default: `<state_dir>`'s, saved
    there after the run when that folder exists; a dry run saves nothing). `on_checked` is told
    each integrity check this run made (not in a dry run): the daemon's deep pass takes them.
    """
    # A shared root: only the holder of its lease prunes (daemon/pruning/leasing.py).
    lease = leasing.check(config, root, dry_run=dry_run, history=history)
    if lease.refusal is not None:
        return _refused_by_lease(leasing.report_root(root), lease.refusal.reason)
    stop = lease.guard(stop)
    if is_remote(root.path):
        # Object storage: no folder to open, lock or rename in; see daemon/pruning/remote.py.
        from daemon.pruning.remote import prune_remote_root

        return prune_remote_root(
            config,
            root,
            now=now,
            dry_run=dry_run,
            force=force,
            policy_override=policy_override,
            history=history,
            stop=stop,
            confirm=confirm,
            progress=progress,
        )
    store = identities if identities is not None else IdentityStore.in_state_dir(config.state_dir)
    key = root_key(root.path)
    try:
        root_dir = open_root(root.path, store=store)  # UsageError when it is not a folder
    except RootChanged as changed:
        return _refused_early(key, str(changed), history, store, key)
    with root_dir:
        job = _job_for(
            config,
            root,
            root_dir,
            dry_run=dry_run,
            force=force,
            policy_override=policy_override,
            history=history,
            fs=fs,
            cache=cache,
            verification=verification,
            on_checked=on_checked,
        )
        if dry_run:
            return _prune_unlocked(job, now=now, stop=stop, confirm=confirm, progress=progress)
        try:
            with root_lock(root_dir, fs) as acquired:
                if acquired:
                    report = _prune_unlocked(
                        job, now=now, stop=stop, confirm=confirm, progress=progress
                    )
                    _keep_verification(job, report)
                    if store is not None:
                        store.clear_refusal(key)
                    return report
        except TrashRefused as refused:
            return _refused_early(job.root_path, str(refused), history, store, key)
    reason = "another prune of this root is running (the daemon, or ckptd prune)"
    history.record(PruneRefused(root=job.root_path, reason=reason, pids=(), cmdlines=()))
    return PruneReport(
        root=job.root_path,
        plan=Plan(root=job.root_path, decisions=()),
        dry_run=False,
        refusal=Refusal(reason),
    )


def _refused_by_lease(root_path: str, reason: str) -> PruneReport:
    """Given a shared root whose lease another node holds, return the refused report (not
    transient: it clears when that node's lease expires, and the daemon's lease job then
    takes it over and prunes)."""
    return PruneReport(
        root=root_path,
        plan=Plan(root=root_path, decisions=()),
        dry_run=False,
        refusal=Refusal(reason, transient=False),
    )


def _keep_verification(job: _Job, report: PruneReport) -> None:
    """Given a finished run, forget the integrity results of checkpoints gone and save the rest
    (saved even when refused: a checkpoint checked and recorded corrupt is not recorded again)."""
    if report.plan.decisions:
        gone = set(report.deleted)
        job.verification.retain(
            job.root_path,
            [d.checkpoint.name for d in report.plan.decisions if d.checkpoint.name not in gone],
        )
    job.verification.save(tests=False)
