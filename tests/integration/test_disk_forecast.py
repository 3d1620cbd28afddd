"""The growth forecast: pure arithmetic from the observed cadence and checkpoint size."""

from __future__ import annotations

import pytest

from daemon.disk.forecast import forecast_growth, observed_cadence
from policies.model import PRESETS, Checkpoint, PolicySpec

GB = 10**9


def test_observed_cadence_from_step_order_and_mtimes() -> None:
    # One save per hour, 3.6 GB each; the oldest one is outside the 20-checkpoint window.
    checkpoints = [
        Checkpoint(name=f"checkpoint-{s}", step=s, size_bytes=3_600_000_000, mtime=s * 36.0)
        for s in range(100, 2300, 100)
    ]
    checkpoints.append(Checkpoint(name="checkpoint-2300", step=2300, complete=False, mtime=1e9))
    saves_per_day, size = observed_cadence(checkpoints)
    assert saves_per_day == pytest.approx(24.0)
    assert size == 3_600_000_000


def test_observed_cadence_with_too_little_to_go_on() -> None:
    assert observed_cadence([]) == (0.0, 0)
    assert observed_cadence([Checkpoint(name="a", step=1, size_bytes=5)]) == (0.0, 5)


def test_the_motivating_case() -> None:
    # 3.6 GB every hour at a 100-step cadence, 614 GB free, balanced preset, tiers already full.
    forecast = forecast_growth(
        free_bytes=614 * GB,
        saves_per_day=24,
        checkpoint_bytes=int(3.6 * GB),
        cadence_steps=100,
        spec=PRESETS["balanced"],
        kept_now=30,
    )
    assert forecast.bytes_per_day_without == pytest.approx(86.4 * GB)
    assert forecast.days_until_full_without == pytest.approx(614 / 86.4)
    # Only tier 3 grows: one checkpoint per 1000 steps = 2.4 per day.
    assert forecast.bytes_per_day_with == pytest.approx(8.64 * GB)
    assert forecast.days_until_full_with == pytest.approx(614 / 8.64)


def test_the_fill_up_of_tiers_comes_out_of_the_free_space_first() -> None:
    forecast = forecast_growth(
        free_bytes=100 * GB,
        saves_per_day=10,
        checkpoint_bytes=GB,
        cadence_steps=100,
        spec=PolicySpec(keep_last=20, tier2_count=20, tier3_interval=1000),
        kept_now=10,  # 20 more to go before the steady state (20 + 10)
    )
    # 20 GB of fill-up at 10 GB/day = 2 days, then 80 GB at 1 GB/day.
    assert forecast.days_until_full_with == pytest.approx(2 + 80)


def test_a_plain_rotation_never_fills_and_no_saving_never_fills() -> None:
    rotation = forecast_growth(
        free_bytes=10 * GB,
        saves_per_day=100,
        checkpoint_bytes=GB,
        cadence_steps=1,
        spec=PolicySpec(keep_last=5, tier2_count=0, tier3_interval=None),
        kept_now=5,
    )
    assert rotation.bytes_per_day_with == 0 and rotation.days_until_full_with is None
    idle = forecast_growth(
        free_bytes=GB,
        saves_per_day=0,
        checkpoint_bytes=GB,
        cadence_steps=None,
        spec=PRESETS["balanced"],
        kept_now=0,
    )
    assert idle.days_until_full_without is None and idle.days_until_full_with is None


def test_the_policy_simulation_agrees_with_the_steady_state_arithmetic() -> None:
    # 170 checkpoints so far (tiers full): only tier 3 grows, 2.4 checkpoints a day.
    common = dict(
        free_bytes=614 * GB,
        saves_per_day=24.0,
        checkpoint_bytes=int(3.6 * GB),
        cadence_steps=100,
        spec=PRESETS["balanced"],
        kept_now=43,
    )
    arithmetic = forecast_growth(**common)  # type: ignore[arg-type]
    simulated = forecast_growth(**common, newest_step=17000)  # type: ignore[arg-type]
    assert simulated.bytes_per_day_with == pytest.approx(arithmetic.bytes_per_day_with, rel=0.02)
    assert simulated.days_until_full_with == pytest.approx(
        arithmetic.days_until_full_with, rel=0.02
    )
    assert simulated.days_until_full_without == arithmetic.days_until_full_without


def test_the_simulation_counts_the_fill_up_of_young_runs() -> None:
    # 5 checkpoints so far: 25 more are kept before only tier 3 grows (balanced keeps 30).
    forecast = forecast_growth(
        free_bytes=100 * GB,
        saves_per_day=10,
        checkpoint_bytes=GB,
        cadence_steps=100,
        spec=PRESETS["balanced"],
        kept_now=5,
        newest_step=500,
    )
    assert forecast.days_until_full_with == pytest.approx(2.5 + 75, rel=0.03)


def test_a_rotation_never_fills_in_the_simulation_either() -> None:
    forecast = forecast_growth(
        free_bytes=10 * GB,
        saves_per_day=100,
        checkpoint_bytes=GB,
        cadence_steps=1,
        spec=PolicySpec(keep_last=5, tier2_count=0, tier3_interval=None),
        kept_now=5,
        newest_step=1000,
    )
    assert forecast.days_until_full_with is None and forecast.bytes_per_day_with == 0
