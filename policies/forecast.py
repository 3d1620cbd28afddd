"""What a policy keeps after N training steps: the numbers behind `ckptd forecast`.

The forecast is the real plan of the simulated series `every, 2·every, …, N` (one prune at the
end, which by the policy's every-k property is also what pruning after each save leaves). It does
not build all N/every checkpoints: tier-3 checkpoints that do not represent their bucket take no
part in any rule (they set no cadence, no tier boundary and no representative), so the series
handed to `plan` is only the tier-3 representatives plus everything from just below tier 2 on,
and the dropped ones are counted as deleted. tests/unit/test_forecast.py checks this against
planning the full series.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from policies.model import Checkpoint, PolicySpec
from policies.tiered import plan

# Far beyond any real run; it bounds the memory when every save is its own tier-3 bucket.
MAX_SIMULATED = 5_000_000


@dataclass(frozen=True, slots=True)
class Forecast:
    """Checkpoints and bytes after `steps` steps, with and without the policy."""

    steps: int
    every: int
    size_bytes: int
    spec: PolicySpec
    cadence: int
    saves: int
    kept: int
    kept_by_tier: tuple[int, int, int]
    # Kept checkpoints the policy's `slim` rule slims, and the share of a checkpoint that
    # slimming moves out (its resume state: about 2/3 with Adam, whose state is twice the weights).
    slimmed: int = 0
    slim_fraction: float = 0.0

    @property
    def deleted(self) -> int:
        return self.saves - self.kept

    @property
    def bytes_without_policy(self) -> int:
        return self.saves * self.size_bytes

    @property
    def bytes_with_policy(self) -> int:
        return self.kept * self.size_bytes

    @property
    def bytes_saved(self) -> int:
        return self.deleted * self.size_bytes

    @property
    def bytes_slimmed(self) -> int:
        """Given the forecast, return the bytes slimming frees on top of the policy's."""
        return self.slimmed * round(self.size_bytes * self.slim_fraction)

    @property
    def bytes_with_slim(self) -> int:
        return self.bytes_with_policy - self.bytes_slimmed


def forecast(
    steps: int, every: int, size_bytes: int, spec: PolicySpec, slim_fraction: float = 0.0
) -> Forecast:
    """Given a run of `steps` steps saving every `every` steps, `size_bytes` per checkpoint, and
    a policy, return how many checkpoints (and bytes) exist without the policy and with it; with
    the policy's `slim` rule, how many of those are slimmed, `slim_fraction` of each moved out.

    Raises ValueError for a negative step count or size, `every` below 1, a fraction outside
    [0, 1], a spec plan() refuses, or a series whose survivors alone would exceed MAX_SIMULATED.
    """
    if steps < 0 or every < 1 or size_bytes < 0:
        raise ValueError("steps and size must be >= 0 and every >= 1")
    if not 0.0 <= slim_fraction <= 1.0:
        raise ValueError(f"the slim fraction must be between 0 and 1, not {slim_fraction}")
    saves = steps // every
    # The cadence plan() would read from the full regular series (with keep_last 1 it reads the
    # whole series, which the reduced series below no longer is): pin it explicitly.
    cadence = spec.cadence if spec.cadence is not None else (every if saves >= 2 else 1)
    pinned_spec = replace(spec, cadence=cadence)

    oldest_tier1 = max(1, saves - spec.keep_last + 1)
    tier2_boundary = oldest_tier1 * every - spec.tier2_count * cadence
    # Every save from just below tier 2 on is planned in full; below that only the tier-3
    # representatives are. Whether a checkpoint represents its bucket depends only on newer
    # ones, so leaving out older non-representatives changes no decision.
    full_from = max(1, -(-tier2_boundary // every) - 1)
    count, representatives = _tier3_representatives(full_from - 1, every, spec.tier3_interval)
    if count + saves - full_from + 1 > MAX_SIMULATED:
        raise ValueError(
            f"the policy would keep more than {MAX_SIMULATED:,} checkpoints; nothing to forecast"
        )
    indices = list(representatives)
    indices.extend(range(full_from, saves + 1))
    series = [Checkpoint(name=f"step-{index * every}", step=index * every) for index in indices]
    result = plan(series, {"default": pinned_spec})
    by_tier = [0, 0, 0]
    slimmed = 0
    for decision in result.decisions:
        if decision.keep and decision.tier is not None:
            by_tier[decision.tier - 1] += 1
            slimmed += decision.slim
    return Forecast(
        steps=steps,
        every=every,
        size_bytes=size_bytes,
        spec=spec,
        cadence=cadence,
        saves=saves,
        kept=sum(by_tier),
        kept_by_tier=(by_tier[0], by_tier[1], by_tier[2]),
        slimmed=slimmed,
        slim_fraction=slim_fraction if spec.slim is not None else 0.0,
    )


def _tier3_representatives(
    last: int, every: int, interval: int | None
) -> tuple[int, Iterable[int]]:
    """Given the save indices 1..last (all in tier 3, with more saves after them), return how
    many checkpoints are the newest of their tier-3 bucket and, lazily, their indices: the saves
    whose step range [i·every, (i+1)·every) holds a multiple of the interval."""
    if interval is None or last < 1:
        return 0, ()
    if interval <= every:
        return last, range(1, last + 1)
    multiples = range(-(-every // interval), ((last + 1) * every - 1) // interval + 1)
    return len(multiples), (multiple * interval // every for multiple in multiples)
