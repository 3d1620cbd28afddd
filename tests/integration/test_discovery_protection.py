"""Trackers, pins, metrics and honest sizes (hard links, symlinks) on real folders."""

from __future__ import annotations

import os
import time
from pathlib import Path

from daemon.config import RootConfig
from daemon.discovery.scan import ScanResult, scan
from policies.model import Checkpoint
from tests.layouts_fixtures import (
    age,
    hf_checkpoint,
    hf_run,
    pt_file,
    write_file,
    write_json,
)


def run_scan(root: Path, **options: object) -> ScanResult:
    want_metrics = bool(options.pop("want_metrics", False))
    return scan(
        RootConfig(path=str(root), **options),  # type: ignore[arg-type]
        now=time.time(),
        settle_seconds=60,
        want_metrics=want_metrics,
    )


def by_name(result: ScanResult) -> dict[str, Checkpoint]:
    return {checkpoint.name: checkpoint for checkpoint in result.checkpoints}


def test_best_model_checkpoint_of_the_newest_trainer_state_is_tracked(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200], best_model_checkpoint=str(tmp_path / "checkpoint-100"))
    # The newest complete one decides: it names checkpoint-200 (by a relative path).
    hf_checkpoint(tmp_path, 300, best_model_checkpoint="output/checkpoint-200/")
    hf_checkpoint(tmp_path, 400, complete=False)
    found = by_name(run_scan(tmp_path))
    assert found["checkpoint-200"].tracked_by == ("checkpoint-300/trainer_state.json",)
    assert found["checkpoint-100"].tracked_by == ()


def test_symlink_into_a_checkpoint_tracks_it_and_dangling_ones_are_harmless(
    tmp_path: Path,
) -> None:
    hf_run(tmp_path, [100, 200, 300])
    (tmp_path / "latest-good").symlink_to("checkpoint-200/model.safetensors")
    (tmp_path / "best").symlink_to(tmp_path / "checkpoint-100")  # absolute
    (tmp_path / "dangling").symlink_to("checkpoint-999")
    (tmp_path / "outside").symlink_to("/etc")
    found = by_name(run_scan(tmp_path))
    assert set(found) == {"checkpoint-100", "checkpoint-200", "checkpoint-300"}
    assert found["checkpoint-200"].tracked_by == ("latest-good",)
    assert found["checkpoint-100"].tracked_by == ("best",)
    assert found["checkpoint-300"].tracked_by == ()


def test_a_symlink_named_like_a_checkpoint_is_not_one(tmp_path: Path) -> None:
    hf_run(tmp_path, [100])
    (tmp_path / "checkpoint-200").symlink_to("checkpoint-100")
    found = by_name(run_scan(tmp_path))
    assert set(found) == {"checkpoint-100"}
    assert found["checkpoint-100"].tracked_by == ("checkpoint-200",)


def test_pins_keep_inside_keep_beside_and_protect_globs(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200, 300])
    (tmp_path / "checkpoint-100" / ".keep").touch()
    age(tmp_path / "checkpoint-100")
    pt_root = tmp_path / "pt"
    pt_root.mkdir()
    pt_file(pt_root, "model_100.pt")
    pt_file(pt_root, "model_200.pt")
    (pt_root / "model_100.pt.keep").touch()
    found = by_name(run_scan(tmp_path, protect=["checkpoint-3*", "best.pt"]))
    assert found["checkpoint-100"].pinned_by == (".keep",)
    assert found["checkpoint-200"].pinned_by == ()
    assert found["checkpoint-300"].pinned_by == ("protect:checkpoint-3*",)
    pt_found = by_name(run_scan(pt_root))
    assert pt_found["model_100.pt"].pinned_by == (".keep",)
    assert pt_found["model_200.pt"].pinned_by == ()
    assert "model_100.pt.keep" not in pt_found


def test_metrics_from_trainer_state_and_sidecars(tmp_path: Path) -> None:
    hf_checkpoint(tmp_path, 100, eval_loss=0.52, best_metric=0.52)
    hf_checkpoint(tmp_path, 200, eval_loss=0.31, best_metric=0.31)
    folder = hf_checkpoint(tmp_path, 300)
    write_json(folder / "metrics.json", {"eval_loss": 0.4, "note": "text is ignored"})
    age(folder)
    found = by_name(run_scan(tmp_path, want_metrics=True))
    assert found["checkpoint-100"].metrics == {"eval_loss": 0.52, "best_metric": 0.52}
    assert found["checkpoint-200"].metrics == {"eval_loss": 0.31, "best_metric": 0.31}
    assert found["checkpoint-300"].metrics == {"eval_loss": 0.4}
    # Without keep_best nothing but the newest trainer_state.json is read.
    lazy = by_name(run_scan(tmp_path))
    assert lazy["checkpoint-100"].metrics == {}

    pt_root = tmp_path / "pt"
    pt_root.mkdir()
    pt_file(pt_root, "model_100.pt", 1000)
    write_json(pt_root / "model_100.pt.metrics.json", {"val_acc": 0.9})
    age(pt_root / "model_100.pt.metrics.json")
    (checkpoint,) = run_scan(pt_root, want_metrics=True).checkpoints
    assert checkpoint.metrics == {"val_acc": 0.9}
    # The sidecar belongs to the checkpoint: deleting it removes both.
    assert checkpoint.entries == ("model_100.pt", "model_100.pt.metrics.json")
    assert checkpoint.size_bytes == 1000 + (pt_root / "model_100.pt.metrics.json").stat().st_size


def test_hard_links_count_once_and_linked_elsewhere_frees_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    folder = hf_checkpoint(root, 100, model_bytes=1_000_000)
    snapshot = tmp_path / "snapshots" / "2026-11-22"
    snapshot.mkdir(parents=True)
    os.link(folder / "model.safetensors", snapshot / "model.safetensors")
    os.link(folder / "optimizer.pt", folder / "optimizer-copy.pt")  # both links inside
    age(folder)
    (checkpoint,) = run_scan(root).checkpoints
    plain = sum(
        path.stat().st_size for path in folder.iterdir() if path.name not in ("optimizer-copy.pt",)
    )
    assert checkpoint.size_bytes == plain  # the doubly linked optimizer counted once
    # The snapshot holds the model: deleting the checkpoint does not free it.
    assert checkpoint.freeable_bytes == plain - 1_000_000


def test_every_file_linked_into_a_snapshot_frees_zero(tmp_path: Path) -> None:
    root = tmp_path / "run"
    folder = hf_checkpoint(root, 100)
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    for path in folder.iterdir():
        os.link(path, snapshot / path.name)
    age(folder)
    (checkpoint,) = run_scan(root).checkpoints
    assert checkpoint.size_bytes > 0
    assert checkpoint.freeable_bytes == 0


def test_symlinks_inside_count_their_own_size_and_are_not_followed(tmp_path: Path) -> None:
    big = write_file(tmp_path / "elsewhere" / "huge.bin", 50_000_000)
    root = tmp_path / "run"
    folder = hf_checkpoint(root, 100)
    before = sum(path.stat().st_size for path in folder.iterdir())
    (folder / "weights-link").symlink_to(big)
    (folder / "loop").symlink_to(folder)  # a loop must not hang the walk
    age(folder)
    (checkpoint,) = run_scan(root).checkpoints
    link_sizes = (folder / "weights-link").lstat().st_size + (folder / "loop").lstat().st_size
    assert checkpoint.size_bytes == before + link_sizes
    assert checkpoint.size_bytes < 1_000_000
