"""Scan a root and plan it: the one function `ckptd plan`, prune, the daemon and status share."""

from __future__ import annotations

from dataclasses import replace

from daemon import slimming
from daemon.config import Config, RootConfig, policy_for, settings_for
from daemon.discovery.scan import ScanResult, scan
from daemon.discovery.sizecache import SizeCache
from daemon.fsio import LOCAL, FileSystem
from policies import tiered
from policies.model import Checkpoint, Plan, PolicySpec


def series_policies(
    config: Config,
    root: RootConfig,
    series: tuple[str, ...],
    policy_override: PolicySpec | None = None,
) -> dict[str, PolicySpec]:
    """Given the config, a root and the series ids a scan found, return each series' policy:
    a configured series' own (its pattern is its id), else the root's, else the defaults';
    `policy_override` replaces them all."""
    configured = {series_config.pattern: series_config for series_config in root.series}
    specs: dict[str, PolicySpec] = {}
    for series_id in series:
        if policy_override is not None:
            specs[series_id] = policy_override
        else:
            specs[series_id] = policy_for(config, root, configured.get(series_id))
    specs["default"] = policy_override or policy_for(config, root)
    return specs


def with_abandoned(result: ScanResult, *, now: float, abandoned_after: float) -> ScanResult:
    """Given a scan, the time and the root's `abandoned_after`, return it with every incomplete
    checkpoint nothing wrote in for that long flagged `abandoned` (a crashed save: the policy
    plans it for deletion). Whether a process still holds it is the safety guard's to check."""
    if not any(_quiet_for(c, now, abandoned_after) for c in result.checkpoints):
        return result
    checkpoints = tuple(
        replace(c, abandoned=True) if _quiet_for(c, now, abandoned_after) else c
        for c in result.checkpoints
    )
    return replace(result, checkpoints=checkpoints)


def _quiet_for(checkpoint: Checkpoint, now: float, seconds: float) -> bool:
    return not checkpoint.complete and 0 < checkpoint.mtime <= now - seconds


def plan_root(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    fs: FileSystem = LOCAL,
    cache: SizeCache | None = None,
    policy_override: PolicySpec | None = None,
) -> tuple[ScanResult, Plan]:
    """Given the config, one of its roots and the time, return the scan and the policy's Plan.

    `policy_override` replaces every series' policy (the disk check's emergency policy).
    With a cache, every checkpoint the plan would delete is proven unchanged since it was
    cached (a stat or two each: a `.keep` dropped into an old folder must pin it) and the root
    is planned again if any was not. Scan warnings are the plan's warnings. An incomplete
    checkpoint quiet for `abandoned_after` is flagged abandoned (`with_abandoned`).
    """
    settings = settings_for(config, root)
    settle_seconds = settings.settle_seconds
    if policy_override is not None:
        candidates = [policy_override]
    else:
        candidates = [policy_for(config, root)]
        candidates += [policy_for(config, root, series) for series in root.series]
    # Metrics are read from trainer_state.json / sidecars only when a policy ranks by them.
    want_metrics = any(spec.keep_best is not None for spec in candidates)
    result = scan(
        root, now=now, settle_seconds=settle_seconds, fs=fs, cache=cache, want_metrics=want_metrics
    )
    result = with_abandoned(result, now=now, abandoned_after=settings.abandoned_after)
    specs = series_policies(config, root, result.series, policy_override)
    plan = tiered.plan(result.checkpoints, specs, root=result.root)
    if cache is not None and (plan.deleted or plan.slimmed):
        # Slims too: a checkpoint slimmed since it was cached must not be slimmed again.
        to_delete = [d.checkpoint.name for d in plan.decisions if not d.keep or d.slim]
        verified = scan(
            root,
            now=now,
            settle_seconds=settle_seconds,
            fs=fs,
            cache=cache,
            verify=to_delete,
            want_metrics=want_metrics,
        )
        verified = with_abandoned(verified, now=now, abandoned_after=settings.abandoned_after)
        if verified.checkpoints != result.checkpoints:
            # Something changed inside a checkpoint since it was cached: plan what is there now.
            result = verified
            plan = tiered.plan(result.checkpoints, specs, root=result.root)
    # Which files each slim moves out is found on disk, not by the policy.
    plan = slimming.resolve(plan, specs)
    if result.warnings:
        plan = replace(plan, warnings=(*result.warnings, *plan.warnings))
    return result, plan
