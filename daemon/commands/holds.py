"""`ckptd holds [ROOT] [--config FILE] [--json]`: every hold of a root (or of every configured
root): active ones, expired ones a prune has not removed yet, and hold files that cannot be
read (they keep their checkpoint all the same)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, tzinfo
from typing import Any

from rich.table import Table

from daemon.clock import zone_for
from daemon.commands._common import local_roots, refuse_remote, select_roots
from daemon.holds import Hold, HoldSet, read_holds
from daemon.render import make_console


def _hold_json(hold: Hold, state: str, zone: tzinfo) -> dict[str, Any]:
    return {
        "checkpoint": hold.checkpoint,
        "holder": hold.holder,
        "until": hold.until.astimezone(zone).isoformat(),
        "reason": hold.reason,
        "given": hold.given,
        "placed": hold.placed.isoformat() if hold.placed is not None else None,
        "state": state,
    }


def holds_to_json(root: str, holds: HoldSet, zone: tzinfo) -> dict[str, Any]:
    """Given a root's holds, return the `holds --json` document of that root."""
    return {
        "root": root,
        "holds": [_hold_json(hold, "active", zone) for hold in holds.active]
        + [_hold_json(hold, "expired", zone) for hold in holds.expired],
        "unreadable": [
            {
                "checkpoint": bad.checkpoint,
                "holder": bad.holder,
                "path": bad.path,
                "problem": bad.problem,
            }
            for bad in holds.malformed
        ],
    }


def _table(document: dict[str, Any]) -> Table:
    table = Table(title=f"holds of {document['root']}", title_justify="left")
    for column in ("checkpoint", "holder", "until", "state", "reason"):
        table.add_column(column, overflow="fold")
    for hold in document["holds"]:
        until = datetime.fromisoformat(hold["until"]).isoformat(sep=" ", timespec="minutes")
        table.add_row(hold["checkpoint"], hold["holder"], until, hold["state"], hold["reason"])
    for bad in document["unreadable"]:
        table.add_row(
            bad["checkpoint"] or "?", bad["holder"] or "?", "", "unreadable", bad["problem"]
        )
    return table


def main(args: argparse.Namespace) -> int:
    """Given parsed `holds` arguments, print the holds and return the exit code."""
    config, selected = select_roots(args.root, args.config)
    if args.root is not None:
        refuse_remote("holds", selected[0])
    roots = local_roots("holds", selected)
    zone = zone_for(config)
    now = time.time()
    documents = [
        holds_to_json(root.path, read_holds(root.path, now=now, tz=zone), zone) for root in roots
    ]
    if args.json:
        json.dump(documents[0] if len(documents) == 1 else documents, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    console = make_console()
    for document in documents:
        if document["holds"] or document["unreadable"]:
            console.print(_table(document))
        else:
            console.print(f"{document['root']}: no holds")
    return 0
