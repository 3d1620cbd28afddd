"""`ckptd status [--config FILE] [--json]`: per root tiers, bytes, cadence and days until full;
per filesystem use; the last and next prune, snapshot and disk check."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from daemon.clock import local_text, utc_iso, zone_for
from daemon.commands._common import load_selected_config, root_exists, warn_missing
from daemon.config import Config, RootConfig, policy_for, settings_for
from daemon.discovery.scan import ScanResult
from daemon.disk import pressure
from daemon.disk.forecast import Forecast, forecast_growth, observed_cadence
from daemon.disk.mounts import mount_point
from daemon.errors import CkptdError
from daemon.pruning import remote as remote_pruning
from daemon.pruning import trash
from daemon.pruning.leasing import lease_status
from daemon.render import format_bytes, format_duration, make_console
from daemon.rootdir import IdentityStore, root_key
from daemon.safety.facts import gather_facts
from daemon.slimming import read_record
from daemon.snapshots.execute import existing_snapshot_dates
from daemon.snapshots.schedule import next_snapshot_time
from daemon.state import read_state
from daemon.verification import is_marked_corrupt, newest_sound
from policies.model import Plan

PlanFunction = Callable[..., tuple[ScanResult, Plan]]


def _default_plan(config: Config, root: RootConfig, *, now: float) -> tuple[ScanResult, Plan]:
    from daemon.planner import plan_root

    return plan_root(config, root, now=now)


def _incomplete_saves(scan: ScanResult, abandoned_after: float) -> list[dict[str, Any]]:
    """Given a root's scan and its `abandoned_after`, return each save in flight or cut off
    with its size, and when it counts as abandoned (then the next prune moves it to the
    trash, if no process holds it)."""
    saves: list[dict[str, Any]] = []
    for checkpoint in scan.checkpoints:
        if checkpoint.complete or is_marked_corrupt(checkpoint):
            continue  # a corrupt checkpoint is kept, never abandoned: listed as corrupt
        at = checkpoint.mtime + abandoned_after
        saves.append(
            {
                "name": checkpoint.name,
                "bytes": checkpoint.size_bytes,
                "abandoned": checkpoint.abandoned,
                "abandoned_at": utc_iso(at, timespec="seconds") if checkpoint.mtime > 0 else None,
            }
        )
    return saves


def root_status(
    config: Config, root: RootConfig, *, now: float, plan: PlanFunction, free_bytes: int | None
) -> dict[str, Any]:
    """Given a root, return its status: counts per tier, bytes, incomplete and in-use
    checkpoints, cadence and the growth forecast."""
    if "://" not in root.path and not os.path.isdir(root.path):
        return {"root": root.path, "error": "no such folder (a configured root)"}
    try:
        scan, root_plan = plan(config, root, now=now)
    except Exception as error:  # an unreadable root is reported, the other roots still shown
        return {"root": root.path, "error": str(error)}
    tiers = Counter(
        str(decision.tier) for decision in root_plan.decisions if decision.keep and decision.tier
    )
    incomplete_saves = _incomplete_saves(scan, settings_for(config, root).abandoned_after)
    in_use, trainer_notes = checkpoints_in_use(root, scan, now=now)
    slimmed = slimmed_status(scan, root_plan)
    growth = _growth(config, root, scan, root_plan, free_bytes, slimmed["fraction"])
    return {
        "root": root.path,
        "layout": scan.layout,
        "checkpoints": len(scan.checkpoints),
        "tiers": {tier: tiers.get(tier, 0) for tier in ("1", "2", "3")},
        "to_delete": sum(1 for d in root_plan.decisions if not d.keep),
        "bytes": sum(c.size_bytes for c in scan.checkpoints),
        "bytes_freeable": root_plan.bytes_freed,
        **integrity_status(scan, root_plan),
        "slimmed": slimmed["slimmed"],
        "bytes_slimmed": slimmed["bytes_slimmed"],
        "to_slim": len(root_plan.slimmed),
        "bytes_slimmable": root_plan.bytes_slimmed,
        "incomplete_saves": incomplete_saves,
        "in_use": in_use,
        "trainer": trainer_notes,
        "trash": trash_status(config, root),
        "cadence": dict(root_plan.cadences),
        "forecast": growth.to_dict(),
        "warnings": [*scan.warnings, *root_plan.warnings],
        "refused": refusal_of(config, root),
        "lease": lease_status(config, root, running_daemon_pid(config)),
    }


def running_daemon_pid(config: Config) -> int | None:
    """Given the config, return the PID of this machine's running daemon (state.json), or None."""
    pid = read_state(config.state_dir).get("pid")
    return pid if isinstance(pid, int) and psutil.pid_exists(pid) else None


