"""`ckptd check-config FILE`: validate a config and show what it resolves to.

Prints `FILE: ok` and a short summary (roots, layouts, policies as numbers, schedules) on stdout
and any warnings on stderr, exit 0; or every problem, one line each, on stderr, exit 2.

The summary also notes, on `note:` lines, what is valid but not there yet on this machine: a
root that does not exist yet, a trainer pid file that names no running process (the trainer is
then found automatically), an `alert` command that does not exist or is not executable. They
do not fail the check: a config is often written before the first run starts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
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
from daemon.render import describe_policy, format_bytes, format_duration
from daemon.safety.facts import pid_file_problem


def alert_problem(command: str) -> str | None:
    """Given the `disk.alert` command line (run without a shell), return why it cannot run
    (its program does not exist, is not executable), else None."""
    try:
        program = shlex.split(command)[0]
    except (ValueError, IndexError):
        return "is not a command line"
    if "/" not in program:
        return None if shutil.which(program) else f"{program} is not on the PATH"
    if not os.path.exists(program):
        return f"{program} does not exist"
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        return f"{program} is not executable"
    return None


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
    if "://" not in root.path and not os.path.isdir(root.path):
        lines.append(
            "    note: does not exist yet: the daemon waits for it; plan, prune, status and "
            "trash skip it with a warning (exit 1)"
        )
    if "://" in root.path:
        lines.append(_remote_line(config, root))
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
        problem = pid_file_problem(trainer.pid_file) if trainer.pid_file else None
        if problem is not None:
            instead = "by its cmdline" if trainer.cmdline else "automatically"
            lines.append(
                f"    note: the pid file {problem}: until it names a running process the "
                f"trainer is found {instead}"
            )
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


def _remote_line(config: Config, root: RootConfig) -> str:
    """Given an object-storage root, return its summary line: how often it is polled and
    which storage_options are set (their names only: values may be secrets)."""
    if root.path.startswith(("az://", "abfs://", "abfss://")):
        usual = "the AZURE_STORAGE_* environment variables"
    elif root.path.startswith(("gs://", "gcs://")):
        usual = "Google's application default credentials"
    else:
        usual = "botocore's usual credentials"
    names = ", ".join(sorted(root.storage_options)) or f"none ({usual})"
    interval = format_duration(settings_for(config, root).poll_interval)
    return (
        f"    object storage: polled every {interval}; storage_options: {names} (values not shown)"
    )


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
    problem = alert_problem(disk.alert) if disk.alert else None
    if problem is not None:
        lines.append(f"  note: the alert command cannot run: {problem}")
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
