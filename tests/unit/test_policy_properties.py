"""Properties of the tiered policy (DESIGN.md): results must not depend on how often it runs.

Saves come at a regular cadence from an arbitrary start (negative ones too), with cadences that
divide none of the spacings (30, 250, 333, ...), under each preset and under random knobs.
`keep_last` is at least 2 unless the cadence is given: with fewer than two distinct steps in
tier 1 the cadence can only be read from the whole series, which pruning thins, so re-planning
may thin further; plan() warns about exactly that case, and these properties assume no warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from policies import PRESETS, Checkpoint, KeepBest, PolicySpec, plan
from policies.tiered import bucket_upper

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

cadences = st.one_of(st.sampled_from([1, 7, 30, 100, 250, 333, 1000, 1700]), st.integers(1, 600))
starts = st.integers(-20_000, 20_000)


@st.composite
def specs(draw: st.DrawFn) -> PolicySpec:
    """A preset, or random knobs; keep_last 1 only together with an explicit cadence."""
    if draw(st.booleans()):
        spec = PRESETS[draw(st.sampled_from(sorted(PRESETS)))]
    else:
        cadence = draw(st.none() | st.integers(1, 500))
        spec = PolicySpec(
            keep_last=draw(st.integers(1 if cadence else 2, 25)),
            tier2_count=draw(st.integers(0, 25)),
            tier3_interval=draw(st.none() | st.integers(1, 3000)),
            cadence=cadence,
        )
    if draw(st.booleans()):
        spec = replace(spec, keep_best=KeepBest(draw(st.integers(1, 3)), "eval_loss", "min"))
    return spec


@st.composite
def regular_series(draw: st.DrawFn, max_saves: int = 250) -> list[Checkpoint]:
    """Saves at start, start+every, ...; some carry an eval_loss, a pin or a tracker."""
    start, every = draw(starts), draw(cadences)
    count = draw(st.integers(0, max_saves))
    losses = draw(st.lists(st.floats(0, 2, allow_nan=False), min_size=count, max_size=count))
    marks = draw(st.lists(st.integers(0, 40), min_size=count, max_size=count))
    series = []
    for index in range(count):
        step = start + index * every
        series.append(
            Checkpoint(
                name=f"checkpoint-{step}",
                step=step,
                metrics={"eval_loss": losses[index]} if marks[index] % 3 == 0 else {},
                pinned_by=(".keep",) if marks[index] == 1 else (),
                tracked_by=("latest",) if marks[index] == 2 else (),
            )
        )
    return series


def survivors(checkpoints: Sequence[Checkpoint], spec: PolicySpec) -> list[Checkpoint]:
    return [d.checkpoint for d in plan(checkpoints, {"default": spec}).decisions if d.keep]


def names(checkpoints: Sequence[Checkpoint]) -> list[str]:
    return [checkpoint.name for checkpoint in checkpoints]


@PROPERTY_SETTINGS
@given(series=regular_series(), spec=specs())
def test_planning_the_survivors_again_deletes_nothing(
    series: list[Checkpoint], spec: PolicySpec
) -> None:
    kept = survivors(series, spec)
    assert plan(kept, {"default": spec}).deleted == ()


@st.composite
def irregular_series(draw: st.DrawFn) -> list[Checkpoint]:
    """Any steps, unordered, with duplicates and incomplete ones."""
    steps = draw(st.lists(st.integers(-3000, 30_000), max_size=150))
    flags = draw(st.lists(st.integers(0, 15), min_size=len(steps), max_size=len(steps)))
    return [
        Checkpoint(
            name=f"c-{index}",
            step=step,
            complete=flags[index] != 0,
            pinned_by=("protect:best*",) if flags[index] == 1 else (),
            tracked_by=("last.ckpt",) if flags[index] == 2 else (),
        )
        for index, step in enumerate(steps)
    ]


@PROPERTY_SETTINGS
@given(series=irregular_series(), spec=specs())
def test_idempotent_for_irregular_steps_too_and_protected_ones_are_never_deleted(
    series: list[Checkpoint], spec: PolicySpec
) -> None:
    result = plan(series, {"default": spec})
    for decision in result.decisions:
        checkpoint = decision.checkpoint
        if not checkpoint.complete or checkpoint.pinned_by or checkpoint.tracked_by:
            assert decision.keep, decision
        assert decision.reasons, decision
    # Equal steps can leave tier 1 without a gap to read the cadence from; plan() then warns
    # that its fallback drifts (test_policy.py pins that case down). Otherwise: idempotent.
    assume(not result.warnings)
    kept = [d.checkpoint for d in result.decisions if d.keep]
    assert plan(kept, {"default": spec}).deleted == ()


@PROPERTY_SETTINGS
@given(series=regular_series(max_saves=200), spec=specs(), every_k=st.integers(1, 60))
def test_pruning_after_every_kth_save_leaves_what_one_prune_at_the_end_leaves(
    series: list[Checkpoint], spec: PolicySpec, every_k: int
) -> None:
    on_disk: list[Checkpoint] = []
    buckets_ever: set[int] = set()
    for saved, checkpoint in enumerate(series, start=1):
        on_disk.append(checkpoint)
        if spec.tier3_interval is not None:
            buckets_ever.add(bucket_upper(checkpoint.step, spec.tier3_interval))
        if saved % every_k == 0:
            on_disk = survivors(on_disk, spec)
            newest = series[max(0, saved - spec.keep_last) : saved]
            assert names(on_disk[-len(newest) :] if newest else []) == names(newest)
    incremental = survivors(on_disk, spec)

    assert names(incremental) == names(survivors(series, spec))
    # The newest keep_last always survive; every tier-3 bucket that ever held one still does.
    newest = series[-spec.keep_last :] if series else []
    assert names(incremental[-len(newest) :] if newest else []) == names(newest)
    if spec.tier3_interval is not None:
        interval = spec.tier3_interval
        assert {bucket_upper(c.step, interval) for c in incremental} == buckets_ever
    assert all(c in incremental for c in series if c.pinned_by or c.tracked_by)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize(("every", "start"), [(30, 30), (250, -1234), (100, 100), (7, 3)])
@pytest.mark.parametrize("every_k", [1, 13, 100])
def test_every_preset_and_awkward_cadence_prunes_alike_however_often(
    preset: str, every: int, start: int, every_k: int
) -> None:
    """The explicit sweep behind the random one: each preset, each cadence, long enough runs
    that tier 3 holds many buckets."""
    spec = PRESETS[preset]
    series = [Checkpoint(name=f"c{start + i * every}", step=start + i * every) for i in range(400)]
    on_disk: list[Checkpoint] = []
    for saved, checkpoint in enumerate(series, start=1):
        on_disk.append(checkpoint)
        if saved % every_k == 0:
            on_disk = survivors(on_disk, spec)
    once = survivors(series, spec)

    assert names(survivors(on_disk, spec)) == names(once)
    assert len(once) < len(series)  # it did thin something
