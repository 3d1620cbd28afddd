"""The safety guard: Plan + Facts -> Plan, pure (DESIGN.md, "Safety").

Given the policy's plan and the facts of one /proc pass (daemon.safety.facts), turn every
deletion the invariants forbid into a keep with its reason, or raise `RootRefused` when the
whole root must be left alone. No I/O, no clock: `facts.now` is the time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from daemon.errors import SafetyRefusal
from daemon.fsio import TRASH_DIRECTORY
from daemon.safety.facts import Facts, Holder
from policies.model import Checkpoint, Decision, Plan
from policies.slim import slim_blockers, unslim


@dataclass(frozen=True, slots=True)
class SafetySettings:
    """The per-root safety knobs (`settings_for` in daemon.config) plus the run's --force."""

    min_keep: int = 3
    max_delete_fraction: float = 0.9
    force: bool = False
    # An incomplete save flagged abandoned may go only once nothing was written in it this long.
    abandoned_after: float = 3600.0


class RootRefused(SafetyRefusal):
    """The whole root is refused for this run; `holders` names the processes involved.

    `transient`: the refusal clears by itself (the trainer lets go of the newest checkpoint);
    otherwise only a person can clear it (a config change, `--force`).
    """

    def __init__(
        self,
        root: str,
        reason: str,
        holders: tuple[Holder, ...] = (),
        *,
        transient: bool = True,
    ) -> None:
        self.root = root
        self.reason = reason
        self.holders = holders
        self.transient = transient
        super().__init__(f"refusing to prune {root}: {reason}")


def _is_direct_entry(name: str) -> bool:
    """Given an entry name, return whether it names something directly inside a root."""
    return (
        bool(name)
        and "/" not in name
        and "\0" not in name
        and name not in (".", "..")
        and name != TRASH_DIRECTORY
    )


def _live_newest(decisions: Iterable[Decision], *, complete_only: bool) -> dict[str, Checkpoint]:
    """Given decisions, return each series' newest checkpoint of the live run: the highest
    (step, version) among those in no abandoned branch (a restart's stale higher steps are not
    the newest: the restarted run's are); a series with no live checkpoint, among all of it."""
    live: dict[str, Checkpoint] = {}
    anywhere: dict[str, Checkpoint] = {}
    for decision in decisions:
        checkpoint = decision.checkpoint
        if complete_only and not checkpoint.complete:
            continue
        newest = live if decision.branch is None else anywhere
        current = newest.get(checkpoint.series)
        if current is None or _rank(checkpoint) > _rank(current):
            newest[checkpoint.series] = checkpoint
    return {**anywhere, **live}


def _rank(checkpoint: Checkpoint) -> tuple[int, int]:
    return checkpoint.step, checkpoint.version


def _newest_by_series(decisions: Iterable[Decision], *, complete_only: bool) -> set[str]:
    return {c.name for c in _live_newest(decisions, complete_only=complete_only).values()}


def _kept(decision: Decision, *reasons: str) -> Decision:
    """Given a decision the guard overrides, return it as kept with the guard's reasons first."""
    carried = decision.reasons if decision.keep else ()
    merged = tuple(dict.fromkeys((*reasons, *carried)))
    return replace(decision, keep=True, reasons=merged)


def _slim_guarded(
    decision: Decision, facts: Facts, settings: SafetySettings, newest_complete: set[str]
) -> Decision:
    """Given a kept decision, return it with its slim turned down when an invariant forbids
    it: what forbids a deletion, plus the protections added after the policy (holds,
    `last-good`). A slim moves the resume state out, and a resume needs exactly that."""
    if not decision.slim:
        return decision
    reasons = _veto_reasons(decision, facts, settings, newest_complete)
    reasons += [kind for kind in slim_blockers(decision) if kind not in reasons]
    if not reasons:
        return decision
    return unslim(decision, "slim-vetoed:" + ", ".join(reasons))


def refusal(plan: Plan, facts: Facts, settings: SafetySettings) -> RootRefused | None:
    """Given a plan and the facts, return why the whole root must be left alone, or None.

    The trainer holding (open file, map, cwd) the newest checkpoint of any series (the newest
    complete one or any above it) refuses the root: the trainer is mid-save or mid-resume. A
    save that is merely settling does not: it is incomplete, so it is never deleted and is not
    the newest complete one, and a trainer that saves every few seconds must still be pruned
    while it runs.
    """
    # "The newest" is the newest complete checkpoint of each series' live run and anything of
    # that run above it (a save in progress); a restarted run writes below the stale higher
    # steps of the run it abandoned, and the checkpoint it is writing is the one that matters.
    floors = _live_newest(plan.decisions, complete_only=True)
    for decision in plan.decisions:
        checkpoint = decision.checkpoint
        floor = floors.get(checkpoint.series)
        if decision.branch is not None or (floor is not None and _rank(checkpoint) < _rank(floor)):
            continue
        trainer_holders = tuple(
            holder for holder in facts.holders_of(checkpoint) if facts.is_trainer(holder)
        )
        if trainer_holders:
            holder = trainer_holders[0]
            return RootRefused(
                plan.root,
                f"the trainer {holder.describe()} holds the newest checkpoint "
                f"{checkpoint.name} ({holder.how} {holder.path})",
                trainer_holders,
            )
    return None


