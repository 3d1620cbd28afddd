"""`ckptd verify [ROOT] [--config FILE] [--deep] [--test] [--json]`: check checkpoints now.

Every complete checkpoint of each root is checked without any ML framework (the formats'
headers, indexes and sizes; with `--deep`, every checksummed byte, with progress on stderr),
and the root's trackers (`latest`, `latest_checkpointed_iteration.txt`, TF's `checkpoint`)
must name checkpoints that exist. A result is remembered for the checkpoint's signature (sizes
and mtimes of everything in it), so a second run costs a walk per checkpoint; the daemon and
`ckptd plan` use the same results. A checkpoint found corrupt now is recorded in the history
(`integrity_corrupt`) and the `alert` command runs. `--test` also runs `verify.command` on the
newest checkpoint that is not corrupt (`daemon/usertest.py`).

Exit 0 when nothing is corrupt; 1 when a checkpoint is corrupt, a tracker is wrong or the
user's test failed; 2 for a usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from daemon.commands._common import (
    history_path_for,
    local_roots,
    refuse_remote,
    select_roots,
    verification_state_for,
)
from daemon.config import Config, RootConfig, settings_for
from daemon.discovery.scan import scan
from daemon.errors import EXIT_FAILED, EXIT_OK
from daemon.history.log import History, HistoryLog
from daemon.integrity.check import check_checkpoint, signature_of
from daemon.integrity.result import IntegrityResult
from daemon.integrity.trackers import TrackerReport, check_root_trackers
from daemon.render import format_bytes, make_console
from daemon.usertest import UserTestOutcome, run_on_newest
from daemon.verification import VerificationState, record_corrupt
from policies.model import Checkpoint


@dataclass
class RootReport:
    """Given one root verified: each checkpoint's result (and whether it was remembered), the
    incomplete ones skipped, the trackers and the user's test."""

    root: str
    results: list[tuple[IntegrityResult, bool]] = field(default_factory=list)
    # Corrupt results found now about checkpoints not known to be corrupt: for the history.
    news: list[IntegrityResult] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    trackers: TrackerReport = field(default_factory=TrackerReport)
    test: UserTestOutcome | None = None

    @property
    def failed(self) -> bool:
        """Whether a checkpoint is corrupt, a tracker is wrong or the user's test failed."""
        tested = self.test.result if self.test is not None else None
        test_failed = tested is not None and tested.verdict == "failed"
        corrupt = any(result.status == "corrupt" for result, _ in self.results)
        return corrupt or bool(self.trackers.problems) or test_failed


ProgressFunction = Callable[[str, int], None]


def verify_root(
    config: Config,
    root: RootConfig,
    state: VerificationState,
    *,
    deep: bool,
    progress: ProgressFunction | None = None,
) -> RootReport:
    """Given a root, check each complete checkpoint (remembered results reused while their
    signature holds) and the trackers; return the report (nothing recorded yet)."""
    root_path = os.path.realpath(root.path)
    found = scan(root, now=time.time(), settle_seconds=settings_for(config, root).settle_seconds)
    report = RootReport(root_path)
    for checkpoint in found.checkpoints:
        if not checkpoint.complete:
            report.incomplete.append(checkpoint.name)
            continue
        known = state.cache.lookup(
            root_path, checkpoint.name, signature_of(root_path, checkpoint.name, checkpoint.layout)
        )
        result, remembered = _check(root_path, checkpoint, state, deep, progress)
        report.results.append((result, remembered))
        if not remembered and (known is None or known.status != "corrupt"):
            report.news.append(result)
    report.trackers = check_root_trackers(root_path)
    return report


def _check(
    root: str,
    checkpoint: Checkpoint,
    state: VerificationState,
    deep: bool,
    progress: ProgressFunction | None,
) -> tuple[IntegrityResult, bool]:
    signature = signature_of(root, checkpoint.name, checkpoint.layout)
    remembered = state.cache.lookup(root, checkpoint.name, signature, deep=deep)
    if remembered is not None:
        if progress is not None:
            progress(checkpoint.name, signature.total_bytes)
        return remembered, True

    def told(count: int) -> None:
        if progress is not None:
            progress(checkpoint.name, count)

    result = check_checkpoint(root, checkpoint.name, checkpoint.layout, deep=deep, progress=told)
    state.cache.store(root, result)
    return result, False


