"""The values the retention policy works on: checkpoints in, a plan out.

Everything here is an immutable value with no behaviour that touches the outside world: the
daemon builds `Checkpoint`s from what it finds on disk, the policy turns them into a `Plan`, and
the safety layer and the deleter only ever read plans.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

EMPTY_METRICS: Mapping[str, float] = MappingProxyType({})
EMPTY_CADENCES: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One checkpoint as found on disk.

    `name` is the checkpoint's identity inside its root: a folder name (`checkpoint-1200`), a file
    name (`model_1200.pt`) or, for layouts where one checkpoint is several files directly in the
    root (TensorFlow's `ckpt-5.index` + `ckpt-5.data-*`), the common stem (`ckpt-5`). `entries`
    lists the names directly inside the root that make it up; deleting the checkpoint means
    removing exactly those.
    """

    name: str
    step: int
    entries: tuple[str, ...] = ()
    series: str = "default"
    layout: str = "custom"
    epoch: int | None = None
    complete: bool = True
    # Why it is not complete yet ("no trainer_state.json", "settling: written 3 s ago", ...).
    incomplete_reason: str | None = None
    size_bytes: int = 0
    # What deleting it would really free: each inode once, files with links elsewhere skipped.
    freeable_bytes: int = 0
    # Newest modification time of anything inside, seconds since the epoch.
    mtime: float = 0.0
    # Tracker files or symlinks that name it ("latest", "last.ckpt", "trainer_state.json").
    tracked_by: tuple[str, ...] = ()
    # Pins: ".keep" or "protect:<glob>".
    pinned_by: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=lambda: EMPTY_METRICS)
    # Orders saves of one step: a later re-save has a higher version (Lightning names a second
    # run's save of a step `...-v1.ckpt`, whose name sorts before the first run's).
    version: int = 0
    # An incomplete save nobody will finish (held by no process, quiet for `abandoned_after`):
    # the daemon decides that from facts and the clock; the policy plans it for deletion
    # (`abandoned-save`) unless pinned or tracked. Meaningless on a complete checkpoint.
    abandoned: bool = False

    @property
    def members(self) -> tuple[str, ...]:
        """Given a checkpoint, return the root entries it consists of (its name if none given)."""
        return self.entries or (self.name,)


@dataclass(frozen=True, slots=True)
class KeepBest:
    """Keep the `count` best checkpoints by `metric` (lowest when mode is "min")."""

    count: int
    metric: str
    mode: Literal["min", "max"] = "min"


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """The tiered policy's knobs, already resolved from presets and config.

    `tier3_interval=None` keeps nothing older than tier 2 (a plain rotation); `cadence=None` reads
    the cadence from tier 1.
    """

    keep_last: int = 20
    tier2_count: int = 20
    tier3_interval: int | None = 1000
    cadence: int | None = None
    keep_best: KeepBest | None = None


PRESETS: Mapping[str, PolicySpec] = MappingProxyType(
    {
        "balanced": PolicySpec(keep_last=20, tier2_count=20, tier3_interval=1000),
        "conservative": PolicySpec(keep_last=50, tier2_count=30, tier3_interval=500),
        "aggressive": PolicySpec(keep_last=10, tier2_count=10, tier3_interval=5000),
    }
)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the plan does with one checkpoint, and every reason for it.

    `tier` is 1, 2 or 3 for complete checkpoints of a series, None for incomplete ones.
    For a kept checkpoint `reasons` lists every rule that keeps it; for a deleted one, why no
    rule kept it. `branch` names the abandoned branch a restart left the checkpoint in
    (`abandoned-after-2000`; its reasons then include `branch:abandoned-after-2000` and its
    tier is its tier within that branch), None for the live run.
    """

    checkpoint: Checkpoint
    keep: bool
    reasons: tuple[str, ...]
    tier: int | None = None
    branch: str | None = None

    @property
    def action(self) -> Literal["keep", "delete"]:
        return "keep" if self.keep else "delete"


@dataclass(frozen=True, slots=True)
class Plan:
    """The decisions for every checkpoint of one root, ordered by series then step."""

    root: str
    decisions: tuple[Decision, ...]
    # Cadence used per series (steps between saves), for display and forecasts.
    cadences: Mapping[str, int] = field(default_factory=lambda: EMPTY_CADENCES)
    # Notes for the reader: a pattern that matched nothing, a cadence that could not be read.
    warnings: tuple[str, ...] = ()

    @property
    def kept(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.keep)

    @property
    def deleted(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.keep)

    @property
    def bytes_freed(self) -> int:
        """Given the plan, return the bytes its deletions would really free."""
        return sum(d.checkpoint.freeable_bytes for d in self.decisions if not d.keep)

    def summary(self) -> dict[str, int]:
        """Given the plan, return the counts of `plan --json`'s summary."""
        keep = sum(1 for d in self.decisions if d.keep)
        return {
            "total": len(self.decisions),
            "keep": keep,
            "delete": len(self.decisions) - keep,
            "bytes_freed": self.bytes_freed,
        }
