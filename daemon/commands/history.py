"""`ckptd history [--config FILE] [-n N] [--follow] [--json]`: the cleanup history.

A table for people (newest last, times in the config's zone, named), the raw JSON lines for
scripts, and `--follow` like `tail -F`: it keeps reading across logrotate (a new file at the path
is picked up from its start; a truncated file is read again from its start), its rows lined up
with the header. The table never cuts a value: at 80 columns each record's root and reason go on
a line of their own under it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from daemon import columns
from daemon.commands._common import history_source
from daemon.history.log import parse_records
from daemon.render import history_layout, history_lines, make_console

FOLLOW_POLL_SECONDS = 0.25


def follow_lines(
    path: str, stop_after: float | None = None, *, handle: TextIO | None = None
) -> Iterator[str]:
    """Given a path, yield lines appended to it from its current end on, across rotations.

    Given the `handle` the shown records were read from, follow on from where it stands: a
    record appended between reading them and following would otherwise be lost.
    """
    started = time.monotonic()
    identity: tuple[int, int] | None = None
    if handle is not None:
        status = os.fstat(handle.fileno())
        identity = (status.st_dev, status.st_ino)
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
    source = history_source(args.config)
    path = source.path
    count = max(0, args.n)
    try:
        handle: TextIO | None = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except FileNotFoundError:
        handle = None
    records = parse_records(handle) if handle is not None else []
    if not args.follow and handle is not None:
        handle.close()
    recent = records[-count:] if count else []
    console = make_console()
    # One layout for the records shown and those --follow prints later: they line up.
    layout = history_layout(
        recent, console.width, zone=source.zone, roots=source.roots, follow=args.follow
    )
    if args.json:
        for record in recent:
            sys.stdout.write(json.dumps(record) + "\n")
    elif not records and not args.follow:
        print(f"no history yet in {path}")
    else:
        for line in [*columns.header(layout), *history_lines(recent, layout, source.zone)]:
            print(line)
    sys.stdout.flush()
    if not args.follow:
        return 0
    try:
        for line in follow_lines(path, handle=handle):
            if args.json:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                for text in history_lines([record], layout, source.zone):
                    print(text, flush=True)
    except KeyboardInterrupt:
        return 0
    return 0
