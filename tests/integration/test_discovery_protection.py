"""Trackers, pins, metrics and honest sizes (hard links, symlinks) on real folders, and the plan
keeping what they protect."""

from __future__ import annotations

import os
import time
from pathlib import Path

from daemon.config import Config, KeepBestConfig, PolicyConfig, RootConfig
from daemon.discovery.scan import ScanResult, scan
from daemon.discovery.sizecache import SizeCache
from daemon.planner import plan_root
from policies.model import Checkpoint
from tests.layouts_fixtures import (
    age,
    hf_checkpoint,
    hf_run,
    pt_file,
    write_file,
    write_json,
)


def run_scan(root: Path, cache: SizeCache | None = None, **options: object) -> ScanResult:
    want_metrics = bool(options.pop("want_metrics", False))
    return scan(
        RootConfig(path=str(root), **options),  # type: ignore[arg-type]
        now=time.time(),
        settle_seconds=60,
        cache=cache,
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


def test_best_model_checkpoint_stays_tracked_while_the_newest_trainer_state_is_half_written(
    tmp_path: Path,
) -> None:
    # Every complete checkpoint names checkpoint-300 as the best; the Trainer is now writing
    # checkpoint-3100's trainer_state.json (cut off mid-write). Reading only that one file would
    # drop the tracker, and the plan would delete the best model load_best_model_at_end needs.
    hf_run(tmp_path, range(100, 3001, 100), best_model_checkpoint=str(tmp_path / "checkpoint-300"))
    saving = hf_checkpoint(tmp_path, 3100, age_seconds=None)
    (saving / "trainer_state.json").write_text('{"global_step": 3100, "best_model_checkpoint": "')
    found = by_name(run_scan(tmp_path))
    assert not found["checkpoint-3100"].complete
    assert found["checkpoint-300"].tracked_by == ("checkpoint-3000/trainer_state.json",)
    _, plan = plan_root(Config(), RootConfig(path=str(tmp_path)), now=time.time())
    decision = next(d for d in plan.decisions if d.checkpoint.name == "checkpoint-300")
    assert decision.keep
    assert "tracked:checkpoint-3000/trainer_state.json" in decision.reasons


def test_keep_best_keeps_the_evaluated_checkpoint_not_a_later_one_without_an_evaluation(
    tmp_path: Path,
) -> None:
    # Saves every 100, evaluations every 500 (as HF Trainer does with save_steps 100 and
    # eval_steps 500): each trainer_state.json holds the whole log history so far. Only
    # checkpoint-500 holds the weights that scored 0.2; checkpoint-600..900 were never
    # evaluated, so handing them 0.2 too made keep_best keep checkpoint-900 and delete 500.
    history: list[dict[str, object]] = []
    losses = {500: 0.2, 1000: 0.4, 1500: 0.5}
    for step in range(100, 1601, 100):
        history.append({"step": step, "loss": 1.0})
        if step in losses:
            history.append({"step": step, "eval_loss": losses[step]})
        folder = hf_checkpoint(tmp_path, step)
        write_json(
            folder / "trainer_state.json",
            {"global_step": step, "log_history": list(history)},
        )
        age(folder)
    found = by_name(run_scan(tmp_path, want_metrics=True))
    assert dict(found["checkpoint-500"].metrics) == {"eval_loss": 0.2}
    assert dict(found["checkpoint-600"].metrics) == {}
    assert dict(found["checkpoint-1000"].metrics) == {"eval_loss": 0.4}
    root = RootConfig(
        path=str(tmp_path),
        policy=PolicyConfig(
            keep_last=3, tier2_count=0, tier3_interval=1000, keep_best=KeepBestConfig(count=1)
        ),
    )
    _, plan = plan_root(Config(roots=[root]), root, now=time.time())
    kept = {d.checkpoint.name: d.reasons for d in plan.decisions if d.keep}
    assert kept["checkpoint-500"] == ("best:eval_loss=0.2",)
    assert "checkpoint-900" not in kept


def test_absolute_symlink_through_another_path_to_the_root_still_tracks_its_target(
    tmp_path: Path,
) -> None:
    # The root is configured through a symlinked mount path (/scratch -> /lustre/scratch); a
    # user's `best` link names the checkpoint by the real path. Textually it lies outside the
    # root, yet deleting checkpoint-100 would break it.
    real = tmp_path / "lustre" / "run"
    real.mkdir(parents=True)
    (tmp_path / "scratch").symlink_to(tmp_path / "lustre")
    hf_run(real, [100, 200, 300])
    (real / "best").symlink_to(real / "checkpoint-100")
    (real / "via-alias").symlink_to(tmp_path / "scratch" / "run" / "checkpoint-200")
    (real / "elsewhere").symlink_to(tmp_path / "lustre")
    for configured in (tmp_path / "scratch" / "run", real):
        found = by_name(run_scan(configured))
        assert found["checkpoint-100"].tracked_by == ("best",)
        assert found["checkpoint-200"].tracked_by == ("via-alias",)
        assert found["checkpoint-300"].tracked_by == ()


def test_best_model_checkpoint_stays_tracked_past_a_save_cut_off_inside_trainer_state(
    tmp_path: Path,
) -> None:
    # A preempted node left checkpoint-3100 with a truncated trainer_state.json, long settled.
    # It names no best, so the best named by every sound trainer_state.json must still count,
    # on the first scan, from the cache, and from the cache file after a restart.
    hf_run(tmp_path, range(100, 3001, 100), best_model_checkpoint=str(tmp_path / "checkpoint-300"))
    cut = hf_checkpoint(tmp_path, 3100, age_seconds=None)
    (cut / "trainer_state.json").write_text('{"global_step": 3100, "best_model_checkpoint": "')
    age(cut)
    cache_path = tmp_path.parent / f"{tmp_path.name}-size-cache.json"
    cache = SizeCache(str(cache_path))
    for _ in range(2):
        found = by_name(run_scan(tmp_path, cache))
        assert found["checkpoint-300"].tracked_by == ("checkpoint-3000/trainer_state.json",)
    cache.save()
    found = by_name(run_scan(tmp_path, SizeCache(str(cache_path))))
    assert found["checkpoint-300"].tracked_by == ("checkpoint-3000/trainer_state.json",)


def test_a_pin_dropped_into_an_old_checkpoint_does_not_date_it_now(tmp_path: Path) -> None:
    """A `.keep` made now (by hand, or by `ckptd trash restore`) changes the folder's mtime;
    the checkpoint must still look as old as its files: not settling, and not a restart that
    would make the run's newer checkpoints an abandoned branch."""
    old = time.time() - 86_400
    for step in range(100, 1100, 100):
        for path in hf_run(tmp_path, [step]):
            for item in (*path.iterdir(), path):
                os.utime(item, (old + step, old + step))
    (tmp_path / "checkpoint-500" / ".keep").write_text("")
    config = Config(roots=[RootConfig(path=str(tmp_path), policy=PolicyConfig(keep_last=3))])
    found, plan = plan_root(config, config.roots[0], now=time.time())
    pinned = next(c for c in found.checkpoints if c.name == "checkpoint-500")
    assert pinned.complete and pinned.pinned_by and pinned.mtime == old + 500
    assert all(decision.branch is None for decision in plan.decisions)
    newest = [d.checkpoint.name for d in plan.decisions if "newest" in d.reasons]
    assert newest == ["checkpoint-1000"]
    # A file the trainer removes later is a write: the folder's mtime dates the checkpoint again.
    (tmp_path / "checkpoint-500" / "scheduler.pt").unlink()
    again = scan(config.roots[0], now=time.time(), settle_seconds=60)
    assert next(c for c in again.checkpoints if c.name == "checkpoint-500").mtime > old + 500