def report_to_json(report: RootReport) -> dict[str, Any]:
    """Given a root's report, return its `verify --json` document."""
    test: dict[str, Any] | None = None
    if report.test is not None:
        result = report.test.result
        test = {"skipped": report.test.skipped}
        if result is not None:
            test.update(result.event().fields())
    return {
        "root": report.root,
        "checkpoints": [
            {
                "name": result.checkpoint,
                "status": result.status,
                "deep": result.deep,
                "remembered": remembered,
                "problems": list(result.problems),
                "skipped": list(result.skipped),
                "bytes_read": result.bytes_read,
            }
            for result, remembered in report.results
        ],
        "incomplete": report.incomplete,
        "trackers": {
            "problems": list(report.trackers.problems),
            "skipped": list(report.trackers.skipped),
            "checked": list(report.trackers.checked),
        },
        "test": test,
        "ok": not report.failed,
    }


def print_report(console: Console, document: dict[str, Any]) -> None:
    """Given a root's `verify --json` document, print it for people."""
    table = Table(title=f"{document['root']}", title_justify="left", box=None, pad_edge=False)
    for column in ("checkpoint", "integrity", "details"):
        table.add_column(column, overflow="fold")
    styles = {"ok": "green", "corrupt": "bold red", "unknown": "yellow"}
    for item in document["checkpoints"]:
        status = item["status"] + (" (deep)" if item["deep"] else "")
        shown = f"[{styles[item['status']]}]{status}[/]"
        result_details = item["problems"][0] if item["problems"] else ""
        if not result_details:
            result_details = (
                "not vouched for: " + item["skipped"][0] if item["skipped"] else "no problem found"
            )
        table.add_row(item["name"], shown, result_details)
    for name in document["incomplete"]:
        table.add_row(name, "incomplete", "still being written or settling: not checked")
    console.print(table)
    for problem in document["trackers"]["problems"]:
        console.print(f"[bold red]tracker:[/] {problem}")
    test = document["test"]
    if test is not None:
        if test.get("verdict"):
            tail = "; ".join(test["last_lines"][-3:])
            console.print(f"user's test: {test['verdict']} ({test['checkpoint']}) {tail}")
        else:
            console.print(f"user's test: not run ({test['skipped']})")
    corrupt = sum(1 for item in document["checkpoints"] if item["status"] == "corrupt")
    console.print(
        f"{len(document['checkpoints'])} checked: {corrupt} corrupt"
        + ("" if document["ok"] else "  [bold red]FAILED[/]")
    )


@contextmanager
def _progress_for(deep: bool, console: Console) -> Iterator[ProgressFunction | None]:
    """Given --deep and the console, yield a progress callback (bytes read per checkpoint): a
    bar on a terminal, else one line per checkpoint on stderr."""
    if not deep:
        yield None
        return
    if not console.is_terminal:
        done: dict[str, int] = {}

        def line(name: str, count: int) -> None:
            done[name] = done.get(name, 0) + count

        yield line
        for name, count in done.items():
            print(f"{name}: {format_bytes(count)} verified", file=sys.stderr)
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = bar.add_task("verifying", total=None)
    with bar:

        def advance(name: str, count: int) -> None:
            bar.update(task, advance=count, description=name)

        yield advance


def main(args: argparse.Namespace) -> int:
    """Given parsed `verify` arguments, check each root and return the exit code."""
    config, selected = select_roots(args.root, args.config)
    if args.root is not None:
        refuse_remote("verify", selected[0])
    roots = local_roots("verify", selected)
    state = verification_state_for(config, args.root, args.config)
    history: History = HistoryLog(history_path_for(config, args.root, args.config))
    documents = []
    failed = False
    try:
        for root in roots:
            report = _verify_one(config, root, state, history, args)
            failed = failed or report.failed
            documents.append(report_to_json(report))
    finally:
        state.save()
        history.close()
    if args.json:
        json.dump(documents[0] if len(documents) == 1 else documents, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        console = make_console()
        for document in documents:
            print_report(console, document)
    return EXIT_FAILED if failed else EXIT_OK


def _verify_one(
    config: Config,
    root: RootConfig,
    state: VerificationState,
    history: History,
    args: argparse.Namespace,
) -> RootReport:
    with _progress_for(args.deep, make_console(stderr=True)) as progress:
        report = verify_root(config, root, state, deep=args.deep, progress=progress)
    record_corrupt(config, report.root, report.news, history)
    if args.test:
        report.test = run_on_newest(
            config, root, now=time.time(), history=history, state=state, again=True
        )
    return report
