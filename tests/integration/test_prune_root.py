"""`prune_root`: recover, purge, plan, guard, delete, record — the one path every caller uses.

The planner is replaced by a small stand-in (keep the newest N folders) so these tests pin down
what prune_root itself does; tests/e2e/test_prune_cli.py runs the real discovery and policy.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import Config, RootConfig
from daemon.discovery.scan import ScanResult
from daemon.history.log import HistoryLog, read_records
from daemon.pruning import pipeline, trash
from policies.model import Checkpoint, Decision, Plan
from tests.configs import make_config
from tests.sizes import tree_blocks

NOW = 1_800_000_000.0
FILE = b"w" * 2000


def keep_newest(count: int):  # type: ignore[no-untyped-def]
    def plan_root(config: Config, root: RootConfig, **_options: object) -> tuple[ScanResult, Plan]:
        folders = sorted(
            (p for p in Path(root.path).iterdir() if p.name.startswith("checkpoint-")),
            key=lambda p: int(p.name.split("-")[1]),
        )
        checkpoints = [
            Checkpoint(
                name=p.name,
                step=int(p.name.split("-")[1]),
                size_bytes=len(FILE),
                freeable_bytes=len(FILE),
                mtime=NOW - 3600,
            )
            for p in folders
        ]
        decisions = tuple(
            Decision(
                c,
                index >= len(checkpoints) - count,
                ("tier1",) if index >= len(checkpoints) - count else ("tier3:every-1000",),
            )
            for index, c in enumerate(checkpoints)
        )
        scan = ScanResult(
            root=root.path, layout="hf", checkpoints=tuple(checkpoints), series=("default",)
        )
        return scan, Plan(root=root.path, decisions=decisions)

    return plan_root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    for step in range(100, 1100, 100):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "model.bin").write_bytes(FILE)
    return folder


@pytest.fixture
def history(tmp_path: Path) -> Iterator[HistoryLog]:
    log = HistoryLog(str(tmp_path / "history.jsonl"))
    yield log
    log.close()


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))


def test_a_run_deletes_records_and_reports(
    root: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(4))
    config = make_config([root], grace=0)
    each = tree_blocks(root / "checkpoint-100")  # what the filesystem gets back per checkpoint
    report = pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    assert report.refused is None and report.failed == ()
    assert report.deleted == tuple(f"checkpoint-{s}" for s in range(100, 700, 100))
    assert report.bytes_freed == 6 * each and report.bytes_logical == 6 * len(FILE)
    assert names(root) == sorted(f"checkpoint-{s}" for s in range(700, 1100, 100))
    records = read_records(history.path)
    assert [r["event"] for r in records] == ["delete"] * 6 + ["prune_run"]
    run = records[-1]
    assert run["deleted"] == 6 and run["kept"] == 4 and run["bytes_freed"] == 6 * each
    assert run["bytes_logical"] == 6 * len(FILE)
    assert run["dry_run"] is False and run["policy"]["keep_last"] == 20


def test_dry_run_changes_nothing_and_says_so(
    root: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(4))
    config = make_config([root], grace=0)
    report = pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=True, history=history)
    assert len(names(root)) == 10 and report.deleted == () and report.bytes_freed == 0
    assert report.applied.would_free == 6 * len(FILE)
    (run,) = read_records(history.path)
    assert run["event"] == "prune_run" and run["dry_run"] is True and run["would_delete"] == 6


def test_the_trainer_on_the_newest_refuses_with_pid_and_command_line(
    root: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(4))
    trainer = subprocess.Popen(
        [sys.executable, "-c", "import os, time; print('ready', flush=True); time.sleep(60)"],
        cwd=root / "checkpoint-1000",
        stdout=subprocess.PIPE,
    )
    try:
        assert trainer.stdout is not None and trainer.stdout.readline() == b"ready\n"
        config = make_config([root], grace=0)
        report = pipeline.prune_root(
            config, config.roots[0], now=NOW, dry_run=False, history=history
        )
    finally:
        trainer.kill()
        trainer.wait()
    assert report.refused is not None and f"pid {trainer.pid}" in report.refused
    assert len(names(root)) == 10
    (refusal,) = read_records(history.path)
    assert refusal["event"] == "prune_refused"
    assert refusal["pids"] == [trainer.pid] and "time.sleep(60)" in refusal["cmdlines"][0]


def test_max_delete_fraction_refuses_unless_forced(
    root: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(4))
    config = make_config([root], grace=0, max_delete_fraction=0.5)
    refused = pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    assert refused.refused is not None and "max_delete_fraction" in refused.refused
    assert len(names(root)) == 10
    forced = pipeline.prune_root(
        config, config.roots[0], now=NOW, dry_run=False, force=True, history=history
    )
    assert len(forced.deleted) == 6


def test_declining_the_confirmation_deletes_nothing(
    root: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(4))
    seen: list[int] = []

    def decline(preview: pipeline.PruneReport) -> bool:
        seen.append(len(preview.plan.deleted))
        return False

    config = make_config([root], grace=0)
    report = pipeline.prune_root(
        config, config.roots[0], now=NOW, dry_run=False, history=history, confirm=decline
    )
    assert seen == [6] and report.aborted is True and report.deleted == ()
    assert len(names(root)) == 10


def test_grace_keeps_deletions_in_the_trash_until_a_later_run_purges_them(
    root: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(4))
    config = make_config([root], grace=3600)
    each = tree_blocks(root / "checkpoint-100")  # what the filesystem gets back per checkpoint
    first = pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    assert len(first.deleted) == 6 and first.bytes_freed == 0
    assert first.applied.bytes_in_trash == 6 * each
    assert len(trash.list_trash(str(root))) == 6
    trash.restore(str(root), "checkpoint-100")  # a change of mind within the grace
    assert (root / "checkpoint-100" / "model.bin").read_bytes() == FILE
    (root / "checkpoint-100").rename(root / "restored-elsewhere")
    later = pipeline.prune_root(
        config, config.roots[0], now=NOW + 3601, dry_run=False, history=history
    )
    assert list(later.purge.removed) == [f"checkpoint-{s}" for s in range(200, 700, 100)]
    assert later.bytes_freed == 5 * each
    assert trash.list_trash(str(root)) == []
    purges = [r for r in read_records(history.path) if r["event"] == "trash_purge"]
    assert len(purges) == 5 and all(r["bytes_freed"] == each for r in purges)
    assert all(r["bytes_logical"] == len(FILE) for r in purges)


def test_a_trash_left_by_a_crash_is_finished_at_the_start(
    root: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(10))
    leftover = root / ".ckptd-trash" / "checkpoint-50@1700000000"
    leftover.mkdir(parents=True)
    (leftover / "half.bin").write_bytes(b"x" * 10)
    config = make_config([root], grace=0)
    report = pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    assert list(report.purge.removed) == ["checkpoint-50"]
    assert not leftover.exists()


def test_a_second_prune_of_the_same_root_is_refused_while_one_runs(
    root: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import os

    monkeypatch.setattr(pipeline, "plan_root", keep_newest(4))
    config = make_config([root], grace=0)
    (root / trash.TRASH_DIRECTORY).mkdir()
    holder = os.open(root / trash.TRASH_DIRECTORY / pipeline.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # the other prune, mid-run
        report = pipeline.prune_root(
            config, config.roots[0], now=NOW, dry_run=False, history=history
        )
        assert report.refused is not None and "another prune" in report.refused
        assert len(names(root)) == 10
        # A dry run only reads, so it goes ahead.
        dry = pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=True)
        assert dry.refused is None
    finally:
        os.close(holder)
    after = pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    assert len(after.deleted) == 6
    assert trash.list_trash(str(root)) == []  # the lock file is not a trash item
