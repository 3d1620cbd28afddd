"""Scan a root and plan it: the one function `ckptd plan`, prune, the daemon and status share."""

from __future__ import annotations

from daemon.config import Config, RootConfig
from daemon.discovery import ScanResult
from daemon.fsio import LOCAL, FileSystem
from policies.model import Plan, PolicySpec


def plan_root(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    fs: FileSystem = LOCAL,
    cache: object | None = None,
    policy_override: PolicySpec | None = None,
) -> tuple[ScanResult, Plan]:
    """Given the config, one of its roots and the time, return the scan and the policy's Plan.

    `policy_override` replaces every series' policy (the disk check's emergency policy).
    """
    raise NotImplementedError
