"""Restarts: which checkpoints of a series belong to the live run, which to abandoned branches.

A trainer restarted from an older checkpoint (or a new run started in an old run's folder) saves
steps lower than saves written before it. Ranked by step alone, the stale higher steps of the
abandoned run fill tier 1 and the restarted run's own saves are thinned as old history (issue 9).
What tells them apart is the write order: each checkpoint's newest mtime.

The complete checkpoints are walked in write order (mtime, ties by step), keeping the *lineage*:
the checkpoints the run being written descends from, in step order. A save `y` pops every
lineage member with a step as high or higher written more than JITTER_SECONDS before it: that
is a **restart**, the popped checkpoints form an abandoned branch named after the branch point
`R`, the highest lineage step below `y` (`abandoned-after-2000`; `abandoned-earlier-run` when
nothing is shared: a new run in an old run's folder). An older save of `y`'s own step is
abandoned too: `y` supersedes it (a restarted run re-saving a step under a new name). `y` then
joins the lineage. What remains in the lineage at the end is the live run: the shared history
up to each branch point plus the saves after it.

Not every out-of-order write is a restart. The checkpoints written after `y` decide: one with a
step inside the range `y` would abandon, (step(y), highest popped step], confirms the restart
(the restarted run went on below the abandoned saves). Otherwise, one above the range means the
run simply went on past it: `y` was one save written late (an asynchronous save finishing after
the next, an evaluation writing into an old checkpoint), and it takes its place by step, popping
nothing. With neither (`y` is the newest write, or only lower steps followed: another restart)
it is a restart: the newest save is never thinned as history.

Why plans stay stable under their own deletions (re-planning deletes nothing more; pruning after
every save leaves what one prune at the end leaves): a checkpoint is popped by the first later
save with a lower step, which is itself a restart, and whether a restart is confirmed depends on
a later save inside its range. So each restart's three *witnesses* are always kept -- the branch
point R (`restart:resumed-from`), the first save y (`restart:first-save`) and the lowest-step later
save inside the range (`restart:second-save`) -- and every branch, like the live run, keeps its
highest step. That also keeps a late save's verdict: the highest step of the group holding a
later save above the range lies above the range too and was written after `y`. Deleting anything
else changes no pop, no verdict and no branch name.

So the most recently written complete checkpoint is always the live run's highest step (its
`newest`, kept by tier 1): it went on above the lineage, or it is a restart that popped
everything above it. Only saves written within JITTER_SECONDS of each other may rank the other
way, and then the highest step counts as the newest, as without mtimes.

The live run's cadence is read from its tier 1 from the latest branch point on: below it, the
shared history was already thinned by earlier plans and its gaps are not the cadence.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, islice
from operator import eq, le
from types import MappingProxyType

# Saves written this close together may finish in either order (asynchronous writers, clocks of
# several hosts on one filesystem): such an inversion is no restart.
JITTER_SECONDS = 2.0

RESUMED_FROM = "restart:resumed-from"
FIRST_SAVE = "restart:first-save"
SECOND_SAVE = "restart:second-save"

_NO_WITNESSES: Mapping[int, tuple[str, ...]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Branch:
    """Checkpoints a restart abandoned: `members` are positions in step order, ascending."""

    label: str
    members: tuple[int, ...]

    @property
    def reason(self) -> str:
        return f"branch:{self.label}"


@dataclass(frozen=True, slots=True)
class Lineage:
    """A series' checkpoints split into the live run and its abandoned branches.

    Positions index the series' complete checkpoints in step order. `witnesses` maps the
    positions every plan must keep to the reasons why; `cadence_from` is the index into `live`
    from which the live run's tier-1 gaps give its cadence.
    """

    live: Sequence[int]
    branches: tuple[Branch, ...] = ()
    witnesses: Mapping[int, tuple[str, ...]] = field(default_factory=lambda: _NO_WITNESSES)
    cadence_from: int = 0


@dataclass(slots=True)
class _Restart:
    first_save: int
    resumed_from: int | None
    second_save: int | None
    popped: list[int]


def trace(
    steps: Sequence[int], times: Sequence[float], *, repeated: bool | None = None
) -> Lineage | None:
    """Given a series' complete checkpoints as their steps (ascending) and mtimes, return how
    they split into the live run and abandoned branches, or None when the write order agrees
    with the step order up to JITTER_SECONDS (one run).

    `repeated` says whether two steps may be equal, when the caller knows (None: look)."""
    count = len(steps)
    if count < 2:
        return None
    # Two saves of one step can pop each other whatever their order: only the walk decides.
    if repeated is None:
        repeated = any(map(eq, steps, islice(steps, 1, None)))
    if not repeated and all(map(le, times, islice(times, 1, None))):
        return None
    # A restart needs a checkpoint written clearly before one with a lower step; without one
    # the inversions are jitter: one run, whose highest step is as new as any write.
    # running[i] is the latest mtime among positions 0..i, compared with position i + 1's.
    running = accumulate(times, max)
    pairs = zip(running, islice(times, 1, None), strict=False)
    if not repeated and all(earlier <= later + JITTER_SECONDS for earlier, later in pairs):
        return None
    return _walk(steps, times)


def _walk(steps: Sequence[int], times: Sequence[float]) -> Lineage:
    """Given steps (ascending) and mtimes, return the lineage found by walking them in write
    order (the module's docstring)."""
    count = len(steps)
    order = sorted(range(count), key=times.__getitem__)  # stable: equal mtimes by step
    unwritten = _Unwritten(count)
    lineage: list[int] = []
    restarts: list[_Restart] = []
    step_at = steps.__getitem__
    for save in order:
        unwritten.mark(save)
        step = steps[save]
        if not lineage or steps[lineage[-1]] < step:
            lineage.append(save)  # the run goes on above everything: the usual case
            continue
        below = bisect_left(lineage, step, key=step_at)
        cutoff = times[save] - JITTER_SECONDS
        popped = [member for member in lineage[below:] if times[member] < cutoff]
        if popped:
            restart = _confirm(steps, unwritten, save, popped)
            if restart is not None:
                restart.resumed_from = lineage[below - 1] if below else None
                gone = set(popped)
                lineage[below:] = [member for member in lineage[below:] if member not in gone]
                restarts.append(restart)
        insort(lineage, save)
    return _lineage(steps, lineage, restarts)


def _confirm(
    steps: Sequence[int], unwritten: _Unwritten, save: int, popped: list[int]
) -> _Restart | None:
    """Given a save that would pop `popped`, return the restart, or None when the save was
    merely written late: nothing later lies inside the popped range but something lies above it
    (the run went on past what the save would abandon)."""
    count = len(steps)
    low = bisect_right(steps, steps[save])
    high = bisect_right(steps, steps[popped[-1]])
    inside = unwritten.first_from(low)
    if inside < high:
        return _Restart(save, None, inside, popped)
    if unwritten.first_from(high) < count:
        return None
    # Nothing written after it yet, or only lower steps (a later restart): a restart still.
    return _Restart(save, None, None, popped)


def _lineage(steps: Sequence[int], live: list[int], restarts: list[_Restart]) -> Lineage:
    """Given the walk's outcome, return the Lineage: each restart's branch named by its branch
    point (`#2`, `#3` for later ones of the same name, in write order) and its witnesses."""
    branches: list[Branch] = []
    seen: dict[str, int] = {}
    witnesses: dict[int, list[str]] = {}
    for restart in restarts:
        resumed = restart.resumed_from
        label = "abandoned-earlier-run" if resumed is None else f"abandoned-after-{steps[resumed]}"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}#{seen[label]}"
        branches.append(Branch(label, tuple(restart.popped)))
        for position, reason in (
            (resumed, RESUMED_FROM),
            (restart.first_save, FIRST_SAVE),
            (restart.second_save, SECOND_SAVE),
        ):
            if position is not None and reason not in witnesses.setdefault(position, []):
                witnesses[position].append(reason)
    return Lineage(
        live=live,
        branches=tuple(branches),
        witnesses={position: tuple(reasons) for position, reasons in witnesses.items()},
        cadence_from=_cadence_from(live, restarts),
    )


def _cadence_from(live: list[int], restarts: list[_Restart]) -> int:
    """Given the live run and the restarts, return the index into `live` of the latest branch
    point still in it (its first save when nothing is shared), or 0 when no restart is live."""
    members = set(live)
    latest = max(
        (restart for restart in restarts if restart.first_save in members),
        key=lambda restart: restart.first_save,
        default=None,
    )
    if latest is None:
        return 0
    anchor = latest.resumed_from
    if anchor is None or anchor not in members:
        anchor = latest.first_save
    return bisect_left(live, anchor)


class _Unwritten:
    """The positions not yet walked: the smallest one at or above a position, near O(1)."""

    def __init__(self, count: int) -> None:
        self._next = list(range(count + 1))

    def mark(self, position: int) -> None:
        self._next[position] = position + 1

    def first_from(self, position: int) -> int:
        """Given a position, return the smallest unwritten one >= it (the count if none)."""
        following = self._next
        while following[position] != position:
            following[position] = following[following[position]]  # path halving
            position = following[position]
        return position
