"""The tiered policy against DESIGN.md's reference numbers and every rule's reasons."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from policies import PRESETS, Checkpoint, Decision, KeepBest, Plan, PolicySpec, plan
from policies.tiered import bucket_upper, most_common_gap

BALANCED = PRESETS["balanced"]


def regular(count: int, every: int = 100, start: int | None = None) -> list[Checkpoint]:
    """Given a count and a cadence, return checkpoints at start, start+every, ... (HF names)."""
    first = every if start is None else start
    return [
        Checkpoint(name=f"checkpoint-{first + index * every}", step=first + index * every)
        for index in range(count)
    ]


def kept_steps(result: Plan, tier: int | None = None) -> list[int]:
    return [
        decision.checkpoint.step
        for decision in result.decisions
        if decision.keep and (tier is None or decision.tier == tier)
    ]


def by_step(result: Plan) -> dict[int, tuple[bool, tuple[str, ...], int | None]]:
    return {d.checkpoint.step: (d.keep, d.reasons, d.tier) for d in result.decisions}


def steps_range(first: int, last: int, spacing: int) -> list[int]:
    return list(range(first, last + 1, spacing))


# --- DESIGN.md's reference numbers -------------------------------------------------------------


def test_170_checkpoints_keep_exactly_the_43_of_the_design() -> None:
    result = plan(regular(170), {"default": BALANCED})

    assert kept_steps(result, tier=1) == steps_range(15100, 17000, 100)
    assert kept_steps(result, tier=2) == steps_range(13200, 15000, 200)
    assert kept_steps(result, tier=3) == steps_range(1000, 13000, 1000)
    assert result.summary() == {"total": 170, "keep": 43, "delete": 127, "bytes_freed": 0}
    assert result.cadences == {"default": 100}
    assert result.warnings == ()


def test_172_checkpoints_keep_43() -> None:
    result = plan(regular(172), {"default": BALANCED})

    assert (len(result.kept), len(result.deleted)) == (43, 129)
    assert kept_steps(result, tier=1) == steps_range(15300, 17200, 100)
    # Tier 2 is the 20 slots 13300 … 15200; 13200 falls to tier 3 and (13000, 14000] keeps 14000.
    assert kept_steps(result, tier=2) == steps_range(13400, 15200, 200)
    assert kept_steps(result, tier=3) == steps_range(1000, 13000, 1000)


@pytest.mark.parametrize(("count", "kept"), [(1000, 126), (500, 76)])
def test_a_year_and_six_months_at_a_100_step_cadence(count: int, kept: int) -> None:
    result = plan(regular(count), {"default": BALANCED})

    assert len(result.kept) == kept
    assert len(result.deleted) == count - kept


def test_the_conservative_preset_keeps_500_1500_in_tier_2_as_tier_3_representatives() -> None:
    result = plan(regular(1000), {"default": PRESETS["conservative"]})
    decisions = by_step(result)

    # 50 / 30 / 500: tier 1 is 95100 … 100000, tier 2 the 30 slots 92100 … 95000.
    assert kept_steps(result, tier=1) == steps_range(95100, 100000, 100)
    assert kept_steps(result, tier=2) == sorted(
        [*steps_range(92200, 95000, 200), 92500, 93500, 94500]
    )
    assert decisions[92500] == (True, ("tier3:every-500",), 2)
    assert decisions[93000] == (True, ("tier2:every-200", "tier3:every-500"), 2)
    assert kept_steps(result, tier=3) == steps_range(500, 92000, 500)
    assert len(result.kept) == 50 + 18 + 184


def test_the_aggressive_preset() -> None:
    result = plan(regular(1000), {"default": PRESETS["aggressive"]})

    # 10 / 10 / 5000: tier 1 99100 … 100000, tier 2 the slots 98100 … 99000 every 200, and
    # (95000, 100000]'s newest is 100000 in tier 1, so tier 2 keeps nothing for tier 3.
    assert kept_steps(result, tier=1) == steps_range(99100, 100000, 100)
    assert kept_steps(result, tier=2) == steps_range(98200, 99000, 200)
    assert kept_steps(result, tier=3) == steps_range(5000, 95000, 5000)
    assert len(result.kept) == 34


# --- reasons ----------------------------------------------------------------------------------


def test_every_decision_carries_its_reasons() -> None:
    decisions = by_step(plan(regular(170), {"default": BALANCED}))

    assert decisions[17000] == (True, ("tier1", "newest"), 1)
    assert decisions[15100] == (True, ("tier1",), 1)
    assert decisions[13200] == (True, ("tier2:every-200",), 2)
    assert decisions[14000] == (True, ("tier2:every-200", "tier3:every-1000"), 2)
    assert decisions[13000] == (True, ("tier3:every-1000",), 3)
    assert decisions[13100] == (
        False,
        (
            "tier2: not the newest in (13000, 13200]; 13200 represents it",
            "tier3: not the newest in (13000, 14000]; 14000 represents it",
        ),
        2,
    )
    assert decisions[12900] == (
        False,
        ("tier3: not the newest in (12000, 13000]; 13000 represents it",),
        3,
    )


def test_a_tier2_checkpoint_whose_bucket_reaches_into_tier_1_is_not_its_representative() -> None:
    decisions = by_step(plan(regular(171), {"default": BALANCED}))

    # Tier 1 starts at 15200, so (15000, 15200]'s newest is 15200, a tier-1 checkpoint.
    assert decisions[15100][0] is False
    assert decisions[15100][1][0] == "tier2: not the newest in (15000, 15200]; 15200 represents it"
    assert decisions[15100][1][1] == "tier3: not the newest in (15000, 16000]; 16000 represents it"


def test_incomplete_checkpoints_are_kept_and_take_no_part_in_the_tiers() -> None:
    checkpoints = regular(170)
    checkpoints.append(
        Checkpoint(
            name="checkpoint-17100",
            step=17100,
            complete=False,
            incomplete_reason="no trainer_state.json",
        )
    )
    checkpoints.append(Checkpoint(name="checkpoint-50", step=50, complete=False))

    result = plan(checkpoints, {"default": BALANCED})
    decisions = by_step(result)

    assert decisions[17100] == (True, ("incomplete:no trainer_state.json",), None)
    assert decisions[50] == (True, ("incomplete",), None)
    # Exactly the 170-checkpoint reference otherwise, including who is newest.
    assert decisions[17000] == (True, ("tier1", "newest"), 1)
    assert kept_steps(result, tier=3) == steps_range(1000, 13000, 1000)
    assert len(result.kept) == 45
    assert [d.checkpoint.step for d in result.decisions][:2] == [50, 100]
    assert result.decisions[-1].checkpoint.step == 17100


def test_pins_and_trackers_keep_what_the_tiers_would_delete_and_say_so() -> None:
    checkpoints = [
        Checkpoint(name=c.name, step=c.step, pinned_by=(".keep",))
        if c.step == 12900
        else Checkpoint(name=c.name, step=c.step, tracked_by=("latest",))
        if c.step == 13100
        else Checkpoint(name=c.name, step=c.step, tracked_by=("last.ckpt",))
        if c.step == 17000
        else c
        for c in regular(170)
    ]

    decisions = by_step(plan(checkpoints, {"default": BALANCED}))

    assert decisions[12900] == (True, ("pinned:.keep",), 3)
    assert decisions[13100] == (True, ("tracked:latest",), 2)
    assert decisions[17000] == (True, ("tier1", "newest", "tracked:last.ckpt"), 1)
    # A pin adds to what is kept; the bucket's representative stays.
    assert decisions[13000][0] is True


def test_keep_best_keeps_the_best_count_by_metric_with_the_value() -> None:
    losses = {3100: 0.31, 5200: 0.29, 7700: 0.5, 9000: 0.29}
    checkpoints = [
        Checkpoint(name=c.name, step=c.step, metrics={"eval_loss": losses[c.step]})
        if c.step in losses
        else c
        for c in regular(170)
    ]
    spec = PolicySpec(keep_best=KeepBest(count=2, metric="eval_loss", mode="min"))

    decisions = by_step(plan(checkpoints, {"default": spec}))

    # 0.29 twice: both, the tie is no reason to drop either; 0.31 is third.
    assert decisions[5200] == (True, ("best:eval_loss=0.29",), 3)
    assert decisions[9000] == (True, ("tier3:every-1000", "best:eval_loss=0.29"), 3)
    assert decisions[3100][0] is False
    assert decisions[7700][0] is False


def test_keep_best_max_mode_and_ties_go_to_the_newer_checkpoint() -> None:
    scores = {200: 0.9, 300: 0.9, 400: 0.1}
    checkpoints = [
        Checkpoint(name=f"m-{step}", step=step, metrics={"accuracy": value})
        for step, value in scores.items()
    ] + [Checkpoint(name=f"m-{step}", step=step) for step in range(500, 3000, 100)]
    spec = PolicySpec(
        keep_last=2, tier2_count=0, tier3_interval=None, keep_best=KeepBest(1, "accuracy", "max")
    )

    decisions = by_step(plan(checkpoints, {"default": spec}))

    assert decisions[300] == (True, ("best:accuracy=0.9",), 3)
    assert decisions[200][0] is False
    assert decisions[400][0] is False


def test_a_rotation_keeps_the_newest_few_and_nothing_older() -> None:
    spec = PolicySpec(keep_last=5, tier2_count=0, tier3_interval=None)
    result = plan(regular(30, every=50), {"default": spec})

    assert kept_steps(result) == steps_range(1300, 1500, 50)
    assert by_step(result)[1000] == (False, ("tier3: keeps nothing (tier3_interval: none)",), 3)


# --- cadence ----------------------------------------------------------------------------------


def test_the_cadence_comes_from_tier_1_not_from_the_thinned_history() -> None:
    # Survivors of an earlier prune (1000-step gaps) under a dense tier 1 (100-step gaps).
    steps = [*steps_range(1000, 13000, 1000), *steps_range(13200, 15000, 200)]
    steps += steps_range(15100, 17000, 100)
    checkpoints = [Checkpoint(name=f"c{step}", step=step) for step in steps]

    result = plan(checkpoints, {"default": BALANCED})

    assert result.cadences == {"default": 100}
    assert result.deleted == ()


def test_a_cadence_override_wins_and_a_missing_tier_1_gap_falls_back_with_a_warning() -> None:
    assert plan(regular(50), {"default": PolicySpec(cadence=250)}).cadences == {"default": 250}

    rotation = plan(regular(10), {"default": PolicySpec(keep_last=1)})
    assert rotation.cadences == {"default": 100}
    assert len(rotation.warnings) == 1
    assert "cadence" in rotation.warnings[0]
    assert plan(regular(1), {"default": PolicySpec(keep_last=1)}).cadences == {"default": 1}


def test_without_a_tier_1_gap_the_fallback_cadence_drifts_and_the_plan_says_so() -> None:
    # The documented limit of the idempotence property: tier 1 is two checkpoints of one step.
    checkpoints = [*regular(10), Checkpoint(name="checkpoint-1000-resaved", step=1000)]
    spec = {"default": PolicySpec(keep_last=2)}

    first = plan(checkpoints, spec)
    again = plan([d.checkpoint for d in first.kept], spec)

    assert "set `cadence:`" in first.warnings[0]
    assert first.cadences == {"default": 100}
    assert again.cadences == {"default": 200}
    assert [d.checkpoint.step for d in again.deleted] == [200, 600]
    # With the cadence given, nothing drifts.
    pinned = {"default": PolicySpec(keep_last=2, cadence=100)}
    survivors = [d.checkpoint for d in plan(checkpoints, pinned).kept]
    assert plan(survivors, pinned).deleted == ()


def test_most_common_gap_prefers_the_smallest_on_ties_and_ignores_equal_steps() -> None:
    assert most_common_gap([0, 100, 200, 450, 700]) == 100
    assert most_common_gap([0, 300, 400, 700, 800]) == 100
    assert most_common_gap([5, 5, 5]) is None
    assert most_common_gap([]) is None


def test_bucket_math_holds_for_zero_and_negative_steps() -> None:
    assert bucket_upper(1000, 1000) == 1000
    assert bucket_upper(1001, 1000) == 2000
    assert bucket_upper(0, 1000) == 0
    assert bucket_upper(-1, 1000) == 0
    assert bucket_upper(-1000, 1000) == -1000
    assert bucket_upper(-1001, 1000) == -1000


def test_a_series_starting_below_zero_keeps_one_per_bucket() -> None:
    result = plan(
        regular(100, every=100, start=-5000), {"default": PolicySpec(keep_last=5, tier2_count=0)}
    )

    assert kept_steps(result, tier=3) == steps_range(-5000, 4000, 1000)
    assert kept_steps(result, tier=1) == steps_range(4500, 4900, 100)


# --- series, order, validation ----------------------------------------------------------------


def test_several_series_each_get_their_own_policy_and_order() -> None:
    epochs = [
        Checkpoint(name=f"checkpoint_epoch_{e}.pt", step=e, series="epoch") for e in range(1, 31)
    ]
    mid = [
        Checkpoint(name=f"mid_epoch_{s // 1000}_{s}.pt", step=s, series="mid_epoch")
        for s in range(250, 10001, 250)
    ]
    specs = {
        "mid_epoch": PolicySpec(keep_last=5, tier2_count=0, tier3_interval=None),
        "default": PolicySpec(keep_last=3, tier2_count=2, tier3_interval=10),
    }
    shuffled = epochs + mid
    random.Random(7).shuffle(shuffled)

    result = plan(shuffled, specs, root="/data/run")

    assert result.root == "/data/run"
    assert [d.checkpoint.series for d in result.decisions] == ["epoch"] * 30 + ["mid_epoch"] * 40
    assert [d.checkpoint.step for d in result.decisions[:30]] == list(range(1, 31))
    assert kept_steps(plan(mid, specs)) == steps_range(9000, 10000, 250)
    # Epochs: tier 1 28-30, tier 2 slots 26-27 (every 2), tier 3 every 10.
    assert [d.checkpoint.step for d in result.decisions[:30] if d.keep] == [10, 20, 26, 28, 29, 30]
    assert result.cadences == {"epoch": 1, "mid_epoch": 250}


def test_the_plan_does_not_depend_on_input_order_even_with_equal_steps() -> None:
    checkpoints = regular(300, every=30, start=7)
    checkpoints += [Checkpoint(name="checkpoint-4507-b", step=4507), Checkpoint(name="a", step=97)]
    expected = plan(checkpoints, {"default": BALANCED})

    for seed in range(3):
        shuffled = list(checkpoints)
        random.Random(seed).shuffle(shuffled)
        assert plan(shuffled, {"default": BALANCED}) == expected
    names_at_4507 = [d.checkpoint.name for d in expected.decisions if d.checkpoint.step == 4507]
    assert names_at_4507 == ["checkpoint-4507", "checkpoint-4507-b"]


def test_an_empty_root_plans_nothing() -> None:
    assert plan([], {}) == Plan(root="", decisions=())


def test_series_without_a_spec_use_default_then_balanced() -> None:
    result = plan(regular(170), {})
    assert len(result.kept) == 43
    result = plan(regular(170), {"default": PolicySpec(keep_last=170)})
    assert len(result.kept) == 170


@pytest.mark.parametrize(
    "spec",
    [
        PolicySpec(keep_last=0),
        PolicySpec(tier2_count=-1),
        PolicySpec(tier3_interval=0),
        PolicySpec(cadence=0),
        PolicySpec(keep_best=KeepBest(0, "eval_loss")),
    ],
)
def test_a_spec_no_config_allows_is_refused(spec: PolicySpec) -> None:
    with pytest.raises(ValueError, match="policy of series 'default'"):
        plan(regular(3), {"default": spec})


def test_bytes_freed_sums_the_deleted_checkpoints() -> None:
    checkpoints: Iterable[Checkpoint] = (
        Checkpoint(name=c.name, step=c.step, size_bytes=10, freeable_bytes=7) for c in regular(170)
    )
    assert plan(list(checkpoints), {}).bytes_freed == 127 * 7


@pytest.mark.parametrize("series_count", [3, 40])
def test_many_series_are_grouped_and_ordered_alike(series_count: int) -> None:
    checkpoints = [
        Checkpoint(name=f"s{series}-{step}", step=step, series=f"s{series:02d}")
        for step in range(100, 5001, 100)
        for series in range(series_count)
    ]
    random.Random(series_count).shuffle(checkpoints)

    result = plan(checkpoints, {"default": PolicySpec(keep_last=5, tier2_count=5)})

    expected_order = [
        (f"s{series:02d}", step) for series in range(series_count) for step in range(100, 5001, 100)
    ]
    assert [(d.checkpoint.series, d.checkpoint.step) for d in result.decisions] == expected_order
    single = plan(regular(50), {"default": PolicySpec(keep_last=5, tier2_count=5)})
    assert len(result.kept) == series_count * len(single.kept)


def test_decisions_are_ordinary_frozen_values_and_the_collector_is_restored() -> None:
    import dataclasses
    import gc

    decision = plan(regular(30), {}).decisions[3]

    rebuilt = Decision(decision.checkpoint, decision.keep, decision.reasons, decision.tier)
    assert decision == rebuilt
    assert repr(decision) == repr(rebuilt)
    assert dataclasses.replace(decision, keep=True).keep is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.keep = True  # type: ignore[misc]
    assert gc.isenabled()
    gc.disable()
    try:
        plan(regular(30), {})
        assert not gc.isenabled()
    finally:
        gc.enable()
