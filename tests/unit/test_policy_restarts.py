"""Restarts (issue 9 point 4): the live run's saves form its tiers; an abandoned branch is kept
as its own series under the same policy, named by its branch point, never mixed in by step.
Plus the `abandoned-save` plan for crashed saves the daemon flags as abandoned."""

from __future__ import annotations

from dataclasses import replace

import pytest

from policies import PRESETS, Checkpoint, Plan, PolicySpec, plan
from policies.lineage import JITTER_SECONDS, trace

BALANCED = {"default": PRESETS["balanced"]}
SAVE_SECONDS = 60.0


class Disk:
    """A training root as the policy sees it: saves write `checkpoint-<step>` (a save to an
    existing name overwrites it, as the Hugging Face Trainer does) and prunes delete what the
    plan deletes."""

    def __init__(self, specs: dict[str, PolicySpec] | None = None) -> None:
        self.specs = specs or BALANCED
        self.checkpoints: dict[str, Checkpoint] = {}
        self.clock = 0.0

    def save(self, step: int, *, name: str | None = None, late: float = 0.0) -> Checkpoint:
        self.clock += SAVE_SECONDS
        checkpoint = Checkpoint(
            name=name or f"checkpoint-{step}", step=step, mtime=self.clock + late
        )
        self.checkpoints[checkpoint.name] = checkpoint
        return checkpoint

    def plan(self) -> Plan:
        return plan(list(self.checkpoints.values()), self.specs)

    def prune(self) -> Plan:
        result = self.plan()
        for decision in result.deleted:
            del self.checkpoints[decision.checkpoint.name]
        return result

    def run(self, steps: range, *, prune: bool = True) -> None:
        for step in steps:
            self.save(step)
            if prune:
                self.prune()

    def steps(self) -> list[int]:
        return sorted(checkpoint.step for checkpoint in self.checkpoints.values())


def decisions_by_step(result: Plan) -> dict[int, tuple[bool, tuple[str, ...], int | None]]:
    return {d.checkpoint.step: (d.keep, d.reasons, d.tier) for d in result.decisions}


def outcome(result: Plan) -> list[tuple[str, bool, tuple[str, ...], int | None, str | None]]:
    """The plan without the checkpoints' own values (mtimes differ between the compared plans)."""
    return [(d.checkpoint.name, d.keep, d.reasons, d.tier, d.branch) for d in result.decisions] + [
        ("cadences", True, tuple(map(str, result.cadences.items())), None, None)
    ]


def without_mtimes(disk: Disk) -> Plan:
    return plan([replace(c, mtime=0.0) for c in disk.checkpoints.values()], disk.specs)


def the_issue_disk() -> Disk:
    """60 checkpoints at 100 … 6000, pruned after each save (balanced)."""
    disk = Disk()
    disk.run(range(100, 6001, 100))
    return disk


# --- the issue's scenario ---------------------------------------------------------------------


def test_a_restart_from_2000_keeps_each_new_save_right_after_it_is_written() -> None:
    disk = the_issue_disk()
    before_restart = dict(disk.checkpoints)

    for step in range(2100, 3001, 100):
        written = disk.save(step)
        result = disk.prune()
        assert written.name in disk.checkpoints, f"the newest save {step} was deleted"
        kept = next(d for d in result.decisions if d.checkpoint.name == written.name)
        assert kept.reasons[:2] == ("tier1", "newest")
        assert kept.branch is None

    # Every save of the restarted run is kept, and so is its history up to the branch point.
    assert [s for s in disk.steps() if s <= 3000] == [1000, 2000, *range(2100, 3001, 100)]
    # Pruning after every save left what one prune at the end leaves.
    once = Disk()
    once.checkpoints = before_restart
    once.clock = disk.clock - 10 * SAVE_SECONDS
    once.run(range(2100, 3001, 100), prune=False)
    once.prune()
    assert sorted(once.checkpoints) == sorted(disk.checkpoints)


