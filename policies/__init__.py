"""The retention policy engine: pure functions over checkpoint values. No I/O, no clock."""

from policies.model import (
    PRESETS,
    Checkpoint,
    Decision,
    KeepBest,
    Plan,
    PolicySpec,
    SlimSpec,
    SlimTarget,
)
from policies.tiered import plan

__all__ = [
    "PRESETS",
    "Checkpoint",
    "Decision",
    "KeepBest",
    "Plan",
    "PolicySpec",
    "SlimSpec",
    "SlimTarget",
    "plan",
]
