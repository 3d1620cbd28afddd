"""How plans look to people (a folded timeline of the tiers) and to scripts (JSON), and the
history's table.

The timeline reads top to bottom from oldest to newest, like `ls` of a checkpoint folder: tier 3,
then tier 2, then tier 1 with the newest checkpoint at the bottom. Consecutive checkpoints with
the same decision for the same kind of reason fold into one line, so 170 checkpoints fit on a
screen while every distinct reason stays visible. Branches a restart abandoned come first, each
under its own heading (`branch:abandoned-after-2000`) with its own tiers, then the live run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any

from daemon import columns
from daemon.clock import local_text, machine_zone
from policies.model import Decision, Plan, PolicySpec

# rich is imported where a table or a console is made, not here: `ckptd run` uses this module's
# plain-text helpers (durations, sizes, the policy line) and never prints a table, and rich's
# import alone is 6 MB of the daemon's resident size (bench/bench_daemon.py).
if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

TIER_TITLES = {
    1: "tier 1 · newest, all kept",
    2: "tier 2 · half density",
    3: "tier 3 · sparse history",
    None: "incomplete · still being written or settling",
}
# The incomplete group's title when it holds a checkpoint found corrupt (daemon/verification.py).
CORRUPT_TITLE = "incomplete or corrupt · kept; a corrupt one never counts as the newest"
CORRUPT_REASON = "incomplete:corrupt: "

BRANCH_NOTE = "abandoned by a restart · its own tiers"
LIVE_TITLE = "live run · the saves being written now"

# A run shorter than this is shown line by line: folding 2 lines into 1 hides more than it saves.
FOLD_AT = 3
# A tier that still needs more rows than this is summarised: one row per kind of decision.
TIER_ROWS_MAX = 12


# The width of a view piped into `less`, `grep` or a file when $COLUMNS does not say otherwise.
PIPED_WIDTH = 200


def make_console(*, stderr: bool = False) -> Console:
    """Given where to print, return a console: the terminal's width on a terminal (or $COLUMNS),
    wide otherwise.

    Piped into `less`, `grep` or a file, long lines beat table cells wrapped at 80 columns; an
    exported $COLUMNS is a width asked for, and wins on a terminal and in a pipe alike.
    """
    from rich.console import Console

    console = Console(highlight=False, emoji=False, stderr=stderr)
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console
    return Console(highlight=False, emoji=False, stderr=stderr, width=PIPED_WIDTH)


def format_duration(seconds: float) -> str:
    """Given seconds, return the shortest exact form such as `90s`, `5m`, `1h` or `2d`."""
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


def format_age(seconds: float) -> str:
    """Given an age in seconds, return it as a reader compares ages: `40s`, `12m`, `5h`, `3d`."""
    seconds = max(0.0, seconds)
    for unit, factor, up_to in (("s", 1, 90), ("m", 60, 90 * 60), ("h", 3600, 48 * 3600)):
        if seconds < up_to:
            return f"{seconds / factor:.0f}{unit}"
    return f"{seconds / 86400:.0f}d"


def format_wait(seconds: float) -> str:
    """Given a time still to wait, return it as `5h 12m`, `40m` or `3d 2h` (at least `1m`)."""
    minutes = max(1, round(seconds / 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m"


def describe_policy(spec: PolicySpec) -> str:
    """Given a resolved policy, return its knobs as numbers in one line."""
    parts = [f"keep_last {spec.keep_last}", f"tier2_count {spec.tier2_count}"]
    parts.append(
        f"tier3_interval {spec.tier3_interval}"
        if spec.tier3_interval is not None
        else "tier3_interval none (nothing kept past tier 2)"
    )
    parts.append(
        f"cadence {spec.cadence}" if spec.cadence else "cadence read from the newest saves"
    )
    if spec.keep_best is not None:
        best = spec.keep_best
        parts.append(f"keep_best {best.count} by {best.metric} ({best.mode})")
    if spec.slim is not None:
        slimmed = "tiers 2 and 3" if spec.slim.after == "tier1" else "tier 3"
        whole = ", keep_best whole" if spec.slim.keep_best_full else ""
        parts.append(f"slim after {spec.slim.after} ({slimmed} keep weights only{whole})")
    return ", ".join(parts)


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


def plan_to_json(
    plan: Plan, *, protected: Sequence[Protected] = (), policy: str | None = None
) -> dict[str, Any]:
    """Given a plan (and the protected entries beside it, and the line saying which policy
    applies), return the `plan --json` document of DESIGN.md's CLI contract."""
    document: dict[str, Any] = {
        "root": plan.root,
        "checkpoints": [_checkpoint_json(plan, decision) for decision in plan.decisions],
        "cadences": dict(plan.cadences),
        "warnings": list(plan.warnings),
        "summary": plan.summary(),
    }
    if protected:
        document["protected"] = [
            {"name": entry.name, "bytes": entry.bytes, "reasons": list(entry.reasons)}
            for entry in protected
        ]
    if policy is not None:
        document["policy"] = policy
    return document


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


