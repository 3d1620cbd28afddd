"""`ckptd check [--config FILE] [--json]`: one line and a Nagios exit code, for monitoring.

Exit codes (the Nagios plugin contract, as sanoid's `--monitor-*` checks use it): 0 OK,
1 WARNING, 2 CRITICAL, 3 UNKNOWN (the check itself could not look: no config, an unreadable
state file). Looked at, from the config, the daemon's `<state_dir>/state.json` and the disks:

- CRITICAL: the daemon is not running (no state file, no pid, the pid gone or reused);
  a root's filesystem above `disk.critical_percent` (or under `disk.min_free`);
- WARNING: a filesystem above `disk.warn_percent`; a root missing; a root without a successful
  prune for longer than `check.max_prune_age`; a root whose prunes have been refused for
  longer than `check.max_refused_age`; no snapshot today `check.snapshot_grace` after
  `snapshots.at`.

The worst finding decides the code, CRITICAL > WARNING > UNKNOWN > OK (monitoring-plugins'
`max_state_alt`: a problem that was seen outranks one that could not be looked at).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from daemon.clock import zone_for
from daemon.commands._common import config_path
from daemon.config import Config, load_config
from daemon.disk import pressure
from daemon.disk.mounts import mount_point
from daemon.errors import CkptdError
from daemon.metrics import epoch_of
from daemon.snapshots.execute import existing_snapshot_dates
from daemon.snapshots.schedule import scheduled_instant
from daemon.state import state_path
from daemon.storage.url import report_key

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
# Worst first: the order in which a finding decides the exit code.
PRECEDENCE = (CRITICAL, WARNING, UNKNOWN, OK)
# A pid whose process started this long after the daemon said it started is another process.
PID_REUSE_SLACK_SECONDS = 5.0
# The OK line's parts, in this order: "2 roots, disk 41% (/data), last prune 12m ago, ...".
SUMMARY_ORDER = ("roots", "disk", "prune", "snapshot", "daemon")
# A snapshot run that found nothing complete to copy is not a missing snapshot.
NOTHING_TO_SNAPSHOT = "no complete checkpoint"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the check found wrong (or could not look at), with its Nagios level."""

    level: int
    message: str


@dataclass
class Report:
    """Given everything the check looked at: its findings, the OK summary parts, the figures."""

    findings: list[Finding] = field(default_factory=list)
    summary: dict[str, str] = field(default_factory=dict)
    perfdata: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, level: int, message: str) -> None:
        self.findings.append(Finding(level, message))

    @property
    def code(self) -> int:
        levels = {finding.level for finding in self.findings}
        return next((level for level in PRECEDENCE if level in levels), OK)

    def line(self) -> str:
        """Given the report, return the one Nagios line: status, findings or summary, perfdata."""
        worst_first = sorted(self.findings, key=lambda f: PRECEDENCE.index(f.level))
        parts = [self.summary[key] for key in SUMMARY_ORDER if key in self.summary]
        text = "; ".join(f.message for f in worst_first) or ", ".join(parts)
        perfdata = f" | {' '.join(self.perfdata)}" if self.perfdata else ""
        return f"CKPTD {NAMES[self.code]} - {text}{perfdata}"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": NAMES[self.code],
            "exit_code": self.code,
            "line": self.line(),
            "problems": [
                {"level": NAMES[finding.level], "message": finding.message}
                for finding in self.findings
            ],
            **self.details,
        }