def lease_text(lease: dict[str, Any], zone: tzinfo) -> str:
    """Given a shared root's lease as `status --json` has it, return its line for people."""
    if lease.get("error"):
        return f"unusable: {lease['error']}"
    holder = lease.get("holder")
    if not holder:
        return f"nobody holds it (this node: {lease['node']})"
    who = f"{holder['host']} pid {holder['pid']}"
    until = _moment(lease["expires"], zone)
    if lease.get("expired"):
        return f"{who}, expired at {until}: the next daemon to look takes it over"
    if lease.get("ours"):
        return f"this daemon ({who}) holds it until {until}, renewing: it prunes here"
    return f"{who} holds it until {until}: that node prunes here, this one ({lease['node']}) not"


def refusal_of(config: Config, root: RootConfig) -> str | None:
    """Given a root, return why ckptd refuses it until a person acts (its identity changed,
    its trash is not ckptd's), as last reported in `<state_dir>/roots.json`; else None."""
    store = IdentityStore.in_state_dir(config.state_dir)
    return store.refusals().get(root_key(root.path)) if store is not None else None


def _growth(
    config: Config,
    root: RootConfig,
    scan: ScanResult,
    root_plan: Plan,
    free_bytes: int | None,
    slim_fraction: float = 0.0,
) -> Forecast:
    """Given a root's scan and plan, return its growth forecast; it follows the root's busiest
    series (the one with the most checkpoints). Slimmed checkpoints count at their weights
    (`slim_fraction` of each moved out)."""
    series_sizes = Counter(c.series for c in scan.checkpoints)
    main_series = series_sizes.most_common(1)[0][0] if series_sizes else None
    saves_per_day, checkpoint_bytes = observed_cadence(
        [c for c in scan.checkpoints if c.series == main_series]
    )
    return forecast_growth(
        free_bytes=free_bytes or 0,
        saves_per_day=saves_per_day,
        checkpoint_bytes=checkpoint_bytes,
        cadence_steps=root_plan.cadences.get(main_series or "", None),
        spec=policy_for(config, root),
        kept_now=sum(
            1 for d in root_plan.decisions if d.keep and d.checkpoint.series == main_series
        ),
        newest_step=max(
            (c.step for c in scan.checkpoints if c.series == main_series and c.complete),
            default=None,
        ),
        slim_fraction=slim_fraction,
    )


def slimmed_status(scan: ScanResult, plan: Plan) -> dict[str, Any]:
    """Given a root's scan and plan, return how many checkpoints are slimmed, the bytes their
    slims freed (from each `.ckptd-slim.json`), and the share of a checkpoint a slim frees
    (what the plan's slims would move out, else what past slims did; 0: unknown)."""
    records = [
        record
        for checkpoint in scan.checkpoints
        if checkpoint.slimmed and (record := read_record(scan.root, checkpoint.name)) is not None
    ]
    sizes = {checkpoint.name: checkpoint.size_bytes for checkpoint in scan.checkpoints}
    moving = sum(target.bytes_logical for target in plan.slim_targets.values())
    whole = sum(sizes.get(name, 0) for name in plan.slim_targets)
    if not whole:
        moving = sum(record.bytes_logical for record in records)
        whole = moving + sum(sizes.get(record.checkpoint, 0) for record in records)
    return {
        "slimmed": sum(1 for checkpoint in scan.checkpoints if checkpoint.slimmed),
        "bytes_slimmed": sum(record.bytes_freed for record in records),
        "fraction": moving / whole if whole else 0.0,
    }


