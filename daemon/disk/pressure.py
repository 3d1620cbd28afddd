"""Disk checks: how full each root's filesystem is, and the escalation when it is too full
(the forecast of when it will be is `daemon.disk.forecast`, the mount table `daemon.disk.mounts`).

Escalation for a filesystem above `critical_percent` (or under `min_free`), each step only if the
one before did not bring it back below: empty the trash, prune now, prune with the `emergency`
policy, then run the `alert` command. Every deletion goes through the injected `prune` (the
safety-checked `prune_root`), so no step can break a safety invariant; every step is a history
record.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psutil

from daemon.alerts import run_alert_command
from daemon.config import Config, RootConfig
from daemon.disk.mounts import mount_point
from daemon.history.events import (
    DiskCritical,
    DiskPrune,
    DiskRecovered,
    DiskTrashEmptied,
    DiskWarn,
    EmergencyPrune,
    EmptiedTrash,
    EscalationStep,
    Pruned,
    StepFailed,
    StepOutcome,
)
from daemon.history.log import History
from daemon.pruning.pipeline import PruneReport
from daemon.pruning.trash import empty_trash
from daemon.rootdir import IdentityStore, open_root
from daemon.storage.url import is_remote
from policies.model import PolicySpec

Level = Literal["ok", "warn", "critical"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Given one filesystem at one moment: its size, use and free space (as `df` shows them)."""

    total: int
    used: int
    free: int
    percent: float


def measure(path: str) -> Usage:
    """Given a path, return the usage of the filesystem it is on."""
    usage = psutil.disk_usage(path)
    return Usage(usage.total, usage.used, usage.free, float(usage.percent))


def level_of(usage: Usage, config: Config) -> Level:
    """Given a filesystem's usage and the config, return ok, warn or critical."""
    disk = config.disk
    if usage.percent > disk.critical_percent or (
        disk.min_free is not None and usage.free < disk.min_free
    ):
        return "critical"
    if usage.percent > disk.warn_percent:
        return "warn"
    return "ok"


@dataclass(frozen=True)
class FilesystemCheck:
    """Given one filesystem's check: its roots, the usage before and after, what was done."""

    mount: str
    device: int
    roots: tuple[str, ...]
    level: Level
    before: Usage
    after: Usage
    steps: tuple[str, ...] = ()
    alert_exit: int | None = None


@dataclass(frozen=True)
class DiskReport:
    """Given one disk check of every root's filesystem: the results and a `STATUS=` line."""

    time: float
    filesystems: tuple[FilesystemCheck, ...]
    status_line: str | None = None
    errors: tuple[str, ...] = ()

    @property
    def worst(self) -> Level:
        levels = [check.level for check in self.filesystems]
        for level in ("critical", "warn"):
            if level in levels:
                return level
        return "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# When each mount's last `disk_warn` was recorded (the daemon's one worker is the only writer).
_warned_at: dict[str, float] = {}
WARN_REPEAT_SECONDS = 3600.0


def group_roots(roots: Iterable[RootConfig]) -> tuple[dict[int, list[RootConfig]], list[str]]:
    """Given roots, return them grouped by the device their filesystem is on, and the errors
    of roots that cannot be looked at."""
    groups: dict[int, list[RootConfig]] = {}
    errors: list[str] = []
    for root in roots:
        if is_remote(root.path):
            continue  # object storage fills no local disk
        try:
            device = os.stat(root.path).st_dev
        except OSError as error:
            errors.append(f"{root.path}: {error.strerror or error}")
            continue
        groups.setdefault(device, []).append(root)
    return groups, errors


def _empty_trash_of(
    config: Config, root: RootConfig, *, now: float, history: History
) -> int | None:
    """Given a root, remove everything in its trash now, grace or not (disk pressure comes
    first); return the bytes freed when known. The root must be the folder first seen at its
    path (RootChanged otherwise: the step fails and says why); on a shared root, only the
    holder of its lease empties it (LeaseHeldElsewhere otherwise)."""
    from daemon.pruning import leasing

    leasing.require(config, root, history=history)
    store = IdentityStore.in_state_dir(config.state_dir)
    with open_root(root.path, store=store) as root_dir:
        freed = empty_trash(root_dir, history=history)
    return int(freed) if freed is not None else None


def check_disks(
    config: Config,
    *,
    now: float,
    history: History,
    prune: Callable[..., PruneReport],
    empty_trash: Callable[..., int | None] | None = None,
    usage: Callable[[str], Usage] = measure,
    alert_timeout: float = 60.0,
) -> DiskReport:
    """Given the config and the time, measure every root's filesystem, escalate where it is
    critical, and report. `prune(config, root, now=, dry_run=False, history=,
    policy_override=)` is the safety-checked prune."""
    groups, errors = group_roots(config.roots)
    checks = [
        _check_filesystem(
            config,
            device,
            roots,
            now=now,
            history=history,
            prune=prune,
            empty_trash=empty_trash or _empty_trash_of,
            usage=usage,
            alert_timeout=alert_timeout,
        )
        for device, roots in groups.items()
    ]
    return DiskReport(now, tuple(checks), status_line(checks, config), tuple(errors))