def ago(seconds: float) -> str:
    """Given an age in seconds, return it short: 45s, 12m, 5h, 3d."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def read_daemon_state(config: Config, report: Report) -> dict[str, Any] | None:
    """Given the config, return the daemon's state.json (None, with a finding, if there is no
    readable one)."""
    path = state_path(config.state_dir)
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except FileNotFoundError:
        report.add(CRITICAL, f"daemon not running (no {path}: it never ran with this state_dir)")
        return None
    except OSError as error:
        report.add(UNKNOWN, f"cannot read {path}: {error.strerror or error}")
        return None
    except ValueError:
        report.add(UNKNOWN, f"{path} is not JSON")
        return None
    if not isinstance(state, dict):
        report.add(UNKNOWN, f"{path} is not a JSON object")
        return None
    return state


def check_daemon(state: dict[str, Any], report: Report, *, now: float) -> float | None:
    """Given the state, add a finding unless its pid is a live process that started with the
    daemon; return when the daemon started (None if unknown)."""
    pid = state.get("pid")
    started = epoch_of(state.get("started"))
    report.details["daemon"] = {"pid": pid, "started": state.get("started"), "running": False}
    if not isinstance(pid, int) or pid <= 0:
        report.add(CRITICAL, "daemon not running (no pid in state.json)")
        return started
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        report.add(CRITICAL, f"daemon not running (pid {pid} is gone)")
        return started
    if started is not None and created > started + PID_REUSE_SLACK_SECONDS:
        report.add(CRITICAL, f"daemon not running (pid {pid} is now another process)")
        return started
    report.details["daemon"]["running"] = True
    if started is not None:
        report.summary["daemon"] = f"daemon up {ago(now - started)}"
    return started


def check_disks(config: Config, report: Report) -> None:
    """Given the config, add a finding for every root filesystem above a threshold or missing,
    and the fullest one to the summary."""
    groups, errors = pressure.group_roots(config.roots)
    for error in errors:
        report.add(WARNING, f"root missing: {error}")
    disk = config.disk
    rows = []
    for roots in groups.values():
        usage = pressure.measure(roots[0].path)
        mount = mount_point(roots[0].path)
        level = pressure.level_of(usage, config)
        rows.append((usage.percent, mount))
        report.perfdata.append(
            f"'{mount}'={usage.percent:.1f}%;{disk.warn_percent:g};{disk.critical_percent:g};0;100"
        )
        report.details.setdefault("filesystems", []).append(
            {
                "mount": mount,
                "used_percent": usage.percent,
                "free_bytes": usage.free,
                "level": level,
            }
        )
        if level == "critical":
            limit = f"critical above {disk.critical_percent:g}%"
            if disk.min_free is not None and usage.free < disk.min_free:
                limit += f" or under {disk.min_free / 1e9:g} GB free"
            report.add(CRITICAL, f"disk {usage.percent:.0f}% used on {mount} ({limit})")
        elif level == "warn":
            report.add(
                WARNING,
                f"disk {usage.percent:.0f}% used on {mount} (warn above {disk.warn_percent:g}%)",
            )
    if rows:
        percent, mount = max(rows)
        report.summary["disk"] = f"disk {percent:.0f}% ({mount})"


def check_roots(
    config: Config, state: dict[str, Any], report: Report, *, now: float, started: float | None
) -> None:
    """Given the config and the state, add a finding for each root without a successful prune
    for `check.max_prune_age` or refused for `check.max_refused_age`."""
    successes = dict(state.get("prune_success") or {})
    refusals = dict(state.get("refused") or {})
    last_prune = state.get("last_prune") or {}
    roots = []
    newest: float | None = None
    for root in config.roots:
        key = report_key(root.path)
        success = epoch_of(successes.get(key))
        if success is None and isinstance(last_prune, dict) and last_prune.get("root") == key:
            success = epoch_of(last_prune.get("time"))  # a daemon from before prune_success
        refused = refusals.get(key) if isinstance(refusals.get(key), dict) else None
        roots.append({"root": key, "last_prune_success": successes.get(key), "refused": refused})
        if success is not None:
            newest = max(newest or success, success)
        # A root not yet pruned by this daemon counts from the daemon's start.
        since = success if success is not None else started
        if since is not None and now - since > config.check.max_prune_age:
            report.add(
                WARNING,
                f"no successful prune of {root.path} for {ago(now - since)} "
                f"(check.max_prune_age {ago(config.check.max_prune_age)})",
            )
        refused_since = epoch_of(refused.get("since")) if refused else None
        if refused and refused_since and now - refused_since > config.check.max_refused_age:
            report.add(
                WARNING,
                f"{root.path} refused for {ago(now - refused_since)}: {refused.get('reason')}",
            )
    report.details["roots"] = roots
    report.summary["roots"] = f"{len(config.roots)} root{'s' * (len(config.roots) != 1)}"
    if newest is not None:
        report.summary["prune"] = f"last prune {ago(now - newest)} ago"


def check_snapshot(config: Config, state: dict[str, Any], report: Report, *, now: float) -> None:
    """Given the config, add a WARNING if today's snapshot is missing `snapshot_grace` after
    `snapshots.at` (unless the last run found nothing complete to copy); summarise the newest."""
    settings = config.snapshots
    if not settings.enabled or settings.dir is None or not config.roots:
        report.details["snapshot"] = None
        return
    zone = zone_for(config)
    moment = dt.datetime.fromtimestamp(now, dt.UTC).astimezone(zone)
    try:
        dates = existing_snapshot_dates(settings.dir)
    except OSError as error:
        report.add(UNKNOWN, f"cannot list {settings.dir}: {error.strerror or error}")
        return
    due = scheduled_instant(moment.date(), settings.at, zone).timestamp()
    result = state.get("snapshot_result") if isinstance(state.get("snapshot_result"), dict) else {}
    report.details["snapshot"] = {
        "newest": dates[-1].isoformat() if dates else None,
        "due": dt.datetime.fromtimestamp(due, dt.UTC).isoformat(),
        "last_result": result,
    }
    if dates:
        report.summary["snapshot"] = f"snapshot {dates[-1].isoformat()}"
    if moment.date() in dates or now < due + config.check.snapshot_grace:
        return
    today = moment.date().isoformat()
    assert isinstance(result, dict)
    if result.get("date") == today and str(result.get("reason", "")).startswith(
        NOTHING_TO_SNAPSHOT
    ):
        return
    why = f": {result.get('status')}, {result.get('reason')}" if result.get("date") == today else ""
    report.add(WARNING, f"no snapshot for {today} (due {settings.at}){why}")


def run_check(config: Config, *, now: float) -> Report:
    """Given the config and the time, look at the daemon, the disks, the roots and the
    snapshots; return the report."""
    report = Report()
    state = read_daemon_state(config, report)
    started = check_daemon(state, report, now=now) if state is not None else None
    check_roots(config, state or {}, report, now=now, started=started)
    check_disks(config, report)
    check_snapshot(config, state or {}, report, now=now)
    return report


def unknown(message: str) -> Report:
    report = Report()
    report.add(UNKNOWN, message)
    return report


def main(args: argparse.Namespace) -> int:
    """Given parsed `check` arguments, print the one line (or JSON) and return the Nagios code."""
    path = config_path(args.config)
    try:
        report = run_check(load_config(path), now=time.time())
    except CkptdError as error:
        problems = getattr(error, "problems", None) or [str(error)]
        report = unknown(f"config {path}: {problems[0]}")
    except OSError as error:
        report = unknown(f"{error.filename or path}: {error.strerror or error}")
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(report.line())
    return report.code
