"""`ckptd history [--config FILE] [-n N] [--follow] [--json]`: the cleanup history.

A table for people (newest last, times in local time), the raw JSON lines for scripts, and
`--follow` like `tail -F`: it keeps reading across logrotate (a new file at the path is picked up
from its start; a truncated file is read again from its start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from rich.table import Table

from daemon.config import load_config
from daemon.history.log import default_history_path, read_records
from daemon.render import format_bytes, make_console

FOLLOW_POLL_SECONDS = 0.25


def history_path(config_argument: str | None) -> str:
    """Given --config (or none), return the history file: the config's, else the user default."""
    from daemon.cli import resolve_config_path

    config_path = resolve_config_path(config_argument)
    if config_argument is not None or os.path.exists(config_path):
        return load_config(config_path).history_path
    return default_history_path()


def _local_time(value: object) -> str:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def why_of(record: dict[str, Any]) -> str:
    """Given a history record, return the one line that says why it happened."""
    for key in ("why", "reason", "reasons"):
        value = record.get(key)
        if isinstance(value, list) and value:
            # The first reason is the checkpoint's own tier's; the rest repeat it for later
            # tiers (all of them stay in the JSON).
            return str(value[0])
        if isinstance(value, str) and value:
            return value
    if record.get("event") == "prune_run":
        mode = "dry run: " if record.get("dry_run") else ""
        return (
            f"{mode}{record.get('deleted', 0) or record.get('would_delete', 0)} deleted, "
            f"{record.get('kept', 0)} kept, {record.get('vetoed', 0)} vetoed, "
            f"{record.get('failed', 0)} failed in {record.get('seconds', 0)} s"
        )
    return ""


def _row(record: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    freed = record.get("bytes_freed")
    in_trash = record.get("bytes_in_trash")
    shown = format_bytes(freed) if isinstance(freed, int | float) else ""
    if isinstance(in_trash, int | float) and in_trash and record.get("event") == "delete":
        shown = f"{format_bytes(in_trash)} to trash"
    return (
        _local_time(record.get("time", "")),
        str(record.get("event", "")),
        str(record.get("root", "")),
        str(record.get("checkpoint", "")),
        shown,
        why_of(record),
    )


def render_table(records: Iterable[dict[str, Any]]) -> Table:
    """Given history records, return the rich table people read (oldest first, newest last)."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("time", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("root", no_wrap=True)
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("freed", justify="right", no_wrap=True)
    table.add_column("why", overflow="fold")
    for record in records:
        table.add_row(*_row(record))
    return table


def follow_lines(path: str, stop_after: float | None = None) -> Iterator[str]:
    """Given a path, yield lines appended to it from its current end on, across rotations."""
    started = time.monotonic()
    handle = None
    identity: tuple[int, int] | None = None
    buffered = ""
    try:
        while stop_after is None or time.monotonic() - started < stop_after:
            if handle is None:
                try:
                    handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
                except FileNotFoundError:
                    time.sleep(FOLLOW_POLL_SECONDS)
                    continue
                status = os.fstat(handle.fileno())
                if identity is None:
                    handle.seek(0, os.SEEK_END)  # the first file: only what comes next
                identity = (status.st_dev, status.st_ino)
            chunk = handle.read()
            if chunk:
                buffered += chunk
                *lines, buffered = buffered.split("\n")
                yield from lines
                continue
            try:
                status = os.stat(path)
                rotated = (status.st_dev, status.st_ino) != identity
                # Only the same file can be truncated (logrotate's copytruncate).
                truncated = not rotated and status.st_size < handle.tell()
            except FileNotFoundError:
                rotated, truncated = True, False
            if truncated:
                handle.seek(0)
            elif rotated:
                # Read what the old file still had, then the new one from its start.
                rest = handle.read()
                if rest:
                    buffered += rest
                    *lines, buffered = buffered.split("\n")
                    yield from lines
                handle.close()
                handle = None
                identity = (-1, -1)  # a new file is read from its beginning
                continue
            time.sleep(FOLLOW_POLL_SECONDS)
    finally:
        if handle is not None:
            handle.close()


def main(args: argparse.Namespace) -> int:
    """Given parsed `history` arguments, print the history and return the exit code."""
    path = history_path(args.config)
    count = max(0, args.n)
    records = read_records(path)
    recent = records[-count:] if count else []
    if args.json:
        for record in recent:
            sys.stdout.write(json.dumps(record) + "\n")
    else:
        console = make_console()
        if not records and not args.follow:
            console.print(f"no history yet in {path}")
        else:
            console.print(render_table(recent))
    sys.stdout.flush()
    if not args.follow:
        return 0
    console = make_console()
    try:
        for line in follow_lines(path):
            if args.json:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                table = render_table([record])
                table.show_header = False
                console.print(table)
    except KeyboardInterrupt:
        return 0
    return 0