def _check_filesystem(
    config: Config,
    device: int,
    roots: Sequence[RootConfig],
    *,
    now: float,
    history: History,
    prune: Callable[..., PruneReport],
    empty_trash: Callable[..., int | None],
    usage: Callable[[str], Usage],
    alert_timeout: float,
) -> FilesystemCheck:
    """Given one filesystem and its roots, measure it and escalate step by step while it is
    critical; return what was found and done."""
    anchor = roots[0].path
    mount = mount_point(anchor)
    paths = tuple(root.path for root in roots)
    before = usage(anchor)
    level = level_of(before, config)

    if level == "warn" and now - _warned_at.get(mount, -math.inf) >= WARN_REPEAT_SECONDS:
        # Once on crossing, then hourly: the history stays readable with `tail -F`, and the
        # STATUS= line carries the warning in between.
        _warned_at[mount] = now
        history.record(
            DiskWarn(
                mount=mount,
                roots=paths,
                used_percent=before.percent,
                free_bytes=before.free,
                warn_percent=config.disk.warn_percent,
            )
        )
    elif level == "ok":
        _warned_at.pop(mount, None)
    if level != "critical":
        return FilesystemCheck(mount, device, paths, level, before, before)

    history.record(
        DiskCritical(
            mount=mount,
            roots=paths,
            used_percent=before.percent,
            free_bytes=before.free,
            critical_percent=config.disk.critical_percent,
            min_free=config.disk.min_free,
        )
    )
    steps: list[str] = []
    current = before

    def escalate(step: type[EscalationStep], action: Callable[[RootConfig], StepOutcome]) -> bool:
        """Run one step on every root of this filesystem; return whether that resolved it."""
        nonlocal current
        results: list[tuple[str, StepOutcome]] = []
        for root in roots:
            try:
                results.append((root.path, action(root)))
            except Exception as error:  # one root's failure must not stop the other roots
                results.append((root.path, StepFailed(error=f"{type(error).__name__}: {error}")))
        current = usage(anchor)
        steps.append(step.event)
        for path, outcome in results:
            history.record(
                step(
                    mount=mount,
                    root=path,
                    outcome=outcome,
                    used_percent=current.percent,
                    free_bytes=current.free,
                )
            )
        return level_of(current, config) != "critical"

    def empty_step(root: RootConfig) -> StepOutcome:
        return EmptiedTrash(trash_bytes_freed=empty_trash(config, root, now=now, history=history))

    def prune_step(override: PolicySpec | None) -> Callable[[RootConfig], StepOutcome]:
        def run(root: RootConfig) -> StepOutcome:
            report = prune(
                config, root, now=now, dry_run=False, history=history, policy_override=override
            )
            # What this prune moved into the trash frees nothing until the trash is emptied,
            # and under disk pressure no grace period applies.
            emptied = empty_trash(config, root, now=now, history=history)
            return Pruned(
                deleted=len(report.deleted),
                bytes_freed=report.bytes_freed,
                trash_bytes_freed=emptied,
                refused=report.refused,
                vetoed=len(report.vetoed),
            )

        return run

    resolved = (
        escalate(DiskTrashEmptied, empty_step)
        or escalate(DiskPrune, prune_step(None))
        or escalate(EmergencyPrune, prune_step(config.disk.emergency.to_spec()))
    )
    alert_exit = None
    if "emergency_prune" in steps and config.disk.alert:
        # The normal measures were not enough: a person should know, resolved or not.
        alert_exit = run_alert(
            config.disk.alert,
            mount=mount,
            roots=paths,
            usage=current,
            level=level_of(current, config),
            config=config,
            history=history,
            timeout=alert_timeout,
        )
        steps.append("alert")
    if resolved:
        history.record(
            DiskRecovered(mount=mount, used_percent=current.percent, free_bytes=current.free)
        )
    return FilesystemCheck(mount, device, paths, level, before, current, tuple(steps), alert_exit)


def run_alert(
    command: str,
    *,
    mount: str,
    roots: Sequence[str],
    usage: Usage,
    level: Level,
    config: Config,
    history: History,
    timeout: float,
) -> int | None:
    """Given the `alert` command line and the figures, run it (no shell) with the figures in
    its environment and return its exit code (None when it could not run or timed out)."""
    variables = {
        "CKPTD_LEVEL": level,
        "CKPTD_USED_PERCENT": f"{usage.percent:.1f}",
        "CKPTD_FREE_BYTES": str(usage.free),
        "CKPTD_TOTAL_BYTES": str(usage.total),
        "CKPTD_MOUNT": mount,
        "CKPTD_ROOT": roots[0],
        "CKPTD_ROOTS": os.pathsep.join(roots),
        "CKPTD_CRITICAL_PERCENT": f"{config.disk.critical_percent:g}",
    }
    return run_alert_command(
        command, variables, mount=mount, level=level, history=history, timeout=timeout
    )


def status_line(checks: Sequence[FilesystemCheck], config: Config) -> str | None:
    """Given the checks, return a one-line `STATUS=` summary of any trouble, else None."""
    parts = []
    for check in checks:
        if check.level == "warn":
            parts.append(
                f"disk {check.mount} {check.before.percent:.0f}% used "
                f"(warn {config.disk.warn_percent:g}%)"
            )
        elif check.level == "critical":
            done = ", ".join(step.removeprefix("disk_") for step in check.steps) or "nothing"
            parts.append(
                f"disk {check.mount} critical {check.before.percent:.0f}% → "
                f"{check.after.percent:.0f}% ({done})"
            )
    return "; ".join(parts) or None