# The deletion reason of a series with `tier3_interval: null` (policies.tiered).
KEEPS_NOTHING = "keeps nothing"
PROTECTED_TITLE = "protected · not checkpoints, never deleted"


def _deletion_kind(reason: str) -> str:
    # "tier3: not the newest in (…]" and "tier3: keeps nothing (tier3_interval: none)" are two
    # different stories: a thinned bucket, or a tier that keeps nothing at all.
    prefix = reason.split(":", 1)[0]
    return f"{prefix} {KEEPS_NOTHING}" if KEEPS_NOTHING in reason else prefix


def _reason_kind(decision: Decision) -> tuple[str, ...]:
    # Deletion reasons name the checkpoint that represents the bucket, so they differ on every
    # line; their prefix ("tier3", "tier2") is what a reader compares.
    if decision.keep:
        return decision.reasons
    return tuple(_deletion_kind(reason) for reason in decision.reasons)


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
    kinds = [_deletion_kind(reason) for reason in reasons]
    thinned = [kind for kind in kinds if not kind.endswith(KEEPS_NOTHING)]
    parts = [f"{', '.join(thinned)}: not the newest of their buckets"] if thinned else []
    if len(thinned) < len(kinds):
        parts.append("tier3: keeps nothing past tier 2 (tier3_interval: none)")
    return "; ".join(parts)


@dataclass(frozen=True)
class Protected:
    """A root entry that is no checkpoint but is never deleted: a `protect:` glob names it."""

    name: str
    bytes: int
    mtime: float
    reasons: tuple[str, ...]


def _run_age(run: Run, now: float | None) -> str:
    if now is None:
        return ""
    ages = [
        format_age(now - d.checkpoint.mtime) if d.checkpoint.mtime > 0 else "?"
        for d in (run.first, run.last)
    ]
    return ages[0] if len(run.decisions) == 1 or ages[0] == ages[1] else f"{ages[0]}…{ages[1]}"


@dataclass(frozen=True)
class _Row:
    """One line of the timeline: a heading (`title`, in `style`) or a row's `values`."""

    title: str = ""
    style: str = ""
    values: tuple[str, ...] = ()
    action: str = "keep"  # "keep", "slim" or "delete": the first value's style


def _timeline_fields(with_age: bool) -> tuple[columns.Field, ...]:
    # A range of names breaks only at the space of "a … b", never inside a name; the reasons
    # go on a line of their own under the row when the terminal is narrow.
    return (
        columns.Field("action"),
        columns.Field("checkpoint", wraps=True, breaks_words=False),
        columns.Field("step", right=True),
        columns.Field("count", right=True),
        *([columns.Field("age", right=True)] if with_age else []),
        columns.Field("size", right=True),
        columns.Field("reasons", wraps=True, moves=True),
    )


def _timeline_rows(
    plan: Plan, unfold: bool, now: float | None, protected: Sequence[Protected]
) -> list[_Row]:
    """Given a plan, return its headings and rows in reading order."""
    rows: list[_Row] = []

    def row(action: str, name: str, step: str, count: str, age: str, size: str, why: str) -> None:
        values = (
            ACTION_WORDS[action],
            name,
            step,
            count,
            *([age] if now is not None else []),
            size,
            why,
        )
        rows.append(_Row(values=values, action=action))

    if protected:
        rows.append(_Row(PROTECTED_TITLE, "bold cyan"))
        for entry in protected:
            age = format_age(now - entry.mtime) if now is not None and entry.mtime > 0 else ""
            reasons = ", ".join(entry.reasons)
            row("keep", entry.name, "", "", age, format_bytes(entry.bytes), reasons)
    series_seen: str | None = None
    branch_seen: object = object()
    tier_seen: object = object()
    multi_series = len({d.checkpoint.series for d in plan.decisions}) > 1
    with_corrupt = {
        d.checkpoint.series
        for d in plan.decisions
        if d.reasons and d.reasons[0].startswith(CORRUPT_REASON)
    }
    branched = {d.checkpoint.series for d in plan.decisions if d.branch is not None}
    for decisions in _split_runs(_timeline_order(plan), unfold):
        head = decisions.first
        if multi_series and head.checkpoint.series != series_seen:
            series_seen = head.checkpoint.series
            branch_seen = tier_seen = object()
            rows.append(_Row(f"series {series_seen}", "bold magenta"))
        if head.checkpoint.series in branched and head.branch != branch_seen:
            branch_seen = head.branch
            tier_seen = object()
            rows.append(_branch_heading(head.branch))
        if head.tier != tier_seen:
            tier_seen = head.tier
            title = TIER_TITLES.get(head.tier, f"tier {head.tier}")
            if head.tier is None and head.checkpoint.series in with_corrupt:
                title = CORRUPT_TITLE
            rows.append(_Row(title, "bold cyan"))
        size = format_bytes(sum(d.checkpoint.size_bytes for d in decisions.decisions))
        if len(decisions.decisions) == 1:
            names, steps, count = head.checkpoint.name, str(head.checkpoint.step), ""
        else:
            names = f"{head.checkpoint.name} … {decisions.last.checkpoint.name}"
            steps = f"{head.checkpoint.step}…{decisions.last.checkpoint.step}"
            count = str(len(decisions.decisions))
        age = _run_age(decisions, now)
        why = _run_reasons(decisions) + _slim_note(plan, decisions)
        row(head.action, names, steps, count, age, size, why)
    return rows


