"""The values the retention policy works on: checkpoints in, a plan out.

Everything here is an immutable value with no behaviour that touches the outside world: the
daemon builds `Checkpoint`s from what it finds on disk, the policy turns them into a `Plan`, and
the safety layer and the deleter only ever read plans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

EMPTY_METRICS: Mapping[str, float] = MappingProxyType({})
EMPTY_CADENCES: Mapping[str, int] = MappingProxyType({})
EMPTY_TARGETS: Mapping[str, SlimTarget] = MappingProxyType({})


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
    # Its resume state (optimizer, scheduler, RNG) was moved out by ckptd: `.ckptd-slim.json`
    # is inside. Weights and metadata remain; a resume from it would start a fresh optimizer.
    slimmed: bool = False

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
class SlimSpec:
    """Slim the kept checkpoints older than tier `after` down to their weights (issue 11).

    `after: "tier1"` slims tiers 2 and 3, `"tier2"` tier 3 only. A slimmed checkpoint stays a
    checkpoint of its tier. `keep_best_full` keeps the `keep_best` ones whole too (evaluation
    needs the weights only, so by default they are slimmed like the others). `drop` are globs
    of paths inside a checkpoint that make up its resume state, instead of the layout's own
    names (None); which files they match is the daemon's business, not the policy's.
    """

    after: Literal["tier1", "tier2"]
    keep_best_full: bool = False
    drop: tuple[str, ...] | None = None

    @property
    def from_tier(self) -> int:
        """Given the spec, return the first tier it slims (2 or 3)."""
        return 2 if self.after == "tier1" else 3


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
    # None: nothing is slimmed (the default).
    slim: SlimSpec | None = None


def policy_record(spec: PolicySpec) -> dict[str, object]:
    """Given a spec, return it as the history records it (`policy` of `delete`, `prune_run`,
    `slim`): its knobs by name, `slim` only when set (records from before slimming existed had
    no such key, and a policy that slims nothing keeps that shape)."""
    record = dataclasses.asdict(spec)
    if spec.slim is None:
        del record["slim"]
    elif spec.slim.drop is not None:
        record["slim"]["drop"] = list(spec.slim.drop)
    return record


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
    tier is its tier within that branch), None for the live run. `slim` (kept ones only)
    means: keep its weights, move its resume state out (`slim:after-tier1` among its
    reasons); a checkpoint slimmed already is not slimmed again.
    """

    checkpoint: Checkpoint
    keep: bool
    reasons: tuple[str, ...]
    tier: int | None = None
    branch: str | None = None
    slim: bool = False

    @property
    def action(self) -> Literal["keep", "delete", "slim"]:
        if not self.keep:
            return "delete"
        return "slim" if self.slim else "keep"


@dataclass(frozen=True, slots=True)
class SlimTarget:
    """What slimming one checkpoint moves out, as the daemon found it: paths inside the
    checkpoint (`optimizer.pt`, `mp_rank_00/distrib_optim.pt`, `global_step400` for a folder)
    and the bytes that frees (allocated bytes, each inode once, files linked elsewhere not)."""

    paths: tuple[str, ...]
    bytes_freed: int = 0
    bytes_logical: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """The decisions for every checkpoint of one root, ordered by series then step."""

    root: str
    decisions: tuple[Decision, ...]
    # Cadence used per series (steps between saves), for display and forecasts.
    cadences: Mapping[str, int] = field(default_factory=lambda: EMPTY_CADENCES)
    # Notes for the reader: a pattern that matched nothing, a cadence that could not be read.
    warnings: tuple[str, ...] = ()
    # What each slim decision moves out, by checkpoint name (filled in by the daemon).
    slim_targets: Mapping[str, SlimTarget] = field(default_factory=lambda: EMPTY_TARGETS)

    @property
    def kept(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.keep)

    @property
    def deleted(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.keep)

    @property
    def slimmed(self) -> tuple[Decision, ...]:
        """Given the plan, return its slim decisions (kept, their resume state moved out)."""
        return tuple(d for d in self.decisions if d.slim)

    @property
    def bytes_freed(self) -> int:
        """Given the plan, return the bytes its deletions would really free."""
        return sum(d.checkpoint.freeable_bytes for d in self.decisions if not d.keep)

    @property
    def bytes_slimmed(self) -> int:
        """Given the plan, return the bytes its slims would really free."""
        targets = self.slim_targets
        return sum(
            targets[d.checkpoint.name].bytes_freed
            for d in self.decisions
            if d.slim and d.checkpoint.name in targets
        )

    def summary(self) -> dict[str, int]:
        """Given the plan, return the counts of `plan --json`'s summary (`slim` and
        `bytes_slimmed` only when it slims anything: slimmed checkpoints count as kept)."""
        keep = sum(1 for d in self.decisions if d.keep)
        counts = {
            "total": len(self.decisions),
            "keep": keep,
            "delete": len(self.decisions) - keep,
            "bytes_freed": self.bytes_freed,
        }
        slims = sum(1 for d in self.decisions if d.slim)
        if slims:
            counts["slim"] = slims
            counts["bytes_slimmed"] = self.bytes_slimmed
        return counts
