"""How plans look to people (a folded timeline of the tiers) and to scripts (JSON), and the
history's table.

The timeline reads top to bottom from oldest to newest, like `ls` of a checkpoint folder: tier 3,
then tier 2, then tier 1 with the newest checkpoint at the bottom. Consecutive checkpoints with
the same decision for the same kind of reason fold into one line, so 170 checkpoints fit on a
screen while every distinct reason stays visible. Branches a restart abandoned come first, each
under its own heading (`branch:abandoned-after-2000`) with its own tiers, then the live run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from policies.model import Decision, Plan

TIER_TITLES = {
    1: "tier 1 · newest, all kept",
    2: "tier 2 · half density",
    3: "tier 3 · sparse history",
    None: "incomplete · still being written or settling",
}

BRANCH_NOTE = "abandoned by a restart · its own tiers"
LIVE_TITLE = "live run · the saves being written now"

# A run shorter than this is shown line by line: folding 2 lines into 1 hides more than it saves.
FOLD_AT = 3
# A tier that still needs more rows than this is summarised: one row per kind of decision.
TIER_ROWS_MAX = 12


def make_console(*, stderr: bool = False) -> Console:
    """Given where to print, return a console: the terminal's width on a terminal, wide otherwise.

    Piped into `less`, `grep` or a file, long lines beat table cells wrapped at 80 columns.
    """
    console = Console(highlight=False, stderr=stderr)
    if console.is_terminal:
        return console
    return Console(highlight=False, stderr=stderr, width=200)


def format_bytes(count: int | float, *, significant: int | None = None) -> str:
    """Given a byte count, return it as people read disk sizes (powers of 1000, like `df -H`,
    up to TB): one decimal in tables (`3.6 GB`, `614.0 GB`, `2.5 TB`), or with `significant`,
    at most that many significant digits and no trailing zeros, as a config writes a size
    (`50 GB`, `2.147 GB`)."""
    value = float(count)
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            break
        value /= 1000
    if significant is not None:
        return f"{value:.{significant}g} {unit}"
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def _checkpoint_json(plan: Plan, decision: Decision) -> dict[str, Any]:
    """Given a plan and one decision, return its entry in `plan --json`: a slim also lists the
    files it moves out (paths inside the checkpoint) and frees their bytes."""
    checkpoint = decision.checkpoint
    target = plan.slim_targets.get(checkpoint.name) if decision.slim else None
    freed = checkpoint.freeable_bytes if not decision.keep else 0
    entry: dict[str, Any] = {
        "name": checkpoint.name,
        "series": checkpoint.series,
        "step": checkpoint.step,
        "tier": decision.tier,
        "bytes": checkpoint.size_bytes,
        "bytes_freed": target.bytes_freed if target is not None else freed,
        "action": decision.action,
        "reasons": list(decision.reasons),
        "slimmed": checkpoint.slimmed,
    }
    if target is not None:
        entry["files"] = list(target.paths)
    return entry


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """Given a plan, return the `plan --json` document of DESIGN.md's CLI contract."""
    return {
        "root": plan.root,
        "checkpoints": [_checkpoint_json(plan, decision) for decision in plan.decisions],
        "cadences": dict(plan.cadences),
        "warnings": list(plan.warnings),
        "summary": plan.summary(),
    }


@dataclass(frozen=True)
class Run:
    """Consecutive decisions of one series, branch and tier with the same action and kind of
    reason."""

    decisions: tuple[Decision, ...]

    @property
    def first(self) -> Decision:
        return self.decisions[0]

    @property
    def last(self) -> Decision:
        return self.decisions[-1]


def _reason_kind(decision: Decision) -> tuple[str, ...]:
    # Deletion reasons name the checkpoint that represents the bucket, so they differ on every
    # line; their prefix ("tier3", "tier2") is what a reader compares.
    if decision.keep:
        return decision.reasons
    return tuple(reason.split(":", 1)[0] for reason in decision.reasons)


def fold(decisions: Iterable[Decision]) -> list[Run]:
    """Given decisions in timeline order, return them grouped into foldable runs."""
    runs: list[list[Decision]] = []
    previous_key: tuple[object, ...] | None = None
    for decision in decisions:
        key = (
            decision.checkpoint.series,
            decision.branch,
            decision.tier,
            decision.action,
            decision.checkpoint.slimmed,
            _reason_kind(decision),
        )
        if runs and key == previous_key:
            runs[-1].append(decision)
        else:
            runs.append([decision])
        previous_key = key
    return [Run(tuple(run)) for run in runs]


