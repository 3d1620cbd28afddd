"""prune_root with the real discovery and the real policy on realistic layouts: what changes while
the prompt waits, bytes measured at removal, a restored checkpoint, a full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.discovery.sizecache import SizeCache
from daemon.history.log import HistoryLog, read_records
from daemon.pruning import pipeline, trash
from policies.model import PolicySpec
from tests.configs import make_config, rotation
from tests.layouts_fixtures import age, age_all, hf_checkpoint, hf_run, tf_checkpoint, tf_tracker
from tests.sizes import tree_blocks


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
    config = make_config([root], grace=0)
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
    config = make_config([root], grace=0)
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
    config = make_config(
        [root], grace=0, layout="tf", root_settings={"policy": rotation(5, tier3_interval=10)}
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
    config = make_config([root], grace=0)
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


def test_what_changes_while_the_prompt_waits_is_honoured(tmp_path: Path) -> None:
    # `ckptd prune` shows the plan and waits at [y/N]; the answer may come many minutes later.
    # Meanwhile the trainer saved checkpoint-6100 whose trainer_state.json names checkpoint-700
    # as the best model, and a colleague pinned checkpoint-1300. Deleting by the stale plan
    # breaks the trainer's load_best_model_at_end and ignores the pin.
    root = tmp_path / "run"
    hf_run(root, range(100, 6100, 100))
    config = make_config([root], grace=0)
    shown: list[str] = []

    def confirm(preview: pipeline.PruneReport) -> bool:
        shown.extend(d.checkpoint.name for d in preview.plan.deleted)
        hf_checkpoint(root, 6100, best_model_checkpoint=str(root / "checkpoint-700"))
        (root / "checkpoint-1300" / ".keep").write_text("")
        # checkpoint-800 replaced under its name (a resumed run saved that step again).
        shutil.rmtree(root / "checkpoint-800")
        age(hf_checkpoint(root, 800, model_bytes=9000), 7200)
        age(root / "checkpoint-6100")  # the answer came after settle_seconds
        return True

    report = pipeline.prune_root(
        config, config.roots[0], now=time.time(), dry_run=False, confirm=confirm
    )
    assert {"checkpoint-700", "checkpoint-1300"} <= set(shown)
    assert report.refused is None and report.failed == ()
    assert (root / "checkpoint-700").is_dir() and (root / "checkpoint-1300").is_dir()
    assert (root / "checkpoint-800").is_dir() and "checkpoint-800" not in report.deleted
    assert "checkpoint-700" not in report.deleted and "checkpoint-1300" not in report.deleted
    # Nothing the person was not shown is deleted either.
    assert set(report.deleted) <= set(shown) and report.deleted
    remaining = {p.name for p in root.iterdir() if p.name.startswith("checkpoint-")}
    assert remaining.isdisjoint(report.deleted)


def test_bytes_freed_are_measured_at_removal_not_taken_from_the_size_cache(
    tmp_path: Path,
) -> None:
    # The daemon's size cache remembers a complete checkpoint's freeable bytes from when it was
    # walked. A hard-link snapshot taken later (inside the folder only the files' link counts
    # change, which the cache cannot see) shares every byte: removing it frees nothing, and
    # the run and the history must say so, not the cached figure.
    root = tmp_path / "run"
    hf_run(root, range(100, 3100, 100), model_bytes=100_000)
    config = make_config([root], grace=0)
    cache = SizeCache()
    preview = pipeline.prune_root(
        config, config.roots[0], now=time.time(), dry_run=True, cache=cache
    )
    doomed = [d.checkpoint.name for d in preview.plan.deleted]
    assert doomed and preview.plan.bytes_freed > 0
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in doomed:
        for file in (root / name).iterdir():
            os.link(file, snapshot / f"{name}-{file.name}")
    history = HistoryLog(str(tmp_path / "history.jsonl"))
    report = pipeline.prune_root(
        config, config.roots[0], now=time.time(), dry_run=False, cache=cache, history=history
    )
    history.close()
    assert sorted(report.deleted) == sorted(doomed)
    assert report.bytes_freed == 0
    records = read_records(history.path)
    assert [r["bytes_freed"] for r in records if r["event"] == "delete"] == [0] * len(doomed)
    assert [r["bytes_freed"] for r in records if r["event"] == "prune_run"] == [0]


def test_a_restored_checkpoint_is_not_deleted_again_by_the_next_prune(tmp_path: Path) -> None:
    # `ckptd trash restore NAME` undoes a deletion; the policy has not changed, so without a
    # pin the daemon's next prune (minutes later, on the next new checkpoint) trashes it again
    # and the grace runs out on a checkpoint the person explicitly brought back.
    root = tmp_path / "run"
    hf_run(root, range(100, 3100, 100))
    tf_root = tmp_path / "tf"
    tf_root.mkdir()
    for number in range(1, 31):
        tf_checkpoint(tf_root, number)
    tf_tracker(tf_root, range(1, 31))
    age_all(tf_root)
    config = make_config([root, tf_root], grace=3600)
    for root_config in config.roots:
        first = pipeline.prune_root(config, root_config, now=time.time(), dry_run=False)
        assert first.deleted and first.refused is None
        name = first.deleted[0]
        trash.restore(root_config.path, name)
        second = pipeline.prune_root(config, root_config, now=time.time(), dry_run=False)
        assert second.refused is None and name not in second.deleted
        kept = {d.checkpoint.name: d for d in second.plan.kept}
        assert ".keep" in kept[name].checkpoint.pinned_by


def _fill(folder: Path) -> None:
    descriptor = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(descriptor, b"f" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(descriptor)


def test_a_full_disk_that_holds_the_history_does_not_stop_the_prune(
    tmp_path: Path, tmpfs: Callable[[int], Path]
) -> None:
    # The disk is full (the very reason to prune) and the history file is on it: a record
    # that cannot be appended must not abort the run before it frees anything.
    mount = tmpfs(8 * 1024 * 1024)
    root = mount / "run"
    hf_run(root, range(100, 1100, 100), model_bytes=500_000)
    allocated = {p.name: tree_blocks(p) for p in root.iterdir()}
    _fill(mount)
    config = make_config([root], grace=0)
    history = HistoryLog(str(mount / "history.jsonl"))
    with pytest.raises(OSError), open(mount / "probe", "wb") as probe:
        probe.write(b"p" * 8192)
    spec = PolicySpec(keep_last=2, tier2_count=0, tier3_interval=None)
    report = pipeline.prune_root(
        config,
        config.roots[0],
        now=time.time(),
        dry_run=False,
        history=history,
        policy_override=spec,
    )
    history.close()
    assert history.dropped > 0  # said in the log, not silently lost
    assert report.refused is None and report.failed == ()
    assert len(report.deleted) == 7 and report.bytes_logical > 7 * 500_000
    # The fixtures' files are sparse: what came back is their allocated blocks.
    assert report.bytes_freed == sum(allocated[name] for name in report.deleted) > 0
    remaining = sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))
    assert remaining == ["checkpoint-1000", "checkpoint-800", "checkpoint-900"]
    # With space again, the history is written as before.
    with HistoryLog(str(mount / "history.jsonl")) as again:
        again.write("probe")
    assert read_records(str(mount / "history.jsonl"))[-1]["event"] == "probe"
