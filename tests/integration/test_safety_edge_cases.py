"""Defects found by the safety review of the deletion path, each pinned by a test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from daemon.config import Config, DefaultsConfig, RootConfig, TrashConfig
from daemon.discovery.sizecache import SizeCache
from daemon.history.log import HistoryLog, read_records
from daemon.pruning import deleter, pipeline, trash
from daemon.pruning.pipeline import root_lock
from daemon.safety import facts as proc_facts
from daemon.safety import guard
from policies.model import Checkpoint, Decision, Plan, PolicySpec
from tests.layouts_fixtures import age, age_all, hf_checkpoint, hf_run, tf_checkpoint, tf_tracker
from tests.sizes import tree_blocks


def _half_moved_tensorflow_checkpoint(root: Path) -> Path:
    """Given a root, leave it as a running prune has it mid-move of a TF checkpoint: the
    journal and the `.index` in the trash item, the data shard still in the root."""
    (root / "ckpt-1.data-00000-of-00001").write_bytes(b"d" * 1000)
    item = root / ".ckptd-trash" / "ckpt-1@1000"
    item.mkdir(parents=True)
    members = ["ckpt-1.index", "ckpt-1.data-00000-of-00001"]
    (item / ".ckptd-entry.json").write_text(json.dumps({"name": "ckpt-1", "members": members}))
    (item / "ckpt-1.index").write_bytes(b"i" * 10)
    return item


def _layout(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_disk_pressure_does_not_touch_the_trash_while_a_prune_moves_into_it(
    tmp_path: Path,
) -> None:
    # A prune (the CLI) is mid-move while the daemon's disk check empties the trash. Rolling
    # the half-moved item back and removing its folder races the prune's next rename into that
    # folder: a member moved in between is removed with the folder, and the checkpoint is left
    # under its name without its data. The trash belongs to whoever holds the root lock.
    item = _half_moved_tensorflow_checkpoint(tmp_path)
    with root_lock(str(tmp_path)) as acquired:
        assert acquired
        before = _layout(tmp_path)
        assert not trash.empty_trash(str(tmp_path))
        assert _layout(tmp_path) == before
    assert item.is_dir()


def test_trash_commands_refuse_while_a_prune_holds_the_root(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _half_moved_tensorflow_checkpoint(root)
    cli_env["XDG_STATE_HOME"] = str(tmp_path / "state")
    with root_lock(str(root)) as acquired:
        assert acquired
        before = _layout(root)
        for action in (["purge", "-y"], ["restore", "ckpt-1"]):
            done = subprocess.run(
                [*ckptd_command, "trash", *action, "--root", str(root)],
                env=cli_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 3, (action, done.stdout, done.stderr)
            assert "another prune" in done.stderr
            assert _layout(root) == before
    assert os.path.isdir(root / ".ckptd-trash" / "ckpt-1@1000")


def test_min_keep_counts_only_complete_survivors() -> None:
    # Three crashed saves (no trainer_state.json, never resumable) are kept as incomplete;
    # they must not stand in for the min_keep checkpoints a resume can fall back on.
    complete = [Checkpoint(name=f"checkpoint-{s}", step=s) for s in (100, 200, 300, 400, 500)]
    broken = [
        Checkpoint(name=f"checkpoint-{s}", step=s, complete=False, incomplete_reason="no state")
        for s in (150, 250, 350)
    ]
    decisions = [
        Decision(c, c.step == 500, ("tier1",) if c.step == 500 else ("tier3",)) for c in complete
    ]
    decisions += [Decision(c, True, ("incomplete",)) for c in broken]
    plan = Plan(root="/r", decisions=tuple(decisions))
    facts = proc_facts.Facts(root_path="/r", now=1e9)
    guarded = guard.guard(plan, facts, guard.SafetySettings(min_keep=3, force=True))
    kept_complete = sorted(d.checkpoint.step for d in guarded.kept if d.checkpoint.complete)
    assert kept_complete == [300, 400, 500]


def test_what_changes_while_the_prompt_waits_is_honoured(tmp_path: Path) -> None:
    # `ckptd prune` shows the plan and waits at [y/N]; the answer may come many minutes later.
    # Meanwhile the trainer saved checkpoint-6100 whose trainer_state.json names checkpoint-700
    # as the best model, and a colleague pinned checkpoint-1300. Deleting by the stale plan
    # breaks the trainer's load_best_model_at_end and ignores the pin.
    root = tmp_path / "run"
    hf_run(root, range(100, 6100, 100))
    config = Config(
        defaults=DefaultsConfig(trash=TrashConfig(grace=0), settle_seconds=60),
        roots=[RootConfig(path=str(root))],
    )
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
    config = Config(
        defaults=DefaultsConfig(trash=TrashConfig(grace=0), settle_seconds=60),
        roots=[RootConfig(path=str(root))],
    )
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
    config = Config(
        defaults=DefaultsConfig(trash=TrashConfig(grace=3600), settle_seconds=60),
        roots=[RootConfig(path=str(root)), RootConfig(path=str(tf_root))],
    )
    for root_config in config.roots:
        first = pipeline.prune_root(config, root_config, now=time.time(), dry_run=False)
        assert first.deleted and first.refused is None
        name = first.deleted[0]
        trash.restore(root_config.path, name)
        second = pipeline.prune_root(config, root_config, now=time.time(), dry_run=False)
        assert second.refused is None and name not in second.deleted
        kept = {d.checkpoint.name: d for d in second.plan.kept}
        assert ".keep" in kept[name].checkpoint.pinned_by


def test_a_file_opened_between_the_holder_check_and_the_rename_vetoes_the_removal(
    tmp_path: Path,
) -> None:
    # A trainer resuming opens checkpoint-200's weights just after the last-moment check and
    # just before the rename: it holds the file, by then inside the trash. The invariant "any
    # process holding a file inside the checkpoint vetoes its deletion" must still hold.
    root = tmp_path / "run"
    checkpoints = []
    for step in (100, 200, 300, 400):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.bin").write_bytes(b"m" * 5000)
        checkpoints.append(Checkpoint(name=folder.name, step=step, freeable_bytes=5000))
    decisions = [Decision(c, c.step > 300, ("tier1",)) for c in checkpoints]
    plan = Plan(root=str(root), decisions=tuple(decisions))
    reader: list[subprocess.Popen[str]] = []

    def check_then_open(root_path: str, entries: Iterable[str]) -> proc_facts.Facts:
        facts = proc_facts.recheck(root_path, entries)
        if not reader:
            reader.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        "import sys, time; handle = open(sys.argv[1], 'rb'); print('open', "
                        "flush=True); time.sleep(60)",
                        str(root / "checkpoint-200" / "model.bin"),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            assert reader[0].stdout is not None and reader[0].stdout.readline() == "open\n"
        return facts

    try:
        result = deleter.apply(
            plan, str(root), dry_run=False, now=time.time(), holders_check=check_then_open
        )
    finally:
        for process in reader:
            process.kill()
            process.wait()
    assert result.deleted == ("checkpoint-100", "checkpoint-300")
    assert [name for name, _ in result.vetoed] == ["checkpoint-200"]
    assert f"pid {reader[0].pid}" in result.vetoed[0][1]
    assert (root / "checkpoint-200" / "model.bin").read_bytes() == b"m" * 5000
    assert not (root / "checkpoint-100").exists() and not (root / "checkpoint-300").exists()
    assert trash.list_trash(str(root)) == []


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
    config = Config(
        defaults=DefaultsConfig(trash=TrashConfig(grace=0), settle_seconds=60),
        roots=[RootConfig(path=str(root))],
    )
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


def test_a_save_in_progress_refuses_the_root_even_below_a_crashed_higher_step(
    tmp_path: Path,
) -> None:
    # A run crashed while saving checkpoint-5000 (left incomplete) and was restarted from
    # checkpoint-900; it is writing checkpoint-1000 now. The stale 5000 has the highest step,
    # but the checkpoint being written is 1000: the root must be refused while the trainer holds
    # it. Once it lets go, the save that is merely settling only keeps itself (issue 9, point 3).
    root = tmp_path / "run"
    hf_run(root, range(100, 1000, 100))
    hf_checkpoint(root, 5000, complete=False)
    hf_checkpoint(root, 1000, complete=False, age_seconds=None)  # being written now
    config = Config(
        defaults=DefaultsConfig(trash=TrashConfig(grace=0), settle_seconds=60),
        roots=[RootConfig(path=str(root))],
    )
    spec = PolicySpec(keep_last=2, tier2_count=0, tier3_interval=None)
    written = next(path for path in (root / "checkpoint-1000").iterdir() if path.is_file())
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; f = open(sys.argv[1], 'ab'); sys.stdin.read()",
            str(written),
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 5
        while not proc_facts.holders_of(str(root), ["checkpoint-1000"]):
            assert time.monotonic() < deadline, "the trainer never opened its file"
            time.sleep(0.02)
        report = pipeline.prune_root(
            config, config.roots[0], now=time.time(), dry_run=False, policy_override=spec
        )
    finally:
        trainer.communicate("", timeout=5)
    assert report.refused is not None and "checkpoint-1000" in report.refused
    assert report.deleted == ()
    assert len([p for p in root.iterdir() if p.name.startswith("checkpoint-")]) == 11
    report = pipeline.prune_root(
        config, config.roots[0], now=time.time(), dry_run=False, policy_override=spec
    )
    assert report.refused is None
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))
    # keep_last 2, raised to min_keep 3: 700-900, and the save in flight; the crashed 5000,
    # quiet for an hour (abandoned_after) and held by nobody, went as an abandoned save.
    assert names == [f"checkpoint-{step}" for step in (1000, 700, 800, 900)]
    why = {d.checkpoint.name: d.reasons for d in report.plan.deleted}
    assert why["checkpoint-5000"] == ("abandoned-save",)
