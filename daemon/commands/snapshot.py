"""`ckptd snapshot [--config FILE] [--verify [DATE]] [--json]`: take today's snapshot now, or
check one against its MANIFEST.json.

`--verify` says OK only for content it compared: a file whose checksum this verify recorded
(a hard-linked file of a snapshot taken without its checksums) has nothing to compare with yet,
and the output says "recorded N checksums; nothing to compare yet". Snapshots taken here or by
the daemon record every checksum while they are taken. On a terminal a progress bar follows
the hashing; DATE is YYYY-MM-DD (`--verify yesterday` is "not a date", exit 2).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from datetime import datetime
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from daemon.clock import zone_for
from daemon.commands._common import load_selected_config
from daemon.config import Config
from daemon.errors import EXIT_FAILED, EXIT_OK, UsageError
from daemon.history.log import HistoryLog
from daemon.render import format_bytes
from daemon.snapshots.daily import SnapshotReport, run_daily_snapshot
from daemon.snapshots.verify import NotADate, VerifyResult, resolve_snapshot, verify_snapshot

# Hashing that takes longer than this gets a progress bar (on a terminal).
HASH_BAR_AFTER = 0.5


def main(args: argparse.Namespace) -> int:
    """Given parsed `snapshot` arguments, take or verify a snapshot and return the exit code."""
    config = load_selected_config(args.config)
    if config.snapshots.dir is None:
        raise UsageError("snapshots.dir is not set in the config: nowhere to put snapshots")
    if args.verify is not None:
        return _verify(config, args.verify, as_json=args.json)
    stop = threading.Event()

    def request_stop(_signal: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        report = run_daily_snapshot(
            config,
            now=datetime.now(zone_for(config)),
            history=HistoryLog(config.history_path),
            stop=stop,
            progress=sys.stderr.isatty() and not args.json,
            # Hard-linked files too: a later --verify then compares every file's content.
            hash_shared=True,
            force=True,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(_describe(report))
    return EXIT_OK if report.ok else EXIT_FAILED


def _describe(report: SnapshotReport) -> str:
    if report.status == "done":
        methods = ", ".join(
            f"{count} {method}" for method, count in sorted(report.by_method.items())
        )
        lines = [
            f"snapshot {report.date}: {len(report.checkpoints)} checkpoint(s), {report.files} "
            f"files ({methods}), {format_bytes(report.bytes_total)}, "
            f"{format_bytes(report.bytes_written)} written, {report.seconds:.1f} s",
            f"  {report.path}",
        ]
        lines += [f"  {name}" for name in report.checkpoints]
        lines += [f"  removed old snapshot {name}" for name in report.removed]
        lines += [f"  warning: {error}" for error in report.errors]
        return "\n".join(lines)
    if report.status == "exists":
        return f"snapshot {report.date}: already taken ({report.path})"
    return f"snapshot {report.date}: {report.status}: {report.reason}"


def _verify(config: Config, which: str, *, as_json: bool) -> int:
    assert config.snapshots.dir is not None
    try:
        path = resolve_snapshot(config.snapshots.dir, which)
    except NotADate as error:
        raise UsageError(str(error)) from None
    except FileNotFoundError as error:
        raise UsageError(f"{error.filename}: {error.strerror}") from None
    bar = _HashBar(enabled=sys.stderr.isatty() and not as_json)
    try:
        result = verify_snapshot(path, progress=bar.update)
    except (OSError, ValueError, KeyError) as error:
        print(f"ckptd snapshot: {path}/MANIFEST.json unreadable: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        bar.close()
    if as_json:
        _print_json(result.to_dict())
    else:
        print(describe_verify(result))
    return EXIT_OK if result.ok else EXIT_FAILED


class _HashBar:
    """A progress bar of the bytes hashed, on a terminal, once hashing takes a while."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def update(self, done: int, total: int) -> None:
        if not self.enabled or time.monotonic() - self.started < HASH_BAR_AFTER:
            return
        if self.bar is None:
            self.bar = Progress(
                TextColumn("verifying"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("verify", total=total)
        if self.task is not None:
            self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def describe_verify(result: VerifyResult) -> str:
    """Given a verify's result, return what it says: every difference, then one line that
    calls the snapshot OK only for content it compared."""
    lines = []
    for label, entries in (
        ("missing", result.missing),
        ("extra", result.extra),
        ("size", result.size),
        ("checksum", result.checksum),
        ("modified", result.modified),
    ):
        lines += [f"{label}: {entry}" for entry in entries]
    recorded = (
        f"recorded {result.sealed} checksum{'s' if result.sealed != 1 else ''}; "
        "nothing to compare yet (the next --verify compares them)"
    )
    if not result.ok:
        differences = len(lines)
        summary = f"{result.path}: {differences} difference(s) from the manifest"
        lines.append(summary + (f"; {recorded}" if result.sealed else ""))
    elif result.compared:
        summary = (
            f"{result.path}: OK, {result.compared} "
            f"file{'s' if result.compared != 1 else ''} match the manifest (content compared)"
        )
        more = (
            f"; recorded {result.sealed} more checksum{'s' if result.sealed != 1 else ''}, "
            "nothing to compare them with yet"
        )
        lines.append(summary + (more if result.sealed else ""))
    else:
        lines.append(f"{result.path}: {recorded}")
    return "\n".join(lines)


def _print_json(document: dict[str, Any]) -> None:
    json.dump(document, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
