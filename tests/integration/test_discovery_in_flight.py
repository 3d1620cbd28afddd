"""Saves in flight and completion markers (issue 9): every save a framework has under way, or
left behind by a crash, is found as an INCOMPLETE checkpoint at the step it will have, with its
size; a layout whose marker is written last is complete once the marker is there.

Names and markers as the frameworks write them (sources read: orbax-checkpoint 0.12.8
`_src/path/atomicity.py`, tensorflow 2.21 `python/checkpoint/functional_saver.py`,
transformers 5.25 `trainer_jit_checkpoint.py`, torch 2.13 `distributed/checkpoint/
filesystem.py`, lightning 2.6 `pytorch/callbacks/model_checkpoint.py`, NeMo 2
`lightning/pytorch/callbacks/model_checkpoint.py`); `tests/fixtures/frameworks/` holds trees
the real frameworks wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import Config, PolicyConfig, RootConfig
from daemon.discovery.scan import ScanResult, scan
from daemon.discovery.sizecache import SizeCache
from daemon.fsio import Dir, DirEntryLike, LocalFileSystem
from daemon.planner import plan_root
from daemon.safety import facts as proc_facts
from daemon.safety import guard
from daemon.safety.guard import RootRefused, SafetySettings
from policies.model import Checkpoint, Plan
from tests.layouts_fixtures import (
    age_all,
    dcp_checkpoint,
    hf_checkpoint,
    hf_run,
    lightning_checkpoint,
    nemo_checkpoint,
    orbax_checkpoint,
    orbax_tmp,
    tf_checkpoint,
    tf_temp_folder,
    tf_tracker,
    write_file,
)

KEEP_ONE = PolicyConfig(keep_last=1, tier2_count=0, tier3_interval=None)


def run_scan(root: Path, cache: SizeCache | None = None, **options: object) -> ScanResult:
    config = RootConfig(path=str(root), **options)  # type: ignore[arg-type]
    return scan(config, now=time.time(), settle_seconds=60, cache=cache)


def by_name(result: ScanResult) -> dict[str, Checkpoint]:
    return {checkpoint.name: checkpoint for checkpoint in result.checkpoints}


def files_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def plan_of(root: Path, policy: PolicyConfig = KEEP_ONE) -> Plan:
    config = RootConfig(path=str(root), policy=policy)
    _, plan = plan_root(Config(roots=[config]), config, now=time.time())
    return plan


# --- Orbax --------------------------------------------------------------------------------------


def test_an_orbax_012_temporary_folder_is_the_save_in_flight_at_its_step(tmp_path: Path) -> None:
    # orbax-checkpoint 0.12 names it `<step>.orbax-checkpoint-tmp`, no `-<timestamp>` after it:
    # invisible before, so the root did not wait for it and a crashed one was never cleaned.
    orbax_checkpoint(tmp_path, 100)
    orbax_checkpoint(tmp_path, 200, marker="commit_success.txt")
    saving = orbax_tmp(tmp_path, 300, age_seconds=None)
    result = run_scan(tmp_path)
    assert result.layout == "orbax"
    assert [(c.name, c.step, c.complete) for c in result.checkpoints] == [
        ("100", 100, True),
        ("200", 200, True),
        ("300.orbax-checkpoint-tmp", 300, False),
    ]
    in_flight = result.checkpoints[-1]
    assert in_flight.incomplete_reason == "orbax temporary folder (save in progress or interrupted)"
    assert in_flight.size_bytes == files_size(saving) > 2048


def test_an_orbax_save_cut_off_before_its_rename_stays_incomplete(tmp_path: Path) -> None:
    # finalize() writes commit_success.txt inside the temporary folder, then renames it: a kill
    # in between leaves every marker there, under the temporary name, for good.
    for step in (1, 2):
        orbax_checkpoint(tmp_path, step, prefix="step_")
    orbax_tmp(tmp_path, 3, prefix="step_", committed=True)
    orbax_tmp(tmp_path, 4, timestamp=True)  # the name older orbax versions wrote
    cache = SizeCache()
    for _ in range(2):  # walked, then (settled, yet never final) walked again, never cached
        found = by_name(run_scan(tmp_path, cache))
        assert found["step_3.orbax-checkpoint-tmp"].step == 3
        assert not found["step_3.orbax-checkpoint-tmp"].complete
        (older,) = [c for c in found.values() if c.step == 4]
        assert older.name.startswith("4.orbax-checkpoint-tmp-") and not older.complete
        assert found["step_2"].complete
    assert len(cache) == 2


# --- TensorFlow ---------------------------------------------------------------------------------


def test_a_tf_temp_folder_is_the_save_in_flight_at_its_step_and_never_deleted(
    tmp_path: Path,
) -> None:
    # TF writes `ckpt-3_temp/part-*` first; `ckpt-3.index` does not exist yet.
    for number in (1, 2):
        tf_checkpoint(tmp_path, number)
    tf_tracker(tmp_path, [1, 2])
    saving = tf_temp_folder(tmp_path, 3, age_seconds=None)
    result = run_scan(tmp_path)
    assert result.layout == "tf"
    assert [(c.name, c.step, c.complete, c.members) for c in result.checkpoints] == [
        ("ckpt-1", 1, True, ("ckpt-1.data-00000-of-00001", "ckpt-1.index")),
        ("ckpt-2", 2, True, ("ckpt-2.data-00000-of-00001", "ckpt-2.index")),
        ("ckpt-3_temp", 3, False, ("ckpt-3_temp",)),
    ]
    in_flight = result.checkpoints[-1]
    assert in_flight.incomplete_reason == (
        "TensorFlow temporary folder (save in progress or interrupted)"
    )
    assert in_flight.size_bytes == files_size(saving) == 4096 + 300
    # The policy counts it nowhere: ckpt-2 stays the newest, the save in flight is kept.
    decisions = {d.checkpoint.name: d for d in plan_of(tmp_path).decisions}
    assert decisions["ckpt-3_temp"].keep and decisions["ckpt-3_temp"].reasons[0].startswith(
        "incomplete:TensorFlow temporary folder"
    )
    assert "newest" in decisions["ckpt-2"].reasons
    assert not decisions["ckpt-1"].keep


def test_a_tf_save_while_merging_and_after_is_one_checkpoint_per_name(tmp_path: Path) -> None:
    tf_checkpoint(tmp_path, 1)
    tf_tracker(tmp_path, [1])
    tf_temp_folder(tmp_path, 2, age_seconds=None)
    # merge_v2_checkpoints has written ckpt-2.* and not yet removed the temp folder; the
    # tracker does not list ckpt-2 yet: two saves in flight at step 2, neither complete.
    tf_checkpoint(tmp_path, 2, age_seconds=None)
    merging = run_scan(tmp_path).checkpoints
    assert [(c.name, c.step, c.complete) for c in merging] == [
        ("ckpt-1", 1, True),
        ("ckpt-2", 2, False),
        ("ckpt-2_temp", 2, False),
    ]
    # A crashed save's leftover temp folder beside the later good save of the same step does
    # not make that save incomplete: each is its own checkpoint, the leftover alone goes.
    tf_tracker(tmp_path, [1, 2])
    found = by_name(run_scan(tmp_path))
    assert found["ckpt-2"].complete and not found["ckpt-2_temp"].complete


# --- Hugging Face JIT checkpoint ------------------------------------------------------------------


def test_an_hf_jit_save_keeps_its_sentinel_until_it_is_over(tmp_path: Path) -> None:
    # transformers' JIT checkpoint writes checkpoint-is-incomplete.txt, runs the whole normal
    # save (trainer_state.json included) and only then removes it: a kill in between leaves
    # both, long settled.
    hf_run(tmp_path, [100, 200])
    folder = hf_checkpoint(tmp_path, 300, jit_incomplete=True)
    assert (folder / "trainer_state.json").exists()
    cache = SizeCache()
    found = by_name(run_scan(tmp_path, cache))
    assert not found["checkpoint-300"].complete
    assert found["checkpoint-300"].incomplete_reason == (
        "checkpoint-is-incomplete.txt inside (save in progress or interrupted)"
    )
    assert found["checkpoint-300"].size_bytes == files_size(folder)
    assert len(cache) == 2  # never cached as final
    (folder / "checkpoint-is-incomplete.txt").unlink()
    assert by_name(run_scan(tmp_path, cache))["checkpoint-300"].complete


# --- torch.distributed.checkpoint -------------------------------------------------------------


def test_dcp_saves_in_checkpoint_folders_are_detected_as_dcp_and_pruned(tmp_path: Path) -> None:
    # `checkpoint-<N>/` holding `.metadata` + `*.distcp` looked like Hugging Face's and was
    # "incomplete: no trainer_state.json" forever: the root was never pruned.
    for step in range(100, 1100, 100):
        dcp_checkpoint(tmp_path, f"checkpoint-{step}")
    # In flight: `.metadata.tmp`, not yet renamed (recent, so no abandoned save either).
    dcp_checkpoint(tmp_path, "checkpoint-1100", complete=False, age_seconds=None)
    result = run_scan(tmp_path)
    assert result.layout == "dcp"
    assert [c.step for c in result.checkpoints if c.complete] == list(range(100, 1100, 100))
    assert by_name(result)["checkpoint-1100"].incomplete_reason == "no .metadata"
    plan = plan_of(tmp_path)
    assert {d.checkpoint.step for d in plan.deleted} == set(range(100, 1000, 100))


def test_an_hf_root_with_a_distcp_file_in_a_checkpoint_stays_hf(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200, 300])
    write_file(tmp_path / "checkpoint-300" / "__0_0.distcp", 100)
    dcp_like = tmp_path / "checkpoint-400"
    write_file(dcp_like / "__0_0.distcp", 100)  # no trainer_state.json: a save in progress
    result = run_scan(tmp_path)
    assert result.layout == "hf"
    assert by_name(result)["checkpoint-400"].incomplete_reason == "no trainer_state.json"


def test_dcp_without_collectives_is_complete_with_rank_zero_metadata(tmp_path: Path) -> None:
    # use_collectives=False: every rank writes `__<rank>.metadata`, and no `.metadata`.
    for step in (1, 2):
        dcp_checkpoint(tmp_path, f"step_{step}", collectives=False)
    dcp_checkpoint(tmp_path, "step_3", collectives=False, complete=False)
    result = run_scan(tmp_path)
    assert result.layout == "dcp"
    assert [(c.step, c.complete, c.incomplete_reason) for c in result.checkpoints] == [
        (1, True, None),
        (2, True, None),
        (3, False, "no .metadata"),
    ]


# --- Lightning and NeMo -------------------------------------------------------------------------


def test_a_second_lightning_run_makes_the_v1_file_the_newest(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    # Two runs into one folder: the second names its files `epoch=0-step=<s>-v1.ckpt`.
    for step in (1, 2, 3):
        lightning_checkpoint(tmp_path, 0, step)
    for step in (1, 2, 3):
        write_file(tmp_path / f"epoch=0-step={step}-v1.ckpt", 4096)
    age_all(tmp_path)
    result = subprocess.run(
        [*ckptd_command, "plan", str(tmp_path), "--json"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    newest = [c["name"] for c in document["checkpoints"] if "newest" in c["reasons"]]
    assert newest == ["epoch=0-step=3-v1.ckpt"]
    assert [c["name"] for c in document["checkpoints"]][-2:] == [
        "epoch=0-step=3.ckpt",
        "epoch=0-step=3-v1.ckpt",
    ]


def test_a_nemo_unfinished_marker_makes_its_checkpoint_incomplete(tmp_path: Path) -> None:
    # NeMo 2 touches `<name>-unfinished` beside the folder before saving and removes it once
    # the save is finalized; `<name>-last/` is a copy the resume picks, no series member.
    nemo_checkpoint(tmp_path, 3, val_loss=2.45)
    nemo_checkpoint(tmp_path, 6, val_loss=2.33, last=True)
    saving = nemo_checkpoint(tmp_path, 9, val_loss=2.2, unfinished=True)
    cache = SizeCache()
    result = run_scan(tmp_path, cache)
    assert result.layout == "lightning"
    assert [(c.step, c.complete) for c in result.checkpoints] == [(3, True), (6, True), (9, False)]
    assert result.checkpoints[-1].name == saving.name
    assert result.checkpoints[-1].incomplete_reason == (
        f"NeMo marker {saving.name}-unfinished beside it (save in progress or interrupted)"
    )
    assert result.checkpoints[0].metrics == {"val_loss": 2.45}
    (tmp_path / f"{saving.name}-unfinished").unlink()
    assert all(c.complete for c in run_scan(tmp_path, cache).checkpoints)
    # A marker appearing beside a checkpoint the cache holds as final is seen all the same.
    (tmp_path / f"{saving.name}-unfinished").touch()
    assert not by_name(run_scan(tmp_path, cache))[saving.name].complete


def test_a_nemo_marker_beside_a_lightning_file_names_it_without_ckpt(tmp_path: Path) -> None:
    lightning_checkpoint(tmp_path, 0, 100)
    lightning_checkpoint(tmp_path, 0, 200)
    (tmp_path / "epoch=0-step=200-unfinished").touch()
    found = by_name(run_scan(tmp_path))
    assert found["epoch=0-step=100.ckpt"].complete
    assert not found["epoch=0-step=200.ckpt"].complete
    assert len(found) == 2  # the marker itself is no checkpoint


# --- the root waits for a save in flight ----------------------------------------------------------


@pytest.fixture
def holder() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def _hold(path: Path) -> subprocess.Popen[bytes]:
    code = (
        "import sys, time; h = open(sys.argv[1], 'rb'); print('ready', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
    return process


@pytest.mark.parametrize("framework", ["tf", "orbax"])
def test_a_save_in_flight_held_by_the_trainer_makes_the_root_wait(
    tmp_path: Path, holder: list[subprocess.Popen[bytes]], framework: str
) -> None:
    if framework == "tf":
        for number in (1, 2, 3):
            tf_checkpoint(tmp_path, number)
        tf_tracker(tmp_path, [1, 2, 3])
        held = tf_temp_folder(tmp_path, 4, age_seconds=None)
        held = held / "part-00000-of-00001.data-00000-of-00001"
    else:
        for step in (1, 2, 3):
            orbax_checkpoint(tmp_path, step)
        held = orbax_tmp(tmp_path, 4, age_seconds=None) / "default" / "d" / "0f3c5b2a9e"
    settings = SafetySettings(min_keep=1, max_delete_fraction=1.0)
    # Nobody holds it: the older checkpoints go (the save in flight and the newest stay).
    unheld = proc_facts.gather_facts(str(tmp_path), now=time.time())
    assert {
        d.checkpoint.step for d in guard.guard(plan_of(tmp_path), unheld, settings).deleted
    } == {
        1,
        2,
    }
    holder.append(_hold(held))
    facts = proc_facts.gather_facts(str(tmp_path), now=time.time())
    with pytest.raises(RootRefused, match="holds the newest checkpoint"):
        guard.guard(plan_of(tmp_path), facts, settings)


# --- cost ---------------------------------------------------------------------------------------


class _CountingFileSystem(LocalFileSystem):
    """The real filesystem, noting every folder listed."""

    def __init__(self) -> None:
        super().__init__()
        self.listed: list[str] = []

    def scandir(self, path: str) -> Iterator[DirEntryLike]:
        self.listed.append(path)
        return super().scandir(path)

    def scandir_at(self, directory: Dir) -> Iterator[DirEntryLike]:
        self.listed.append(directory.path)  # the walk lists through descriptors
        return super().scandir_at(directory)


def test_a_rescan_of_an_unchanged_hf_root_lists_the_root_alone(tmp_path: Path) -> None:
    # Telling hf from dcp looks into folders; the cache's walks answer that on a rescan.
    hf_run(tmp_path, range(100, 1100, 100))
    fs = _CountingFileSystem()
    cache = SizeCache()
    config = RootConfig(path=str(tmp_path))
    first = scan(config, now=time.time(), settle_seconds=60, fs=fs, cache=cache)
    assert first.layout == "hf" and first.walked == 10
    fs.listed.clear()
    again = scan(config, now=time.time(), settle_seconds=60, fs=fs, cache=cache)
    assert again.layout == "hf" and again.walked == 0
    assert fs.listed == [str(tmp_path)]
