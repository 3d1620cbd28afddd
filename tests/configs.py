"""The one way a test writes a ckptd config: `write_config(path, roots=[...], ...)` for a YAML file
the daemon or the CLI reads, `make_config(...)` for the same config as an in-process `Config`.

Keywords name only what tests vary; a keyword left at None is not written, so the product's
default holds. Two test defaults differ from the product's, on purpose: snapshots are off unless
given (a test never copies checkpoints by surprise), and `write_config` keeps the state in
`state/` beside the file unless told (never /var/lib/ckptd).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from daemon.config import Config

Section = Mapping[str, object]
SNAPSHOTS_OFF: Section = {"enabled": False}

# The daily snapshot's tests: UTC days, Hugging Face roots, and a disk check that never stops a
# copy (critical at 100 %). They give `snapshots={"dir": ...}` themselves.
DAILY: dict[str, object] = {
    "timezone": "UTC",
    "layout": "hf",
    "disk": {"critical_percent": 100},
}


def rotation(count: int, **more: object) -> dict[str, object]:
    """Given a count (and any other policy keys), return the policy most tests use: keep the
    newest `count`, no tier 2, no tier 3."""
    return {"keep_last": count, "tier2_count": 0, "tier3_interval": None, **more}


def config_mapping(
    roots: Iterable[Path | str | Section] = (),
    *,
    layout: str | None = None,
    root_settings: Section | None = None,
    state_dir: Path | str | None = None,
    history_file: Path | str | None = None,
    timezone: str | None = None,
    log: Section | None = None,
    policy: Section | None = None,
    settle_seconds: float | str | None = None,
    abandoned_after: float | str | None = None,
    min_keep: int | None = None,
    max_delete_fraction: float | None = None,
    grace: float | str | None = None,
    prune: Section | None = None,
    snapshots: Section | None = SNAPSHOTS_OFF,
    disk: Section | None = None,
    verify: Section | None = None,
    metrics: Section | None = None,
    check: Section | None = None,
) -> dict[str, object]:
    """Given the settings a test varies, return the config as the mapping its YAML holds.

    `roots` are paths (each gets `layout` and `root_settings`) or whole root entries; `policy`,
    `settle_seconds`, `abandoned_after`, `min_keep`, `max_delete_fraction` and `grace` (the
    trash's) go under `defaults:`; the sections are written as given; `snapshots=None` leaves
    the product's default (on).
    """
    defaults = {
        "policy": policy,
        "settle_seconds": settle_seconds,
        "abandoned_after": abandoned_after,
        "min_keep": min_keep,
        "max_delete_fraction": max_delete_fraction,
        "trash": None if grace is None else {"grace": grace},
    }
    mapping = {
        "timezone": timezone,
        "state_dir": None if state_dir is None else str(state_dir),
        "history_file": None if history_file is None else str(history_file),
        "log": log,
        "defaults": _present(defaults) or None,
        "roots": [_root_entry(root, layout, root_settings) for root in roots],
        "prune": prune,
        "snapshots": snapshots,
        "disk": disk,
        "verify": verify,
        "metrics": metrics,
        "check": check,
    }
    return {key: _plain(value) for key, value in _present(mapping).items()}


def write_config(
    path: Path, roots: Iterable[Path | str | Section] = (), **settings: object
) -> Path:
    """Given the file to write and `config_mapping`'s keywords, write the config as YAML the way
    an editor saves (aside, then renamed over: a watching daemon never reads half of it) and
    return its path. The state goes to `state/` beside the file unless `state_dir` is given
    (`state_dir=None`: the product's default)."""
    settings.setdefault("state_dir", path.parent / "state")
    text = yaml.safe_dump(config_mapping(roots, **settings), sort_keys=False)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.tmp")
    aside.write_text(text)
    os.replace(aside, path)
    return path


def make_config(roots: Iterable[Path | str | Section] = (), **settings: object) -> Config:
    """Given `config_mapping`'s keywords, return the same config as `write_config` writes, as
    an in-process `Config` (validated by the same models the YAML loader uses)."""
    return Config.model_validate(config_mapping(roots, **settings))  # type: ignore[arg-type]


def _root_entry(
    root: Path | str | Section, layout: str | None, settings: Section | None
) -> dict[str, object]:
    if isinstance(root, Mapping):
        return dict(root)
    return _present({"path": str(root), "layout": layout, **(settings or {})})


def _present(mapping: Mapping[str, object]) -> dict[str, object]:
    return {key: value for key, value in mapping.items() if value is not None}


def _plain(value: object) -> object:
    """Paths as strings, all the way down: YAML knows no Path."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
