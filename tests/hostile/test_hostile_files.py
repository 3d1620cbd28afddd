"""Issue 10: what a root's owner can put in it to break the daemon or its figures.

A FIFO where ckptd reads a marker or tracker; a 50 GB sparse file on an 8 MB filesystem; names
of 245 bytes and more; a checkpoint with a name that is not UTF-8 (or holds a newline) held
only by a memory map; the history on a full filesystem; ckptd as PID 1 of a container killed
during a snapshot. None of these needs a second user.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon.config import (
    Config,
    DiskConfig,
    RootConfig,
    SnapshotsConfig,
)
from daemon.fsio import LOCAL, READ_LIMIT, NotRegularFile, read_regular
from daemon.history.log import NULL_HISTORY, HistoryLog, read_records
from daemon.pruning import deleter, pipeline, trash
from daemon.safety import facts
from daemon.snapshots import daily
from policies.model import Checkpoint, Decision, Plan
from tests.configs import make_config, write_config
from tests.hostile.attacks import KEEP_NEWEST
from tests.layouts_fixtures import age_all, deepspeed_run, hf_run, lightning_checkpoint

pytestmark = pytest.mark.hostile


def prune(config: Config, **options: Any) -> pipeline.PruneReport:
    return pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False, **options)


# --- a FIFO where ckptd reads ------------------------------------------------------------------


def test_files_ckptd_reads_are_regular_files_read_up_to_a_cap(tmp_path: Path) -> None:
    outside = tmp_path / "secret.json"
    outside.write_text('{"best_model_checkpoint": "x"}')
    (tmp_path / "link.json").symlink_to(outside)
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "big.json").write_bytes(b"x" * (READ_LIMIT + 10))
    started = time.monotonic()
    with pytest.raises(NotRegularFile, match="FIFO"):
        LOCAL.read_bytes(str(tmp_path / "fifo.json"))  # a blocking open() would hang here
    with pytest.raises(OSError) as followed:
        LOCAL.read_bytes(str(tmp_path / "link.json"))
    assert followed.value.errno == errno.ELOOP
    with pytest.raises(NotRegularFile, match="folder"):
        read_regular(str(tmp_path))
    assert time.monotonic() - started < 5
    assert len(LOCAL.read_bytes(str(tmp_path / "big.json"))) == READ_LIMIT
    assert LOCAL.read_bytes(str(outside), 10) == b'{"best_mod'


def test_a_trainer_pid_file_that_is_a_fifo_does_not_hang_the_process_pass(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "trainer.pid")  # the pid file may lie in the root, hers
    started = time.monotonic()
    assert (
        facts.find_trainers([], pid_file=str(tmp_path / "trainer.pid"), cmdline_pattern=None)
        == frozenset()
    )
    (tmp_path / "real.pid").symlink_to(f"/proc/{os.getpid()}/stat")
    assert (
        facts.find_trainers([], pid_file=str(tmp_path / "real.pid"), cmdline_pattern=None)
        == frozenset()
    )
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("layout", ["hf", "deepspeed"])
def test_a_fifo_marker_or_tracker_neither_hangs_nor_stops_the_prune(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str], layout: str
) -> None:
    root = tmp_path / "run"
    if layout == "hf":
        hf_run(root, range(100, 600, 100))
        fifo = root / "checkpoint-500" / "trainer_state.json"
        older = root / "checkpoint-100"
    else:
        deepspeed_run(root, range(100, 600, 100))
        fifo = root / "latest"
        older = root / "global_step100"
    fifo.unlink()
    os.mkfifo(fifo)  # an open() for reading waits for a writer that never comes
    age_all(root)
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        layout=layout,
        **KEEP_NEWEST,
    )
    (tmp_path / "state").mkdir()
    result = subprocess.run(
        [*ckptd_command, "prune", "--config", str(config), "-y"],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    if layout == "hf":
        assert not older.exists()  # the other checkpoints were still pruned


# --- freed bytes are what the filesystem got back ---------------------------------------------


def test_a_sparse_file_frees_its_blocks_not_its_length(tmpfs: Any, tmp_path: Path) -> None:
    mount = tmpfs(8 * 1024 * 1024)
    root = mount / "run"
    hf_run(root, range(100, 300, 100))
    with open(root / "checkpoint-100" / "huge.bin", "wb") as handle:
        handle.truncate(50_000_000_000)
        handle.seek(1 << 20)
        handle.write(os.urandom(98_304))
    age_all(root)
    before = os.statvfs(mount)
    history = HistoryLog(str(tmp_path / "history.jsonl"))
    report = prune(make_config([root], layout="hf", grace=0, **KEEP_NEWEST), history=history)
    history.close()
    after = os.statvfs(mount)
    came_back = (after.f_bfree - before.f_bfree) * after.f_frsize
    assert report.deleted == ("checkpoint-100",)
    (record,) = [r for r in read_records(history.path) if r["event"] == "delete"]
    assert record["bytes_freed"] == came_back == report.bytes_freed
    assert 98_304 <= came_back < 8 * 1024 * 1024
    assert record["bytes_logical"] > 50_000_000_000  # the length, shown apart
    (run,) = [r for r in read_records(history.path) if r["event"] == "prune_run"]
    assert run["bytes_freed"] == came_back and run["bytes_logical"] == record["bytes_logical"]


# --- long names --------------------------------------------------------------------------------


def test_checkpoint_names_of_up_to_255_bytes_are_deleted_and_restored(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    names = []
    for step in (100, 200, 300, 400):
        prefix = f"epoch=0-step={step}-"
        padding = "val_loss=0.123456789-" * 20
        long = f"{prefix}{padding}"[: 255 - len(".ckpt")] + ".ckpt"
        assert len(long.encode()) == 255
        lightning_checkpoint(root, 0, step, metrics={"x": 1})
        os.rename(root / f"epoch=0-step={step}-x=1.ckpt", root / long)
        names.append(long)
    age_all(root)
    config = make_config([root], layout="lightning", grace=3600, **KEEP_NEWEST)
    report = prune(config)
    assert report.failed == () and sorted(report.deleted) == sorted(names[:3])
    assert sorted(item.name for item in trash.list_trash(str(root))) == sorted(names[:3])
    # Back under its full name; `<name>.keep` would pass the name limit, so it says so.
    restored = trash.restore_pinned(str(root), names[0])
    assert (root / names[0]).is_file() and restored.pin is None
    assert restored.problem is not None and "protect" in restored.problem
    purged = trash.purge(str(root), now=time.time(), grace=0, everything=True)
    assert sorted(purged.removed) == sorted(names[1:3]) and purged.failed == ()
    assert [p.name for p in (root / ".ckptd-trash").iterdir() if p.name != ".lock"] == []


# --- a name that is not UTF-8, held only by a memory map ---------------------------------------

# Python's mmap keeps a duplicate of the descriptor open; libc's mmap(2) keeps only the map.
MAP_AND_WAIT = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
)
descriptor = os.open(os.fsencode(sys.argv[1]), os.O_RDONLY)
address = libc.mmap(None, 8192, 1, 1, descriptor, 0)  # PROT_READ, MAP_SHARED
assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
os.close(descriptor)  # held by the map alone now
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("raw", [b"run-\xff\xfe-200", b"run-\n-200"], ids=["latin1", "newline"])
def test_a_checkpoint_held_only_by_a_memory_map_is_vetoed_whatever_its_name(
    tmp_path: Path, raw: bytes
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    name = os.fsdecode(raw)
    (root / name).mkdir()
    (root / name / "weights.bin").write_bytes(b"w" * 8192)
    (root / "run-300").mkdir()
    (root / "run-300" / "weights.bin").write_bytes(b"w" * 8192)
    holder = subprocess.Popen(
        [sys.executable, "-c", MAP_AND_WAIT, os.fsencode(root / name / "weights.bin")],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
        plan = Plan(
            root=str(root),
            decisions=tuple(
                Decision(Checkpoint(name=entry, step=step), False, ("r",))
                for entry, step in ((name, 200), ("run-300", 300))
            ),
        )
        result = deleter.apply(plan, str(root), dry_run=False, now=time.time())
    finally:
        holder.kill()
        holder.wait()
    assert result.deleted == ("run-300",)
    ((vetoed, reason),) = result.vetoed
    assert vetoed == name and reason.startswith(f"in-use:pid {holder.pid}")
    assert (root / name / "weights.bin").exists()


# --- the history on a full filesystem ----------------------------------------------------------


def test_history_records_are_written_whole_or_not_at_all_on_a_full_disk(tmpfs: Any) -> None:
    mount = tmpfs(256 * 1024)
    path = mount / "history.jsonl"
    history = HistoryLog(str(path))
    history.write("first", pad="x" * 200)  # the file's first page, partly used
    filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(filler, b"f" * 4096):
            pass
    except OSError:
        pass  # full
    finally:
        os.close(filler)
    attempts = 1
    while history.dropped == 0:
        attempts += 1
        history.write("record", number=attempts, pad="y" * 300)
        assert attempts < 100
    history.write("also dropped", pad="z" * 300)
    os.unlink(mount / "filler")  # space again
    history.write("after", pad="a" * 50)
    history.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a whole line
    parsed = [json.loads(line) for line in lines[:-1]]  # every line a whole record
    assert [r["event"] for r in parsed] == ["first"] + ["record"] * (attempts - 2) + ["after"]
    assert history.dropped == 2


def test_a_half_line_left_in_the_history_is_ended_before_the_next_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.jsonl"
    path.write_bytes(b'{"time":"x","event":"cut short","fi')
    with HistoryLog(str(path)) as history:
        history.write("next")
    assert [r["event"] for r in read_records(str(path))] == ["next"]


# --- ckptd as PID 1 of a container, killed during a snapshot -----------------------------------


def test_a_leftover_snapshot_folder_with_our_own_pid_is_removed_and_retaken(
    tmp_path: Path,
) -> None:
    now = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)
    root = tmp_path / "run"
    hf_run(root, range(100, 300, 100))
    age_all(root, now=now.timestamp())
    snaps = tmp_path / "snaps"
    # What the previous ckptd, PID 1 like this one after the restart, left when killed.
    leftover = snaps / f".tmp-2026-06-01-{os.getpid()}"
    (leftover / "run" / "checkpoint-200").mkdir(parents=True)
    (leftover / "run" / "checkpoint-200" / "half.bin").write_bytes(b"x" * 100)
    config = Config(
        timezone="UTC",
        roots=[RootConfig(path=str(root), layout="hf")],
        snapshots=SnapshotsConfig(dir=str(snaps)),
        disk=DiskConfig(critical_percent=100),
    )
    report = daily.run_daily_snapshot(config, now=now, history=NULL_HISTORY)
    assert report.status == "done", report.reason
    assert (snaps / "2026-06-01").is_dir()
    assert not leftover.exists()
