"""`ckptd trash list|restore NAME|purge [--root ROOT] [--config FILE] [--json]`.

`list` shows each root's trash (deleted when, removed when the grace ends, size, and what
removing it frees: its allocated bytes, less than the size for sparse files); `restore NAME`
renames a checkpoint back into its root (refused if the name is taken there); `purge` removes
everything in the trash now, regardless of the grace (the scheduled prune only removes what is
past it). Roots: `--root`, else every root of the config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from daemon.commands._common import config_path, history_path_for, select_roots
from daemon.config import Config, RootConfig, default_config_for_root, settings_for
from daemon.errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, SafetyRefusal, UsageError
from daemon.history.events import TrashRestore
from daemon.history.log import HistoryLog
from daemon.pruning import trash
from daemon.pruning.lock import root_lock
from daemon.render import format_bytes, make_console
from daemon.rootdir import IdentityStore, RootDir, open_root

# A prune moving checkpoints into the trash looks, to recovery, like a crashed move.
BUSY = "another prune of this root is running (the daemon, or ckptd prune); try again after it"


@dataclass(frozen=True)
class _Selection:
    """Given the arguments: the config, the roots to act on and the history file."""

    config: Config
    roots: list[RootConfig]
    history_path: str


def _select(args: argparse.Namespace) -> _Selection:
    """Given the arguments, return the config, the roots and the history file."""
    if args.root is not None and args.config is None and not os.path.exists(config_path(None)):
        config = default_config_for_root(os.path.abspath(args.root))
        return _Selection(config, list(config.roots), history_path_for(config, args.root, None))
    config, roots = select_roots(args.root, args.config)
    return _Selection(config, roots, config.history_path)


def _open(selected: _Selection, root: RootConfig) -> RootDir:
    """Given a root of the selection, open it, checked against the identity recorded for it
    (RootChanged, exit 3, when another folder is at its path)."""
    return open_root(root.path, store=IdentityStore.in_state_dir(selected.config.state_dir))


def _local(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _print_json(document: object) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _list(args: argparse.Namespace, selected: _Selection, console: Console) -> int:
    """`trash list`: every item in the selected roots' trash, oldest deletion first."""
    rows: list[dict[str, Any]] = []
    refused = False
    for root in selected.roots:
        grace = settings_for(selected.config, root).trash_grace
        try:
            with _open(selected, root) as root_dir:
                items = trash.list_trash(root_dir)
                root_path = root_dir.path
        except SafetyRefusal as refusal:
            print(f"ckptd trash: refused for safety: {root.path}: {refusal}", file=sys.stderr)
            refused = True
            continue
        for item in items:
            rows.append(
                {
                    "root": root_path,
                    "name": item.name,
                    "item": item.item,
                    "deleted_at": item.deleted_at,
                    "expires_at": item.expires_at(grace),
                    "bytes": item.bytes,
                    "bytes_logical": item.bytes_logical,
                    "state": item.state,
                }
            )
    status = EXIT_REFUSED if refused else EXIT_OK
    if args.json:
        _print_json(rows)
        return status
    if not rows:
        console.print("the trash is empty")
        return status
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("root", overflow="fold")
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("deleted", no_wrap=True)
    table.add_column("removed after", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("frees", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for row in rows:
        table.add_row(
            row["root"],
            row["name"],
            _local(row["deleted_at"]),
            _local(row["expires_at"]),
            format_bytes(row["bytes_logical"]),
            format_bytes(row["bytes"]),
            row["state"],
        )
    console.print(table)
    return status


def _root_holding(name: str, selected: _Selection) -> RootConfig:
    """Given a checkpoint name, return the one root whose trash holds it (else UsageError)."""
    candidates = []
    for root in selected.roots:
        with _open(selected, root) as root_dir:
            if any(name in (item.name, item.item) for item in trash.list_trash(root_dir)):
                candidates.append(root)
    if not candidates:
        raise UsageError(f"no checkpoint named {name!r} in the trash")
    if len(candidates) > 1:
        raise UsageError(
            f"{name!r} is in the trash of several roots "
            f"({', '.join(root.path for root in candidates)}); choose one with --root"
        )
    return candidates[0]


def _restore(args: argparse.Namespace, selected: _Selection, console: Console) -> int:
    """`trash restore NAME`: rename it back into its root, pinned, and record that."""
    if not args.name:
        raise UsageError("trash restore needs the NAME of a checkpoint (see `ckptd trash list`)")
    with _open(selected, _root_holding(args.name, selected)) as root_dir:
        root_path = root_dir.path
        with root_lock(root_dir) as acquired:
            if not acquired:
                raise SafetyRefusal(f"refusing to restore into {root_path}: {BUSY}")
            restored = trash.restore_pinned(root_dir, args.name)
    name = restored.item.name
    with HistoryLog(selected.history_path) as history:
        history.record(TrashRestore(root=root_path, checkpoint=name))
    if args.json:
        json.dump({"root": root_path, "restored": name, "pin": restored.pin}, sys.stdout)
        sys.stdout.write("\n")
    elif restored.pin is not None:
        console.print(
            f"restored {name} into {root_path}, pinned by {restored.pin} "
            "(delete it to let the policy decide again)"
        )
    else:
        console.print(f"restored {name} into {root_path}, {restored.problem}")
    return EXIT_OK


def _purge(args: argparse.Namespace, selected: _Selection, console: Console) -> int:
    """`trash purge`: remove everything in the selected roots' trash now, grace or not."""
    now = time.time()
    results: dict[str, trash.PurgeResult] = {}
    busy = False
    with HistoryLog(selected.history_path) as history:
        for root in selected.roots:
            try:
                root_path, result = _purge_root(selected, root, now, history)
            except SafetyRefusal as refusal:
                where = os.path.realpath(root.path)
                print(f"ckptd trash: refusing to purge {where}: {refusal}", file=sys.stderr)
                busy = True
                continue
            results[root_path] = result
    if args.json:
        _print_json({root_path: _purge_to_json(result) for root_path, result in results.items()})
    else:
        _print_purges(console, results)
    if busy:
        return EXIT_REFUSED
    return EXIT_FAILED if any(result.failed for result in results.values()) else EXIT_OK


def _purge_root(
    selected: _Selection, root: RootConfig, now: float, history: HistoryLog
) -> tuple[str, trash.PurgeResult]:
    """Given a root, recover and purge its trash under its lock; return its path and what was
    purged. Raises SafetyRefusal when another prune holds it, or the root or its trash is
    refused."""
    with _open(selected, root) as root_dir, root_lock(root_dir) as acquired:
        if not acquired:
            raise SafetyRefusal(BUSY)
        trash.recover(root_dir)
        purged = trash.purge(root_dir, now=now, grace=0.0, everything=True, history=history)
        return root_dir.path, purged


def _purge_to_json(result: trash.PurgeResult) -> dict[str, Any]:
    return {
        "removed": list(result.removed),
        "bytes_freed": result.bytes_freed,
        "bytes_logical": result.bytes_logical,
        "failed": [{"name": name, "error": error} for name, error in result.failed],
    }


def _print_purges(console: Console, results: dict[str, trash.PurgeResult]) -> None:
    for root_path, result in results.items():
        console.print(
            f"{root_path}: removed {len(result.removed)} from the trash, "
            f"freed {format_bytes(result.bytes_freed)} "
            f"({format_bytes(result.bytes_logical)} logical)"
            + (f", {len(result.failed)} failed" if result.failed else "")
        )
        for name, error in result.failed:
            console.print(f"  failed: {name}: {error}")


ACTIONS: dict[str, Callable[[argparse.Namespace, _Selection, Console], int]] = {
    "list": _list,
    "restore": _restore,
    "purge": _purge,
}


def main(args: argparse.Namespace) -> int:
    """Given parsed `trash` arguments, list, restore or purge and return the exit code."""
    return ACTIONS[args.action](args, _select(args), make_console())
