"""`ckptd prune [ROOT] [--config FILE] [-y] [--dry-run] [--force] [--json]`.

Shows the current count and the guarded plan, asks `[y/N]` (or takes `-y`), deletes through
`prune_root` and ends with a summary. Without a terminal and without `-y` it refuses (exit 2):
a cron job that forgot `-y` must not hang or, worse, delete unasked. Exit codes: 0 done, 1 some
deletion failed, 2 usage or config error, 3 refused for safety.

Which config, policy and history file apply is `daemon.commands._common`'s: the first line of
each root says which policy applies. Deleted checkpoints wait out the trash grace: the question
and the summary both say when their space comes back, and that `ckptd trash purge` frees it now.
A configured root that does not exist is a warning; the other roots are pruned (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from daemon.clock import local_text, zone_for
from daemon.commands._common import Selection, protected_entries, select, warn_missing
from daemon.config import RootConfig, settings_for
from daemon.errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, UsageError
from daemon.history.log import HistoryLog
from daemon.pruning.pipeline import PruneReport, prune_root
from daemon.render import (
    format_bytes,
    format_duration,
    make_console,
    plan_to_json,
    timeline_lines,
)

# Deleting fewer than this finishes before a progress bar would be worth drawing.
PROGRESS_AT = 5


def report_to_json(report: PruneReport) -> dict[str, Any]:
    """Given a prune report, return `plan --json`'s document plus what was done ("result")."""
    document = plan_to_json(report.plan)
    applied = report.applied
    veto_reasons = report.veto_reasons
    failures = dict(applied.failed)
    document["result"] = {
        "dry_run": report.dry_run,
        "refused": report.refused,
        "aborted": report.aborted,
        "deleted": list(report.deleted),
        "vetoed": [{"name": name, "reason": veto_reasons.get(name, "")} for name in report.vetoed],
        "failed": [{"name": name, "error": failures.get(name, "")} for name in report.failed],
        "partial": list(applied.partial),
        "trashed": list(applied.trashed),
        "bytes_freed": report.bytes_freed,
        "bytes_logical": report.bytes_logical,
        "bytes_in_trash": applied.bytes_in_trash,
        "would_delete": list(applied.would_delete),
        "would_free": applied.would_free,
        "slimmed": list(report.slims.slimmed),
        "slims_in_trash": list(report.slims.trashed),
        "bytes_slimmed": report.slims.bytes_freed,
        "would_slim": list(report.slims.would_slim),
        "would_free_by_slims": report.slims.would_free,
        "seconds": round(report.seconds, 3),
        "notes": list(report.notes),
    }
    return document


def _show_plan(console: Console, report: PruneReport, root: RootConfig, now: float) -> None:
    plan = report.plan
    console.print(f"[bold]{plan.root}[/bold]: {len(plan.decisions)} checkpoints now")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    protected = protected_entries(root, plan)
    if plan.decisions or protected:
        for line in timeline_lines(plan, console.width, now=now, protected=protected):
            console.print(line, overflow="fold")
    deleting = plan.deleted
    slims = (
        f"slim {len(plan.slimmed)} (frees {format_bytes(plan.bytes_slimmed)}), "
        if plan.slimmed
        else ""
    )
    console.print(
        f"keep {len(plan.kept)}, {slims}delete {len(deleting)}, "
        f"frees {format_bytes(plan.bytes_freed)}"
        + (f"; {len(report.vetoed)} vetoed by the safety checks" if report.vetoed else "")
    )


def _ask(console: Console, question: str) -> bool:
    console.print(question + " [y/N] ", end="", markup=False)
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


@dataclass(frozen=True)
class _Grace:
    """Given a root: how long deleted checkpoints wait in its trash, and the zone to say when."""

    seconds: float
    zone: tzinfo

    def until(self, start: float) -> str:
        """Given when the deletion happens, return when the grace ends, as people read it."""
        return local_text(start + self.seconds, self.zone)

    def question(self, count: int, freeing: int, start: float) -> str:
        """Given what is about to go, return the `[y/N]` question, saying when the space
        comes back."""
        question = f"delete {count} checkpoints?"
        if self.seconds <= 0:
            return question
        return (
            f"{question} They wait {format_duration(self.seconds)} in the trash "
            "(`ckptd trash restore NAME` brings one back): their "
            f"{format_bytes(freeing)} are freed when the grace ends, at {self.until(start)}, "
            "or at once with `ckptd trash purge`."
        )


