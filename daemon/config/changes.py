"""What changed between two configs, in words a log line can carry (`config_reloaded`)."""

from __future__ import annotations

from typing import Any

from daemon.config.models import Config

# Past this many changes the list ends with "… and N more": a log line stays a line.
MAX_CHANGES = 20


def _flatten(value: Any, prefix: str, into: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), into)
    else:
        into[prefix] = value


def _roots_by_path(config: Config) -> dict[str, dict[str, Any]]:
    return {root.path: root.model_dump() for root in config.roots}


def config_changes(old: Config, new: Config) -> list[str]:
    """Given the config in force and the one reloaded, return each change as
    `key: old -> new`; roots are named by their path (`roots[/data/run].policy.keep_last`),
    added and removed roots said as such. Nothing changed: an empty list."""
    changes: list[str] = []
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    _flatten(old.model_dump(exclude={"roots"}), "", before)
    _flatten(new.model_dump(exclude={"roots"}), "", after)
    old_roots, new_roots = _roots_by_path(old), _roots_by_path(new)
    for path in old_roots.keys() - new_roots.keys():
        changes.append(f"roots: {path} removed")
    for path in new_roots.keys() - old_roots.keys():
        changes.append(f"roots: {path} added")
    for path in old_roots.keys() & new_roots.keys():
        _flatten(old_roots[path], f"roots[{path}]", before)
        _flatten(new_roots[path], f"roots[{path}]", after)
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key), after.get(key)
        if was != now:
            changes.append(f"{key}: {_text(was)} -> {_text(now)}")
    changes.sort()
    if len(changes) > MAX_CHANGES:
        return [*changes[:MAX_CHANGES], f"… and {len(changes) - MAX_CHANGES} more"]
    return changes


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_text(item)}" for key, item in value.items()) + "}"
    return str(value)
