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
- `keep_best`, pins and trackers keep a checkpoint whatever the tiers say, and incomplete
  checkpoints are kept (`incomplete:<why>`) and take no part in tiers, cadence or buckets.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from itertools import compress, islice, pairwise, repeat
from operator import attrgetter, lt, ne
from typing import Any

from policies.collector import collector_paused
from policies.model import PRESETS, Checkpoint, Decision, Plan, PolicySpec

_step_of = attrgetter("step")
_complete_of = attrgetter("complete")
_pinned_by_of = attrgetter("pinned_by")
_tracked_by_of = attrgetter("tracked_by")
# The fast path fills exactly these slots; a field added to Decision later disables it.
_DECISION_FIELDS = ("checkpoint", "keep", "reasons", "tier")
_FAST_DECISIONS = tuple(field.name for field in fields(Decision)) == _DECISION_FIELDS
_DECISION_SETTERS: tuple[Callable[[Decision, Any], None], ...] = tuple(
    vars(Decision)[name].__set__ for name in _DECISION_FIELDS
)
_REASONS_TIER1 = ("tier1",)
_REASONS_NEWEST = ("tier1", "newest")


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
            series_decisions, cadence, warning = _plan_series(series, by_series[series], spec)
            decisions.extend(series_decisions)
            if cadence is not None:
                cadences[series] = cadence
            if warning:
                warnings.append(warning)
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


def _sorted_by_step(group: list[Checkpoint]) -> tuple[list[Checkpoint], list[int]]:
    """Given a series' checkpoints, return them ordered by (step, version, name) and their
    steps."""
    steps = list(map(_step_of, group))
    if all(map(lt, steps, islice(steps, 1, None))):
        return group, steps  # discovery often hands them over in order already
    order = sorted(range(len(steps)), key=steps.__getitem__)
    ordered = list(map(group.__getitem__, order))
    steps = list(map(steps.__getitem__, order))
    if len(set(steps)) != len(steps):
        # Equal steps (two layouts, a re-save): order them by version (the later re-save last),
        # then name, so the plan never depends on the order the directory listing returned.
        ordered.sort(key=lambda checkpoint: (checkpoint.step, checkpoint.version, checkpoint.name))
        steps = list(map(_step_of, ordered))
    return ordered, steps


def _plan_series(
    series: str, group: list[Checkpoint], spec: PolicySpec
) -> tuple[list[Decision], int | None, str | None]:
    ordered, steps = _sorted_by_step(group)
    complete_flags = list(map(_complete_of, ordered))
    if False in complete_flags:
        complete = list(compress(ordered, complete_flags))
        incomplete = [c for c, done in zip(ordered, complete_flags, strict=True) if not done]
        steps = list(compress(steps, complete_flags))
    else:
        complete, incomplete = ordered, []
    count = len(steps)
    tier1_start = max(0, count - spec.keep_last)
    cadence, warning = _cadence(series, steps, tier1_start, spec)

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

    decisions = _decisions(complete, keeps, reasons, tiers)
    if incomplete:
        # Interleave back into step order: complete_flags says, per position, which list is next.
        sources = (
            iter([Decision(c, True, _incomplete_reasons(c), None) for c in incomplete]),
            iter(decisions),
        )
        decisions = list(map(next, map(sources.__getitem__, complete_flags)))
    return decisions, (cadence if count else None), warning


def _decisions(
    checkpoints: list[Checkpoint],
    keeps: list[bool],
    reasons: list[tuple[str, ...]],
    tiers: list[int | None],
) -> list[Decision]:
    """Given the columns of a series' decisions, return the Decisions."""
    if not _FAST_DECISIONS:
        return list(map(Decision, checkpoints, keeps, reasons, tiers))
    # A frozen dataclass's __init__ sets each field through object.__setattr__; filling the slots
    # column by column through their descriptors builds the same objects in 60% of the time.
    decisions = list(map(object.__new__, repeat(Decision, len(checkpoints))))
    columns: tuple[list[Any], ...] = (checkpoints, keeps, reasons, tiers)
    for setter, column in zip(_DECISION_SETTERS, columns, strict=True):
        deque(map(setter, decisions, column), maxlen=0)
    return decisions


def _cadence(
    series: str, steps: list[int], tier1_start: int, spec: PolicySpec
) -> tuple[int, str | None]:
    if spec.cadence is not None:
        return spec.cadence, None
    from_tier1 = most_common_gap(steps[tier1_start:])
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


def _incomplete_reasons(checkpoint: Checkpoint) -> tuple[str, ...]:
    why = checkpoint.incomplete_reason
    return (f"incomplete:{why}" if why else "incomplete", *_protections(checkpoint))
