"""Discovery on real folders built like each framework builds them (tests/layouts_fixtures.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from daemon.config import Config, PolicyConfig, RootConfig, SeriesConfig
from daemon.discovery.layouts import compile_pattern
from daemon.discovery.scan import ScanResult, scan
from daemon.errors import UsageError
from daemon.planner import plan_root
from policies.model import Checkpoint
from tests.layouts_fixtures import (
    age,
    age_all,
    dcp_checkpoint,
    deepspeed_checkpoint,
    deepspeed_run,
    hf_checkpoint,
    hf_run,
    hf_tmp_folder,
    lightning_checkpoint,
    lightning_last,
    megatron_checkpoint,
    megatron_run,
    orbax_checkpoint,
    orbax_tmp,
    pt_file,
    pt_training_run,
    tf_checkpoint,
    tf_tracker,
    write_file,
)


def run_scan(root: Path, settle_seconds: float = 60, **options: object) -> ScanResult:
    return scan(
        RootConfig(path=str(root), **options),  # type: ignore[arg-type]
        now=time.time(),
        settle_seconds=settle_seconds,
    )


def by_name(result: ScanResult) -> dict[str, Checkpoint]:
    return {checkpoint.name: checkpoint for checkpoint in result.checkpoints}


def files_size(folder: Path) -> int:
    return sum(path.lstat().st_size for path in folder.rglob("*") if not path.is_dir())


def test_hf_complete_interrupted_and_tmp_folders(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200, 300])
    hf_checkpoint(tmp_path, 400, complete=False)  # crashed before trainer_state.json
    hf_tmp_folder(tmp_path, 500)
    result = run_scan(tmp_path)
    assert result.layout == "hf"
    assert result.series == ("hf",)
    assert [c.name for c in result.checkpoints] == [
        "checkpoint-100",
        "checkpoint-200",
        "checkpoint-300",
        "checkpoint-400",
    ]
    found = by_name(result)
    assert all(found[f"checkpoint-{step}"].complete for step in (100, 200, 300))
    assert found["checkpoint-400"].complete is False
    assert found["checkpoint-400"].incomplete_reason == "no trainer_state.json"
    assert found["checkpoint-300"].step == 300 and found["checkpoint-300"].series == "hf"
    assert found["checkpoint-300"].size_bytes == files_size(tmp_path / "checkpoint-300")
    assert found["checkpoint-300"].freeable_bytes == found["checkpoint-300"].size_bytes
    assert found["checkpoint-300"].mtime == pytest.approx(
        (tmp_path / "checkpoint-300").stat().st_mtime, abs=1e-3
    )


def test_hf_sharded_megabytes_sizes_are_st_size(tmp_path: Path) -> None:
    folder = hf_checkpoint(tmp_path, 100, sharded=True, model_bytes=3_000_000)
    result = run_scan(tmp_path)
    (checkpoint,) = result.checkpoints
    assert (folder / "model-00001-of-00002.safetensors").stat().st_size == 1_500_000
    assert checkpoint.size_bytes == files_size(folder) > 9_000_000


def test_settling_checkpoint_says_how_long_ago(tmp_path: Path) -> None:
    # Plain PyTorch files have no completion marker: only settle time says a save is over.
    pt_file(tmp_path, "model_100.pt")
    pt_file(tmp_path, "model_200.pt", age_seconds=12)
    found = by_name(run_scan(tmp_path, settle_seconds=60))
    assert found["model_100.pt"].complete
    assert found["model_200.pt"].complete is False
    assert found["model_200.pt"].incomplete_reason == "settling: last write 12 s ago"
    assert by_name(run_scan(tmp_path, settle_seconds=10))["model_200.pt"].complete


def test_a_marker_written_last_means_complete_without_waiting_to_settle(tmp_path: Path) -> None:
    # trainer_state.json, .metadata, commit_success.txt, `latest`, TF's `checkpoint`: each is
    # written when the save is over, so settle time would only delay the truth.
    hf_run(tmp_path / "hf", [100])
    hf_checkpoint(tmp_path / "hf", 200, age_seconds=None)
    dcp_checkpoint(tmp_path / "dcp", "step_200", age_seconds=None)
    orbax_checkpoint(tmp_path / "orbax", 200, marker="commit_success.txt", age_seconds=None)
    deepspeed_run(tmp_path / "ds", [200], age_seconds=None)
    tf_checkpoint(tmp_path / "tf", 2, age_seconds=None)
    tf_tracker(tmp_path / "tf", [2])
    for root in ("hf", "dcp", "orbax", "ds", "tf"):
        newest = run_scan(tmp_path / root, settle_seconds=60).checkpoints[-1]
        assert newest.step in (2, 200), root
        assert (newest.complete, newest.incomplete_reason) == (True, None), root


def test_a_file_written_deep_inside_resets_settling(tmp_path: Path) -> None:
    folder = lightning_checkpoint(tmp_path, 1, 100, as_folder=True)
    write_file(folder / "extra" / "late.bin", 10)  # parent folders get a fresh mtime too
    age(folder)
    os.utime(folder / "extra" / "late.bin")  # only the deep file is new
    assert by_name(run_scan(tmp_path))[folder.name].incomplete_reason == (
        "settling: last write 0 s ago"
    )


def test_pt_second_source_layout_as_configured_series(tmp_path: Path) -> None:
    pt_training_run(tmp_path, epochs=3, steps_per_epoch=1000, every=250)
    result = run_scan(
        tmp_path,
        series=[
            SeriesConfig(pattern="mid_epoch_{epoch}_{step}.pt"),
            SeriesConfig(pattern="checkpoint_epoch_{epoch}.pt"),
        ],
        protect=["best.pt", "last.pt"],
    )
    assert result.series == ("mid_epoch_{epoch}_{step}.pt", "checkpoint_epoch_{epoch}.pt")
    mid = [c for c in result.checkpoints if c.series == "mid_epoch_{epoch}_{step}.pt"]
    epochs = [c for c in result.checkpoints if c.series == "checkpoint_epoch_{epoch}.pt"]
    assert [(c.epoch, c.step) for c in mid] == [
        (0, 250), (0, 500), (0, 750), (1, 1250), (1, 1500), (1, 1750),
        (2, 2250), (2, 2500), (2, 2750),
    ]  # fmt: skip
    # No {step}: ordered by epoch, which is then the step.
    assert [(c.name, c.step, c.epoch) for c in epochs] == [
        ("checkpoint_epoch_0.pt", 0, 0),
        ("checkpoint_epoch_1.pt", 1, 1),
        ("checkpoint_epoch_2.pt", 2, 2),
    ]
    names = {c.name for c in result.checkpoints}
    assert "best.pt" not in names and "last.pt" not in names
    assert all(c.complete and c.size_bytes == 2048 for c in result.checkpoints)
    assert result.warnings == ()


def test_pt_auto_detects_one_series_per_naming_pattern(tmp_path: Path) -> None:
    pt_training_run(tmp_path, epochs=2, steps_per_epoch=1000, every=500)
    pt_file(tmp_path, "model_100.pt")
    pt_file(tmp_path, "model_200.pt")
    result = run_scan(tmp_path)
    assert result.layout == "pt"
    assert result.series == (
        "checkpoint_epoch_{epoch}.pt",
        "mid_epoch_{epoch}_{step}.pt",
        "model_{step}.pt",
    )
    assert [c.name for c in result.checkpoints if c.series == "model_{step}.pt"] == [
        "model_100.pt",
        "model_200.pt",
    ]


def test_lightning_files_folders_metrics_and_last_ckpt(tmp_path: Path) -> None:
    first = lightning_checkpoint(tmp_path, 0, 500, metrics={"val_loss": 0.52})
    second = lightning_checkpoint(tmp_path, 1, 1000, metrics={"val_loss": 0.31})
    lightning_checkpoint(tmp_path, 2, 1500, as_folder=True)
    lightning_last(tmp_path, second, symlink=True)
    result = run_scan(tmp_path)
    assert result.layout == "lightning"
    found = by_name(result)
    assert [c.step for c in result.checkpoints] == [500, 1000, 1500]
    assert found[first.name].metrics == {"val_loss": 0.52}
    assert found[first.name].epoch == 0
    assert found[second.name].tracked_by == ("last.ckpt",)
    assert found[first.name].tracked_by == ()
    assert found["epoch=2-step=1500.ckpt"].size_bytes == 4096 + 100
    assert "last.ckpt" not in found


def test_lightning_last_ckpt_copy_is_not_a_checkpoint(tmp_path: Path) -> None:
    target = lightning_checkpoint(tmp_path, 0, 500)
    lightning_last(tmp_path, target, symlink=False)
    result = run_scan(tmp_path)
    assert [c.name for c in result.checkpoints] == [target.name]
    assert result.checkpoints[0].tracked_by == ()


def test_deepspeed_latest_decides_completeness_and_protects(tmp_path: Path) -> None:
    deepspeed_run(tmp_path, [100, 200, 300], latest=200)
    result = run_scan(tmp_path)
    assert result.layout == "deepspeed"
    found = by_name(result)
    assert set(found) == {"global_step100", "global_step200", "global_step300"}
    assert found["global_step100"].complete and found["global_step200"].complete
    assert found["global_step300"].incomplete_reason == "newer than 'latest' (global_step200)"
    assert found["global_step200"].tracked_by == ("latest",)
    # mp_rank_00_model_states.pt + 2 optimizer shards
    assert found["global_step100"].size_bytes == 3 * 4096


def test_deepspeed_without_latest_is_never_complete(tmp_path: Path) -> None:
    deepspeed_checkpoint(tmp_path, 100)
    deepspeed_checkpoint(tmp_path, 200)
    found = by_name(run_scan(tmp_path, layout="deepspeed"))
    assert not any(c.complete for c in found.values())
    assert found["global_step100"].incomplete_reason == "no readable 'latest' file"


def test_megatron_tracker(tmp_path: Path) -> None:
    megatron_run(tmp_path, [1000, 2000, 3000], tracker=2000, tensor_parallel=2)
    result = run_scan(tmp_path)
    assert result.layout == "megatron"
    found = by_name(result)
    assert found["iter_0002000"].tracked_by == ("latest_checkpointed_iteration.txt",)
    assert found["iter_0001000"].complete and found["iter_0002000"].complete
    assert found["iter_0003000"].incomplete_reason == (
        "newer than latest_checkpointed_iteration.txt (2000)"
    )
    assert found["iter_0001000"].size_bytes == 2 * 4096


def test_orbax_markers_prefixes_and_tmp_folders(tmp_path: Path) -> None:
    orbax_checkpoint(tmp_path, 100)
    orbax_checkpoint(tmp_path, 200, marker="commit_success.txt")
    orbax_checkpoint(tmp_path, 300, marker=None)
    orbax_tmp(tmp_path, 400)
    result = run_scan(tmp_path)
    assert result.layout == "orbax"
    found = by_name(result)
    assert found["100"].complete and found["200"].complete
    assert found["300"].incomplete_reason == "no commit_success.txt or _CHECKPOINT_METADATA"
    (tmp,) = [c for c in result.checkpoints if c.step == 400]
    assert tmp.complete is False and "orbax temporary folder" in str(tmp.incomplete_reason)

    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    orbax_checkpoint(prefixed, 100, prefix="step_")
    orbax_checkpoint(prefixed, 200, prefix="step_")
    result = run_scan(prefixed)
    assert result.layout == "orbax"
    assert [(c.name, c.step, c.complete) for c in result.checkpoints] == [
        ("step_100", 100, True),
        ("step_200", 200, True),
    ]


def test_dcp_needs_metadata_and_distcp_files(tmp_path: Path) -> None:
    dcp_checkpoint(tmp_path, "step_1000")
    dcp_checkpoint(tmp_path, "step_2000")
    dcp_checkpoint(tmp_path, "step_3000", complete=False)
    write_file(tmp_path / "logs_2024" / "events.txt", 10)  # numbered, but no *.distcp
    age(tmp_path / "logs_2024")
    result = run_scan(tmp_path)
    assert result.layout == "dcp"
    found = by_name(result)
    assert set(found) == {"step_1000", "step_2000", "step_3000"}
    assert found["step_1000"].complete and found["step_2000"].complete
    assert found["step_3000"].incomplete_reason == "no .metadata"
    assert found["step_1000"].size_bytes == 2 * 4096 + 900


def test_tf_one_checkpoint_is_several_root_entries(tmp_path: Path) -> None:
    for number in range(1, 6):
        tf_checkpoint(tmp_path, number, shards=2)
    tf_tracker(tmp_path, [3, 4, 5])
    tf_checkpoint(tmp_path, 6, with_index=False)  # being written
    tf_checkpoint(tmp_path, 7)  # index written, tracker not updated yet
    result = run_scan(tmp_path)
    assert result.layout == "tf"
    found = by_name(result)
    assert [c.name for c in result.checkpoints] == [f"ckpt-{n}" for n in range(1, 8)]
    assert found["ckpt-5"].entries == (
        "ckpt-5.data-00000-of-00002",
        "ckpt-5.data-00001-of-00002",
        "ckpt-5.index",
    )
    assert found["ckpt-5"].members == found["ckpt-5"].entries
    assert found["ckpt-5"].size_bytes == 2 * 4096 + 300
    assert found["ckpt-5"].tracked_by == ("checkpoint",)
    assert found["ckpt-4"].tracked_by == ()  # listed (complete) but not the resume point
    assert all(found[f"ckpt-{n}"].complete for n in range(1, 6))
    assert found["ckpt-6"].incomplete_reason == "no ckpt-6.index"
    assert found["ckpt-7"].incomplete_reason == "not listed in 'checkpoint'"


@pytest.mark.parametrize(
    ("build", "layout"),
    [
        (lambda root: hf_run(root, [100, 200]), "hf"),
        (lambda root: pt_training_run(root, epochs=1), "pt"),
        (lambda root: [lightning_checkpoint(root, 0, 10)], "lightning"),
        (lambda root: deepspeed_run(root, [100]), "deepspeed"),
        (lambda root: megatron_run(root, [1000]), "megatron"),
        (lambda root: [orbax_checkpoint(root, 5)], "orbax"),
        (lambda root: [dcp_checkpoint(root, "step_5")], "dcp"),
        (lambda root: [*tf_checkpoint(root, 1), tf_tracker(root, [1])], "tf"),
    ],
)
def test_auto_detection(tmp_path: Path, build: object, layout: str) -> None:
    build(tmp_path)  # type: ignore[operator]
    result = run_scan(tmp_path)
    assert result.layout == layout
    assert result.checkpoints and all(c.layout == layout for c in result.checkpoints)
    # Naming the layout gives the same answer.
    assert run_scan(tmp_path, layout=layout).checkpoints == result.checkpoints


def test_hf_with_fsdp_distcp_inside_is_still_hf(tmp_path: Path) -> None:
    folder = hf_checkpoint(tmp_path, 100)
    write_file(folder / "pytorch_model_fsdp_0" / "__0_0.distcp", 100)
    age(folder)
    assert run_scan(tmp_path).layout == "hf"


def test_custom_pattern(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        write_file(tmp_path / f"ckpt-{step}" / "weights.bin", 1000)
        age(tmp_path / f"ckpt-{step}")
    write_file(tmp_path / "ckpt-final" / "weights.bin", 1000)
    result = run_scan(tmp_path, pattern="ckpt-{step}")
    assert result.series == ("ckpt-{step}",)
    assert [(c.name, c.step, c.series) for c in result.checkpoints] == [
        ("ckpt-10", 10, "ckpt-{step}"),
        ("ckpt-20", 20, "ckpt-{step}"),
        ("ckpt-30", 30, "ckpt-{step}"),
    ]
    assert result.layout == "custom"
    assert result.warnings == ()


def test_pattern_matching_nothing_is_a_warning(tmp_path: Path) -> None:
    hf_run(tmp_path, [100])
    result = run_scan(tmp_path, pattern="ckpt-{step}")
    assert result.checkpoints == ()
    assert result.warnings == (f"pattern 'ckpt-{{step}}' matched nothing in {tmp_path}",)


def test_empty_root_warns(tmp_path: Path) -> None:
    result = run_scan(tmp_path)
    assert result.checkpoints == ()
    assert "no checkpoints found" in result.warnings[0]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("ckpt", "has no {step} or {epoch}"),
        ("ckpt-{step}-{step}", "appears twice"),
        ("ckpt-{iteration}", "unknown placeholder {iteration}"),
    ],
)
def test_bad_patterns_are_usage_errors(pattern: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("{", r"\{").replace("}", r"\}")):
        compile_pattern(pattern)


def test_pattern_wildcards_and_escaping() -> None:
    pattern = compile_pattern("run.*_{epoch}_{step}.pt")
    assert pattern.match("run.a_1_100.pt") == pattern.match("run.a_1_100.pt")
    found = pattern.match("run.xyz_2_300.pt")
    assert found is not None and (found.epoch, found.step) == (2, 300)
    assert pattern.match("runXxyz_2_300.pt") is None  # the dot is literal
    assert pattern.match("run.xyz_2_300.ptx") is None


def test_root_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match=f"{missing}: root does not exist"):
        run_scan(missing)
    a_file = write_file(tmp_path / "file", 3)
    with pytest.raises(UsageError, match=f"{a_file}: root is not a folder"):
        run_scan(a_file)


def test_unreadable_root_as_a_normal_user(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every folder; covered by the misbehaving-fs test")
    root = tmp_path / "locked"
    root.mkdir()
    root.chmod(0)
    try:
        with pytest.raises(UsageError, match="root cannot be read"):
            run_scan(root)
    finally:
        root.chmod(0o755)


def test_same_step_twice_is_ordered_by_version_then_name(tmp_path: Path) -> None:
    # A second run into the same folder: Lightning names its save of a step the first run
    # already saved `-v1` (then `-v2`), so the versioned file is the newer one, though its name
    # sorts first (`-` < `.`).
    lightning_checkpoint(tmp_path, 1, 1000)
    lightning_checkpoint(tmp_path, 0, 500)
    (tmp_path / "epoch=1-step=1000-v1.ckpt").write_bytes(b"second run")
    (tmp_path / "epoch=1-step=1000-v2.ckpt").write_bytes(b"third run")
    (tmp_path / "epoch=1-step=1000-v10.ckpt").write_bytes(b"eleventh run")
    age_all(tmp_path)
    result = run_scan(tmp_path)
    assert [(c.name, c.step) for c in result.checkpoints] == [
        ("epoch=0-step=500.ckpt", 500),
        ("epoch=1-step=1000.ckpt", 1000),
        ("epoch=1-step=1000-v1.ckpt", 1000),
        ("epoch=1-step=1000-v2.ckpt", 1000),
        ("epoch=1-step=1000-v10.ckpt", 1000),
    ]


def test_a_pattern_root_keeps_the_completeness_rules_of_its_layout(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200])
    hf_checkpoint(tmp_path, 300, complete=False)
    result = run_scan(tmp_path, pattern="checkpoint-{step}")
    assert result.layout == "hf" and result.series == ("checkpoint-{step}",)
    assert [(c.step, c.complete) for c in result.checkpoints] == [
        (100, True),
        (200, True),
        (300, False),
    ]


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
