"""`ckptd check-config FILE`: validate a config and show what it resolves to.

Prints `FILE: ok` and a short summary (roots, layouts, policies as numbers, schedules) on stdout
and any warnings on stderr, exit 0; or every problem, one line each, on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

from daemon.clock import local_text, zone_for
from daemon.config import (
    Config,
    PolicyConfig,
    RootConfig,
    load_config_with_warnings,
    policy_for,
    settings_for,
)
from daemon.errors import EXIT_OK, EXIT_USAGE, ConfigError
from daemon.render import format_bytes
from policies.model import PolicySpec


def format_duration(seconds: float) -> str:
    """Given seconds, return the shortest exact form such as `90s`, `5m`, `1h` or `2d`."""
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


def describe_policy(spec: PolicySpec) -> str:
    """Given a resolved policy, return its knobs as numbers in one line."""
    parts = [f"keep_last {spec.keep_last}", f"tier2_count {spec.tier2_count}"]
    parts.append(
        f"tier3_interval {spec.tier3_interval}"
        if spec.tier3_interval is not None
        else "tier3_interval none (nothing kept past tier 2)"
    )
    parts.append(f"cadence {spec.cadence}" if spec.cadence else "cadence read from tier 1")
    if spec.keep_best is not None:
        best = spec.keep_best
        parts.append(f"keep_best {best.count} by {best.metric} ({best.mode})")
    return ", ".join(parts)


def _preset_note(policy: PolicyConfig | None) -> str:
    return f" [preset {policy.preset}]" if policy is not None else ""


def _next_prune(config: Config, now: datetime) -> str:
    """Given a valid config and the time, return when the daemon's next weekly prune runs."""
    from daemon.service.scheduler import prune_trigger

    zone = zone_for(config)
    upcoming = prune_trigger(config, zone).get_next_fire_time(None, now.astimezone(zone))
    return local_text(upcoming, zone) if upcoming is not None else "never"


def _root_lines(config: Config, root: RootConfig) -> list[str]:
    lines = [f"  {root.path}  (layout {root.layout}, watch {root.watch})"]
    if root.series:
        for series in root.series:
            spec = policy_for(config, root, series)
            source = series.policy if series.policy is not None else root.policy
            lines.append(f"    series {series.pattern}: {describe_policy(spec)}")
            if source is None:
                lines[-1] += " [defaults]"
            else:
                lines[-1] += _preset_note(source)
    else:
        name = f"pattern {root.pattern}" if root.pattern else "policy"
        note = _preset_note(root.policy) if root.policy is not None else " [defaults]"
        lines.append(f"    {name}: {describe_policy(policy_for(config, root))}{note}")
    if root.protect:
        lines.append("    protect: " + ", ".join(root.protect))
    trainer = root.trainer
    if trainer.pid_file or trainer.cmdline:
        found = [f"pid file {trainer.pid_file}"] if trainer.pid_file else []
        found += [f"cmdline /{trainer.cmdline}/"] if trainer.cmdline else []
        lines.append("    trainer: " + ", ".join(found))
    else:
        lines.append("    trainer: found automatically (processes using files under the root)")
    settings = settings_for(config, root)
    lines.append(
        f"    safety: settle {format_duration(settings.settle_seconds)}, "
        f"min_keep {settings.min_keep}, "
        f"max_delete_fraction {settings.max_delete_fraction:g}, "
        f"trash grace {format_duration(settings.trash_grace)}"
    )
    return lines


def summary_lines(config: Config, now: datetime) -> list[str]:
    """Given a valid config and the current time, return the summary check-config prints."""
    zone = config.timezone or "the machine's local time"
    lines = [
        f"timezone: {zone}; state: {config.state_dir}; history: {config.history_path}",
        f"roots: {len(config.roots)}",
    ]
    for root in config.roots:
        lines.extend(_root_lines(config, root))
    prune = config.prune
    lines.append(
        f'prune: "{prune.schedule}" (next {_next_prune(config, now)}), '
        f"on new checkpoint: {'yes' if prune.on_new_checkpoint else 'no'}"
    )
    snapshots = config.snapshots
    if snapshots.enabled:
        lines.append(
            f"snapshots: daily at {snapshots.at} into {snapshots.dir}, scope {snapshots.scope}, "
            f"keep {snapshots.keep}, method {snapshots.method}, "
            f"never hard-linked: {', '.join(snapshots.mutable) or 'none'}"
        )
    else:
        lines.append("snapshots: off")
    disk = config.disk
    min_free = (
        f", min free {format_bytes(disk.min_free, significant=4)}"
        if disk.min_free is not None
        else ""
    )
    lines.append(
        f"disk: every {format_duration(disk.interval)}, warn {disk.warn_percent:g}%, "
        f"critical {disk.critical_percent:g}%{min_free}; "
        f"alert: {disk.alert or 'none'}"
    )
    lines.append(
        f"  emergency policy: {describe_policy(disk.emergency.to_spec())}"
        f"{_preset_note(disk.emergency)}"
    )
    return lines


def main(args: argparse.Namespace) -> int:
    """Given parsed arguments (`file`), check the config and return the exit code."""
    file: str = args.file
    try:
        config, warnings = load_config_with_warnings(file)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        count = len(error.problems)
        print(f"{file}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{file}: ok")
    for line in summary_lines(config, datetime.now().astimezone()):
        print("  " + line)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK
