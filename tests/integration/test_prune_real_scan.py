"""prune_root with the real discovery and the real policy on realistic layouts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from daemon.config import Config, DefaultsConfig, RootConfig, TrashConfig
from daemon.history.log import HistoryLog, read_records
from daemon.pruning import pipeline, trash
from tests.layouts_fixtures import age_all, hf_checkpoint, hf_run, tf_checkpoint, tf_tracker
from tests.sizes import tree_blocks


def config_for(root: Path, **root_options: object) -> Config:
    return Config(
        defaults=DefaultsConfig(trash=TrashConfig(grace=0), settle_seconds=60),
        roots=[RootConfig(path=str(root), **root_options)],  # type: ignore[arg-type]
    )


def steps_in(root: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in root.iterdir() if p.name.startswith("checkpoint-")}


def test_hf_run_keeps_what_policy_trackers_and_pins_keep_and_frees_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "run"
    hf_run(root, range(100, 6100, 100))
    # best_model_checkpoint (the trainer's own pointer) names checkpoint-700; a .keep pins 1300.
    hf_checkpoint(root, 6000, best_model_checkpoint=str(root / "checkpoint-700"))
    (root / "checkpoint-1300" / ".keep").write_text("")
    age_all(root)
    # The fixtures' files are sparse: what deleting gives back is their allocated blocks.
    allocated = {p.name: tree_blocks(p) for p in root.iterdir() if p.name.startswith("checkpoint")}
    history = HistoryLog(str(tmp_path / "history.jsonl"))
    now = time.time()
    config = config_for(root)
    report = pipeline.prune_root(config, config.roots[0], now=now, dry_run=False, history=history)
    history.close()
    assert report.refused is None and report.failed == ()
    kept = {d.checkpoint.step for d in report.plan.kept}
    assert steps_in(root) == kept
    assert {700, 1300, 6000} <= kept
    assert set(range(4100, 6100, 100)) <= kept  # tier 1: the newest 20
    deleted = {d.checkpoint.name for d in report.plan.deleted}
    assert set(report.deleted) == deleted and len(deleted) > 10
    freed = sum(d.checkpoint.freeable_bytes for d in report.plan.deleted)
    assert report.bytes_logical == freed > 0
    assert report.bytes_freed == sum(allocated[name] for name in deleted) > 0
    assert trash.list_trash(str(root)) == []
    records = read_records(history.path)
    assert sorted(r["checkpoint"] for r in records if r["event"] == "delete") == sorted(deleted)


def test_a_second_run_deletes_nothing_more(tmp_path: Path) -> None:
    root = tmp_path / "run"
    hf_run(root, range(100, 6100, 100))
    config = config_for(root)
    first = pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert first.deleted
    second = pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert second.deleted == () and second.refused is None


def test_tensorflow_multi_file_checkpoints_go_whole_and_the_tracked_one_stays(
    tmp_path: Path,
) -> None:
    root = tmp_path / "tf"
    root.mkdir()
    for number in range(1, 41):
        tf_checkpoint(root, number, shards=2)
    tf_tracker(root, range(1, 41))
    age_all(root)
    config = config_for(
        root, layout="tf", policy={"keep_last": 5, "tier2_count": 0, "tier3_interval": 10}
    )
    report = pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert report.failed == () and report.deleted
    for name in report.deleted:
        assert not any(entry.startswith(name + ".") for entry in os.listdir(root)), name
    for decision in report.plan.kept:
        members = decision.checkpoint.members
        assert members and all((root / member).exists() for member in members)
    assert (root / "ckpt-40.index").exists()


def test_a_reader_of_an_old_checkpoint_vetoes_only_that_one(tmp_path: Path) -> None:
    root = tmp_path / "run"
    hf_run(root, range(100, 6100, 100))
    config = config_for(root)
    reader = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
        cwd=root / "checkpoint-300",
        stdout=subprocess.PIPE,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == b"ready\n"
        report = pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    finally:
        reader.kill()
        reader.wait()
    assert "checkpoint-300" in report.vetoed
    assert f"in-use:pid {reader.pid}" in str(report.veto_reasons)
    assert (root / "checkpoint-300").exists()
    assert report.deleted and report.refused is None
