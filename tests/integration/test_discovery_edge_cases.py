"""Defects found in review of discovery and the policy, each pinned by the test that found it."""

from __future__ import annotations

import time
from pathlib import Path

from daemon.config import Config, KeepBestConfig, PolicyConfig, RootConfig, SeriesConfig
from daemon.discovery.scan import ScanResult, scan
from daemon.discovery.sizecache import SizeCache
from daemon.planner import plan_root
from policies.model import Checkpoint
from tests.layouts_fixtures import (
    age,
    age_all,
    hf_checkpoint,
    hf_run,
    megatron_checkpoint,
    megatron_run,
    pt_file,
    write_json,
)


def run_scan(
    root: Path, cache: SizeCache | None = None, *, want_metrics: bool = False
) -> ScanResult:
    return scan(
        RootConfig(path=str(root)),
        now=time.time(),
        settle_seconds=60,
        cache=cache,
        want_metrics=want_metrics,
    )


def by_name(result: ScanResult) -> dict[str, Checkpoint]:
    return {checkpoint.name: checkpoint for checkpoint in result.checkpoints}


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


def test_megatron_iterations_past_seven_digits_are_checkpoints(tmp_path: Path) -> None:
    # Megatron formats `iter_{:07d}`: from iteration 10,000,000 on the name has eight digits.
    # Matching exactly seven made every later checkpoint invisible, never pruned.
    megatron_run(tmp_path, [9_998_000, 9_999_000, 10_000_000, 10_001_000])
    megatron_checkpoint(tmp_path, 10_002_000, age_seconds=None)  # above the tracker: saving
    result = run_scan(tmp_path)
    assert result.layout == "megatron"
    found = by_name(result)
    assert [checkpoint.step for checkpoint in result.checkpoints] == [
        9_998_000,
        9_999_000,
        10_000_000,
        10_001_000,
        10_002_000,
    ]
    assert found["iter_10001000"].complete
    assert found["iter_10001000"].tracked_by == ("latest_checkpointed_iteration.txt",)
    assert not found["iter_10002000"].complete


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


def test_a_checkpoint_with_an_mtime_in_the_future_is_not_settled(tmp_path: Path) -> None:
    # Clock skew on NFS: the server stamps a file two hours ahead. Until that moment plus
    # settle_seconds has passed, nothing proves the save is over (in a layout with no marker).
    pt_file(tmp_path, "model_100.pt")
    pt_file(tmp_path, "model_200.pt", age_seconds=-7200)
    found = by_name(run_scan(tmp_path))
    assert found["model_100.pt"].complete
    assert not found["model_200.pt"].complete
    assert (found["model_200.pt"].incomplete_reason or "").startswith("settling")


def test_stray_files_of_a_training_run_are_neither_checkpoints_nor_a_layout(
    tmp_path: Path,
) -> None:
    hf_run(tmp_path, [0, 100, 200])
    for folder in ("runs", "wandb", "logs_2024"):
        (tmp_path / folder).mkdir()
    (tmp_path / "runs" / "events.out.tfevents.1700000000.host.1.v2").write_text("x")
    for name in ("README.md", "config.json", "events.out.tfevents.1700000000.host", "model.pt"):
        (tmp_path / name).write_text("x")
    result = run_scan(tmp_path)
    assert result.layout == "hf"
    assert [(c.name, c.step, c.complete) for c in result.checkpoints] == [
        ("checkpoint-0", 0, True),
        ("checkpoint-100", 100, True),
        ("checkpoint-200", 200, True),
    ]
    for name in ("ckpt-100", "ckpt-0200", "ckpt-best", "ckpt-100.tmp"):
        (tmp_path / name).mkdir()
    patterned = scan(
        RootConfig(path=str(tmp_path), pattern="ckpt-{step}"), now=time.time(), settle_seconds=60
    )
    assert [(c.name, c.step) for c in patterned.checkpoints] == [
        ("ckpt-100", 100),
        ("ckpt-0200", 200),
    ]


def test_mid_epoch_steps_counted_within_each_epoch_are_ordered_by_epoch_first(
    tmp_path: Path,
) -> None:
    # `mid_epoch_<epoch>_<batch>.pt` where the number restarts each epoch (the position to
    # resume the data loader from). Ordered by that number alone, mid_epoch_2_250.pt, the newest
    # save, sorted below mid_epoch_0_750.pt and the keep-5 rotation deleted it.
    for epoch, batches in ((0, (250, 500, 750)), (1, (250, 500, 750)), (2, (250,))):
        for batch in batches:
            pt_file(tmp_path, f"mid_epoch_{epoch}_{batch}.pt", 2048)
    age_all(tmp_path)
    series = "mid_epoch_{epoch}_{step}.pt"
    rotation = PolicyConfig(keep_last=5, tier2_count=0, tier3_interval=None)
    root = RootConfig(path=str(tmp_path), series=[SeriesConfig(pattern=series, policy=rotation)])
    result, plan = plan_root(Config(roots=[root]), root, now=time.time())
    assert [c.name for c in result.checkpoints] == [
        f"mid_epoch_{epoch}_{batch}.pt"
        for epoch, batch in ((0, 250), (0, 500), (0, 750), (1, 250), (1, 500), (1, 750), (2, 250))
    ]
    kept = [d.checkpoint.name for d in plan.decisions if d.keep]
    assert kept == [
        "mid_epoch_0_750.pt",
        "mid_epoch_1_250.pt",
        "mid_epoch_1_500.pt",
        "mid_epoch_1_750.pt",
        "mid_epoch_2_250.pt",
    ]
    assert [c.epoch for c in result.checkpoints] == [0, 0, 0, 1, 1, 1, 2]
    # The same root auto-detected (no configured series) orders the same way.
    auto = run_scan(tmp_path)
    assert [c.name for c in auto.checkpoints] == [c.name for c in result.checkpoints]
