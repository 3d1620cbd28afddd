"""The tiered retention policy (DESIGN.md, "The retention policy").

Per series, ordered by step (never mtime), over its complete checkpoints only:

- **Tier 1** is the newest `keep_last`; all kept (`tier1`, the very newest also `newest`).
- The **cadence** is the most common step gap inside tier 1 (ties: the smallest gap), unless the
  spec sets one. With fewer than two distinct steps in tier 1 (`keep_last: 1`, or two
  checkpoints of one step) it falls back to the most common gap of the whole series, else 1, and
  the plan carries a warning: pruning thins the series, so that fallback drifts and re-planning
  may delete more. The properties below hold whenever the plan has no such warning; set
  `cadence:` for a series with `keep_last: 1`.
- **Tier 2** is a *range of save slots*, not a count of survivors: the checkpoints below tier 1
  with `step >= oldest_tier1_step - tier2_count * cadence`. **Tier 3** is everything older.
- Spacing S is `2 * cadence` for tier 2 and `tier3_interval` for tier 3 (None: tier 3 keeps
  nothing). Buckets are `((k-1)·S, k·S]`, i.e. `k = ceil(step / S)` in floor-division form so
  steps <= 0 land in the right bucket. A bucket's representative is its newest checkpoint over
  the whole series, tier 1 included. A checkpoint in tier t is kept if it represents its bucket
  for tier t or any later tier (`tier2:every-200`, `tier3:every-1000`).
- `slim: {after: tier1}` marks the kept checkpoints of tiers 2 and 3 for slimming
  (policies/slim.py): they stay, as checkpoints of their tier, with their weights only.
- `keep_best`, pins and trackers keep a checkpoint whatever the tiers say, and incomplete
  checkpoints are kept (`incomplete:<why>`) and take no part in tiers, cadence or buckets;
  one the daemon flagged `abandoned` (a crashed save) is deleted (`abandoned-save`) unless
  pinned or tracked.
- **Restarts** (policies/lineage.py): mtimes order nothing, but they tell runs apart. When a
  trainer restarted from an older step, the saves it abandoned above that step form a branch
  (`branch:abandoned-after-2000`) planned by these rules as a run of its own; the live run
  (the shared history plus the new saves) is planned alone, so its newest save is its `newest`.
  The branch point and the restart's first two saves are kept (`restart:...`); the most
  recently written complete checkpoint is the live run's `newest`. When the write order agrees
  with the step order (up to 2 s of jitter) none of this changes anything.

Why results do not depend on how often pruning runs: tier 1 is never thinned, so the cadence and
the tier-2 boundary of "survivors + new saves" equal those of "everything + new saves"; each
bucket's newest member is kept by every plan that saw it in tier 2 or 3, so later plans see the
same representatives. Hence planning the survivors again deletes nothing, and pruning after every
k-th save leaves what one prune at the end would (tests/unit/test_policy_properties.py).

Planning is O(n log n) (the sort; bucket boundaries are found by bisection) and builds no
per-checkpoint strings: reasons are shared tuples, one per rule and one per thinned bucket.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import compress, islice, pairwise, repeat
from operator import attrgetter, lt, ne
from typing import Any

from policies import slim
from policies.collector import collector_paused
from policies.lineage import Branch, Lineage, trace
from policies.model import PRESETS, Checkpoint, Decision, Plan, PolicySpec

_step_of = attrgetter("step")
_complete_of = attrgetter("complete")
_pinned_by_of = attrgetter("pinned_by")
_tracked_by_of = attrgetter("tracked_by")
_mtime_of = attrgetter("mtime")
# The fast path fills exactly these slots; a field added to Decision later disables it.
_DECISION_FIELDS = ("checkpoint", "keep", "reasons", "tier", "branch", "slim")
_FAST_DECISIONS = tuple(field.name for field in fields(Decision)) == _DECISION_FIELDS
_DECISION_SETTERS: tuple[Callable[[Decision, Any], None], ...] = tuple(
    vars(Decision)[name].__set__ for name in _DECISION_FIELDS
)
_REASONS_TIER1 = ("tier1",)
_REASONS_NEWEST = ("tier1", "newest")
_REASONS_ABANDONED = ("abandoned-save",)


def plan(
    checkpoints: Sequence[Checkpoint],
    specs: Mapping[str, PolicySpec],
    *,
    root: str = "",
) -> Plan:
    """Given a root's checkpoints (any order, any series) and the policy of each series, return
    the Plan: one Decision per checkpoint with every reason, ordered by series name then step.

    A checkpoint whose series has no entry in `specs` uses `specs["default"]` if present, else
    the balanced preset. Raises ValueError for a spec no config would allow (keep_last < 1, ...).
    """
    decisions: list[Decision] = []
    cadences: dict[str, int] = {}
    warnings: list[str] = []
    with collector_paused():
        by_series = _group_by_series(checkpoints)
        for series in sorted(by_series):
            spec = specs.get(series) or specs.get("default") or PRESETS["balanced"]
            _check_spec(series, spec)
            series_decisions, cadence, series_warnings = _plan_series(
                series, by_series[series], spec
            )
            if spec.slim is not None:
                series_decisions = slim.mark(series_decisions, spec.slim)
            decisions.extend(series_decisions)
            if cadence is not None:
                cadences[series] = cadence
            warnings.extend(series_warnings)
        return Plan(
            root=root, decisions=tuple(decisions), cadences=cadences, warnings=tuple(warnings)
        )


def most_common_gap(steps: Sequence[int]) -> int | None:
    """Given ascending steps, return the most common positive gap between neighbours (ties: the
    smallest gap), or None when there is no positive gap."""
    counts = Counter(later - earlier for earlier, later in pairwise(steps))
    counts.pop(0, None)
    if not counts:
        return None
    return max(counts.items(), key=lambda item: (item[1], -item[0]))[0]


def bucket_upper(step: int, spacing: int) -> int:
    """Given a step and a spacing S, return k·S for the bucket ((k-1)·S, k·S] holding the step."""
    return -(-step // spacing) * spacing


# --- internals ---------------------------------------------------------------------------------


def _check_spec(series: str, spec: PolicySpec) -> None:
    problems = []
    if spec.keep_last < 1:
        problems.append(f"keep_last must be >= 1, not {spec.keep_last}")
    if spec.tier2_count < 0:
        problems.append(f"tier2_count must be >= 0, not {spec.tier2_count}")
    if spec.tier3_interval is not None and spec.tier3_interval < 1:
        problems.append(f"tier3_interval must be >= 1 or None, not {spec.tier3_interval}")
    if spec.cadence is not None and spec.cadence < 1:
        problems.append(f"cadence must be >= 1 or None, not {spec.cadence}")
    if spec.keep_best is not None and spec.keep_best.count < 1:
        problems.append(f"keep_best.count must be >= 1, not {spec.keep_best.count}")
    if spec.slim is not None and spec.slim.after not in ("tier1", "tier2"):
        problems.append(f"slim.after must be tier1, tier2 or None, not {spec.slim.after!r}")
    if problems:
        raise ValueError(f"policy of series {series!r}: " + "; ".join(problems))


def _group_by_series(checkpoints: Sequence[Checkpoint]) -> dict[str, list[Checkpoint]]:
    groups: dict[str, list[Checkpoint]] = {}
    for checkpoint in checkpoints:
        series = checkpoint.series
        if series in groups:
            groups[series].append(checkpoint)
        else:
            groups[series] = [checkpoint]
    return groups


def _sorted_by_step(group: list[Checkpoint]) -> tuple[list[Checkpoint], list[int], bool]:
    """Given a series' checkpoints, return them ordered by (step, version, name), their steps,
    and whether two of them share a step."""
    steps = list(map(_step_of, group))
    if all(map(lt, steps, islice(steps, 1, None))):
        return group, steps, False  # discovery often hands them over in order already
    order = sorted(range(len(steps)), key=steps.__getitem__)
    ordered = list(map(group.__getitem__, order))
    steps = list(map(steps.__getitem__, order))
    repeated = len(set(steps)) != len(steps)
    if repeated:
        # Equal steps (two layouts, a re-save): order them by version (the later re-save last),
        # then name, so the plan never depends on the order the directory listing returned.
        ordered.sort(key=lambda checkpoint: (checkpoint.step, checkpoint.version, checkpoint.name))
        steps = list(map(_step_of, ordered))
    return ordered, steps, repeated


@dataclass(slots=True)
class _Columns:
    """A series' (or one branch's) decisions as columns, in step order."""

    keeps: list[bool]
    reasons: list[tuple[str, ...]]
    tiers: list[int | None]
    cadence: int | None
    warnings: list[str]
    # The branch of each checkpoint; None when the series is one run.
    branches: list[str | None] | None = None


def _plan_series(
    series: str, group: list[Checkpoint], spec: PolicySpec
) -> tuple[list[Decision], int | None, list[str]]:
    ordered, steps, repeated = _sorted_by_step(group)
    complete_flags = list(map(_complete_of, ordered))
    if False in complete_flags:
        complete = list(compress(ordered, complete_flags))
        incomplete = [c for c, done in zip(ordered, complete_flags, strict=True) if not done]
        steps = list(compress(steps, complete_flags))
    else:
        complete, incomplete = ordered, []
    lineage = trace(steps, list(map(_mtime_of, complete)), repeated=repeated)
    if lineage is None or not lineage.branches:
        columns = _plan_group(series, complete, steps, spec)
    else:
        columns = _plan_branched(series, complete, steps, spec, lineage)

    decisions = _decisions(complete, columns)
    if incomplete:
        # Interleave back into step order: complete_flags says, per position, which list is next.
        sources = (iter(list(map(_incomplete_decision, incomplete))), iter(decisions))
        decisions = list(map(next, map(sources.__getitem__, complete_flags)))
    return decisions, columns.cadence, columns.warnings


def _plan_group(
    name: str, complete: list[Checkpoint], steps: list[int], spec: PolicySpec, cadence_from: int = 0
) -> _Columns:
    """Given one run's complete checkpoints in step order, return its tiered decisions.

    `cadence_from` is the index from which tier 1's gaps give the cadence (a restarted run's
    branch point: the shared history below it was thinned by earlier plans)."""
    count = len(steps)
    tier1_start = max(0, count - spec.keep_last)
    cadence, warning = _cadence(name, steps, tier1_start, spec, cadence_from)

    keeps: list[bool] = []
    reasons: list[tuple[str, ...]] = []
    tiers: list[int | None] = []
    if count:
        boundary = steps[tier1_start] - spec.tier2_count * cadence
        tier2_start = bisect_left(steps, boundary, 0, tier1_start)
        _thin_tier3(steps, tier2_start, spec.tier3_interval, keeps, reasons)
        _thin_tier2(
            steps, tier2_start, tier1_start, 2 * cadence, spec.tier3_interval, keeps, reasons
        )
        keeps.extend([True] * (count - tier1_start))
        reasons.extend([_REASONS_TIER1] * (count - tier1_start - 1))
        reasons.append(_REASONS_NEWEST)
        tiers.extend([3] * tier2_start)
        tiers.extend([2] * (tier1_start - tier2_start))
        tiers.extend([1] * (count - tier1_start))
        _apply_overrides(complete, spec, keeps, reasons)
    return _Columns(keeps, reasons, tiers, cadence if count else None, [warning] if warning else [])


def _plan_branched(
    series: str, complete: list[Checkpoint], steps: list[int], spec: PolicySpec, lineage: Lineage
) -> _Columns:
    """Given a series split by restarts, return its decisions: the live run and each abandoned
    branch planned as runs of their own under the same policy, plus the restarts' witnesses."""
    count = len(steps)
    columns = _Columns([False] * count, [()] * count, [None] * count, None, [], [None] * count)
    live = _plan_part(series, complete, steps, spec, lineage.live, lineage.cadence_from)
    _scatter(columns, lineage.live, live, None)
    columns.cadence, columns.warnings = live.cadence, live.warnings
    for branch in lineage.branches:
        part = _plan_part(f"{series} ({branch.label})", complete, steps, spec, branch.members)
        _scatter(columns, branch.members, part, branch)
        columns.warnings.extend(part.warnings)
    for position, witnessed in lineage.witnesses.items():
        _keep_also(columns, position, witnessed)
    return columns


