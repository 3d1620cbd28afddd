"""The plan's human timeline and its JSON document."""

from __future__ import annotations

import io
import json

from rich.console import Console

from daemon.render import (
    _timeline_order,
    fold,
    format_bytes,
    plan_to_json,
    print_plan,
    timeline_table,
)
from policies import PRESETS, plan
from policies.model import Checkpoint, Decision, Plan


def _decision(step: int, keep: bool, tier: int | None, *reasons: str) -> Decision:
    checkpoint = Checkpoint(
        name=f"checkpoint-{step}", step=step, size_bytes=1000, freeable_bytes=1000
    )
    return Decision(checkpoint=checkpoint, keep=keep, reasons=reasons, tier=tier)


def _sample_plan() -> Plan:
    decisions = [
        _decision(step, False, 3, f"tier3: {step} is not the newest in (0, 1000]")
        for step in range(100, 1000, 100)
    ]
    decisions.append(_decision(1000, True, 3, "tier3:every-1000"))
    decisions += [_decision(step, True, 1, "tier1") for step in range(1100, 1500, 100)]
    decisions.append(_decision(1500, True, 1, "tier1", "newest"))
    decisions.append(
        Decision(
            checkpoint=Checkpoint(name="checkpoint-1600", step=1600, complete=False),
            keep=True,
            reasons=("incomplete:no trainer_state.json",),
            tier=None,
        )
    )
    return Plan(root="/data/run", decisions=tuple(decisions), cadences={"default": 100})


def _render(plan: Plan, unfold: bool = False) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, no_color=True)
    print_plan(console, plan, layout="hf", unfold=unfold)
    return buffer.getvalue()


def test_format_bytes_uses_powers_of_1000() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(999) == "999 B"
    assert format_bytes(3_600_000_000) == "3.6 GB"
    assert format_bytes(614_000_000_000) == "614.0 GB"
    assert format_bytes(2_500_000_000_000) == "2.5 TB"
    assert format_bytes(3_146_400_000_000) == "3.1 TB"  # past 1,000 GB: TB


def test_format_bytes_as_a_config_writes_a_size() -> None:
    assert format_bytes(50 * 1000**3, significant=4) == "50 GB"
    assert format_bytes(2 * 1024**3, significant=4) == "2.147 GB"  # 2GiB
    assert format_bytes(1_500_000_000_000, significant=4) == "1.5 TB"
    assert format_bytes(512, significant=4) == "512 B"


def test_runs_of_the_same_decision_fold_into_one_line() -> None:
    runs = fold(_sample_plan().decisions)
    sizes = [len(run.decisions) for run in runs]
    # 9 deletions, the tier-3 keep, 4 plain tier-1 keeps, the newest, the incomplete one.
    assert sizes == [9, 1, 4, 1, 1]


def test_timeline_reads_oldest_to_newest_and_folds_long_runs() -> None:
    text = _render(_sample_plan())
    lines = text.splitlines()
    assert "checkpoint-100 … checkpoint-900" in text
    assert "checkpoint-1100 … checkpoint-1400" in text
    # Tier 3 before tier 1; the newest complete one right before the incomplete one, at the end.
    assert text.index("tier 3") < text.index("tier 1") < text.index("incomplete ·")
    newest_line = next(i for i, line in enumerate(lines) if "checkpoint-1500" in line)
    incomplete_line = next(i for i, line in enumerate(lines) if "checkpoint-1600" in line)
    assert newest_line < incomplete_line
    assert "16 checkpoints: keep 7" in text and "delete 9 (frees 9.0 KB)" in text


def test_unfolded_timeline_lists_every_checkpoint() -> None:
    text = _render(_sample_plan(), unfold=True)
    for step in range(100, 1700, 100):
        assert f"checkpoint-{step} " in text or text.rstrip().endswith(f"checkpoint-{step}")