def trash_status(config: Config, root: RootConfig) -> dict[str, Any]:
    """Given a root, return what waits in its trash: how many checkpoints, their bytes, and
    the grace they wait."""
    try:
        if "://" in root.path:
            # Object storage: the deferred-deletion lists (their objects stay until the grace).
            sizes = [item.size for item in remote_pruning.deferred(root)[1]]
        else:
            sizes = [item.bytes for item in trash.list_trash(os.path.realpath(root.path))]
    except (OSError, CkptdError):
        sizes = []  # a trash refused for safety (said under "refused") is not counted
    return {
        "checkpoints": len(sizes),
        "bytes": sum(sizes),
        "grace_seconds": settings_for(config, root).trash_grace,
    }


def integrity_status(scan: ScanResult, root_plan: Plan) -> dict[str, Any]:
    """Given a root's planned scan and plan, return the incomplete checkpoints and what issue
    12 adds to a root's status: the corrupt checkpoints (with why), the last good one (what
    `ckptd last-good` prints) and the held ones (with their holds)."""
    last_good = newest_sound(scan.checkpoints)
    return {
        "incomplete": [
            c.name for c in scan.checkpoints if not c.complete and not is_marked_corrupt(c)
        ],
        "corrupt": {
            c.name: (c.incomplete_reason or "").removeprefix("corrupt: ")
            for c in scan.checkpoints
            if is_marked_corrupt(c)
        },
        "last_good": last_good.name if last_good is not None else None,
        "held": {
            d.checkpoint.name: [reason for reason in d.reasons if reason.startswith("held:")]
            for d in root_plan.decisions
            if any(reason.startswith("held:") for reason in d.reasons)
        },
    }


def checkpoints_in_use(
    root: RootConfig, scan: ScanResult, *, now: float
) -> tuple[list[str], list[str]]:
    """Given a root's scan, return the checkpoints a process holds now (open file, memory map
    or cwd inside), as the safety layer sees them, and what it says of finding the trainer (a
    missing or stale `trainer.pid_file`)."""
    facts = gather_facts(
        root.path,
        now=now,
        trainer_pid_file=root.trainer.pid_file,
        trainer_cmdline=root.trainer.cmdline,
    )
    held = [
        checkpoint.name
        for checkpoint in scan.checkpoints
        if any(facts.holders.get(member) for member in checkpoint.members)
    ]
    return held, [note for note in facts.notes if note.startswith("trainer")]


def filesystem_status(config: Config) -> list[dict[str, Any]]:
    """Given the config, return each root filesystem's use (the snapshots folder's too)."""
    groups, _errors = pressure.group_roots(config.roots)
    result = []
    for roots in groups.values():
        usage = pressure.measure(roots[0].path)
        result.append(
            {
                "mount": mount_point(roots[0].path),
                "roots": [root.path for root in roots],
                "total_bytes": usage.total,
                "used_bytes": usage.used,
                "free_bytes": usage.free,
                "used_percent": usage.percent,
                "level": pressure.level_of(usage, config),
            }
        )
    return result


def schedule_status(config: Config, *, now: float) -> dict[str, Any]:
    """Given the config, return the last and next runs: from the daemon's state file if it
    runs, else what the disk shows (the newest snapshot) and what the schedule says."""
    state = read_state(config.state_dir)
    pid = state.get("pid")
    running = isinstance(pid, int) and psutil.pid_exists(pid)
    snapshot_dates = (
        existing_snapshot_dates(config.snapshots.dir) if config.snapshots.dir is not None else []
    )
    last_snapshot = state.get("last_snapshot") or (
        {"date": snapshot_dates[-1].isoformat()} if snapshot_dates else None
    )
    upcoming = dict(state.get("next") or {}) if running else {}
    if config.snapshots.enabled and "snapshot" not in upcoming:
        moment = datetime.fromtimestamp(now, UTC)
        upcoming["snapshot"] = utc_iso(
            next_snapshot_time(moment, config.snapshots.at, zone_for(config), snapshot_dates),
            timespec="auto",
        )
    return {
        "daemon_running": running,
        "pid": pid if running else None,
        "last_prune": state.get("last_prune"),
        "last_snapshot": last_snapshot,
        "last_disk_check": state.get("last_disk_check"),
        "next": upcoming,
    }


