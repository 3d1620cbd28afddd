"""What the prune path writes to the history, and what it leaves out: a run that did nothing
writes no row (the root's next `prune_run` counts it in `quiet_runs`), and a dry run never
writes `prune_refused` (it was asked to change nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.history.log import HistoryLog, read_records
from daemon.pruning import pipeline
from tests.configs import make_config
from tests.history_golden import matching_shape
from tests.integration.test_prune_root import FILE, NOW, keep_newest


def make_root(folder: Path, count: int) -> Path:
    for step in range(100, 100 * (count + 1), 100):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "model.bin").write_bytes(FILE)
    return folder


def test_runs_that_did_nothing_write_no_row_and_are_counted_in_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_root(tmp_path / "run", 4)
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(4))
    config = make_config([root], grace=0, min_keep=1)
    history = HistoryLog(str(tmp_path / "history.jsonl"))
    for _ in range(3):  # the daemon after each new checkpoint: nothing to delete yet
        report = pipeline.prune_root(
            config, config.roots[0], now=NOW, dry_run=False, history=history
        )
        assert report.deleted == () and report.refused is None
    assert read_records(history.path) == []
    # A dry run that would do nothing writes nothing either, and is not counted.
    pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=True, history=history)
    assert read_records(history.path) == []
    (root / "checkpoint-500").mkdir()
    (root / "checkpoint-500" / "model.bin").write_bytes(FILE)
    report = pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    assert report.deleted == ("checkpoint-100",)
    records = read_records(history.path)
    assert [record["event"] for record in records] == ["delete", "prune_run"]
    assert records[-1]["quiet_runs"] == 3
    assert matching_shape(records[-1]) == "prune_run_after_quiet_runs"
    # Counted once: the next run that does something starts from zero again (left out).
    (root / "checkpoint-600").mkdir()
    (root / "checkpoint-600" / "model.bin").write_bytes(FILE)
    pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    assert "quiet_runs" not in read_records(history.path)[-1]
    history.close()


def test_a_dry_run_refused_by_a_limit_records_no_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_root(tmp_path / "run", 10)
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(2))
    config = make_config([root], grace=0, min_keep=1, max_delete_fraction=0.5)
    history = HistoryLog(str(tmp_path / "history.jsonl"))
    dry = pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=True, history=history)
    assert dry.refused is not None and "max_delete_fraction" in dry.refused
    assert read_records(history.path) == []
    real = pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    assert real.refused is not None
    (refusal,) = read_records(history.path)
    assert refusal["event"] == "prune_refused" and refusal["dry_run"] is False
    history.close()
