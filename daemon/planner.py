"""Scan a root and plan it: the one function `ckptd plan`, prune, the daemon and status share.

Besides the policy, two things of issue 12 go into every plan, through the same means the
policy's own protections use (a Checkpoint's completeness, a kept Decision with its reasons),
so the safety guard and the deleter need not know them:

- integrity (`daemon/verification.py`): a corrupt checkpoint is planned as incomplete
  (`incomplete:corrupt: <first problem>`): kept, and never counted as the newest complete one;
  the newest checkpoint that passed is kept (`last-good`) while a newer one of its series is
  corrupt or unchecked. Each corrupt checkpoint is also one of the plan's warnings;
- holds (`daemon/holds.py`): a held checkpoint is kept (`held:<holder> until <time>`); an
  unreadable hold keeps its checkpoint too and is a warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import tzinfo

from daemon import slimming
from daemon.clock import zone_for
from daemon.config import Config, RootConfig, policy_for, settings_for
from daemon.discovery.remote import RemoteScan, scan_remote
from daemon.discovery.scan import ScanResult, scan
from daemon.discovery.sizecache import SizeCache
from daemon.fsio import LOCAL, FileSystem
from daemon.holds import HoldSet, read_holds
from daemon.integrity.result import IntegrityResult
from daemon.storage.base import ObjectInfo, ObjectStore
from daemon.storage.url import StorageUrl, is_remote
from daemon.verification import (
    Assessment,
    VerificationState,
    assess,
    corrupt_reason,
    is_marked_corrupt,
    last_good_protection,
)
from policies import tiered
from policies.model import Checkpoint, Decision, Plan, PolicySpec
from policies.slim import unslim

LAST_GOOD = "last-good"


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


@dataclass(frozen=True)
class Planned:
    """Given one planning of one root: the scan (corrupt checkpoints marked incomplete), the
    plan, the integrity verdicts it rests on and the root's holds."""

    scan: ScanResult
    plan: Plan
    assessment: Assessment = field(default_factory=Assessment)
    holds: HoldSet = field(default_factory=HoldSet)


def plan_root(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    fs: FileSystem = LOCAL,
    cache: SizeCache | None = None,
    policy_override: PolicySpec | None = None,
    verification: VerificationState | None = None,
    check_new: bool = False,
    on_checked: Callable[[IntegrityResult], None] | None = None,
) -> tuple[ScanResult, Plan]:
    """Given the config, one of its roots and the time, return the scan and the policy's Plan
    (see `plan_root_full`)."""
    planned = plan_root_full(
        config,
        root,
        now=now,
        fs=fs,
        cache=cache,
        policy_override=policy_override,
        verification=verification,
        check_new=check_new,
        on_checked=on_checked,
    )
    return planned.scan, planned.plan


