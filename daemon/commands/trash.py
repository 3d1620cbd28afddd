"""`ckptd trash list|restore NAME|purge [--root ROOT] [--config FILE] [-y] [--json]`.

`list` shows each root's trash (deleted when, removed when the grace ends, size) and the total
(`--json`: the times in UTC ISO 8601);
`restore NAME` renames a checkpoint back into its root (refused if the name is taken there);
`purge` removes everything in the trash now, regardless of the grace (the scheduled prune only
removes what is past it). Unlike a prune it cannot be undone, so it asks `[y/N]` like `prune`
does (`-y` for scripts; without a terminal and without `-y` it refuses, exit 2). Roots:
`--root`, else every root of the config; a configured root that does not exist is a warning
(never created: no `.ckptd-trash` appears in a mistyped path), the others are done, exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import tzinfo
from typing import Any

from rich.console import Console

from daemon import columns
from daemon.clock import local_text, utc_iso, zone_for
from daemon.commands._common import Selection, select, warn_missing
from daemon.config import RootConfig, settings_for
from daemon.errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, SafetyRefusal, UsageError
from daemon.history.events import TrashRestore
from daemon.history.log import HistoryLog
from daemon.pruning import trash
from daemon.pruning.lock import root_lock
from daemon.render import format_bytes, format_wait, make_console

# A prune moving checkpoints into the trash looks, to recovery, like a crashed move.
BUSY = "another prune of this root is running (the daemon, or ckptd prune); try again after it"

# At 80 columns the time of deletion and the state go on a line of their own under the name:
# the name stays whole, `ckptd trash restore NAME` needs it.
TRASH_FIELDS = (
    columns.Field("checkpoint"),
    columns.Field("removed"),
    columns.Field("size", right=True),
    columns.Field("deleted", wraps=True, moves=True),
    columns.Field("state", wraps=True, moves=True),
)


def _print_json(document: object) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _removal(expires_at: float, now: float) -> str:
    if expires_at > now:
        return f"in {format_wait(expires_at - now)}"
    return "at the next prune"


def _list(args: argparse.Namespace, selected: Selection, console: Console) -> int:
    """`trash list`: every item in the selected roots' trash, oldest deletion first, per root,
    and the total."""
    now = time.time()
    zone = zone_for(selected.config)
    rows: list[dict[str, Any]] = []
    for root in selected.roots:
        root_path = os.path.realpath(root.path)
        grace = settings_for(selected.config, root).trash_grace
        for item in trash.list_trash(root_path):
            rows.append(
                {
                    "root": root_path,
                    "name": item.name,
                    "item": item.item,
                    "deleted_at": item.deleted_at,
                    "expires_at": item.expires_at(grace),
                    "bytes": item.bytes,
                    "state": item.state,
                }
            )
    if args.json:
        # Times as every --json document writes them: UTC ISO 8601.
        _print_json(
            [
                {
                    **row,
                    "deleted_at": utc_iso(row["deleted_at"]),
                    "expires_at": utc_iso(row["expires_at"]),
                }
                for row in rows
            ]
        )
    elif not rows:
        console.print("the trash is empty")
    else:
        _print_list(rows, console, zone, now)
    return warn_missing("trash", selected.missing)


def _print_list(rows: list[dict[str, Any]], console: Console, zone: tzinfo, now: float) -> None:
    """Given the trash items, print them per root, then the total. Names are never cut:
    `ckptd trash restore NAME` needs them whole."""
    values = [
        (
            row["name"],
            _removal(row["expires_at"], now),
            format_bytes(row["bytes"]),
            local_text(row["deleted_at"], zone),
            row["state"],
        )
        for row in rows
    ]
    layout = columns.layout(TRASH_FIELDS, values, console.width)
    root_seen = None
    for row, row_values in zip(rows, values, strict=True):
        if row["root"] != root_seen:
            root_seen = row["root"]
            count = sum(1 for other in rows if other["root"] == root_seen)
            console.print(
                f"{root_seen}/.ckptd-trash: {count} checkpoint{'s' if count != 1 else ''}",
                markup=False,
            )
            console.print("\n".join(columns.header(layout)), markup=False)
        console.print("\n".join(columns.rows(layout, row_values)), markup=False)
    total = sum(row["bytes"] for row in rows)
    console.print(
        f"total: {len(rows)} checkpoint{'s' if len(rows) != 1 else ''}, {format_bytes(total)} "
        "(`ckptd trash purge` frees it now; `ckptd trash restore NAME` brings one back)",
        markup=False,
    )


def _root_holding(name: str, roots: Sequence[RootConfig]) -> str:
    """Given a checkpoint name, return the one root whose trash holds it (else UsageError)."""
    candidates = [
        os.path.realpath(root.path)
        for root in roots
        if any(name in (item.name, item.item) for item in trash.list_trash(root.path))
    ]
    if not candidates:
        raise UsageError(f"no checkpoint named {name!r} in the trash")
    if len(candidates) > 1:
        raise UsageError(
            f"{name!r} is in the trash of several roots ({', '.join(candidates)}); "
            "choose one with --root"
        )
    return candidates[0]


def _restore(args: argparse.Namespace, selected: Selection, console: Console) -> int:
    """`trash restore NAME`: rename it back into its root, pinned, and record that."""
    if not args.name:
        raise UsageError("trash restore needs the NAME of a checkpoint (see `ckptd trash list`)")
    root_path = _root_holding(args.name, selected.roots)
    with root_lock(root_path) as acquired:
        if not acquired:
            raise SafetyRefusal(f"refusing to restore into {root_path}: {BUSY}")
        restored = trash.restore(root_path, args.name)
    with HistoryLog(selected.history_path) as history:
        history.record(TrashRestore(root=root_path, checkpoint=restored.name))
    pin = trash.pin_path(root_path, restored.name)
    if args.json:
        json.dump({"root": root_path, "restored": restored.name, "pin": pin}, sys.stdout)
        sys.stdout.write("\n")
    else:
        console.print(
            f"restored {restored.name} into {root_path}, pinned by {pin} "
            "(delete it to let the policy decide again)"
        )
    return warn_missing("trash", selected.missing)


def _confirm_purge(args: argparse.Namespace, selected: Selection, console: Console) -> bool:
    """Given the arguments, return whether to purge: -y, else the person's answer to what is
    about to be removed for good (nothing asked when the trash is empty)."""
    if args.yes:
        return True
    items = [item for root in selected.roots for item in trash.list_trash(root.path)]
    if not items:
        return True
    total = format_bytes(sum(item.bytes for item in items))
    count = f"{len(items)} checkpoint{'s' if len(items) != 1 else ''}"
    console.print(
        f"remove {count} ({total}) from the trash for good? This cannot be undone. [y/N] ",
        end="",
        markup=False,
    )
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _purge(args: argparse.Namespace, selected: Selection, console: Console) -> int:
    """`trash purge`: remove everything in the selected roots' trash now, grace or not."""
    if not args.yes and not sys.stdin.isatty():
        raise UsageError(
            "not purging without confirmation: no terminal to ask on; pass -y to confirm "
            "(a purge cannot be undone)"
        )
    if not _confirm_purge(args, selected, console):
        console.print("nothing removed")
        return EXIT_OK
    now = time.time()
    results: dict[str, trash.PurgeResult] = {}
    busy = False
    with HistoryLog(selected.history_path) as history:
        for root in selected.roots:
            root_path = os.path.realpath(root.path)
            with root_lock(root_path) as acquired:
                if not acquired:
                    print(f"ckptd trash: refusing to purge {root_path}: {BUSY}", file=sys.stderr)
                    busy = True
                    continue
                trash.recover(root_path)
                results[root_path] = trash.purge(
                    root_path, now=now, grace=0.0, everything=True, history=history
                )
    if args.json:
        _print_json({root_path: _purge_to_json(result) for root_path, result in results.items()})
    else:
        _print_purges(console, results)
    missing = warn_missing("trash", selected.missing)
    if busy:
        return EXIT_REFUSED
    failed = any(result.failed for result in results.values())
    return EXIT_FAILED if failed else missing


def _purge_to_json(result: trash.PurgeResult) -> dict[str, Any]:
    return {
        "removed": list(result.removed),
        "bytes_freed": result.bytes_freed,
        "failed": [{"name": name, "error": error} for name, error in result.failed],
    }


def _print_purges(console: Console, results: dict[str, trash.PurgeResult]) -> None:
    for root_path, result in results.items():
        console.print(
            f"{root_path}: removed {len(result.removed)} from the trash, "
            f"freed {format_bytes(result.bytes_freed)}"
            + (f", {len(result.failed)} failed" if result.failed else "")
        )
        for name, error in result.failed:
            console.print(f"  failed: {name}: {error}")


ACTIONS: dict[str, Callable[[argparse.Namespace, Selection, Console], int]] = {
    "list": _list,
    "restore": _restore,
    "purge": _purge,
}


def main(args: argparse.Namespace) -> int:
    """Given parsed `trash` arguments, list, restore or purge and return the exit code."""
    return ACTIONS[args.action](args, select(args.root, args.config), make_console())