def _plan_part(
    name: str,
    complete: list[Checkpoint],
    steps: list[int],
    spec: PolicySpec,
    members: Sequence[int],
    cadence_from: int = 0,
) -> _Columns:
    part = list(map(complete.__getitem__, members))
    return _plan_group(name, part, list(map(steps.__getitem__, members)), spec, cadence_from)


def _scatter(
    columns: _Columns, members: Sequence[int], part: _Columns, branch: Branch | None
) -> None:
    """Write a part's decisions into the series' columns; in a branch, its reason replaces
    `newest` (the branch's highest step is no run's newest checkpoint)."""
    assert columns.branches is not None
    reasons = part.reasons
    if branch is not None:
        tag = (branch.reason,)
        marked: dict[tuple[str, ...], tuple[str, ...]] = {}
        for why in set(reasons):
            marked[why] = tuple(reason for reason in why if reason != "newest") + tag
        reasons = list(map(marked.__getitem__, reasons))
    label = branch.label if branch is not None else None
    for index, position in enumerate(members):
        columns.keeps[position] = part.keeps[index]
        columns.reasons[position] = reasons[index]
        columns.tiers[position] = part.tiers[index]
        columns.branches[position] = label


def _keep_also(columns: _Columns, position: int, added: tuple[str, ...]) -> None:
    """Keep the checkpoint at `position` for the `added` reasons too, whatever the tiers say."""
    assert columns.branches is not None
    label = columns.branches[position]
    tag = (f"branch:{label}",) if label is not None else ()
    if columns.keeps[position]:
        current = tuple(reason for reason in columns.reasons[position] if reason not in tag)
        columns.reasons[position] = current + tuple(r for r in added if r not in current) + tag
        return
    columns.keeps[position] = True
    # The tier rules' explanations would contradict a kept checkpoint; its branch still holds.
    columns.reasons[position] = added + tag