def plan_root_full(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    fs: FileSystem = LOCAL,
    cache: SizeCache | None = None,
    policy_override: PolicySpec | None = None,
    verification: VerificationState | None = None,
    check_new: bool = False,
    on_checked: Callable[[IntegrityResult], None] | None = None,
) -> Planned:
    """Given the config, one of its roots and the time, return the scan, the Plan, the
    integrity verdicts and the holds.

    `policy_override` replaces every series' policy (the disk check's emergency policy).
    With a cache, every checkpoint the plan would delete is proven unchanged since it was
    cached (a stat or two each: a `.keep` dropped into an old folder must pin it) and the root
    is planned again if any was not. Scan warnings are the plan's warnings. An incomplete
    checkpoint quiet for `abandoned_after` is flagged abandoned (`with_abandoned`; before the
    integrity check, so a corrupt checkpoint, complete as scanned, is never flagged).

    `verification` is what is remembered of the checkpoints' integrity (default: what
    `<state_dir>` holds, read only); `check_new` also checks every checkpoint never checked
    before (the prune); `on_checked` is told each integrity result computed now.
    """
    if is_remote(root.path):
        return plan_remote(config, root, now=now, policy_override=policy_override).planned
    settings = settings_for(config, root)
    settle_seconds = settings.settle_seconds
    want_metrics = _wants_metrics(config, root, policy_override)

    def scan_now(verify: Collection[str]) -> ScanResult:
        found = scan(
            root,
            now=now,
            settle_seconds=settle_seconds,
            fs=fs,
            cache=cache,
            verify=verify,
            want_metrics=want_metrics,
        )
        return with_abandoned(found, now=now, abandoned_after=settings.abandoned_after)

    result = scan_now(())
    specs = series_policies(config, root, result.series, policy_override)
    context = _Context(config, verification, check_new, on_checked)
    holds = read_holds(result.root, now=now, tz=context.zone)
    planned = _plan_checked(result, specs, context, holds)
    if cache is not None and (planned.plan.deleted or planned.plan.slimmed):
        # Slims too: a checkpoint slimmed since it was cached must not be slimmed again.
        to_check = [d.checkpoint.name for d in planned.plan.decisions if not d.keep or d.slim]
        verified = scan_now(to_check)
        if verified.checkpoints != result.checkpoints:
            # Something changed inside a checkpoint since it was cached: plan what is there now.
            result = verified
            planned = _plan_checked(result, specs, context, holds)
    # Which files each slim moves out is found on disk, not by the policy; after the holds and
    # `last-good` protections, which keep a checkpoint whole.
    planned = replace(planned, plan=slimming.resolve(planned.plan, specs))
    if result.warnings:
        plan = planned.plan
        planned = replace(planned, plan=replace(plan, warnings=(*result.warnings, *plan.warnings)))
    return planned


def _wants_metrics(config: Config, root: RootConfig, policy_override: PolicySpec | None) -> bool:
    """Given a root and its policies: metrics are read from trainer_state.json / sidecars
    only when a policy ranks by them."""
    if policy_override is not None:
        candidates = [policy_override]
    else:
        candidates = [policy_for(config, root)]
        candidates += [policy_for(config, root, series) for series in root.series]
    return any(spec.keep_best is not None for spec in candidates)


# Why a slim the policy asks for is not done on object storage (no rename to move files out).
REMOTE_NO_SLIM = "not-slimmable:object storage (slims need a local folder)"


@dataclass(frozen=True)
class RemotePlanned:
    """Given one planning of an object-storage root: the planning, and the scan with the
    listing it rests on (the prune deletes exactly the keys listed there)."""

    planned: Planned
    scanned: RemoteScan


def plan_remote(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    policy_override: PolicySpec | None = None,
    store: ObjectStore | None = None,
    url: StorageUrl | None = None,
    objects: Iterable[ObjectInfo] | None = None,
) -> RemotePlanned:
    """Given the config, an object-storage root and the time, return its planning as
    `plan_root_full` does for a local root, from one listing (`objects`: one made already).

    What object storage has not: integrity checks (they read whole files: not here), holds
    (`ckptd hold` writes into a local root), slims (planned ones are kept whole, with why).
    """
    settings = settings_for(config, root)
    scanned = scan_remote(
        root,
        now=now,
        settle_seconds=settings.settle_seconds,
        want_metrics=_wants_metrics(config, root, policy_override),
        store=store,
        url=url,
        objects=objects,
    )
    result = with_abandoned(scanned.result, now=now, abandoned_after=settings.abandoned_after)
    specs = series_policies(config, root, result.series, policy_override)
    unchecked = config.model_copy(
        update={"verify": config.verify.model_copy(update={"checks": False})}
    )
    context = _Context(unchecked, None, False, None)
    planned = _plan_checked(result, specs, context, HoldSet())
    plan = planned.plan
    if plan.slimmed:
        plan = replace(plan, decisions=tuple(unslim(d, REMOTE_NO_SLIM) for d in plan.decisions))
    if result.warnings:
        plan = replace(plan, warnings=(*result.warnings, *plan.warnings))
    return RemotePlanned(replace(planned, plan=plan), replace(scanned, result=result))