def _timeline_order(plan: Plan) -> list[Decision]:
    # Per series: abandoned branches first (the one reaching lowest first), then the live run;
    # each oldest first, its newest at the bottom; incomplete ones (being written now) last.
    lowest: dict[tuple[str, str], int] = {}
    for decision in plan.decisions:
        if decision.branch is not None:
            key = (decision.checkpoint.series, decision.branch)
            lowest[key] = min(lowest.get(key, decision.checkpoint.step), decision.checkpoint.step)

    def order(d: Decision) -> tuple[object, ...]:
        series = d.checkpoint.series
        group = (1, 0, "") if d.branch is None else (0, lowest[(series, d.branch)], d.branch)
        return (series, group, d.tier is None, d.checkpoint.step, d.checkpoint.name)

    return sorted(plan.decisions, key=order)


def _shown_reasons(decision: Decision) -> tuple[str, ...]:
    # Under a branch's heading its reason on every row would only repeat the heading.
    if decision.branch is None:
        return decision.reasons
    return tuple(reason for reason in decision.reasons if reason != f"branch:{decision.branch}")


def _run_reasons(run: Run) -> str:
    reasons = _shown_reasons(run.first)
    if len(run.decisions) == 1:
        # A deletion's first reason is its own tier's; the rest repeat it for later tiers.
        return ", ".join(reasons if run.first.keep else reasons[:1])
    if run.first.keep:
        steps = [str(d.checkpoint.step) for d in run.decisions]
        shown = ", ".join(steps) if len(steps) <= 4 else f"{steps[0]}, {steps[1]} … {steps[-1]}"
        return f"{', '.join(reasons)} ({shown})"
    kinds = ", ".join(reason.split(":", 1)[0] for reason in reasons)
    return f"{kinds}: not the newest of their buckets"


