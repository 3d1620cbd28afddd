"""The growth forecast: how fast a root's checkpoints fill its filesystem, and in how many days
it is full, without pruning and with the policy (the policy's own simulation where it can)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from policies.forecast import forecast as simulate
from policies.model import Checkpoint, PolicySpec

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True, slots=True)
class Forecast:
    """Given a root's observed saving: growth per day and days until its filesystem is full,
    without pruning and with the policy (None: never, at this rate)."""

    saves_per_day: float
    checkpoint_bytes: int
    bytes_per_day_without: float
    bytes_per_day_with: float
    days_until_full_without: float | None
    days_until_full_with: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            name: (None if isinstance(value, float) and math.isinf(value) else value)
            for name, value in asdict(self).items()
        }


def observed_cadence(checkpoints: Sequence[Checkpoint], *, window: int = 20) -> tuple[float, int]:
    """Given a series' checkpoints, return (saves per day, typical checkpoint bytes) observed
    over its newest `window` complete ones (by step, mtimes for the time between them)."""
    complete = sorted((c for c in checkpoints if c.complete), key=lambda c: c.step)[-window:]
    if not complete:
        return 0.0, 0
    sizes = sorted(c.size_bytes for c in complete)
    typical = sizes[len(sizes) // 2]
    if len(complete) < 2:
        return 0.0, typical
    span = complete[-1].mtime - complete[0].mtime
    if span <= 0:
        return 0.0, typical
    return (len(complete) - 1) * SECONDS_PER_DAY / span, typical


def forecast_growth(
    *,
    free_bytes: int,
    saves_per_day: float,
    checkpoint_bytes: int,
    cadence_steps: int | None,
    spec: PolicySpec,
    kept_now: int,
    newest_step: int | None = None,
    slim_fraction: float = 0.0,
) -> Forecast:
    """Given free space, the saving rate and size, the cadence, the policy and how many
    checkpoints the policy keeps now, return the growth forecast.

    Without pruning every save stays. With the policy and `newest_step` known, the policy's own
    simulation (`policies.forecast`: the real plan of the series saved so far and of the series
    d days on) says how many checkpoints it keeps then; the days until full are the first d at
    which the growth of that count fills the free space (bisection, horizon 100 years). Without
    `newest_step`, the steady-state arithmetic: tiers 1 and 2 hold `keep_last + tier2_count / 2`
    once full, so only tier 3 grows, one checkpoint per `tier3_interval` steps; until tiers 1
    and 2 are full every save stays, and that fill-up comes out of the free space first.
    With the policy's `slim` rule, each checkpoint it slims counts `1 - slim_fraction` of its
    size (the share its resume state is, measured on the root's own checkpoints).
    """
    if newest_step is not None and cadence_steps and saves_per_day > 0 and checkpoint_bytes > 0:
        try:
            return _simulated_forecast(
                free_bytes=free_bytes,
                saves_per_day=saves_per_day,
                checkpoint_bytes=checkpoint_bytes,
                cadence_steps=cadence_steps,
                spec=spec,
                newest_step=newest_step,
                slim_fraction=slim_fraction,
            )
        except ValueError:
            pass  # a series the simulation refuses: the arithmetic below still answers
    without = saves_per_day * checkpoint_bytes
    if cadence_steps and spec.tier3_interval:
        with_policy = (
            saves_per_day * checkpoint_bytes * min(1.0, cadence_steps / spec.tier3_interval)
        )
        if spec.slim is not None:
            with_policy *= 1.0 - slim_fraction  # tier 3, where it grows, is slimmed
    else:
        with_policy = 0.0
    steady_count = spec.keep_last + spec.tier2_count // 2
    fill_up = max(0, steady_count - kept_now) * checkpoint_bytes

    def days(rate: float, room: float) -> float | None:
        return None if rate <= 0 else max(0.0, room) / rate

    if without <= 0:
        days_with = None
    elif fill_up >= free_bytes:
        days_with = days(without, free_bytes)
    else:
        fill_days = fill_up / without
        rest = days(with_policy, free_bytes - fill_up)
        days_with = None if rest is None else fill_days + rest
    return Forecast(
        saves_per_day=saves_per_day,
        checkpoint_bytes=checkpoint_bytes,
        bytes_per_day_without=without,
        bytes_per_day_with=with_policy,
        days_until_full_without=days(without, free_bytes),
        days_until_full_with=days_with,
    )


HORIZON_DAYS = 36500.0


def _simulated_forecast(
    *,
    free_bytes: int,
    saves_per_day: float,
    checkpoint_bytes: int,
    cadence_steps: int,
    spec: PolicySpec,
    newest_step: int,
    slim_fraction: float = 0.0,
) -> Forecast:
    """Given the observed saving and the policy, return the forecast from the policy's own
    simulation of what it keeps after a number of steps (see `forecast_growth`)."""
    steps_per_day = saves_per_day * cadence_steps

    def kept_after(days: float) -> int:
        steps = newest_step + int(days * steps_per_day)
        result = simulate(steps, cadence_steps, checkpoint_bytes, spec, slim_fraction)
        return result.bytes_with_slim

    kept_now = kept_after(0.0)

    def grown(days: float) -> int:
        return kept_after(days) - kept_now

    with_policy = grown(365.0) / 365.0
    days_with: float | None = None
    if grown(HORIZON_DAYS) >= free_bytes:
        low, high = 0.0, HORIZON_DAYS
        while high - low > max(0.01, 0.002 * high):
            middle = (low + high) / 2
            low, high = (low, middle) if grown(middle) >= free_bytes else (middle, high)
        days_with = high
    without = saves_per_day * checkpoint_bytes
    return Forecast(
        saves_per_day=saves_per_day,
        checkpoint_bytes=checkpoint_bytes,
        bytes_per_day_without=without,
        bytes_per_day_with=with_policy,
        days_until_full_without=free_bytes / without,
        days_until_full_with=days_with,
    )
