"""The forecast: the user's own tables, and agreement with planning the whole simulated series."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import PRESETS, Checkpoint, PolicySpec, plan
from policies.forecast import MAX_SIMULATED, forecast

GB = 1000**3
CHECKPOINT_BYTES = 3_600_000_000  # 3.6 GB, the motivating run


@pytest.mark.parametrize(
    ("steps", "saves", "kept", "by_tier"),
    [
        (50_000, 500, 76, (20, 10, 46)),  # six months
        (100_000, 1000, 126, (20, 10, 96)),  # a year
    ],
)
def test_the_users_tables_come_out_exactly(
    steps: int, saves: int, kept: int, by_tier: tuple[int, int, int]
) -> None:
    result = forecast(steps, 100, CHECKPOINT_BYTES, PRESETS["balanced"])

    assert (result.saves, result.kept, result.deleted) == (saves, kept, saves - kept)
    assert result.kept_by_tier == by_tier
    assert result.cadence == 100
    assert result.bytes_without_policy == saves * CHECKPOINT_BYTES
    assert result.bytes_with_policy == kept * CHECKPOINT_BYTES
    assert result.bytes_saved == (saves - kept) * CHECKPOINT_BYTES


def test_a_year_without_policy_is_3600_gb_and_with_it_453_6_gb() -> None:
    result = forecast(100_000, 100, CHECKPOINT_BYTES, PRESETS["balanced"])

    assert result.bytes_without_policy / GB == 3600
    assert result.bytes_with_policy / GB == pytest.approx(453.6)


def full_plan_kept(steps: int, every: int, spec: PolicySpec) -> int:
    series = [Checkpoint(name=str(s), step=s) for s in range(every, steps + 1, every)]
    return len(plan(series, {"default": spec}).kept)


@settings(max_examples=150, deadline=None)
@given(
    saves=st.integers(0, 700),
    every=st.sampled_from([1, 7, 30, 100, 250, 333, 1000, 4000]),
    spec=st.builds(
        PolicySpec,
        keep_last=st.integers(1, 60),
        tier2_count=st.integers(0, 40),
        tier3_interval=st.none() | st.integers(1, 6000),
        cadence=st.none() | st.integers(1, 500),
    ),
    leftover=st.integers(0, 6),
)
def test_the_forecast_equals_planning_the_whole_series(
    saves: int, every: int, spec: PolicySpec, leftover: int
) -> None:
    steps = saves * every + min(leftover, every - 1)

    assert forecast(steps, every, 1, spec).kept == full_plan_kept(steps, every, spec)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_agrees_with_the_full_plan_at_long_runs(preset: str) -> None:
    spec = PRESETS[preset]
    assert forecast(300_000, 100, 1, spec).kept == full_plan_kept(300_000, 100, spec)
    assert forecast(30_000, 7, 1, spec).kept == full_plan_kept(30_000, 7, spec)


def test_a_long_run_is_fast_because_only_survivors_are_planned() -> None:
    # 100 million steps at every step: a full simulation would build 10^8 checkpoints.
    result = forecast(100_000_000, 1, 1, PRESETS["balanced"])
    assert result.saves == 100_000_000
    assert result.kept_by_tier[0] == 20
    # Tier 3 holds 99,999 whole buckets; tier 2 keeps every other of its 20 slots.
    assert result.kept == 99_999 + 10 + 20


def test_short_runs_and_limits() -> None:
    balanced = PRESETS["balanced"]
    assert forecast(99, 100, 5, balanced).saves == 0
    assert forecast(99, 100, 5, balanced).kept == 0
    assert forecast(100, 100, 5, balanced).kept == 1
    assert forecast(2_000, 100, 5, balanced).kept == 20
    rotation = replace(balanced, keep_last=5, tier2_count=0, tier3_interval=None)
    assert forecast(1_000_000, 100, 5, rotation).kept == 5
    with pytest.raises(ValueError, match="every >= 1"):
        forecast(100, 0, 5, balanced)
    with pytest.raises(ValueError, match="every >= 1"):
        forecast(-1, 10, 5, balanced)
    with pytest.raises(ValueError, match="more than"):
        forecast((MAX_SIMULATED + 10) * 1000, 1000, 1, balanced)