def _decisions(checkpoints: list[Checkpoint], columns: _Columns) -> list[Decision]:
    """Given a series' checkpoints and the columns of their decisions, return the Decisions."""
    branches: Iterable[str | None] = (
        columns.branches if columns.branches is not None else repeat(None, len(checkpoints))
    )
    if not _FAST_DECISIONS:
        return list(
            map(
                Decision,
                checkpoints,
                columns.keeps,
                columns.reasons,
                columns.tiers,
                branches,
                repeat(False),
            )
        )
    # A frozen dataclass's __init__ sets each field through object.__setattr__; filling the slots
    # column by column through their descriptors builds the same objects in 60% of the time.
    decisions = list(map(object.__new__, repeat(Decision, len(checkpoints))))
    columns_in_order: tuple[Iterable[Any], ...] = (
        checkpoints,
        columns.keeps,
        columns.reasons,
        columns.tiers,
        branches,
        repeat(False, len(checkpoints)),  # slim: `policies.slim.mark` decides, after the tiers
    )
    for setter, column in zip(_DECISION_SETTERS, columns_in_order, strict=True):
        deque(map(setter, decisions, column), maxlen=0)
    return decisions


def _cadence(
    series: str, steps: list[int], tier1_start: int, spec: PolicySpec, cadence_from: int = 0
) -> tuple[int, str | None]:
    if spec.cadence is not None:
        return spec.cadence, None
    from_tier1 = most_common_gap(steps[max(tier1_start, cadence_from) :])
    if from_tier1 is not None:
        return from_tier1, None
    cadence = most_common_gap(steps) or 1
    if tier1_start == 0:
        return cadence, None
    # Only worth a warning when something below tier 1 depends on it.
    return cadence, (
        f"series {series!r}: tier 1 holds fewer than 2 distinct steps, so the cadence "
        f"({cadence}) was read from the whole series and will drift as pruning thins it; "
        "set `cadence:` in its policy"
    )