ACTION_WORDS = {"keep": "KEEP", "slim": "SLIM", "delete": "delete"}
ACTION_STYLES = {"keep": "bold green", "slim": "bold yellow", "delete": "red"}


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


def timeline_table(
    plan: Plan,
    *,
    unfold: bool = False,
    now: float | None = None,
    protected: Sequence[Protected] = (),
) -> Table:
    """Given a plan, return its timeline as a rich table (folded unless `unfold`; with `now`,
    an age column; `protected` entries first, under their own heading)."""
    from rich.table import Table
    from rich.text import Text

    fields = _timeline_fields(now is not None)
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for field in fields:
        table.add_column(field.header, justify="right" if field.right else "left", overflow="fold")
    for entry in _timeline_rows(plan, unfold, now, protected):
        if entry.values:
            action = Text(entry.values[0], style=ACTION_STYLES[entry.action])
            table.add_row(action, *entry.values[1:])
        else:
            table.add_row("", Text(entry.title, style=entry.style), *[""] * (len(fields) - 2))
    return table


def timeline_lines(
    plan: Plan,
    width: int,
    *,
    unfold: bool = False,
    now: float | None = None,
    protected: Sequence[Protected] = (),
) -> list[Text]:
    """Given a plan and the width, return the timeline's lines (folded unless `unfold`): one
    line per row where it fits; at 80 columns each row's reasons on a line of their own.
    Nothing is ever cut."""
    from rich.text import Text

    fields = _timeline_fields(now is not None)
    entries = _timeline_rows(plan, unfold, now, protected)
    layout = columns.layout(fields, [e.values for e in entries if e.values], width, indent=8)
    heading_at = " " * columns.start_of(layout, 1)
    lines = [Text(line, style="bold") for line in columns.header(layout)]
    for entry in entries:
        if not entry.values:
            lines.append(Text(heading_at) + Text(entry.title, style=entry.style))
            continue
        for number, line in enumerate(columns.rows(layout, entry.values)):
            text = Text(line)
            if number == 0:
                text.stylize(ACTION_STYLES[entry.action], 0, len(entry.values[0]))
            lines.append(text)
    return lines


def _branch_heading(branch: str | None) -> _Row:
    if branch is None:
        return _Row(LIVE_TITLE, "bold green")
    return _Row(f"branch:{branch} · {BRANCH_NOTE}", "bold yellow")


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


def _unit(count: int, unit: str) -> str:
    return f"every {unit}" if count == 1 else f"every {count} {unit}s"


def cadence_text(plan: Plan, layout: str = "") -> str:
    """Given a plan and its root's layout, return `cadence: every 100 steps (hf layout)`; with
    several series, each series' cadence by name. A series ordered by epoch counts epochs."""
    by_epoch = {
        series
        for series in plan.cadences
        if all(
            d.checkpoint.epoch is not None and d.checkpoint.epoch == d.checkpoint.step
            for d in plan.decisions
            if d.checkpoint.series == series
        )
    }
    cadences = [
        (series, _unit(steps, "epoch" if series in by_epoch else "step"))
        for series, steps in plan.cadences.items()
    ]
    where = f" ({layout} layout)" if layout else ""
    if not cadences:
        return f"cadence: none yet{where}"
    if len(cadences) == 1:
        return f"cadence: {cadences[0][1]}{where}"
    return "cadence: " + ", ".join(f"{series} {every}" for series, every in cadences) + where


