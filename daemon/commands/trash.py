"""`ckptd trash list|restore NAME|purge [--root ROOT] [--config FILE] [--json]`.

`list` shows each root's trash (deleted when, removed when the grace ends, size); `restore NAME`
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
from datetime import datetime

from rich.table import Table

from daemon.config import Config, RootConfig, default_config_for_root, settings_for
from daemon.errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, SafetyRefusal, UsageError
from daemon.history.log import HistoryLog
from daemon.pruning import trash
from daemon.render import make_console

# A prune moving checkpoints into the trash looks, to recovery, like a crashed move.
BUSY = "another prune of this root is running (the daemon, or ckptd prune); try again after it"


def _roots(args: argparse.Namespace) -> tuple[Config, list[RootConfig], str | None]:
    """Given the arguments, return the config, the roots and the history path (None: no log)."""
    from daemon.cli import resolve_config_path
    from daemon.commands.plan import select_roots
    from daemon.commands.prune import history_for

    if args.root is not None and args.config is None:
        config_path = resolve_config_path(None)
        if not os.path.exists(config_path):
            config = default_config_for_root(os.path.abspath(args.root))
            return config, list(config.roots), history_for(config, args.root, None)
    config, roots = select_roots(args.root, args.config)
    return config, roots, config.history_path


def _local(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def main(args: argparse.Namespace) -> int:
    """Given parsed `trash` arguments, list, restore or purge and return the exit code."""
    config, roots, history_file = _roots(args)
    now = time.time()
    console = make_console()
    if args.action == "list":
        rows: list[dict[str, str | float | int]] = []
        for root in roots:
            root_path = os.path.realpath(root.path)
            grace = settings_for(config, root).trash_grace
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
            json.dump(rows, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return EXIT_OK
        if not rows:
            console.print("the trash is empty")
            return EXIT_OK
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("root", overflow="fold")
        table.add_column("checkpoint", no_wrap=True)
        table.add_column("deleted", no_wrap=True)
        table.add_column("removed after", no_wrap=True)
        table.add_column("size", justify="right", no_wrap=True)
        table.add_column("state", no_wrap=True)
        from daemon.render import format_bytes

        for row in rows:
            table.add_row(
                str(row["root"]),
                str(row["name"]),
                _local(float(row["deleted_at"])),
                _local(float(row["expires_at"])),
                format_bytes(int(row["bytes"])),
                str(row["state"]),
            )
        console.print(table)
        return EXIT_OK
    if args.action == "restore":
        if not args.name:
            raise UsageError(
                "trash restore needs the NAME of a checkpoint (see `ckptd trash list`)"
            )
        candidates = [
            os.path.realpath(root.path)
            for root in roots
            if any(args.name in (item.name, item.item) for item in trash.list_trash(root.path))
        ]
        if not candidates:
            raise UsageError(f"no checkpoint named {args.name!r} in the trash")
        if len(candidates) > 1:
            raise UsageError(
                f"{args.name!r} is in the trash of several roots ({', '.join(candidates)}); "
                "choose one with --root"
            )
        with trash.root_lock(candidates[0]) as acquired:
            if not acquired:
                raise SafetyRefusal(f"refusing to restore into {candidates[0]}: {BUSY}")
            restored = trash.restore(candidates[0], args.name)
        if history_file is not None:
            with HistoryLog(history_file) as restore_log:
                restore_log.write("trash_restore", root=candidates[0], checkpoint=restored.name)
        pin = trash.pin_path(candidates[0], restored.name)
        if args.json:
            json.dump({"root": candidates[0], "restored": restored.name, "pin": pin}, sys.stdout)
            sys.stdout.write("\n")
        else:
            console.print(
                f"restored {restored.name} into {candidates[0]}, pinned by {pin} "
                "(delete it to let the policy decide again)"
            )
        return EXIT_OK
    # purge
    results = {}
    failed = False
    busy = False
    history = HistoryLog(history_file) if history_file is not None else None
    try:
        for root in roots:
            root_path = os.path.realpath(root.path)
            with trash.root_lock(root_path) as acquired:
                if not acquired:
                    print(f"ckptd trash: refusing to purge {root_path}: {BUSY}", file=sys.stderr)
                    busy = True
                    continue
                trash.recover(root_path)
                result = trash.purge(
                    root_path, now=now, grace=0.0, everything=True, history=history
                )
            results[root_path] = result
            failed = failed or bool(result.failed)
    finally:
        if history is not None:
            history.close()
    if args.json:
        json.dump(
            {
                purged_root: {
                    "removed": list(r.removed),
                    "bytes_freed": r.bytes_freed,
                    "failed": [{"name": n, "error": e} for n, e in r.failed],
                }
                for purged_root, r in results.items()
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        from daemon.render import format_bytes

        for purged_root, result in results.items():
            console.print(
                f"{purged_root}: removed {len(result.removed)} from the trash, "
                f"freed {format_bytes(result.bytes_freed)}"
                + (f", {len(result.failed)} failed" if result.failed else "")
            )
            for name, error in result.failed:
                console.print(f"  failed: {name}: {error}")
    if busy:
        return EXIT_REFUSED
    return EXIT_FAILED if failed else EXIT_OK
