"""Scan, plan, guard, delete, record: the one safety-checked prune path.

`ckptd prune`, the daemon's jobs and the disk check's escalation all call `prune_root`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from daemon.config import Config, RootConfig
from daemon.fsio import LOCAL, FileSystem
from daemon.history import HistoryLog
from policies.model import Plan, PolicySpec


@dataclass(frozen=True)
class PruneReport:
    """Given one prune run of one root: what was planned, refused, deleted, vetoed, freed."""

    root: str
    plan: Plan  # after the safety guard: vetoed checkpoints are kept with their reason
    dry_run: bool
    refused: str | None = None  # why the whole root was refused (exit 3), else None
    deleted: tuple[str, ...] = ()
    vetoed: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()  # names whose deletion failed (exit 1)
    errors: tuple[str, ...] = ()
    bytes_freed: int = 0
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


def prune_root(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    dry_run: bool,
    force: bool = False,
    policy_override: PolicySpec | None = None,
    history: HistoryLog | None = None,
    fs: FileSystem = LOCAL,
    cache: object | None = None,
    stop: threading.Event | None = None,
) -> PruneReport:
    """Given the config, a root and the time, prune it through the safety guard and report.

    `stop` set means: finish the deletion in progress, start no other (SIGTERM).
    """
    raise NotImplementedError
