"""The tiered retention policy (DESIGN.md, "The retention policy")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from policies.model import Checkpoint, Plan, PolicySpec


def plan(
    checkpoints: Sequence[Checkpoint],
    specs: Mapping[str, PolicySpec],
    *,
    root: str = "",
) -> Plan:
    """Given a root's checkpoints (any order, any series) and the policy of each series, return
    the Plan: one Decision per checkpoint with every reason, ordered by series then step.

    A checkpoint whose series has no entry in `specs` uses `specs["default"]` if present, else
    the balanced preset.
    """
    raise NotImplementedError