def print_plan(
    console: Console,
    plan: Plan,
    *,
    layout: str = "",
    unfold: bool = False,
    now: float | None = None,
    protected: Sequence[Protected] = (),
    warnings: Sequence[str] = (),
) -> None:
    """Given a console and a plan, print the root with its cadence, the warnings (the plan's
    and the caller's), the timeline and the totals."""
    from rich.text import Text

    heading = Text(plan.root, style="bold")
    heading.append(f"  {cadence_text(plan, layout)}", style="")
    console.print(heading)
    for warning in (*plan.warnings, *warnings):
        console.print(Text("warning: ", style="yellow") + Text(warning))
    if plan.decisions or protected:
        for line in timeline_lines(
            plan, console.width, unfold=unfold, now=now, protected=protected
        ):
            console.print(line, overflow="fold")
    console.print(summary_line(plan), markup=False)


# --- the cleanup history ------------------------------------------------------------------------

HISTORY_FIELDS = (
    columns.Field("time"),
    columns.Field("event"),
    columns.Field("root", wraps=True, moves=True),
    columns.Field("checkpoint"),
    columns.Field("freed", right=True),
    columns.Field("why", wraps=True, moves=True),
)
# Room for what `history --follow` prints later, so that its rows line up with the first ones:
# the common events, checkpoint names to step 99999, sizes to "999.9 MB to trash".
EVENT_WIDTH = len("prune_refused")
CHECKPOINT_WIDTH = len("checkpoint-10000")
ROOT_WIDTH = len("/data/training/current_model")  # without a config to say
FREED_WIDTH = len("3.6 GB to trash")


def history_time(value: object, zone: tzinfo | None = None) -> str:
    """Given a record's UTC ISO time, return it in the zone (else the machine's), with the zone
    named: `2026-12-05 14:03:11 CET`."""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.tzinfo is None:
        return str(value)
    return local_text(moment, zone or machine_zone(), seconds=True)


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
        quiet = record.get("quiet_runs")
        before = f" ({quiet} run(s) before it had nothing to do)" if quiet else ""
        return (
            f"{mode}{record.get('deleted', 0) or record.get('would_delete', 0)} deleted, "
            f"{record.get('kept', 0)} kept, {record.get('vetoed', 0)} vetoed, "
            f"{record.get('failed', 0)} failed in {record.get('seconds', 0)} s{before}"
        )
    return ""


def history_row(record: dict[str, Any], zone: tzinfo | None = None) -> tuple[str, ...]:
    """Given a history record, return its values in HISTORY_FIELDS order."""
    freed = record.get("bytes_freed")
    in_trash = record.get("bytes_in_trash")
    shown = format_bytes(freed) if isinstance(freed, int | float) else ""
    if isinstance(in_trash, int | float) and in_trash and record.get("event") == "delete":
        shown = f"{format_bytes(in_trash)} to trash"
    return (
        history_time(record.get("time", ""), zone),
        str(record.get("event", "")),
        str(record.get("root", "")),
        str(record.get("checkpoint", "")),
        shown,
        why_of(record),
    )


def history_layout(
    records: Iterable[dict[str, Any]],
    width: int,
    *,
    zone: tzinfo | None = None,
    roots: Iterable[str] = (),
    follow: bool = False,
) -> columns.Layout:
    """Given the records shown first, the width and the configured roots, return the layout
    every row uses; with `follow`, with room for the rows `--follow` prints later, so that
    they line up with the first ones."""
    zone = zone or machine_zone()
    rows = [history_row(record, zone) for record in records]
    if not follow:
        return columns.layout(HISTORY_FIELDS, rows, width)
    # One more than today's: summer and winter names of a zone differ (CET, CEST).
    time_width = len(local_text(datetime.now(zone), zone, seconds=True)) + 1
    least = (
        time_width,
        EVENT_WIDTH,
        max((len(root) for root in roots), default=ROOT_WIDTH),
        CHECKPOINT_WIDTH,
        FREED_WIDTH,
        0,
    )
    layout = columns.layout(HISTORY_FIELDS, rows, width, least=least)
    if layout.stacked:
        return layout
    # The reasons still to come take what is left of the line, not the first ones' width.
    why = len(HISTORY_FIELDS) - 1
    rest = max(layout.widths[why], width - columns.start_of(layout, why))
    return replace(layout, widths=(*layout.widths[:why], rest))


def history_lines(
    records: Iterable[dict[str, Any]], layout: columns.Layout, zone: tzinfo | None = None
) -> list[str]:
    """Given records and the layout, return their lines (oldest first, newest last)."""
    zone = zone or machine_zone()
    lines: list[str] = []
    for record in records:
        lines += columns.rows(layout, history_row(record, zone))
    return lines


def history_table(
    records: Iterable[dict[str, Any]], *, width: int = PIPED_WIDTH, zone: tzinfo | None = None
) -> Text:
    """Given history records, return the table people read (header, then oldest first)."""
    from rich.text import Text

    shown = list(records)
    zone = zone or machine_zone()
    layout = history_layout(shown, width, zone=zone)
    return Text("\n".join([*columns.header(layout), *history_lines(shown, layout, zone)]))