def test_the_abandoned_branch_is_planned_as_its_own_series_with_its_reason() -> None:
    disk = the_issue_disk()
    disk.run(range(2100, 3001, 100))

    result = disk.plan()
    decisions = decisions_by_step(result)

    assert result.deleted == ()
    assert result.cadences == {"default": 100}
    # The live run: 3000 is its newest, the branch point and the first saves witness the restart.
    assert decisions[3000] == (True, ("tier1", "newest"), 1)
    assert decisions[2000] == (True, ("tier1", "restart:resumed-from"), 1)
    assert decisions[2100] == (True, ("tier1", "restart:first-save"), 1)
    assert decisions[2200] == (True, ("tier1", "restart:second-save"), 1)
    # The stale steps above 3000 are the old run's, under its own tiers, never the live newest.
    branch = [d for d in result.decisions if d.branch is not None]
    assert {d.branch for d in branch} == {"abandoned-after-2000"}
    assert [d.checkpoint.step for d in branch] == [*range(3200, 4001, 200), *range(4100, 6001, 100)]
    assert decisions[6000] == (True, ("tier1", "branch:abandoned-after-2000"), 1)
    assert decisions[3200] == (True, ("tier2:every-200", "branch:abandoned-after-2000"), 2)
    assert all(d.reasons[-1] == "branch:abandoned-after-2000" for d in branch)


def test_the_branch_keeps_its_own_policy_and_its_deletions_say_the_branch() -> None:
    # Unpruned: the abandoned run's 60 saves are thinned as a series of their own.
    disk = Disk()
    disk.run(range(100, 6001, 100), prune=False)
    disk.run(range(2100, 2301, 100), prune=False)

    result = disk.plan()
    branch = [d for d in result.decisions if d.branch == "abandoned-after-2000"]

    # The old 2100-2300 were overwritten by the new run; the branch is the old 2400 … 6000.
    assert [d.checkpoint.step for d in branch] == list(range(2400, 6001, 100))
    kept = [d.checkpoint.step for d in branch if d.keep]
    assert kept == [*range(2400, 4001, 200), *range(4100, 6001, 100)]
    deleted = [d for d in branch if not d.keep]
    assert deleted[0].reasons == (
        "tier2: not the newest in (2400, 2600]; 2600 represents it",
        "tier3: not the newest in (2000, 3000]; 3000 represents it",
        "branch:abandoned-after-2000",
    )
    # The live run: 100 … 2000 as history, the three new saves in its tier 1.
    live_tier1 = [d.checkpoint.step for d in result.decisions if d.branch is None and d.tier == 1]
    assert live_tier1 == list(range(400, 2301, 100))


def test_without_mtimes_or_in_write_order_nothing_changes() -> None:
    in_order = Disk()
    in_order.run(range(100, 17001, 100), prune=False)

    assert outcome(in_order.plan()) == outcome(without_mtimes(in_order))
    assert len(in_order.plan().kept) == 43
    assert trace([100, 200, 300], [5.0, 5.0, 9.0]) is None


# --- several restarts, new runs, branch names -------------------------------------------------


def test_two_restarts_make_two_branches_each_named_by_its_branch_point() -> None:
    disk = the_issue_disk()
    disk.run(range(2100, 3001, 100))  # restart 1: from 2000
    disk.run(range(2600, 2801, 100))  # restart 2: from 2500, overwriting 2600 … 2800

    result = disk.plan()
    branches = {d.checkpoint.step: d.branch for d in result.decisions if d.branch}

    assert {step for step, name in branches.items() if name == "abandoned-after-2500"} == {
        2900,
        3000,
    }
    assert min(s for s, name in branches.items() if name == "abandoned-after-2000") == 3200
    assert decisions_by_step(result)[2800] == (True, ("tier1", "newest"), 1)
    assert decisions_by_step(result)[2500][1] == ("tier1", "restart:resumed-from")


def test_two_restarts_from_the_same_step_get_distinct_branches() -> None:
    disk = the_issue_disk()
    disk.run(range(2100, 2501, 100))
    disk.save(2100)  # resumed from 2000 again: checkpoint-2100 is overwritten
    disk.prune()

    result = disk.plan()
    names = sorted({d.branch for d in result.decisions if d.branch})

    assert names == ["abandoned-after-2000", "abandoned-after-2000#2"]
    second = [d.checkpoint.step for d in result.decisions if d.branch == "abandoned-after-2000#2"]
    assert second == list(range(2200, 2501, 100))
    assert decisions_by_step(result)[2100] == (True, ("tier1", "newest", "restart:first-save"), 1)