def collect_status(
    config: Config, *, now: float, plan: PlanFunction | None = None
) -> dict[str, Any]:
    """Given the config and the time, return the whole `status --json` document."""
    filesystems = filesystem_status(config)
    free_by_root = {
        root: filesystem["free_bytes"] for filesystem in filesystems for root in filesystem["roots"]
    }
    return {
        "time": utc_iso(now, timespec="auto"),
        "roots": [
            root_status(
                config,
                root,
                now=now,
                plan=plan or _default_plan,
                free_bytes=free_by_root.get(root.path),
            )
            for root in config.roots
        ],
        "filesystems": filesystems,
        "schedule": schedule_status(config, now=now),
    }


def _trash_text(in_trash: dict[str, Any]) -> str:
    count = in_trash["checkpoints"]
    if not count:
        return "empty"
    return (
        f"{format_bytes(in_trash['bytes'])} in {count} checkpoint{'s' if count != 1 else ''}, "
        f"freed as each one's {format_duration(in_trash['grace_seconds'])} grace ends "
        "(`ckptd trash purge`: now)"
    )


def _days(value: float | None, growing: bool = False) -> str:
    if value is None:
        return "not within 100 years" if growing else "never"
    if value >= 730:
        return f"{value / 365:.0f} y"
    return f"{value:.1f} d" if value < 100 else f"{value:.0f} d"


def _moment(value: Any, zone: tzinfo) -> str:
    """Given an ISO time (or a record holding one), return it in the config's zone, short."""
    if not value:
        return "—"
    text = value.get("time") or value.get("date") if isinstance(value, dict) else value
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return str(text)
    if moment.tzinfo is None:
        return str(text)
    return local_text(moment, zone)


def _details(record: Any) -> str:
    if not isinstance(record, dict):
        return ""
    return " ".join(f"{k}={v}" for k, v in record.items() if k not in ("time", "date"))


def _integrity_rows(table: Table, root: dict[str, Any]) -> None:
    corrupt = [f"{name} ({why})" for name, why in root["corrupt"].items()]
    table.add_row("corrupt", "; ".join(corrupt) or "none")
    table.add_row("last good", root["last_good"] or "none")
    if root["held"]:
        held = [f"{name} ({', '.join(reasons)})" for name, reasons in root["held"].items()]
        table.add_row("held", "; ".join(held))


def _incomplete_text(saves: list[dict[str, Any]], zone: tzinfo) -> str:
    """Given a root's incomplete saves, return one line each: name, size, and when it is (or
    was) abandoned."""
    lines = []
    for save in saves:
        if save["abandoned"]:
            when = "abandoned: to the trash at the next prune unless a process holds it"
        elif save["abandoned_at"]:
            when = f"abandoned if still unwritten at {_moment(save['abandoned_at'], zone)}"
        else:
            when = "in flight"
        lines.append(f"{save['name']} ({format_bytes(save['bytes'])}; {when})")
    return "\n".join(lines) or "none"


