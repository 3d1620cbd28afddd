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
    settle_seconds: float = 60.0
    force: bool = False


class RootRefused(SafetyRefusal):
    """The whole root is refused for this run; `holders` names the processes involved.

    `transient`: the refusal clears by itself (the trainer finishes its save, the newest
    checkpoint settles); otherwise only a person can clear it (a config change, `--force`).
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


def _is_settling(checkpoint: Checkpoint, now: float, settle_seconds: float) -> bool:
    if checkpoint.complete:
        return False
    reason = (checkpoint.incomplete_reason or "").lower()
    return reason.startswith("settling") or (
        checkpoint.mtime > 0 and now - checkpoint.mtime < settle_seconds
    )


def _newest_by_series(decisions: Iterable[Decision], *, complete_only: bool) -> set[str]:
    newest: dict[str, Checkpoint] = {}
    for decision in decisions:
        checkpoint = decision.checkpoint
        if complete_only and not checkpoint.complete:
            continue
        current = newest.get(checkpoint.series)
        if current is None or checkpoint.step > current.step:
            newest[checkpoint.series] = checkpoint
    return {checkpoint.name for checkpoint in newest.values()}


def _kept(decision: Decision, *reasons: str) -> Decision:
    """Given a decision the guard overrides, return it as kept with the guard's reasons first."""
    carried = decision.reasons if decision.keep else ()
    merged = tuple(dict.fromkeys((*reasons, *carried)))
    return replace(decision, keep=True, reasons=merged)


def _forbidden(checkpoint: Checkpoint, newest_complete: set[str], facts: Facts) -> list[str]:
    """Given a checkpoint about to be deleted or slimmed, return the invariants that forbid
    it: the newest complete one, incomplete, tracked, pinned, not in the root, held."""
    reasons: list[str] = []
    if checkpoint.name in newest_complete:
        reasons.append("newest")
    if not checkpoint.complete:
        reasons.append("incomplete")
    if checkpoint.tracked_by:
        reasons.append("tracked")
    if checkpoint.pinned_by:
        reasons.append("pinned")
    bad = [member for member in checkpoint.members if not _is_direct_entry(member)]
    if bad or not _is_direct_entry(checkpoint.name):
        reasons.append(f"outside-root:{(bad or [checkpoint.name])[0]!r}")
    for holder in facts.holders_of(checkpoint):
        reasons.append(f"in-use:{holder.describe()}")
    return reasons


def _slim_guarded(decision: Decision, newest_complete: set[str], facts: Facts) -> Decision:
    """Given a kept decision, return it with its slim turned down when an invariant forbids
    it: what forbids a deletion, plus the protections added after the policy (holds,
    `last-good`). A slim moves the resume state out, and a resume needs exactly that."""
    if not decision.slim:
        return decision
    reasons = _forbidden(decision.checkpoint, newest_complete, facts)
    reasons += [kind for kind in slim_blockers(decision) if kind not in reasons]
    if not reasons:
        return decision
    return unslim(decision, "slim-vetoed:" + ", ".join(reasons))


def refusal(plan: Plan, facts: Facts, settings: SafetySettings) -> RootRefused | None:
    """Given a plan and the facts, return why the whole root must be left alone, or None.

    The trainer holding (open file, map, cwd) the newest checkpoint of any series (the newest
    complete one or any above it), or that newest checkpoint still settling, refuses the root:
    the trainer is mid-save or mid-resume.
    """
    # "The newest" is the newest complete checkpoint of each series and anything above it: a
    # run restarted from an earlier step writes below a crashed save's higher step, and the
    # checkpoint it is writing is the one that matters.
    newest_complete_step: dict[str, int] = {}
    for decision in plan.decisions:
        checkpoint = decision.checkpoint
        if checkpoint.complete:
            current = newest_complete_step.get(checkpoint.series)
            if current is None or checkpoint.step > current:
                newest_complete_step[checkpoint.series] = checkpoint.step
    for decision in plan.decisions:
        checkpoint = decision.checkpoint
        floor = newest_complete_step.get(checkpoint.series)
        if floor is not None and checkpoint.step < floor:
            continue
        if _is_settling(checkpoint, facts.now, settings.settle_seconds):
            why = checkpoint.incomplete_reason or "written less than settle_seconds ago"
            return RootRefused(
                plan.root, f"the newest checkpoint {checkpoint.name} is still settling ({why})"
            )
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


def guard(plan: Plan, facts: Facts, settings: SafetySettings) -> Plan:
    """Given a policy's plan, the facts and the settings, return the plan the invariants allow.

    Deletions of the newest complete checkpoint (per series), anything incomplete, tracked,
    pinned, held by a process or not a plain entry directly inside the root become keeps with
    the reason, and slims of such checkpoints (or of held or `last-good` ones) keeps whole;
    then, per series, the newest deletions are kept back until `min_keep` survive. Raises
    `RootRefused` when the trainer holds or is still writing the newest checkpoint, or when
    the run would delete more than `max_delete_fraction` of the root without `force`.
    """
    refused = refusal(plan, facts, settings)
    if refused is not None:
        raise refused
    newest_complete = _newest_by_series(plan.decisions, complete_only=True)
    guarded: list[Decision] = []
    for decision in plan.decisions:
        if decision.keep:
            guarded.append(_slim_guarded(decision, newest_complete, facts))
            continue
        reasons = _forbidden(decision.checkpoint, newest_complete, facts)
        guarded.append(_kept(decision, *reasons) if reasons else decision)

    # min_keep, per series: the policy may thin a series to nothing (a keep_last: 1 rotation
    # beside well-kept epoch checkpoints); keep back its newest deletions. Only complete
    # checkpoints count: a crashed save kept as incomplete is nothing to resume from.
    by_series: dict[str, list[int]] = {}
    for index, decision in enumerate(guarded):
        by_series.setdefault(decision.checkpoint.series, []).append(index)
    for indexes in by_series.values():
        survivors = sum(1 for i in indexes if guarded[i].keep and guarded[i].checkpoint.complete)
        if survivors >= settings.min_keep:
            continue
        deleted_newest_first = sorted(
            (i for i in indexes if not guarded[i].keep),
            key=lambda i: guarded[i].checkpoint.step,
            reverse=True,
        )
        for index in deleted_newest_first[: settings.min_keep - survivors]:
            guarded[index] = _kept(guarded[index], f"min_keep:{settings.min_keep}")

    deleting = sum(1 for decision in guarded if not decision.keep)
    total = len(guarded)
    if total and deleting / total > settings.max_delete_fraction and not settings.force:
        raise RootRefused(
            plan.root,
            f"the plan deletes {deleting} of {total} checkpoints "
            f"({deleting / total:.0%}), more than max_delete_fraction "
            f"{settings.max_delete_fraction:.0%}; check the policy or pass --force",
            transient=False,
        )
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
