"""Properties of the tiered policy (DESIGN.md): results must not depend on how often it runs.

Saves come at a regular cadence from an arbitrary start (negative ones too), with cadences that
divide none of the spacings (30, 250, 333, ...), under each preset and under random knobs.
`keep_last` is at least 2 unless the cadence is given: with fewer than two distinct steps in
tier 1 the cadence can only be read from the whole series, which pruning thins, so re-planning
may thin further; plan() warns about exactly that case, and these properties assume no warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from policies import PRESETS, Checkpoint, KeepBest, Plan, PolicySpec, plan
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


# --- restarts (issue 9): the live run's saves form its tiers, abandoned branches their own -----


@dataclass
class Restart:
    """A trainer resumed from the `pick`-th surviving checkpoint (by step, modulo their count),
    saving `saves` times at the run's cadence under new names (`r<run>-<step>`).

    At the same cadence: had the restarted run saved at another one, one prune at the end could
    not tell which checkpoint it resumed from (pruning along the way may have removed saves
    between the true branch point and its first save); test_policy_restarts.py covers that.
    """

    pick: int
    saves: int


@dataclass
class RestartedRun:
    spec: PolicySpec
    start: int
    every: int
    old_saves: int
    restarts: list[Restart]
    every_k: int
    marks: list[int]


@st.composite
def restarted_runs(draw: st.DrawFn) -> RestartedRun:
    every = draw(cadences)
    restarts = draw(
        st.lists(
            st.builds(Restart, pick=st.integers(0, 10_000), saves=st.integers(1, 60)),
            min_size=1,
            max_size=3,
        )
    )
    return RestartedRun(
        spec=draw(specs()),
        start=draw(starts),
        every=every,
        old_saves=draw(st.integers(1, 150)),
        restarts=restarts,
        every_k=draw(st.integers(1, 25)),
        marks=draw(st.lists(st.integers(0, 40), min_size=1, max_size=30)),
    )


class Trainer:
    """Saves one checkpoint a minute (the mtime is the write order) and prunes by the plan.

    With `overwrite`, a save is named by its step alone (`checkpoint-<step>`, the Hugging Face
    Trainer's way) and replaces a checkpoint of that name; otherwise each run has its names.
    """

    def __init__(self, spec: PolicySpec, marks: list[int], *, overwrite: bool) -> None:
        self.spec = spec
        self.marks = marks
        self.overwrite = overwrite
        self.clock = 1_000_000.0
        self.on_disk: list[Checkpoint] = []
        self.written: list[Checkpoint] = []

    def save(self, run: int, step: int) -> Checkpoint:
        self.clock += 60.0
        mark = self.marks[len(self.written) % len(self.marks)]
        checkpoint = Checkpoint(
            name=f"checkpoint-{step}" if self.overwrite else f"r{run}-{step}",
            step=step,
            mtime=self.clock,
            metrics={"eval_loss": mark / 40} if mark % 3 == 0 else {},
            pinned_by=(".keep",) if mark == 1 else (),
        )
        self.on_disk = [*overwritten(self.on_disk, [checkpoint]), checkpoint]
        self.written.append(checkpoint)
        return checkpoint

    def plan(self) -> Plan:
        return plan(self.on_disk, {"default": self.spec})

    def prune(self) -> Plan:
        result = self.plan()
        self.on_disk = [d.checkpoint for d in result.decisions if d.keep]
        return result


def overwritten(before: list[Checkpoint], saves: list[Checkpoint]) -> list[Checkpoint]:
    """Given checkpoints and later saves, return the checkpoints no save replaced (by name)."""
    replaced = {checkpoint.name for checkpoint in saves}
    return [checkpoint for checkpoint in before if checkpoint.name not in replaced]


def prune_through_restarts(case: RestartedRun, *, overwrite: bool) -> None:
    """From the checkpoints on disk when a trainer restarts, pruning after every k-th save of
    the restarted run ends with what one prune at its end leaves; the newest write always
    survives as the live run's newest; re-planning deletes nothing more, branches and all.

    The trainer resumes from a checkpoint of the live run. Resuming from one of an abandoned
    branch is outside these properties: its saves join the live run above a gap, and with a
    tiny tier 1 that gap can pass for the cadence (test_policy_restarts.py shows what it keeps).
    """
    trainer = Trainer(case.spec, case.marks, overwrite=overwrite)
    for index in range(case.old_saves):
        trainer.save(0, case.start + index * case.every)
        if (index + 1) % case.every_k == 0:
            trainer.prune()
    final = trainer.prune()

    saved = 0
    for run, restart in enumerate(case.restarts, start=1):
        trainer.clock += 600.0  # the restart itself
        at_restart = list(trainer.on_disk)
        candidates = [d.checkpoint for d in final.kept if d.branch is None]
        resumed = candidates[restart.pick % len(candidates)]
        for index in range(1, restart.saves + 1):
            newest = trainer.save(run, resumed.step + index * case.every)
            saved += 1
            if saved % case.every_k == 0:
                result = trainer.prune()
                assert newest in trainer.on_disk
                decision = next(d for d in result.decisions if d.checkpoint is newest)
                assert decision.branch is None
                assert "newest" in decision.reasons
        final = trainer.prune()
        saves = trainer.written[-restart.saves :]
        once = plan([*overwritten(at_restart, saves), *saves], {"default": case.spec})
        assert names([d.checkpoint for d in once.decisions if d.keep]) == names(trainer.on_disk)

    assert trainer.written[-1] in trainer.on_disk
    for decision in final.decisions:
        if decision.branch is not None:
            assert decision.reasons[-1] == f"branch:{decision.branch}"
    assume(not final.warnings)
    assert plan(trainer.on_disk, {"default": case.spec}).deleted == ()


@PROPERTY_SETTINGS
@given(case=restarted_runs())
def test_restarts_keep_the_newest_write_and_prune_alike_however_often(case: RestartedRun) -> None:
    prune_through_restarts(case, overwrite=False)


@PROPERTY_SETTINGS
@given(case=restarted_runs())
def test_restarts_that_overwrite_by_name_prune_alike_however_often(case: RestartedRun) -> None:
    prune_through_restarts(case, overwrite=True)
