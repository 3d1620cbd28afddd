"""Checkpoint discovery: which entries of a root are checkpoints, of which series, complete or not.

One module scans; it decides nothing. See DESIGN.md, "Checkpoint discovery".
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.config import RootConfig
from daemon.fsio import LOCAL, FileSystem
from policies.model import Checkpoint


@dataclass(frozen=True, slots=True)
class ScanResult:
    """One scan of one root: its checkpoints (every series) and what the reader should know."""

    root: str
    layout: str  # the detected or configured layout
    checkpoints: tuple[Checkpoint, ...]
    # Series ids found or configured, in config order (a checkpoint's `series` is one of them).
    series: tuple[str, ...]
    warnings: tuple[str, ...] = ()


def scan(
    root: RootConfig,
    *,
    now: float,
    settle_seconds: float,
    fs: FileSystem = LOCAL,
    cache: object | None = None,
) -> ScanResult:
    """Given a configured root, return what is in it now. `now` is seconds since the epoch."""
    raise NotImplementedError