def print_status(console: Console, document: dict[str, Any], zone: tzinfo = UTC) -> None:
    """Given the status document, print it as tables for people."""
    for root in document["roots"]:
        # One small table per root: a long path never squeezes the figures off the screen.
        table = Table(title=f"root {root['root']}", title_justify="left", show_header=False)
        table.add_column("what", no_wrap=True)
        table.add_column("value", overflow="fold")
        if "error" in root:
            table.add_row("error", root["error"])
            console.print(table)
            continue
        forecast = root["forecast"]
        tiers = root["tiers"]
        if root.get("refused"):
            table.add_row("REFUSED", root["refused"])
        if root.get("lease"):
            table.add_row("lease", lease_text(root["lease"], zone))
        table.add_row(
            "checkpoints",
            f"{root['checkpoints']} ({root['layout']}): tier 1 {tiers['1']}, tier 2 {tiers['2']}, "
            f"tier 3 {tiers['3']}; {root['to_delete']} the policy would delete",
        )
        table.add_row(
            "bytes",
            f"{format_bytes(root['bytes'])}, {format_bytes(root['bytes_freeable'])} freeable",
        )
        if root["slimmed"] or root["to_slim"]:
            table.add_row(
                "slimmed",
                f"{root['slimmed']} (weights only, freed {format_bytes(root['bytes_slimmed'])}); "
                f"{root['to_slim']} more the policy would slim "
                f"({format_bytes(root['bytes_slimmable'])})",
            )
        table.add_row("incomplete", _incomplete_text(root.get("incomplete_saves", []), zone))
        _integrity_rows(table, root)
        table.add_row("in use", ", ".join(root["in_use"]) or "none")
        for note in root["trainer"]:
            table.add_row("trainer", note)
        table.add_row("trash", _trash_text(root["trash"]))
        cadence = ", ".join(f"{series}: {steps}" for series, steps in root["cadence"].items())
        table.add_row(
            "cadence",
            f"{cadence or '—'} steps; {forecast['saves_per_day']:.1f} saves/day of "
            f"{format_bytes(forecast['checkpoint_bytes'])}",
        )
        table.add_row(
            "growth",
            f"{format_bytes(forecast['bytes_per_day_with'])}/day with the policy, "
            f"{format_bytes(forecast['bytes_per_day_without'])}/day without",
        )
        table.add_row(
            "days to full",
            f"{_days(forecast['days_until_full_with'], forecast['bytes_per_day_with'] > 0)} "
            "with the policy, "
            f"{_days(forecast['days_until_full_without'])} without",
        )
        console.print(table)
    filesystems = Table(title="filesystems", title_justify="left")
    for column in ("mount", "used", "free", "size", "level", "roots"):
        filesystems.add_column(column, overflow="fold")
    for filesystem in document["filesystems"]:
        filesystems.add_row(
            filesystem["mount"],
            f"{filesystem['used_percent']:.1f}%",
            format_bytes(filesystem["free_bytes"]),
            format_bytes(filesystem["total_bytes"]),
            filesystem["level"],
            ", ".join(filesystem["roots"]),
        )
    console.print(filesystems)
    schedule = document["schedule"]
    running = f"running (pid {schedule['pid']})" if schedule["daemon_running"] else "not running"
    jobs = Table(title=f"jobs · daemon {running}", title_justify="left")
    for column in ("job", "last", "details", "next"):
        jobs.add_column(column, overflow="fold")
    upcoming = schedule["next"]
    now = document["time"]
    for job, key in (
        ("prune", "last_prune"),
        ("snapshot", "last_snapshot"),
        ("disk check", "last_disk_check"),
    ):
        following = upcoming.get(job.replace(" ", "_")) or upcoming.get(job)
        jobs.add_row(
            job,
            _moment(schedule[key], zone),
            _details(schedule[key]),
            "due now" if following and following <= now else _moment(following, zone),
        )
    console.print(jobs)


def main(args: argparse.Namespace) -> int:
    """Given parsed `status` arguments, print the status and return the exit code."""
    config = load_selected_config(args.config)
    document = collect_status(config, now=time.time())
    if args.json:
        json.dump(document, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print_status(make_console(), document, zone_for(config))
    missing = warn_missing(
        "status",
        [root for root in config.roots if not root_exists(root)],
    )
    return 0 if all("error" not in root for root in document["roots"]) else missing or 1
