"""Scan, plan, guard, delete, record: the one safety-checked prune path.

`ckptd prune`, the daemon's jobs and the disk check's escalation all call `prune_root`. In order:
finish a trash a crash left behind, purge trash past its grace, scan and plan the root, gather
the process facts in one pass, let the safety guard veto or refuse, then hand the guarded plan
to `deleter.apply` and write one `prune_run` record.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.config import Config, RootConfig, policy_for, settings_for
from daemon.discovery.sizecache import SizeCache
from daemon.errors import UsageError
from daemon.fsio import LOCAL, FileSystem
from daemon.history.log import HistoryLog
from daemon.planner import plan_root
from daemon.pruning import deleter, trash
from daemon.pruning.trash import LOCK_FILE, root_lock
from daemon.safety import facts as proc_facts
from daemon.safety import guard
from policies.model import Checkpoint, Decision, Plan, PolicySpec

__all__ = ["LOCK_FILE", "PruneReport", "prune_root", "root_lock"]


@dataclass(frozen=True)
class PruneReport:
    """Given one prune run of one root: what was planned, refused, deleted, vetoed, freed."""

    root: str
    plan: Plan  # after the safety guard: vetoed checkpoints are kept with their reason
    dry_run: bool
    refused: str | None = None  # why the whole root was refused (exit 3), else None
    # Whether that refusal clears by itself (a save finishing) or needs a person (a limit).
    refusal_transient: bool = True
    deleted: tuple[str, ...] = ()
    vetoed: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()  # names whose deletion failed (exit 1)
    errors: tuple[str, ...] = ()
    bytes_freed: int = 0
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


# Given the report of the guarded plan (nothing deleted yet), return whether to go ahead.
Confirm = Callable[[PruneReport], bool]


def _policy_record(spec: PolicySpec) -> dict[str, object]:
    record: dict[str, object] = dataclasses.asdict(spec)
    return record


def _same_content(before: Checkpoint, after: Checkpoint) -> bool:
    return (before.members, before.mtime, before.size_bytes, before.complete) == (
        after.members,
        after.mtime,
        after.size_bytes,
        after.complete,
    )


def only_confirmed(fresh: Plan, confirmed: Plan) -> Plan:
    """Given a fresh guarded plan and the one a person confirmed, return the fresh plan with
    every deletion that was not confirmed, or whose checkpoint changed since, kept instead."""
    shown = {d.checkpoint.name: d.checkpoint for d in confirmed.deleted}
    decisions: list[Decision] = []
    for decision in fresh.decisions:
        checkpoint = decision.checkpoint
        before = shown.get(checkpoint.name)
        if decision.keep or (before is not None and _same_content(before, checkpoint)):
            decisions.append(decision)
        elif before is None:
            decisions.append(dataclasses.replace(decision, keep=True, reasons=("not-confirmed",)))
        else:
            reason = "changed-since-confirmed"
            decisions.append(dataclasses.replace(decision, keep=True, reasons=(reason,)))
    return dataclasses.replace(fresh, decisions=tuple(decisions))


def _prune_unlocked(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    dry_run: bool,
    force: bool = False,
    policy_override: PolicySpec | None = None,
    history: HistoryLog | None = None,
    fs: FileSystem = LOCAL,
    cache: SizeCache | None = None,
    stop: threading.Event | None = None,
    confirm: Confirm | None = None,
    progress: deleter.Progress | None = None,
) -> PruneReport:
    """Given the config, a root and the time, prune it (the root lock held by the caller).

    `stop` set means: finish the deletion in progress, start no other (SIGTERM). `confirm`
    (the CLI's `[y/N]`) sees the guarded plan before anything is deleted; False ends the run
    with nothing deleted. `progress(done, total, name)` is told before each deletion.
    """
    started = time.monotonic()
    root_path = os.path.realpath(root.path)
    if not os.path.isdir(root_path):
        raise UsageError(f"{root.path}: not a folder")
    settings = settings_for(config, root)
    grace = settings.trash_grace
    spec = policy_override or policy_for(config, root)
    policy = _policy_record(spec)

    purged = trash.PurgeResult()
    if not dry_run:
        purged = trash.finish_leftovers(root_path, now=now, grace=grace, fs=fs, history=history)

    _scan, plan = plan_root(
        config, root, now=now, fs=fs, cache=cache, policy_override=policy_override
    )
    facts = proc_facts.gather_facts(
        root_path,
        now=now,
        trainer_pid_file=root.trainer.pid_file,
        trainer_cmdline=root.trainer.cmdline,
    )
    safety_settings = guard.SafetySettings(
        min_keep=settings.min_keep,
        max_delete_fraction=settings.max_delete_fraction,
        settle_seconds=settings.settle_seconds,
        force=force,
    )
    extra: dict[str, object] = {
        "recovered": list(purged.notes),
        "purged": list(purged.removed),
        "purge_bytes_freed": purged.bytes_freed,
        "notes": list(facts.notes) + list(plan.warnings),
    }

    def refuse(refused: guard.RootRefused, refused_plan: Plan) -> PruneReport:
        if history is not None:
            history.write(
                "prune_refused",
                root=root_path,
                reason=refused.reason,
                pids=[holder.pid for holder in refused.holders],
                cmdlines=[holder.cmdline for holder in refused.holders],
                dry_run=dry_run,
            )
        return PruneReport(
            root=root_path,
            plan=refused_plan,
            dry_run=dry_run,
            refused=refused.reason,
            refusal_transient=refused.transient,
            bytes_freed=purged.bytes_freed,
            seconds=time.monotonic() - started,
            extra=extra,
        )

    def write_vetoes(decisions: tuple[Decision, ...], already: set[str]) -> None:
        if history is None or dry_run:
            return
        for decision in decisions:
            if decision.checkpoint.name in already:
                continue
            history.write(
                "veto",
                root=root_path,
                checkpoint=decision.checkpoint.name,
                step=decision.checkpoint.step,
                reason=", ".join(decision.reasons),
            )

    try:
        guarded = guard.guard(plan, facts, safety_settings)
    except guard.RootRefused as refused:
        return refuse(refused, plan)

    guard_vetoes = guard.vetoed(plan, guarded)
    write_vetoes(guard_vetoes, set())
    preview = PruneReport(
        root=root_path,
        plan=guarded,
        dry_run=dry_run,
        vetoed=tuple(d.checkpoint.name for d in guard_vetoes),
        extra=extra,
    )
    if confirm is not None and not dry_run and guarded.deleted:
        asked_at = time.monotonic()
        if not confirm(preview):
            extra["aborted"] = True
            return dataclasses.replace(preview, seconds=time.monotonic() - started)
        # The answer may come minutes later: a new checkpoint, tracker or pin since, or a
        # checkpoint replaced under its name, must count. Plan again at the time of the answer
        # and delete only what both plans delete, unchanged (nothing the person was not shown).
        now += time.monotonic() - asked_at
        _scan, plan = plan_root(
            config, root, now=now, fs=fs, cache=cache, policy_override=policy_override
        )
        facts = proc_facts.gather_facts(
            root_path,
            now=now,
            trainer_pid_file=root.trainer.pid_file,
            trainer_cmdline=root.trainer.cmdline,
        )
        try:
            fresh = guard.guard(plan, facts, safety_settings)
        except guard.RootRefused as refused:
            return refuse(refused, plan)
        guarded = only_confirmed(fresh, guarded)
        already = {d.checkpoint.name for d in guard_vetoes}
        guard_vetoes = guard.vetoed(plan, guarded)
        write_vetoes(guard_vetoes, already)

    result = deleter.apply(
        guarded,
        root_path,
        dry_run=dry_run,
        now=now,
        fs=fs,
        history=history,
        trash_grace=grace,
        stop=stop,
        progress=progress,
        policy=policy,
    )
    veto_reasons = {d.checkpoint.name: ", ".join(d.reasons) for d in guard_vetoes}
    veto_reasons.update(dict(result.vetoed))
    extra.update(
        {
            "veto_reasons": veto_reasons,
            "failures": dict(result.failed),
            "partial": list(result.partial),
            "trashed": list(result.trashed),
            "bytes_in_trash": result.bytes_in_trash,
            "skipped": list(result.skipped),
            "would_delete": list(result.would_delete),
            "would_free": result.would_free,
        }
    )
    seconds = time.monotonic() - started
    report = PruneReport(
        root=root_path,
        plan=guarded,
        dry_run=dry_run,
        deleted=result.deleted,
        vetoed=tuple(veto_reasons),
        failed=tuple(name for name, _ in result.failed),
        errors=tuple(f"{name}: {message}" for name, message in result.failed),
        bytes_freed=result.bytes_freed + purged.bytes_freed,
        seconds=seconds,
        extra=extra,
    )
    if history is not None:
        history.write(
            "prune_run",
            root=root_path,
            dry_run=dry_run,
            checkpoints=len(guarded.decisions),
            kept=len(guarded.decisions) - len(result.deleted),
            deleted=len(result.deleted),
            would_delete=len(result.would_delete),
            vetoed=len(veto_reasons),
            failed=len(result.failed),
            trashed=len(result.trashed),
            bytes_freed=report.bytes_freed,
            bytes_in_trash=result.bytes_in_trash,
            seconds=round(seconds, 3),
            force=force,
            policy=policy,
        )
    return report


def prune_root(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    dry_run: bool,
    force: bool = False,
    policy_override: PolicySpec | None = None,
    history: HistoryLog | None = None,
    fs: FileSystem = LOCAL,
    cache: SizeCache | None = None,
    stop: threading.Event | None = None,
    confirm: Confirm | None = None,
    progress: deleter.Progress | None = None,
) -> PruneReport:
    """Given the config, a root and the time, prune it through the safety guard and report.

    `stop` set means: finish the deletion in progress, start no other (SIGTERM). `confirm`
    (the CLI's `[y/N]`) sees the guarded plan before anything is deleted; False ends the run
    with nothing deleted. `progress(done, total, name)` is told before each removal. A second
    prune of the same root while one runs (daemon and CLI) is refused, not queued.
    """
    root_path = os.path.realpath(root.path)
    if not os.path.isdir(root_path):
        raise UsageError(f"{root.path}: not a folder")

    def run() -> PruneReport:
        return _prune_unlocked(
            config,
            root,
            now=now,
            dry_run=dry_run,
            force=force,
            policy_override=policy_override,
            history=history,
            fs=fs,
            cache=cache,
            stop=stop,
            confirm=confirm,
            progress=progress,
        )

    if dry_run:
        return run()
    with root_lock(root_path) as acquired:
        if acquired:
            return run()
    reason = "another prune of this root is running (the daemon, or ckptd prune)"
    if history is not None:
        history.write("prune_refused", root=root_path, reason=reason, pids=[], cmdlines=[])
    return PruneReport(
        root=root_path, plan=Plan(root=root_path, decisions=()), dry_run=False, refused=reason
    )