def test_timeline_table_has_a_row_per_run_plus_tier_headings() -> None:
    table = timeline_table(_sample_plan())
    # 5 runs + 3 headings (tier 3, tier 1, incomplete).
    assert table.row_count == 8


def test_plan_json_matches_the_cli_contract() -> None:
    document = plan_to_json(_sample_plan())
    json.dumps(document)  # serialisable as is
    assert document["root"] == "/data/run"
    assert document["summary"] == {"total": 16, "keep": 7, "delete": 9, "bytes_freed": 9000}
    first = document["checkpoints"][0]
    assert {"name", "step", "bytes", "action", "reasons"} <= set(first)
    assert first["action"] == "delete" and first["reasons"][0].startswith("tier3:")


def test_a_long_alternating_tier_is_summarised_one_row_per_kind() -> None:
    decisions = []
    for step in range(100, 4100, 100):
        kept = step % 200 == 0
        reason = "tier2:every-200" if kept else f"tier2: {step} is not the newest in its bucket"
        decisions.append(_decision(step, kept, 2, reason))
    plan = Plan(root="/data/run", decisions=tuple(decisions), cadences={"default": 100})
    table = timeline_table(plan)
    # One heading, one row of 20 deletions, one row of 20 keeps.
    assert table.row_count == 3
    text = _render(plan)
    assert "tier2:every-200 (200, 400 … 4000)" in text
    unfolded = timeline_table(plan, unfold=True)
    assert unfolded.row_count == 41


def _restarted_plan() -> Plan:
    """40 saves at 100 … 4000 written in order, then a restart from 2000 saving 2100 … 2500
    (new names), and a save in flight."""
    checkpoints = [
        Checkpoint(name=f"checkpoint-{step}", step=step, mtime=step * 0.6, size_bytes=1000)
        for step in range(100, 4001, 100)
    ]
    checkpoints += [
        Checkpoint(name=f"run2-{step}", step=step, mtime=3000 + step * 0.6, size_bytes=1000)
        for step in range(2100, 2501, 100)
    ]
    checkpoints.append(Checkpoint(name="run2-2600", step=2600, complete=False))
    return plan(checkpoints, {"default": PRESETS["balanced"]}, root="/data/run")


def test_an_abandoned_branch_has_its_own_heading_before_the_live_run() -> None:
    result = _restarted_plan()
    text = _render(result)
    lines = text.splitlines()

    def line_of(fragment: str) -> int:
        return next(i for i, line in enumerate(lines) if fragment in line)

    branch_heading = line_of("branch:abandoned-after-2000 ·")
    live_heading = line_of("live run ·")
    # The branch's own rows (its newest, 4000, in its tier 1) sit under its heading; the live
    # run follows with its newest save last before the one in flight.
    assert branch_heading < line_of("checkpoint-2100 … checkpoint-4000") < live_heading
    assert live_heading < line_of("run2-2500") < line_of("run2-2600")
    assert "tier1, newest" in lines[line_of("run2-2500")]
    assert "restart:first-save" in lines[line_of("run2-2100")]
    # The heading names the branch once; its rows do not repeat it.
    assert text.count("branch:abandoned-after-2000") == 1
    # Each group has its own tier headings.
    assert text.count("tier 1 · newest, all kept") == 2


def test_a_branch_never_folds_into_the_live_run_and_json_keeps_its_reason() -> None:
    result = _restarted_plan()

    runs = fold(_timeline_order(result))
    assert all(len({d.branch for d in run.decisions}) == 1 for run in runs)
    assert timeline_table(result, unfold=True).row_count == len(result.decisions) + 6
    document = plan_to_json(result)
    branch_rows = [
        c
        for c in document["checkpoints"]
        if c["name"].startswith("checkpoint-") and c["step"] > 2000
    ]
    assert len(branch_rows) == 20
    assert all(c["reasons"][-1] == "branch:abandoned-after-2000" for c in branch_rows)