def _thin_tier3(
    steps: list[int],
    tier2_start: int,
    interval: int | None,
    keeps: list[bool],
    reasons: list[tuple[str, ...]],
) -> None:
    """Append the decisions of steps[:tier2_start]: each tier-3 bucket keeps its newest."""
    if tier2_start == 0:
        return
    if interval is None:
        keeps.extend([False] * tier2_start)
        reasons.extend([("tier3: keeps nothing (tier3_interval: none)",)] * tier2_start)
        return
    tier3_steps = steps[:tier2_start]
    uppers = [-(-step // interval) * interval for step in tier3_steps]
    # A checkpoint represents its bucket when the next one (tier 2 and 1 included) lies beyond it.
    beyond = -(-steps[tier2_start] // interval) * interval if tier2_start < len(steps) else None
    represents = list(map(ne, uppers, [*islice(uppers, 1, None), beyond]))
    if all(represents):
        keeps.extend(represents)
        reasons.extend([(f"tier3:every-{interval}",)] * tier2_start)
        return
    newest = dict(zip(uppers, tier3_steps, strict=True))  # the last one of a bucket wins
    if beyond == uppers[-1]:
        newest[beyond] = steps[bisect_right(steps, beyond) - 1]
    # One shared explanation per thinned bucket, not one string per deleted checkpoint.
    thinned_buckets = {upper for upper, kept in zip(uppers, represents, strict=True) if not kept}
    thinned = {
        upper: (_not_newest("tier3", upper, interval, newest[upper]),) for upper in thinned_buckets
    }
    kept_reasons = (f"tier3:every-{interval}",)
    keeps.extend(represents)
    reasons.extend(
        [
            kept_reasons if kept else thinned[upper]
            for upper, kept in zip(uppers, represents, strict=True)
        ]
    )


def _thin_tier2(
    steps: list[int],
    tier2_start: int,
    tier1_start: int,
    spacing: int,
    interval: int | None,
    keeps: list[bool],
    reasons: list[tuple[str, ...]],
) -> None:
    """Append the decisions of steps[tier2_start:tier1_start]: kept if newest in its tier-2 or
    its tier-3 bucket."""
    count = len(steps)
    keep2 = f"tier2:every-{spacing}"
    keep3 = f"tier3:every-{interval}"
    for index in range(tier2_start, tier1_start):
        step = steps[index]
        following = steps[index + 1]  # exists: tier 1 is never empty when tier 2 is not
        why: list[str] = []
        upper2 = -(-step // spacing) * spacing
        if following > upper2:
            why.append(keep2)
        if interval is not None:
            upper3 = -(-step // interval) * interval
            if following > upper3:
                why.append(keep3)
        if why:
            keeps.append(True)
            reasons.append(tuple(why))
            continue
        newest2 = steps[bisect_right(steps, upper2, index, count) - 1]
        why.append(_not_newest("tier2", upper2, spacing, newest2))
        if interval is None:
            why.append("tier3: keeps nothing (tier3_interval: none)")
        else:
            newest3 = steps[bisect_right(steps, upper3, index, count) - 1]
            why.append(_not_newest("tier3", upper3, interval, newest3))
        keeps.append(False)
        reasons.append(tuple(why))


def _not_newest(tier: str, upper: int, spacing: int, newest: int) -> str:
    return f"{tier}: not the newest in ({upper - spacing}, {upper}]; {newest} represents it"


def _apply_overrides(
    complete: list[Checkpoint],
    spec: PolicySpec,
    keeps: list[bool],
    reasons: list[tuple[str, ...]],
) -> None:
    """Add the reasons that keep a checkpoint whatever the tiers say: best, pinned, tracked."""
    extra: dict[int, list[str]] = {}
    if spec.keep_best is not None:
        metric, sign = spec.keep_best.metric, (1.0 if spec.keep_best.mode == "min" else -1.0)
        candidates = [
            (sign * value, -index, index, value)
            for index, checkpoint in enumerate(complete)
            if checkpoint.metrics
            and (value := checkpoint.metrics.get(metric)) is not None
            and not math.isnan(value)
        ]
        # Ties go to the newer checkpoint: the same score after more training.
        for _, _, index, value in heapq.nsmallest(spec.keep_best.count, candidates):
            extra.setdefault(index, []).append(f"best:{metric}={value:g}")
    positions = range(len(complete))
    pinned = compress(positions, map(_pinned_by_of, complete))
    tracked = compress(positions, map(_tracked_by_of, complete))
    for index in sorted({*pinned, *tracked}):
        extra.setdefault(index, []).extend(_protections(complete[index]))
    for index, added in extra.items():
        if keeps[index]:
            reasons[index] = reasons[index] + tuple(added)
        else:
            # The tier rules' explanations would contradict a kept checkpoint.
            keeps[index] = True
            reasons[index] = tuple(added)


def _protections(checkpoint: Checkpoint) -> list[str]:
    return [f"pinned:{pin}" for pin in checkpoint.pinned_by] + [
        f"tracked:{tracker}" for tracker in checkpoint.tracked_by
    ]


def _incomplete_decision(checkpoint: Checkpoint) -> Decision:
    """An incomplete checkpoint is kept, unless the daemon found it abandoned (a crashed save
    nobody will finish) and nothing protects it: then it goes, so a resume starts from the newest
    complete checkpoint."""
    if checkpoint.abandoned and not checkpoint.pinned_by and not checkpoint.tracked_by:
        return Decision(checkpoint, False, _REASONS_ABANDONED, None)
    return Decision(checkpoint, True, _incomplete_reasons(checkpoint), None)


def _incomplete_reasons(checkpoint: Checkpoint) -> tuple[str, ...]:
    why = checkpoint.incomplete_reason
    return (f"incomplete:{why}" if why else "incomplete", *_protections(checkpoint))