def is_abandoned(checkpoint: Checkpoint, facts: Facts, settings: SafetySettings) -> bool:
    """Given a checkpoint, the facts and the settings, return whether it is an abandoned save
    the guard lets go: incomplete, flagged abandoned, nothing written in it for
    `abandoned_after`, and no process holding anything in it."""
    return (
        not checkpoint.complete
        and checkpoint.abandoned
        and 0 < checkpoint.mtime <= facts.now - settings.abandoned_after
        and not facts.holders_of(checkpoint)
    )


def _veto_reasons(
    decision: Decision, facts: Facts, settings: SafetySettings, newest_complete: set[str]
) -> list[str]:
    """Given a planned deletion, the facts, the settings and the newest complete checkpoints,
    return every invariant that forbids it (empty when it may go)."""
    checkpoint = decision.checkpoint
    reasons: list[str] = []
    if checkpoint.name in newest_complete:
        reasons.append("newest")
    if not checkpoint.complete and not is_abandoned(checkpoint, facts, settings):
        reasons.append("incomplete")
    if checkpoint.tracked_by:
        reasons.append("tracked")
    if checkpoint.pinned_by:
        reasons.append("pinned")
    bad = [member for member in checkpoint.members if not _is_direct_entry(member)]
    if bad or not _is_direct_entry(checkpoint.name):
        reasons.append(f"outside-root:{(bad or [checkpoint.name])[0]!r}")
    reasons.extend(f"in-use:{holder.describe()}" for holder in facts.holders_of(checkpoint))
    return reasons


def _with_min_keep(guarded: list[Decision], min_keep: int) -> list[Decision]:
    """Given the guarded decisions, return them with, per series, the newest deletions kept
    back until `min_keep` complete checkpoints survive.

    The policy may thin a series to nothing (a keep_last: 1 rotation beside well-kept epoch
    checkpoints). Only complete checkpoints count: a crashed save kept as incomplete is nothing
    to resume from.
    """
    result = list(guarded)
    by_series: dict[str, list[int]] = {}
    for index, decision in enumerate(result):
        by_series.setdefault(decision.checkpoint.series, []).append(index)
    for indexes in by_series.values():
        survivors = sum(1 for i in indexes if result[i].keep and result[i].checkpoint.complete)
        if survivors >= min_keep:
            continue
        # Keeping an abandoned save back would not help: it is nothing to resume from.
        # The live run's newest first, an abandoned branch's after it.
        deleted_newest_first = sorted(
            (i for i in indexes if not result[i].keep and result[i].checkpoint.complete),
            key=lambda i: (result[i].branch is None, _rank(result[i].checkpoint)),
            reverse=True,
        )
        for index in deleted_newest_first[: min_keep - survivors]:
            result[index] = _kept(result[index], f"min_keep:{min_keep}")
    return result


def _fraction_refusal(
    root: str, guarded: list[Decision], settings: SafetySettings
) -> RootRefused | None:
    """Given the guarded decisions, return the refusal when they delete more than
    `max_delete_fraction` of the root without `force`, else None."""
    deleting = sum(1 for decision in guarded if not decision.keep)
    total = len(guarded)
    if not total or deleting / total <= settings.max_delete_fraction or settings.force:
        return None
    return RootRefused(
        root,
        f"the plan deletes {deleting} of {total} checkpoints "
        f"({deleting / total:.0%}), more than max_delete_fraction "
        f"{settings.max_delete_fraction:.0%}; check the policy or pass --force",
        transient=False,
    )


def guard(plan: Plan, facts: Facts, settings: SafetySettings) -> Plan:
    """Given a policy's plan, the facts and the settings, return the plan the invariants allow.

    Deletions of the newest complete checkpoint (per series), anything incomplete (but an
    abandoned save: `is_abandoned`), tracked, pinned, held by a process or not a plain entry
    directly inside the root become keeps with the reason, and slims of such checkpoints (or
    of held or `last-good` ones) keeps whole; then, per series, the newest deletions are kept
    back until `min_keep` complete checkpoints survive. Raises `RootRefused` when the trainer
    holds the newest checkpoint, or when the run would delete more than `max_delete_fraction`
    of the root without `force`.
    """
    refused = refusal(plan, facts, settings)
    if refused is not None:
        raise refused
    newest_complete = _newest_by_series(plan.decisions, complete_only=True)
    guarded: list[Decision] = []
    for decision in plan.decisions:
        if decision.keep:
            guarded.append(_slim_guarded(decision, facts, settings, newest_complete))
            continue
        reasons = _veto_reasons(decision, facts, settings, newest_complete)
        guarded.append(_kept(decision, *reasons) if reasons else decision)
    guarded = _with_min_keep(guarded, settings.min_keep)
    refused = _fraction_refusal(plan.root, guarded, settings)
    if refused is not None:
        raise refused
    return replace(plan, decisions=tuple(guarded))


def vetoed(before: Plan, after: Plan) -> tuple[Decision, ...]:
    """Given the policy's plan and the guarded one, return the deletions and the slims the
    guard turned down."""
    planned = {decision.checkpoint.name for decision in before.deleted}
    planned_slims = {decision.checkpoint.name for decision in before.slimmed}
    return tuple(
        decision
        for decision in after.decisions
        if (decision.keep and decision.checkpoint.name in planned)
        or (not decision.slim and decision.checkpoint.name in planned_slims)
    )