def test_a_restarted_run_resaving_a_step_under_a_new_name_abandons_the_older_save() -> None:
    # Resumed from 2000 again, the run saves step 2100 as `-v1` (Lightning's way): the first
    # 2100 belongs to the run it abandoned, and 2000 is the branch point.
    disk = the_issue_disk()
    disk.run(range(2100, 2501, 100))
    disk.save(2100, name="checkpoint-2100-v1")

    result = disk.plan()
    second = [d.checkpoint.name for d in result.decisions if d.branch == "abandoned-after-2000#2"]

    assert second == [f"checkpoint-{step}" for step in range(2100, 2501, 100)]
    v1 = next(d for d in result.decisions if d.checkpoint.name == "checkpoint-2100-v1")
    assert (v1.keep, v1.branch, v1.reasons) == (
        True,
        None,
        ("tier1", "newest", "restart:first-save"),
    )


def test_a_restart_at_another_cadence_is_still_a_restart() -> None:
    # Resumed from 2000, saving every 250: the branch point is the highest step below the first
    # new save, 2200 (the policy cannot tell it was not what the run resumed from).
    disk = the_issue_disk()
    disk.run(range(2250, 3001, 250))

    result = disk.plan()
    live_new = [d.checkpoint.step for d in result.decisions if d.branch is None and d.tier == 1]

    assert live_new[-4:] == [2250, 2500, 2750, 3000]
    assert {d.branch for d in result.decisions if d.checkpoint.step > 3000} == {
        "abandoned-after-2200"
    }
    assert result.cadences == {"default": 250}
    assert result.deleted == ()


def test_a_new_run_in_an_old_runs_folder_leaves_the_old_run_as_one_branch() -> None:
    disk = the_issue_disk()
    for step in range(100, 1001, 100):
        written = disk.save(step)
        disk.prune()
        assert written.name in disk.checkpoints

    result = disk.plan()
    old = [d for d in result.decisions if d.branch is not None]

    # checkpoint-1000 was overwritten by the new run; everything above is the old run's.
    assert {d.branch for d in old} == {"abandoned-earlier-run"}
    assert min(d.checkpoint.step for d in old) == 2000
    live = [d.checkpoint.step for d in result.decisions if d.branch is None]
    assert live == list(range(100, 1001, 100))
    assert result.deleted == ()


def test_resuming_from_the_abandoned_branch_loses_nothing_of_it() -> None:
    # Restarted from 2000 by mistake, the trainer goes back to the old run's newest, 6000. Its
    # saves join the live run (the lineage it last wrote), above a gap; the old run stays a
    # branch with its own tiers, so nothing of it is lost, and each new save is kept.
    disk = the_issue_disk()
    disk.run(range(2100, 3001, 100))
    branch_before = {d.checkpoint.name for d in disk.plan().decisions if d.branch}

    for step in range(6100, 6501, 100):
        written = disk.save(step)
        disk.prune()
        assert written.name in disk.checkpoints

    result = disk.plan()
    assert {d.checkpoint.name for d in result.decisions if d.branch} == branch_before
    assert decisions_by_step(result)[6500] == (True, ("tier1", "newest"), 1)


def test_the_live_cadence_is_read_from_the_branch_point_on_not_the_thinned_history() -> None:
    # 170 saves pruned: tier 2 holds every 200th step up to 15000. A restart from 15000 puts
    # that thinned stretch into the live run's tier 1 next to only a few new saves.
    disk = Disk()
    disk.run(range(100, 17001, 100))
    before = disk.steps()
    disk.run(range(15100, 15501, 100))

    result = disk.plan()

    assert result.cadences == {"default": 100}
    assert result.deleted == ()
    assert [s for s in disk.steps() if s <= 15000] == [s for s in before if s <= 15000]


# --- what is not a restart --------------------------------------------------------------------