@dataclass
class _Context:
    """What planning needs besides the scan: the integrity state and the zone of hold times."""

    config: Config
    verification: VerificationState | None
    check_new: bool
    on_checked: Callable[[IntegrityResult], None] | None
    zone: tzinfo = field(init=False)

    def __post_init__(self) -> None:
        self.zone = zone_for(self.config)

    def state(self) -> VerificationState:
        if self.verification is None:
            # Read only: `ckptd plan` must not need write access to state_dir.
            self.verification = VerificationState.in_folder(self.config.state_dir)
        return self.verification


def _plan_checked(
    result: ScanResult, specs: dict[str, PolicySpec], context: _Context, holds: HoldSet
) -> Planned:
    """Given a scan, the policies and the holds: assess the checkpoints' integrity, mark the
    corrupt ones, plan, and keep what holds and `last-good` protect."""
    assessment = Assessment()
    if context.config.verify.checks:
        # Keyed by the real path, as the prune pipeline keys the root.
        root = os.path.realpath(result.root)
        assessment = assess(root, result.checkpoints, context.state(), check_new=context.check_new)
        if context.on_checked is not None:
            for checked in assessment.fresh:
                context.on_checked(checked)
    marked = mark_corrupt(result, assessment)
    plan = tiered.plan(marked.checkpoints, specs, root=marked.root)
    protections = protections_for(marked, assessment, holds, context.zone)
    plan = protect(plan, protections)
    plan = replace(plan, warnings=(*plan.warnings, *_integrity_warnings(marked, holds)))
    return Planned(marked, plan, assessment, holds)


def mark_corrupt(result: ScanResult, assessment: Assessment) -> ScanResult:
    """Given a scan and its assessment, return the scan with each corrupt checkpoint planned as
    incomplete (`corrupt: <first problem>`): kept, never the newest complete one."""
    corrupt = assessment.corrupt()
    if not corrupt:
        return result
    checkpoints = tuple(
        replace(c, complete=False, incomplete_reason=corrupt_reason(corrupt[c.name]))
        if c.name in corrupt and c.complete
        else c
        for c in result.checkpoints
    )
    return replace(result, checkpoints=checkpoints)


def protections_for(
    result: ScanResult, assessment: Assessment, holds: HoldSet, zone: tzinfo
) -> dict[str, tuple[str, ...]]:
    """Given a marked scan, its assessment and the holds, return the reasons that keep a
    checkpoint whatever the policy says, by name: `held:<holder> until <time>`, `last-good`."""
    reasons: dict[str, tuple[str, ...]] = dict(holds.reasons(zone))
    for name in last_good_protection(result.checkpoints, assessment):
        reasons[name] = (*reasons.get(name, ()), LAST_GOOD)
    return reasons


def protect(plan: Plan, protections: Mapping[str, tuple[str, ...]]) -> Plan:
    """Given a plan and reasons that keep checkpoints by name, return the plan with those kept:
    a kept checkpoint gains the reasons, a deleted one is kept for them alone (the tier rules'
    explanations would contradict a kept checkpoint), as the policy treats pins."""
    if not protections:
        return plan
    decisions: list[Decision] = []
    for decision in plan.decisions:
        extra = protections.get(decision.checkpoint.name)
        if extra is None:
            decisions.append(decision)
        elif decision.keep:
            merged = tuple(dict.fromkeys((*decision.reasons, *extra)))
            decisions.append(replace(decision, reasons=merged))
        else:
            decisions.append(replace(decision, keep=True, reasons=extra))
    return replace(plan, decisions=tuple(decisions))


def _integrity_warnings(result: ScanResult, holds: HoldSet) -> tuple[str, ...]:
    warnings = [
        f"{c.name} is {c.incomplete_reason}; kept, and not counted as the newest checkpoint"
        for c in result.checkpoints
        if is_marked_corrupt(c)
    ]
    warnings += [f"unreadable hold {bad.path}: {bad.problem}" for bad in holds.malformed]
    return tuple(warnings)
