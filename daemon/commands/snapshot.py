"""`ckptd snapshot [--config FILE] [--verify [DATE]] [--json]`: take today's snapshot now, or
check one against its MANIFEST.json."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from datetime import datetime
from types import FrameType
from typing import Any

from daemon.clock import zone_for
from daemon.commands._common import load_selected_config
from daemon.config import Config
from daemon.errors import EXIT_FAILED, EXIT_OK, UsageError
from daemon.history.log import HistoryLog
from daemon.render import format_bytes
from daemon.snapshots.daily import SnapshotReport, run_daily_snapshot
from daemon.snapshots.verify import VerifyResult, resolve_snapshot, verify_snapshot


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
    except FileNotFoundError as error:
        raise UsageError(f"{error.filename}: {error.strerror}") from None
    try:
        result = verify_snapshot(path)
    except (OSError, ValueError, KeyError) as error:
        print(f"ckptd snapshot: {path}/MANIFEST.json unreadable: {error}", file=sys.stderr)
        return EXIT_FAILED
    if as_json:
        _print_json(result.to_dict())
    else:
        print(_describe_verify(result))
    return EXIT_OK if result.ok else EXIT_FAILED


def _describe_verify(result: VerifyResult) -> str:
    lines = []
    for label, entries in (
        ("missing", result.missing),
        ("extra", result.extra),
        ("size", result.size),
        ("checksum", result.checksum),
        ("modified", result.modified),
    ):
        lines += [f"{label}: {entry}" for entry in entries]
    sealed = f", {result.sealed} checksum(s) recorded now" if result.sealed else ""
    if result.ok:
        lines.append(f"{result.path}: OK, {result.checked} files match the manifest{sealed}")
    else:
        differences = len(lines)
        lines.append(f"{result.path}: {differences} difference(s) from the manifest{sealed}")
    return "\n".join(lines)


def _print_json(document: dict[str, Any]) -> None:
    json.dump(document, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