def _summary(report: PruneReport, grace: _Grace, now: float) -> str:
    kept = len(report.plan.decisions) - len(report.deleted)
    slims = report.slims
    if report.dry_run:
        would_slim = (
            f", slim {len(slims.would_slim)} (frees {format_bytes(slims.would_free)})"
            if slims.would_slim
            else ""
        )
        return (
            f"dry run, nothing changed: would delete {len(report.applied.would_delete)} "
            f"and free {format_bytes(report.applied.would_free)}{would_slim}"
        )
    freed = f"freed {format_bytes(report.bytes_freed)}"
    if report.bytes_logical != report.bytes_freed:
        # What the disk got back, and apart the files' lengths (sparse files differ most).
        freed += f" ({format_bytes(report.bytes_logical)} logical)"
    parts = [f"deleted {len(report.deleted)}", f"kept {kept}", freed]
    if slims.slimmed:
        parts.append(
            f"slimmed {len(slims.slimmed)} (freed {format_bytes(slims.bytes_freed)}"
            + (f", {format_bytes(slims.bytes_in_trash)} in the trash)" if slims.trashed else ")")
        )
    if report.vetoed:
        parts.append(f"vetoed {len(report.vetoed)}")
    if report.failed:
        parts.append(f"failed {len(report.failed)}")
    line = ", ".join(parts) + f" in {report.seconds:.1f} s"
    in_trash = report.applied.bytes_in_trash
    if in_trash:
        line += (
            f"\n{format_bytes(in_trash)} wait in the trash: freed when the "
            f"{format_duration(grace.seconds)} grace ends, at {grace.until(now)}, "
            "or at once with `ckptd trash purge`"
        )
    return line


def main(args: argparse.Namespace) -> int:
    """Given parsed `prune` arguments, prune each selected root and return the exit code."""
    interactive = sys.stdin.isatty()
    if not args.yes and not args.dry_run and not interactive:
        raise UsageError(
            "not deleting without confirmation: no terminal to ask on; "
            "pass -y to confirm (or --dry-run to see the plan)"
        )
    selection = select(args.root, args.config)
    history = HistoryLog(selection.history_path)
    console = make_console()
    documents: list[dict[str, Any]] = []
    exit_code = EXIT_OK
    try:
        for root in selection.roots:
            report = _prune_one(selection, root, args, history, console, interactive)
            if args.json:
                document = report_to_json(report)
                document["policy"] = selection.policy_line(root)
                documents.append(document)
            if report.refused is not None:
                # Plain print: a message for logs and scripts must not be wrapped or styled.
                print(
                    f"ckptd prune: refused for safety: {report.root}: {report.refused}",
                    file=sys.stderr,
                )
                exit_code = EXIT_REFUSED
            elif report.failed and exit_code != EXIT_REFUSED:
                for line in report.errors:
                    print(f"ckptd prune: failed: {line}", file=sys.stderr)
                exit_code = EXIT_FAILED
    finally:
        history.close()
    if args.json:
        json.dump(documents[0] if len(documents) == 1 else documents, sys.stdout, indent=2)
        sys.stdout.write("\n")
    missing = warn_missing("prune", selection.missing)
    return exit_code or missing


def _prune_one(
    selection: Selection,
    root: RootConfig,
    args: argparse.Namespace,
    history: HistoryLog,
    console: Console,
    interactive: bool,
) -> PruneReport:
    config = selection.config
    show = not args.json
    progress_bar: Progress | None = None
    task_id: Any = None
    now = time.time()
    grace = _Grace(settings_for(config, root).trash_grace, zone_for(config))
    if show:
        selection.print_policy(console, root)

    def confirm(preview: PruneReport) -> bool:
        if show:
            _show_plan(console, preview, root, now)
        if args.yes:
            return True
        deleting = preview.plan.deleted
        question = grace.question(len(deleting), preview.plan.bytes_freed, time.time())
        slimming = len(preview.plan.slimmed)
        if slimming:
            question = f"slim {slimming} (their weights stay) and {question}"
        return _ask(console, question)

    def progress(done: int, total: int, name: str) -> None:
        nonlocal progress_bar, task_id
        if not show or not console.is_terminal or total < PROGRESS_AT:
            return
        if progress_bar is None:
            progress_bar = Progress(
                TextColumn("deleting"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            progress_bar.start()
            task_id = progress_bar.add_task("", total=total)
        progress_bar.update(task_id, completed=done, description=name)

    try:
        report = prune_root(
            config,
            root,
            now=now,
            dry_run=args.dry_run,
            force=args.force,
            history=history,
            confirm=confirm,
            progress=progress,
        )
    finally:
        if progress_bar is not None:
            progress_bar.stop()
    if show:
        # The confirmation step showed the plan already unless there was nothing to confirm.
        changes = report.plan.deleted or report.plan.slimmed
        confirmed_shown = bool(changes) and not report.dry_run
        if report.refused is not None or not confirmed_shown:
            _show_plan(console, report, root, now)
        if report.aborted:
            console.print("nothing deleted")
        elif report.refused is None:
            console.print(_summary(report, grace, time.time()), markup=False)
    return report