def test_saves_finishing_out_of_order_within_the_jitter_are_one_run() -> None:
    disk = Disk()
    for step in range(100, 6001, 100):
        # Each pair of saves finishes in reverse order, a second apart.
        disk.save(step, late=1.0 if step % 200 else -1.0)
    assert outcome(disk.plan()) == outcome(without_mtimes(disk))
    assert JITTER_SECONDS > 1.0


def test_a_single_late_save_is_no_restart_once_the_run_goes_on() -> None:
    disk = Disk()
    disk.run(range(100, 3001, 100), prune=False)
    disk.save(3200)
    disk.save(3100)  # finished 60 s after 3200
    disk.save(3300)

    assert outcome(disk.plan()) == outcome(without_mtimes(disk))


def test_an_evaluation_writing_into_an_old_checkpoint_splits_nothing_once_the_run_saves() -> None:
    disk = the_issue_disk()
    touched = replace(disk.checkpoints["checkpoint-3000"], mtime=disk.clock + 3600)
    disk.checkpoints[touched.name] = touched

    # Until the next save it looks like a restart from 3000: nothing is deleted meanwhile.
    assert disk.plan().deleted == ()
    assert decisions_by_step(disk.plan())[6000][0] is True

    disk.clock += 3600
    disk.save(6100)
    assert outcome(disk.plan()) == outcome(without_mtimes(disk))


@pytest.mark.parametrize(
    ("late", "kept", "newest"), [(1.0, [1000], 1000), (10.0, [800, 900, 1000], 900)]
)
def test_the_newest_write_is_the_newest_unless_within_the_jitter(
    late: float, kept: list[int], newest: int
) -> None:
    # A one-checkpoint rotation; 900 finished `late` seconds after 1000. A second apart, the
    # order is noise and the highest step is the newest, as without mtimes. Ten seconds apart,
    # 900 is a restart's save: the live run's newest, and 1000 an abandoned branch of its own
    # (800, the branch point, is kept as its witness).
    spec = {"default": PolicySpec(keep_last=1, tier2_count=0, tier3_interval=None, cadence=100)}
    checkpoints = [
        Checkpoint(name="c-800", step=800, mtime=900.0),
        Checkpoint(name="c-1000", step=1000, mtime=1000.0),
        Checkpoint(name="c-900", step=900, mtime=1000.0 + late),
    ]

    result = plan(checkpoints, spec)

    assert [d.checkpoint.step for d in result.kept] == kept
    (newest_decision,) = [d for d in result.decisions if "newest" in d.reasons]
    assert newest_decision.checkpoint.step == newest
    assert newest_decision.branch is None


# --- abandoned saves ---------------------------------------------------------------------------


def test_an_incomplete_save_flagged_abandoned_is_planned_for_deletion() -> None:
    disk = Disk()
    disk.run(range(100, 1001, 100), prune=False)
    crashed = Checkpoint(
        name="checkpoint-1100",
        step=1100,
        complete=False,
        incomplete_reason="no trainer_state.json",
        abandoned=True,
    )
    writing = Checkpoint(name="checkpoint-1200", step=1200, complete=False)

    result = plan([*disk.checkpoints.values(), crashed, writing], BALANCED)
    decisions = decisions_by_step(result)

    assert decisions[1100] == (False, ("abandoned-save",), None)
    assert decisions[1200] == (True, ("incomplete",), None)
    # It takes no part in the tiers: 1000 is still the newest.
    assert decisions[1000] == (True, ("tier1", "newest"), 1)


@pytest.mark.parametrize(
    "protection", [{"pinned_by": (".keep",)}, {"tracked_by": ("latest",)}], ids=["pin", "tracker"]
)
def test_a_pinned_or_tracked_abandoned_save_is_kept(protection: dict[str, tuple[str]]) -> None:
    crashed = Checkpoint(name="c", step=5, complete=False, abandoned=True, **protection)  # type: ignore[arg-type]

    (decision,) = plan([crashed], BALANCED).decisions

    assert decision.keep is True
    assert decision.reasons[0] == "incomplete"


def test_the_abandoned_flag_means_nothing_on_a_complete_checkpoint() -> None:
    checkpoint = Checkpoint(name="c", step=5, abandoned=True)
    assert plan([checkpoint], BALANCED).decisions[0].reasons == ("tier1", "newest")
