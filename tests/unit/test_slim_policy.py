"""The slim rule of a policy (issue 11): which kept checkpoints keep their weights only.

Pure: plans of checkpoint values. What files a slim moves, and the guard's last word, are
tested in tests/integration/test_slimming.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import PRESETS, Checkpoint, KeepBest, Plan, PolicySpec, SlimSpec, plan
from policies.forecast import forecast
from policies.model import policy_record
from policies.slim import slim_blockers
from tests.unit.test_policy_properties import PROPERTY_SETTINGS, regular_series, specs

BALANCED = PRESETS["balanced"]


def series_of(count: int, every: int = 100) -> list[Checkpoint]:
    return [Checkpoint(name=f"checkpoint-{i * every}", step=i * every) for i in range(1, count + 1)]


def slimmed_names(result: Plan) -> list[str]:
    return [d.checkpoint.name for d in result.decisions if d.slim]


def test_after_tier1_slims_every_kept_checkpoint_of_tiers_2_and_3() -> None:
    spec = replace(BALANCED, slim=SlimSpec("tier1"))
    result = plan(series_of(170), {"default": spec})
    kept = result.kept
    assert len(kept) == 43
    slimmed = [d for d in kept if d.slim]
    assert {d.tier for d in slimmed} == {2, 3} and len(slimmed) == 23
    assert all(d.action == "slim" and "slim:after-tier1" in d.reasons for d in slimmed)
    whole = [d for d in kept if not d.slim]
    assert [d.tier for d in whole] == [1] * 20
    assert whole[-1].checkpoint.step == 17000 and "newest" in whole[-1].reasons
    assert result.summary()["slim"] == 23


def test_after_tier2_slims_tier_3_only() -> None:
    spec = replace(BALANCED, slim=SlimSpec("tier2"))
    result = plan(series_of(170), {"default": spec})
    assert {d.tier for d in result.slimmed} == {3}
    assert slimmed_names(result) == [f"checkpoint-{step}" for step in range(1000, 14000, 1000)]


def test_slimming_changes_no_keep_or_delete_decision() -> None:
    checkpoints = series_of(500, every=30)
    without = plan(checkpoints, {"default": BALANCED})
    with_slim = plan(checkpoints, {"default": replace(BALANCED, slim=SlimSpec("tier1"))})
    assert [d.keep for d in without.decisions] == [d.keep for d in with_slim.decisions]
    assert [d.tier for d in without.decisions] == [d.tier for d in with_slim.decisions]
    for before, after in zip(without.decisions, with_slim.decisions, strict=True):
        assert after.reasons[: len(before.reasons)] == before.reasons
    assert without.slimmed == () and "slim" not in without.summary()


def test_without_slim_no_decision_is_slimmed_and_the_fast_path_holds() -> None:
    result = plan(series_of(170), {"default": BALANCED})
    assert not any(d.slim for d in result.decisions)
    assert {d.action for d in result.decisions} == {"keep", "delete"}


def test_never_slimmed_tracked_pinned_incomplete_or_slimmed_already() -> None:
    checkpoints = series_of(170)
    marked = {
        "checkpoint-1000": {"tracked_by": ("latest",)},
        "checkpoint-2000": {"pinned_by": (".keep",)},
        "checkpoint-3000": {"slimmed": True},
        "checkpoint-4000": {"complete": False, "incomplete_reason": "no trainer_state.json"},
    }
    checkpoints = [replace(c, **marked.get(c.name, {})) for c in checkpoints]  # type: ignore[arg-type]
    result = plan(checkpoints, {"default": replace(BALANCED, slim=SlimSpec("tier1"))})
    by_name = {d.checkpoint.name: d for d in result.decisions}
    for name in marked:
        assert by_name[name].keep and not by_name[name].slim, by_name[name]
    assert by_name["checkpoint-5000"].slim


def test_keep_best_is_slimmed_unless_keep_best_full() -> None:
    checkpoints = [
        replace(c, metrics={"eval_loss": 0.1 if c.step == 1500 else 1.0}) for c in series_of(170)
    ]
    best = KeepBest(1, "eval_loss", "min")
    for full, expected in ((False, True), (True, False)):
        spec = replace(BALANCED, keep_best=best, slim=SlimSpec("tier1", keep_best_full=full))
        decision = next(
            d for d in plan(checkpoints, {"default": spec}).decisions if d.checkpoint.step == 1500
        )
        assert decision.keep and decision.reasons[0] == "best:eval_loss=0.1"
        assert decision.slim is expected


def test_each_series_has_its_own_slim_rule() -> None:
    epochs = [replace(c, series="epochs", name=f"e-{c.step}") for c in series_of(60)]
    result = plan(
        series_of(60) + epochs,
        {"default": BALANCED, "epochs": replace(BALANCED, slim=SlimSpec("tier1"))},
    )
    assert {d.checkpoint.series for d in result.slimmed} == {"epochs"}


def test_blockers_added_after_planning_are_seen() -> None:
    decision = plan(series_of(170), {"default": replace(BALANCED, slim=SlimSpec("tier1"))})
    first = decision.slimmed[0]
    held = replace(first, reasons=(*first.reasons, "held:alice until 2026-06-01 12:00"))
    assert slim_blockers(held) == ("held",)
    assert slim_blockers(replace(first, reasons=("tier3:every-1000", "last-good"))) == (
        "last-good",
    )
    assert slim_blockers(first) == ()


def test_the_recorded_policy_has_no_slim_key_unless_set() -> None:
    assert "slim" not in policy_record(BALANCED)
    record = policy_record(replace(BALANCED, slim=SlimSpec("tier2", drop=("opt_state",))))
    assert record["slim"] == {"after": "tier2", "keep_best_full": False, "drop": ["opt_state"]}


def test_an_unknown_after_is_refused() -> None:
    spec = replace(BALANCED, slim=SlimSpec("tier3"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"slim\.after"):
        plan(series_of(3), {"default": spec})


# --- path independence ----------------------------------------------------------------------


def prune_and_slim(on_disk: Sequence[Checkpoint], spec: PolicySpec) -> list[Checkpoint]:
    """One prune with slimming: the survivors, those the plan slims marked slimmed."""
    return [
        replace(d.checkpoint, slimmed=True) if d.slim else d.checkpoint
        for d in plan(on_disk, {"default": spec}).decisions
        if d.keep
    ]


def state(checkpoints: Sequence[Checkpoint]) -> list[tuple[str, bool]]:
    return [(c.name, c.slimmed) for c in checkpoints]


@PROPERTY_SETTINGS
@given(
    series=regular_series(max_saves=200),
    base=specs(),
    slim=st.builds(SlimSpec, st.sampled_from(["tier1", "tier2"]), st.booleans()),
    every_k=st.integers(1, 60),
)
def test_slimming_after_every_kth_save_equals_slimming_once_at_the_end(
    series: list[Checkpoint], base: PolicySpec, slim: SlimSpec, every_k: int
) -> None:
    spec = replace(base, slim=slim)
    on_disk: list[Checkpoint] = []
    for saved, checkpoint in enumerate(series, start=1):
        on_disk.append(checkpoint)
        if saved % every_k == 0:
            on_disk = prune_and_slim(on_disk, spec)
            # The newest complete checkpoint is never slimmed.
            assert not on_disk[-1].slimmed
    incremental = prune_and_slim(on_disk, spec)
    assert state(incremental) == state(prune_and_slim(series, spec))
    # Once at the end is a fixed point: nothing more to slim, nothing more to delete.
    again = plan(incremental, {"default": spec})
    assert again.deleted == () and again.slimmed == ()


@settings(max_examples=60, deadline=None)
@given(series=regular_series(max_saves=120), base=specs())
def test_a_slim_spec_never_slims_tier_1_nor_anything_protected(
    series: list[Checkpoint], base: PolicySpec
) -> None:
    result = plan(series, {"default": replace(base, slim=SlimSpec("tier1"))})
    for decision in result.decisions:
        checkpoint = decision.checkpoint
        if decision.slim:
            assert decision.keep and decision.tier in (2, 3)
            assert not (checkpoint.pinned_by or checkpoint.tracked_by)
            assert "newest" not in decision.reasons


# --- the forecast ---------------------------------------------------------------------------

GB = 1000**3


@pytest.mark.parametrize(
    ("steps", "kept", "slimmed", "with_slim_gb"),
    [(17_000, 43, 23, 99.6), (50_000, 76, 56, 139.2), (100_000, 126, 106, 199.2)],
)
def test_forecast_with_slim_counts_slimmed_checkpoints_at_their_weights(
    steps: int, kept: int, slimmed: int, with_slim_gb: float
) -> None:
    spec = replace(BALANCED, slim=SlimSpec("tier1"))
    result = forecast(steps, 100, int(3.6 * GB), spec, slim_fraction=2 / 3)
    assert (result.kept, result.slimmed) == (kept, slimmed)
    assert result.bytes_with_policy == kept * int(3.6 * GB)
    assert result.bytes_with_slim / GB == pytest.approx(with_slim_gb)


def test_forecast_without_a_slim_rule_slims_nothing() -> None:
    result = forecast(100_000, 100, int(3.6 * GB), BALANCED, slim_fraction=2 / 3)
    assert result.slimmed == 0 and result.bytes_with_slim == result.bytes_with_policy
    after_tier2 = forecast(100_000, 100, GB, replace(BALANCED, slim=SlimSpec("tier2")), 0.5)
    assert after_tier2.slimmed == after_tier2.kept_by_tier[2] == 96
    with pytest.raises(ValueError, match="between 0 and 1"):
        forecast(100, 10, GB, BALANCED, slim_fraction=1.5)


def test_the_policy_line_says_what_is_slimmed() -> None:
    from daemon.render import describe_policy

    assert "slim" not in describe_policy(BALANCED)
    line = describe_policy(replace(BALANCED, slim=SlimSpec("tier2", keep_best_full=True)))
    assert line.endswith("slim after tier2 (tier 3 keep weights only, keep_best whole)")