def timeline_table(plan: Plan, *, unfold: bool = False) -> Table:
    """Given a plan, return the rich table of its timeline (folded unless `unfold`)."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column("action")
    table.add_column("checkpoint")
    table.add_column("step", justify="right")
    table.add_column("count", justify="right")
    table.add_column("size", justify="right")
    table.add_column("reasons")
    series_seen: str | None = None
    branch_seen: object = object()
    tier_seen: object = object()
    multi_series = len({d.checkpoint.series for d in plan.decisions}) > 1
    branched = {d.checkpoint.series for d in plan.decisions if d.branch is not None}
    for decisions in _split_runs(_timeline_order(plan), unfold):
        head = decisions.first
        if multi_series and head.checkpoint.series != series_seen:
            series_seen = head.checkpoint.series
            branch_seen = tier_seen = object()
            table.add_row("", Text(f"series {series_seen}", style="bold magenta"), "", "", "", "")
        if head.checkpoint.series in branched and head.branch != branch_seen:
            branch_seen = head.branch
            tier_seen = object()
            table.add_row("", _branch_heading(head.branch), "", "", "", "")
        if head.tier != tier_seen:
            tier_seen = head.tier
            title = TIER_TITLES.get(head.tier, f"tier {head.tier}")
            table.add_row("", Text(title, style="bold cyan"), "", "", "", "")
        action = _ACTIONS[head.action]
        size = sum(d.checkpoint.size_bytes for d in decisions.decisions)
        if len(decisions.decisions) == 1:
            names, steps, count = head.checkpoint.name, str(head.checkpoint.step), ""
        else:
            names = f"{head.checkpoint.name} … {decisions.last.checkpoint.name}"
            steps = f"{head.checkpoint.step}…{decisions.last.checkpoint.step}"
            count = str(len(decisions.decisions))
        reasons = _run_reasons(decisions) + _slim_note(plan, decisions)
        table.add_row(action, names, steps, count, format_bytes(size), reasons)
    return table


_ACTIONS = {
    "keep": Text("KEEP", style="bold green"),
    "slim": Text("SLIM", style="bold yellow"),
    "delete": Text("delete", style="red"),
}


def _slim_note(plan: Plan, run: Run) -> str:
    """Given a run of the timeline, return what its slims free, or that it is slimmed."""
    if run.first.slim:
        targets = plan.slim_targets
        freed = sum(
            targets[d.checkpoint.name].bytes_freed
            for d in run.decisions
            if d.checkpoint.name in targets
        )
        return f" · frees {format_bytes(freed)}"
    if run.first.keep and run.first.checkpoint.slimmed:
        return " · slimmed (weights only)"
    return ""


def _branch_heading(branch: str | None) -> Text:
    if branch is None:
        return Text(LIVE_TITLE, style="bold green")
    return Text(f"branch:{branch} · {BRANCH_NOTE}", style="bold yellow")


def _split_runs(decisions: Sequence[Decision], unfold: bool) -> list[Run]:
    if unfold:
        return [Run((decision,)) for decision in decisions]
    runs: list[Run] = []
    for tier_decisions in _by_tier(decisions):
        rows: list[Run] = []
        for run in fold(tier_decisions):
            if len(run.decisions) < FOLD_AT:
                rows.extend(Run((decision,)) for decision in run.decisions)
            else:
                rows.append(run)
        runs.extend(_summarise(tier_decisions) if len(rows) > TIER_ROWS_MAX else rows)
    return runs


def _by_tier(decisions: Sequence[Decision]) -> list[list[Decision]]:
    groups: list[list[Decision]] = []
    for decision in decisions:
        key = (decision.checkpoint.series, decision.branch, decision.tier)
        last = groups[-1][0] if groups else None
        if last is not None and (last.checkpoint.series, last.branch, last.tier) == key:
            groups[-1].append(decision)
        else:
            groups.append([decision])
    return groups


def _summarise(decisions: Sequence[Decision]) -> list[Run]:
    # A long tier alternates keep/delete (tier 2 keeps every other save): one row per kind of
    # decision says more at a glance than a hundred alternating rows; `--all` shows them all.
    groups: dict[tuple[str, bool, tuple[str, ...]], list[Decision]] = {}
    for decision in decisions:
        key = (decision.action, decision.checkpoint.slimmed, _reason_kind(decision))
        groups.setdefault(key, []).append(decision)
    return [Run(tuple(group)) for group in groups.values()]


def summary_line(plan: Plan) -> str:
    """Given a plan, return its one-line totals."""
    summary = plan.summary()
    kept_bytes = sum(d.checkpoint.size_bytes for d in plan.decisions if d.keep)
    slims = (
        f"slim {summary['slim']} (frees {format_bytes(summary['bytes_slimmed'])}), "
        if "slim" in summary
        else ""
    )
    return (
        f"{summary['total']} checkpoints: keep {summary['keep']} ({format_bytes(kept_bytes)}), "
        f"{slims}delete {summary['delete']} (frees {format_bytes(summary['bytes_freed'])})"
    )


def print_plan(console: Console, plan: Plan, *, layout: str = "", unfold: bool = False) -> None:
    """Given a console and a plan, print its heading, timeline, warnings and totals."""
    cadences = ", ".join(f"{series}: every {steps}" for series, steps in plan.cadences.items())
    heading = f"[bold]{plan.root}[/bold]"
    if layout:
        heading += f"  layout {layout}"
    if cadences:
        heading += f"  cadence {cadences}"
    console.print(heading)
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if plan.decisions:
        console.print(timeline_table(plan, unfold=unfold))
    console.print(summary_line(plan))


# --- the cleanup history ------------------------------------------------------------------------


def _local_time(value: object) -> str:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def why_of(record: dict[str, Any]) -> str:
    """Given a history record, return the one line that says why it happened."""
    for key in ("why", "reason", "reasons"):
        value = record.get(key)
        if isinstance(value, list) and value:
            # The first reason is the checkpoint's own tier's; the rest repeat it for later
            # tiers (all of them stay in the JSON).
            return str(value[0])
        if isinstance(value, str) and value:
            return value
    if record.get("event") == "prune_run":
        mode = "dry run: " if record.get("dry_run") else ""
        return (
            f"{mode}{record.get('deleted', 0) or record.get('would_delete', 0)} deleted, "
            f"{record.get('kept', 0)} kept, {record.get('vetoed', 0)} vetoed, "
            f"{record.get('failed', 0)} failed in {record.get('seconds', 0)} s"
        )
    return ""


def _history_row(record: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    freed = record.get("bytes_freed")
    in_trash = record.get("bytes_in_trash")
    shown = format_bytes(freed) if isinstance(freed, int | float) else ""
    if isinstance(in_trash, int | float) and in_trash and record.get("event") == "delete":
        shown = f"{format_bytes(in_trash)} to trash"
    return (
        _local_time(record.get("time", "")),
        str(record.get("event", "")),
        str(record.get("root", "")),
        str(record.get("checkpoint", "")),
        shown,
        why_of(record),
    )


def history_table(records: Iterable[dict[str, Any]]) -> Table:
    """Given history records, return the rich table people read (oldest first, newest last)."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("time", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("root", no_wrap=True)
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("freed", justify="right", no_wrap=True)
    table.add_column("why", overflow="fold")
    for record in records:
        table.add_row(*_history_row(record))
    return table
