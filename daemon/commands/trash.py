"""`ckptd trash list|restore NAME|purge [--root ROOT] [--config FILE] [-y] [--json]`.

`list` shows each root's trash (deleted when, removed when the grace ends, size, and what
removing it frees: its allocated bytes, less than the size for sparse files) and the total
(`--json`: the times in UTC ISO 8601);
`restore NAME` renames a checkpoint back into its root (refused if the name is taken there);
`purge` removes everything in the trash now, regardless of the grace (the scheduled prune only
removes what is past it). Unlike a prune it cannot be undone, so it asks `[y/N]` like `prune`
does (`-y` for scripts; without a terminal and without `-y` it refuses, exit 2). Roots:
`--root`, else every root of the config; a configured root that does not exist is a warning
(never created: no `.ckptd-trash` appears in a mistyped path), the others are done, exit 1.
Each root is opened once and checked against the identity recorded for it, and its trash must
be ckptd's own (README, "Against a hostile root owner"); a root refused for safety is said on
stderr, the others are done, exit 3.

A shared root (README, "Shared storage") is purged or restored into only under its lease, taken
as `ckptd prune` takes it (daemon/pruning/leasing.py) and given back when the command ends: on a
standby node, whose root's lease another node holds, both are refused like a prune there
(`refused for safety`, naming the holder and its expiry; exit 3) and nothing in the trash moves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
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
from daemon.pruning import leasing, trash
from daemon.pruning import remote as remote_pruning
from daemon.pruning.lock import root_lock
from daemon.render import format_bytes, format_wait, make_console
from daemon.rootdir import IdentityStore, RootDir, open_root
from daemon.storage.url import is_remote

# A prune moving checkpoints into the trash looks, to recovery, like a crashed move.
BUSY = "another prune of this root is running (the daemon, or ckptd prune); try again after it"

# After the lease refusal's own sentence (who holds it, until when): what it means here.
STANDBY = "its trash is that node's to purge and restore; nothing changed"

# At 80 columns the time of deletion and the state go on a line of their own under the name:
# the name stays whole, `ckptd trash restore NAME` needs it.
TRASH_FIELDS = (
    columns.Field("checkpoint"),
    columns.Field("removed"),
    columns.Field("size", right=True),
    columns.Field("frees", right=True),
    columns.Field("deleted", wraps=True, moves=True),
    columns.Field("state", wraps=True, moves=True),
)


def _print_json(document: object) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _open(selected: Selection, root: RootConfig) -> RootDir:
    """Given a root of the selection, open it, checked against the identity recorded for it
    (RootChanged, exit 3, when another folder is at its path)."""
    return open_root(root.path, store=IdentityStore.in_state_dir(selected.config.state_dir))


def _say_standby(root: RootConfig, held: leasing.LeaseHeldElsewhere) -> None:
    """Given a root whose lease another node holds, say so as `ckptd prune` says it there."""
    # Plain print: a message for logs and scripts must not be wrapped or styled.
    print(
        f"ckptd trash: refused for safety: {leasing.report_root(root)}: {held}; {STANDBY}",
        file=sys.stderr,
    )


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
    refused = False
    for root in selected.roots:
        grace = settings_for(selected.config, root).trash_grace
        if is_remote(root.path):
            rows.extend(_remote_rows(root, grace))
            continue
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
                    # "slim": the resume state moved out of the checkpoint `name` (issue 11).
                    "kind": "slim" if item.slim is not None else "checkpoint",
                    "item": item.item,
                    "deleted_at": item.deleted_at,
                    "expires_at": item.expires_at(grace),
                    "bytes": item.bytes,
                    "bytes_logical": item.bytes_logical,
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
    missing = warn_missing("trash", selected.missing)
    return EXIT_REFUSED if refused else missing


def _remote_rows(root: RootConfig, grace: float) -> list[dict[str, Any]]:
    """Given an object-storage root, return the rows of its trash: the checkpoints waiting in
    its deferred-deletion lists (their objects stay until the grace ends)."""
    url, items = remote_pruning.deferred(root)
    return [
        {
            "root": str(url),
            "name": item.name,
            "kind": "checkpoint",
            "item": item.name,
            "deleted_at": item.due - grace,
            "expires_at": item.due,
            "bytes": item.size,
            "bytes_logical": item.size,
            "state": "deferred (its objects stay until then)",
        }
        for item in items
    ]


def _print_list(rows: list[dict[str, Any]], console: Console, zone: tzinfo, now: float) -> None:
    """Given the trash items, print them per root, then the total. Names are never cut:
    `ckptd trash restore NAME` needs them whole."""
    values = [
        (
            # The resume state of a slimmed checkpoint (issue 11), restored into it by name.
            row["name"] + (" (resume state)" if row["kind"] == "slim" else ""),
            _removal(row["expires_at"], now),
            format_bytes(row["bytes_logical"]),
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
    size = sum(row["bytes_logical"] for row in rows)
    console.print(
        f"total: {len(rows)} checkpoint{'s' if len(rows) != 1 else ''}, {format_bytes(total)} "
        f"({format_bytes(size)} logical) "
        "(`ckptd trash purge` frees it now; `ckptd trash restore NAME` brings one back)",
        markup=False,
    )


def _root_holding(name: str, selected: Selection) -> RootConfig:
    """Given a checkpoint name, return the one root whose trash holds it (else UsageError)."""
    candidates: list[RootConfig] = []
    for root in selected.roots:
        if is_remote(root.path):
            if any(item.name == name for item in remote_pruning.deferred(root)[1]):
                candidates.append(root)
            continue
        with _open(selected, root) as root_dir:
            if any(name in (item.name, item.item) for item in trash.list_trash(root_dir)):
                candidates.append(root)
    if not candidates:
        raise UsageError(f"no checkpoint named {name!r} in the trash")
    if len(candidates) > 1:
        raise UsageError(
            f"{name!r} is in the trash of several roots "
            f"({', '.join(os.path.realpath(root.path) for root in candidates)}); "
            "choose one with --root"
        )
    return candidates[0]


def _restore(args: argparse.Namespace, selected: Selection, console: Console) -> int:
    """`trash restore NAME`: rename it back into its root, pinned, and record that."""
    if not args.name:
        raise UsageError("trash restore needs the NAME of a checkpoint (see `ckptd trash list`)")
    holding = _root_holding(args.name, selected)
    try:
        with leasing.taken(selected.config, holding):
            if is_remote(holding.path):
                return _restore_remote(args, selected, console, holding)
            with _open(selected, holding) as root_dir:
                root_path = root_dir.path
                with root_lock(root_dir) as acquired:
                    if not acquired:
                        raise SafetyRefusal(f"refusing to restore into {root_path}: {BUSY}")
                    restored = trash.restore_pinned(root_dir, args.name)
    except leasing.LeaseHeldElsewhere as held:
        _say_standby(holding, held)
        return EXIT_REFUSED
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
    return warn_missing("trash", selected.missing)


def _restore_remote(
    args: argparse.Namespace, selected: Selection, console: Console, root: RootConfig
) -> int:
    """`trash restore NAME` on object storage: cancel its deferred deletion (nothing moves:
    its objects never left) and record that."""
    if not remote_pruning.restore_deferred(root, args.name):
        raise SafetyRefusal(f"{args.name}: its deletion has already begun; it cannot be restored")
    with HistoryLog(selected.history_path) as history:
        history.record(TrashRestore(root=root.path, checkpoint=args.name))
    if args.json:
        json.dump({"root": root.path, "restored": args.name, "pin": None}, sys.stdout)
        sys.stdout.write("\n")
    else:
        console.print(
            f"restored {args.name} in {root.path}: its deferred deletion is cancelled "
            "(no pin on object storage: the policy decides again at the next prune)"
        )
    return warn_missing("trash", selected.missing)


def _confirm_purge(args: argparse.Namespace, selected: Selection, console: Console) -> bool:
    """Given the arguments, return whether to purge: -y, else the person's answer to what is
    about to be removed for good (nothing asked when the trash is empty)."""
    if args.yes:
        return True
    items = []
    sizes: list[int] = []
    for root in selected.roots:
        if leasing.standby(selected.config, root) is not None:
            continue  # refused when the purge comes to it: nothing to ask about there
        if is_remote(root.path):
            sizes.extend(item.size for item in remote_pruning.deferred(root)[1])
            continue
        try:
            with _open(selected, root) as root_dir:
                items.extend(trash.list_trash(root_dir))
        except SafetyRefusal:
            continue  # said when the purge comes to it
    sizes.extend(item.bytes for item in items)
    if not sizes:
        return True
    total = format_bytes(sum(sizes))
    count = f"{len(sizes)} checkpoint{'s' if len(sizes) != 1 else ''}"
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
            try:
                root_path, result = _purge_root(selected, root, now, history)
            except leasing.LeaseHeldElsewhere as held:
                _say_standby(root, held)
                busy = True
                continue
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
    missing = warn_missing("trash", selected.missing)
    if busy:
        return EXIT_REFUSED
    failed = any(result.failed for result in results.values())
    return EXIT_FAILED if failed else missing


def _purge_root(
    selected: Selection, root: RootConfig, now: float, history: HistoryLog
) -> tuple[str, trash.PurgeResult]:
    """Given a root, recover and purge its trash under its lease (a shared root) and its lock;
    return its path and what was purged. Raises LeaseHeldElsewhere when another node holds the
    lease, SafetyRefusal when another prune holds the root, or the root or its trash is
    refused."""
    with leasing.taken(selected.config, root) as lease:
        stop = lease.guard(None)  # set once the lease is lost: start no further removal
        if is_remote(root.path):
            return root.path, remote_pruning.purge_deferred(root, now, history, stop)
        with _open(selected, root) as root_dir, root_lock(root_dir) as acquired:
            if not acquired:
                raise SafetyRefusal(BUSY)
            trash.recover(root_dir)
            purged = trash.purge(
                root_dir, now=now, grace=0.0, everything=True, history=history, stop=stop
            )
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


ACTIONS: dict[str, Callable[[argparse.Namespace, Selection, Console], int]] = {
    "list": _list,
    "restore": _restore,
    "purge": _purge,
}


def main(args: argparse.Namespace) -> int:
    """Given parsed `trash` arguments, list, restore or purge and return the exit code."""
    return ACTIONS[args.action](args, select(args.root, args.config), make_console())
