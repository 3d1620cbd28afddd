"""Slimming on real folders through the real prune path (issue 11): the resume state goes
through the safety guard, the root lock and the trash as one item; `.ckptd-slim.json` records
it; `ckptd trash restore` puts it back; the history has one `slim` record per checkpoint."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.discovery.sizecache import SizeCache
from daemon.fsio import At, LocalFileSystem
from daemon.history.log import HistoryLog, read_records
from daemon.planner import plan_root
from daemon.pruning import pipeline, slimmer, trash
from daemon.slimming import SLIM_RECORD, is_slimmed, read_record
from policies.model import Checkpoint, Decision, Plan, SlimTarget
from tests.configs import make_config
from tests.layouts_fixtures import well_formed_bytes

NOW = 1_800_000_000.0
RESUME = {"optimizer.pt": 30_000, "scheduler.pt": 1_000, "rng_state.pth": 2_000}
WEIGHTS = {"model.safetensors": 15_000, "config.json": 100, "trainer_state.json": 300}


def make_checkpoint(root: Path, step: int, stamp: float) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name, size in {**WEIGHTS, **RESUME}.items():
        # trainer_state.json is read by discovery: JSON, padded with whitespace.
        if name.endswith(".json"):
            (folder / name).write_bytes(f'{{"step": {step}}}'.encode().ljust(size))
        else:
            # Well-formed (the integrity checks read headers), and each file's bytes its own.
            (folder / name).write_bytes(well_formed_bytes(name, size, random=True))
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (stamp, stamp))
    return folder


def make_root(root: Path, steps: range) -> None:
    for step in steps:
        make_checkpoint(root, step, NOW - 86_400 + step)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# Slimmed from tier 1 on, with nothing to wait for (tests/configs.py builds the config).
SLIM_FROM_TIER1: dict[str, Any] = {
    "settle_seconds": 0,
    "min_keep": 0,
    "root_settings": {
        "policy": {
            "keep_last": 3,
            "tier2_count": 4,
            "tier3_interval": 1000,
            "cadence": 100,
            "slim": {"after": "tier1"},
        }
    },
}


@pytest.fixture
def history(tmp_path: Path) -> Iterator[HistoryLog]:
    log = HistoryLog(str(tmp_path / "history.jsonl"))
    yield log
    log.close()


def prune(root: Path, history: HistoryLog, **options: object) -> pipeline.PruneReport:
    grace = float(options.pop("grace", 0.0))  # type: ignore[arg-type]
    config = make_config([root], state_dir=root.parent / "st", grace=grace, **SLIM_FROM_TIER1)
    root_config = config.roots[0]
    return pipeline.prune_root(
        config,
        root_config,
        now=NOW,
        dry_run=bool(options.pop("dry_run", False)),
        history=history,
        **options,  # type: ignore[arg-type]
    )


def test_a_prune_slims_tiers_2_and_3_and_records_each(tmp_path: Path, history: HistoryLog) -> None:
    root = tmp_path / "run"
    make_root(root, range(100, 1100, 100))
    before = {step: snapshot(root / f"checkpoint-{step}") for step in (400, 600, 1000)}
    report = prune(root, history)
    assert report.refused is None and not report.failed, report.errors
    assert sorted(report.slims.slimmed) == ["checkpoint-400", "checkpoint-600"]
    for step in (400, 600):
        folder = root / f"checkpoint-{step}"
        left = snapshot(folder)
        # The weights and metadata are untouched; the resume state is gone; the record is there.
        assert {k: v for k, v in left.items() if k != SLIM_RECORD} == {
            k: v for k, v in before[step].items() if k in WEIGHTS
        }
        record = read_record(str(root), folder.name)
        assert record is not None and record.slimmed_at == NOW
        assert sorted(f.path for f in record.files) == sorted(RESUME)
        assert sum(f.bytes_logical for f in record.files) == sum(RESUME.values())
        # The checkpoint keeps its age: discovery must not see a freshly written folder.
        assert folder.stat().st_mtime == NOW - 86_400 + step
        assert (folder / SLIM_RECORD).stat().st_mtime == NOW - 86_400 + step
    assert snapshot(root / "checkpoint-1000") == before[1000]
    assert trash.list_trash(str(root)) == []  # grace 0: the resume state is removed
    slims = [r for r in read_records(str(tmp_path / "history.jsonl")) if r["event"] == "slim"]
    assert [r["checkpoint"] for r in slims] == ["checkpoint-400", "checkpoint-600"]
    for record in slims:
        folder_record = read_record(str(root), record["checkpoint"])
        assert folder_record is not None
        assert record["bytes_freed"] == folder_record.bytes_freed > 0
        assert record["files"] == sorted(RESUME)
        assert "slim:after-tier1" in record["why"] and record["tier"] == 2
    run = next(
        r for r in read_records(str(tmp_path / "history.jsonl")) if r["event"] == "prune_run"
    )
    assert run["slimmed"] == 2 and run["bytes_slimmed"] == report.slims.bytes_freed


def test_a_second_prune_slims_nothing_more_and_the_plan_sees_them_slimmed(
    tmp_path: Path, history: HistoryLog
) -> None:
    root = tmp_path / "run"
    make_root(root, range(100, 1100, 100))
    cache = SizeCache()
    first = prune(root, history, cache=cache)
    assert len(first.slims.slimmed) == 2
    config = make_config([root], state_dir=root.parent / "st", grace=0, **SLIM_FROM_TIER1)
    root_config = config.roots[0]
    scan, plan = plan_root(config, root_config, now=NOW, cache=cache)
    assert plan.slimmed == () and plan.deleted == ()
    slimmed = {c.name for c in scan.checkpoints if c.slimmed}
    assert slimmed == {"checkpoint-400", "checkpoint-600"}
    # The cache forgot them: their size is what is left, not what was there.
    sizes = {c.name: c.size_bytes for c in scan.checkpoints}
    assert sizes["checkpoint-400"] < sum(WEIGHTS.values()) + 2000
    # No restart was read into the slims' new files: the tiers are the same.
    assert {d.checkpoint.name: d.tier for d in plan.decisions}["checkpoint-400"] == 2
    second = prune(root, history, cache=cache)
    assert second.slims.slimmed == () and second.deleted == ()


def test_a_slim_in_the_trash_is_restored_whole_and_pinned(
    tmp_path: Path, history: HistoryLog
) -> None:
    root = tmp_path / "run"
    make_root(root, range(100, 1100, 100))
    before = snapshot(root / "checkpoint-400")
    report = prune(root, history, grace=3600.0)
    assert "checkpoint-400" in report.slims.trashed
    assert report.slims.bytes_in_trash > 0 and report.slims.bytes_freed == 0
    items = [item for item in trash.list_trash(str(root)) if item.name == "checkpoint-400"]
    assert len(items) == 1 and items[0].slim is not None and items[0].state == "trashed"
    restored = trash.restore_pinned(str(root), "checkpoint-400")
    assert restored.pin == str(root / "checkpoint-400" / ".keep")
    after = snapshot(root / "checkpoint-400")
    assert after.pop(".keep").startswith(b"restored from the ckptd trash")
    assert after == before
    assert not is_slimmed(str(root), "checkpoint-400")
    assert (root / "checkpoint-400").stat().st_mtime == NOW - 86_400 + 400
    # Pinned: the next prune neither slims nor deletes it.
    again = prune(root, history, grace=3600.0)
    assert "checkpoint-400" not in again.slims.slimmed


def test_nested_resume_state_moves_and_comes_back(tmp_path: Path, history: HistoryLog) -> None:
    root = tmp_path / "run"
    for step in range(100, 1100, 100):
        folder = root / f"iter_{step:07d}"
        for rank in ("mp_rank_00", "mp_rank_01"):
            (folder / rank).mkdir(parents=True)
            for name, size in (("model_optim_rng.pt", 1000), ("distrib_optim.pt", 4000)):
                (folder / rank / name).write_bytes(well_formed_bytes(name, size, random=True))
        stamp = NOW - 86_400 + step
        for path in [*folder.rglob("*"), folder]:
            os.utime(path, (stamp, stamp))
    (root / "latest_checkpointed_iteration.txt").write_text("1000")
    before = snapshot(root / "iter_0000400")
    report = prune(root, history, grace=3600.0)
    assert "iter_0000400" in report.slims.slimmed, (report.plan.decisions, report.errors)
    left = snapshot(root / "iter_0000400")
    assert sorted(left) == [
        SLIM_RECORD,
        "mp_rank_00/model_optim_rng.pt",
        "mp_rank_01/model_optim_rng.pt",
    ]
    assert (root / "iter_0000400" / "mp_rank_00").stat().st_mtime == NOW - 86_400 + 400
    trash.restore(str(root), "iter_0000400")
    restored = snapshot(root / "iter_0000400")
    restored.pop(".keep")
    assert restored == before


def test_a_process_holding_a_file_vetoes_the_slim(tmp_path: Path, history: HistoryLog) -> None:
    root = tmp_path / "run"
    make_root(root, range(100, 1100, 100))
    code = "import sys, time; h = open(sys.argv[1]); print('ready', flush=True); time.sleep(60)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(root / "checkpoint-400" / "optimizer.pt")],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ready"
        before = snapshot(root / "checkpoint-400")
        report = prune(root, history)
    finally:
        holder.kill()
        holder.wait()
    assert report.slims.slimmed == ("checkpoint-600",)
    assert f"in-use:pid {holder.pid}" in report.veto_reasons["checkpoint-400"]
    assert snapshot(root / "checkpoint-400") == before


def test_the_slimmer_vetoes_a_holder_seen_at_the_last_moment(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_root(root, range(100, 300, 100))
    checkpoint = Checkpoint(name="checkpoint-100", step=100, layout="hf")
    plan = Plan(
        root=str(root),
        decisions=(
            Decision(checkpoint, True, ("tier3:every-1000", "slim:after-tier1"), 3, None, True),
        ),
        slim_targets={"checkpoint-100": SlimTarget(("optimizer.pt",), 30_000, 30_000)},
    )
    before = snapshot(root / "checkpoint-100")
    from daemon.safety.facts import Facts, Holder

    holder = Holder(4242, 1.0, "python train.py", "open", str(root / "checkpoint-100"))

    def everyone_holds(path: str, _names: object) -> Facts:
        return Facts(root_path=path, now=NOW, everywhere=(holder,))

    result = slimmer.apply(plan, str(root), dry_run=False, now=NOW, holders_check=everyone_holds)
    assert result.vetoed == (("checkpoint-100", "slim-vetoed:in-use:pid 4242 (python train.py)"),)
    assert snapshot(root / "checkpoint-100") == before and trash.list_trash(str(root)) == []


def test_a_dry_run_slims_nothing_and_says_what_it_would(
    tmp_path: Path, history: HistoryLog
) -> None:
    root = tmp_path / "run"
    make_root(root, range(100, 1100, 100))
    before = snapshot(root)
    report = prune(root, history, dry_run=True)
    assert sorted(report.slims.would_slim) == ["checkpoint-400", "checkpoint-600"]
    assert report.slims.would_free > 0 and snapshot(root) == before


def test_a_vanished_file_fails_that_slim_only_and_leaves_it_whole(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_root(root, range(100, 300, 100))
    decisions = []
    targets = {}
    for step in (100, 200):
        checkpoint = Checkpoint(name=f"checkpoint-{step}", step=step, layout="hf")
        decisions.append(Decision(checkpoint, True, ("slim:after-tier1",), 3, None, True))
        paths = ("optimizer.pt", "gone.pt") if step == 100 else ("optimizer.pt",)
        targets[checkpoint.name] = SlimTarget(paths, 1, 1)
    plan = Plan(root=str(root), decisions=tuple(decisions), slim_targets=targets)
    before = snapshot(root / "checkpoint-100")
    result = slimmer.apply(plan, str(root), dry_run=False, now=NOW, holders_check=None)
    assert result.slimmed == ("checkpoint-200",)
    assert [name for name, _ in result.failed] == ["checkpoint-100"]
    assert snapshot(root / "checkpoint-100") == before
    assert [item.name for item in trash.list_trash(str(root))] == []
    assert json.loads((root / "checkpoint-200" / SLIM_RECORD).read_text())["files"][0]["path"] == (
        "optimizer.pt"
    )


class RecordFails(LocalFileSystem):
    """A filesystem that fills up right when the slim record is written."""

    def write_new_at(self, at: At, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
        if at.name.startswith(SLIM_RECORD):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), at.path)
        super().write_new_at(at, data, mode=mode, durable=durable)


def test_a_slim_whose_record_cannot_be_written_is_undone(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_root(root, range(100, 200, 100))
    checkpoint = Checkpoint(name="checkpoint-100", step=100, layout="hf")
    plan = Plan(
        root=str(root),
        decisions=(Decision(checkpoint, True, ("slim:after-tier1",), 3, None, True),),
        slim_targets={"checkpoint-100": SlimTarget(tuple(sorted(RESUME)), 1, 1)},
    )
    before = snapshot(root / "checkpoint-100")
    result = slimmer.apply(
        plan, str(root), dry_run=False, now=NOW, fs=RecordFails(), holders_check=None
    )
    assert result.slimmed == () and "No space left" in result.failed[0][1]
    assert snapshot(root / "checkpoint-100") == before
    assert trash.list_trash(str(root)) == []
    assert (root / "checkpoint-100").stat().st_mtime == NOW - 86_400 + 100
