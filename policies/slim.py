"""Which kept checkpoints the policy slims down to their weights (issue 11). Pure.

Old checkpoints are kept to compare with older model versions, to see long-term trends, to
recover from a catastrophe: all of that needs the weights; only resuming needs the optimizer
state, the scheduler and the RNG states (with Adam about twice the weights). A series' `slim:
{after: tier1}` marks every kept checkpoint of tier 2 and 3 `slim` (`after: tier2`: tier 3);
which files that moves out is the daemon's business (daemon/slimming.py).

Never slimmed here: tier 1 (so never the newest complete checkpoint), anything incomplete,
tracked (the framework's resume pointer names it), pinned, slimmed already, and the `keep_best`
ones when `keep_best_full` is set. What this module cannot see — holds, `last-good`, processes
holding files — the safety guard turns down (`slim_blockers` lists what the plan shows).

Path independence: tiers only age (tier 1 -> 2 -> 3 as newer saves arrive) and the survivors
are those one prune at the end would leave, so a checkpoint slimmed by some earlier prune is one
the final plan would slim too; slimming after every save equals slimming once at the end
(tests/unit/test_slim_policy.py).
"""

from __future__ import annotations

from dataclasses import replace

from policies.model import Decision, SlimSpec

BEST_PREFIX = "best:"
SLIM_REASON_PREFIX = "slim:after-"
# Reasons (exact, or a prefix before ":") that a slim must never override; the daemon adds the
# last two after planning (holds, and the resume point kept while newer ones are corrupt).
_NEVER = ("newest", "tracked", "pinned", "incomplete", "held", "last-good")


def reason_for(spec: SlimSpec) -> str:
    """Given a slim spec, return the reason a slimmed checkpoint carries (`slim:after-tier1`)."""
    return f"{SLIM_REASON_PREFIX}{spec.after}"


def slim_blockers(decision: Decision) -> tuple[str, ...]:
    """Given a decision, return the reasons it names that forbid slimming it (empty: none)."""
    found: list[str] = []
    for reason in decision.reasons:
        kind = reason.split(":", 1)[0]
        if kind in _NEVER and kind not in found:
            found.append(kind)
    return tuple(found)


def mark(decisions: list[Decision], spec: SlimSpec) -> list[Decision]:
    """Given one series' decisions (any order) and its slim spec, return them with each kept
    checkpoint the spec slims marked `slim`, with the spec's reason added."""
    reason = reason_for(spec)
    first_tier = spec.from_tier
    marked: list[Decision] = []
    for decision in decisions:
        if _slims(decision, spec, first_tier):
            decision = replace(decision, slim=True, reasons=(*decision.reasons, reason))
        marked.append(decision)
    return marked


def _slims(decision: Decision, spec: SlimSpec, first_tier: int) -> bool:
    """Given a decision, return whether the spec slims it."""
    checkpoint = decision.checkpoint
    if not decision.keep or decision.tier is None or decision.tier < first_tier:
        return False
    if not checkpoint.complete or checkpoint.slimmed:
        return False
    if checkpoint.tracked_by or checkpoint.pinned_by or slim_blockers(decision):
        return False
    return not (
        spec.keep_best_full and any(reason.startswith(BEST_PREFIX) for reason in decision.reasons)
    )


def unslim(decision: Decision, why: str) -> Decision:
    """Given a slim decision something forbids, return it kept whole, its slim reason replaced
    by `why` (`not-slimmable:<why>`, the guard's `slim-vetoed:in-use:pid 42 (...)`)."""
    if not decision.slim:
        return decision
    reasons = tuple(r for r in decision.reasons if not r.startswith(SLIM_REASON_PREFIX))
    return replace(decision, slim=False, reasons=(*reasons, why))
