"""The daily snapshot on real filesystems: layout, once per date, methods, keep, faults."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.config import Config, DiskConfig
from daemon.history.log import NULL_HISTORY, History, HistoryLog
from daemon.snapshots import daily, verify
from daemon.snapshots.plan import FileItem
from tests.configs import DAILY, make_config
from tests.layouts_fixtures import well_formed_bytes

NOW = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)


class RecordingHistory(HistoryLog):
    """The history, kept in memory so a test can read what was recorded."""

    def __init__(self) -> None:
        super().__init__("/nonexistent/history.jsonl")
        self.records: list[dict[str, object]] = []

    def write(self, event: str, **fields: object) -> None:
        self.records.append({"event": event, **fields})

    def events(self) -> list[str]:
        return [str(record["event"]) for record in self.records]


def write_hf_checkpoint(root: Path, step: int, *, size: int = 64 * 1024, files: int = 2) -> Path:
    """Given a root and a step, write a complete Hugging Face checkpoint of random data (in
    well-formed files: ckptd never snapshots a checkpoint its integrity check calls corrupt)."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for index in range(files):
        shard = f"shard-{index}.safetensors"
        (folder / shard).write_bytes(well_formed_bytes(shard, size, random=True))
    # A mutable file inside.
    (folder / "last.pt").write_bytes(well_formed_bytes("last.pt", 1024, random=True))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    # Written an hour before NOW: settled, so discovery counts it complete.
    moment = NOW.timestamp() - 3600 + step / 1000
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (moment, moment))
    return folder


def run(config: Config, history: History = NULL_HISTORY, **options: object) -> daily.SnapshotReport:
    return daily.run_daily_snapshot(
        config,
        now=NOW,
        history=history,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "run-a"
    for step in (100, 200, 300):
        write_hf_checkpoint(folder, step)
    # An incomplete one, newer: never snapshotted.
    (folder / "checkpoint-400").mkdir()
    (folder / "checkpoint-400" / "shard-0.safetensors").write_bytes(b"partial")
    return folder


def test_latest_scope_takes_the_newest_complete_checkpoint(root: Path, tmp_path: Path) -> None:
    history = RecordingHistory()
    config = make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY)
    report = run(config, history, method="copy")
    assert report.status == "done", report
    target = tmp_path / "snaps" / "2026-06-01" / "run-a"
    assert sorted(os.listdir(target)) == ["checkpoint-300"]
    for name in os.listdir(root / "checkpoint-300"):
        assert (target / "checkpoint-300" / name).read_bytes() == (
            root / "checkpoint-300" / name
        ).read_bytes()
    manifest = json.loads((tmp_path / "snaps" / "2026-06-01" / "MANIFEST.json").read_text())
    paths = {record["path"]: record for record in manifest["files"]}
    assert set(paths) == {
        "run-a/checkpoint-300/shard-0.safetensors",
        "run-a/checkpoint-300/shard-1.safetensors",
        "run-a/checkpoint-300/last.pt",
        "run-a/checkpoint-300/trainer_state.json",
    }
    shard = root / "checkpoint-300" / "shard-0.safetensors"
    import hashlib

    assert (
        paths["run-a/checkpoint-300/shard-0.safetensors"]["sha256"]
        == hashlib.sha256(shard.read_bytes()).hexdigest()
    )
    assert paths["run-a/checkpoint-300/shard-0.safetensors"]["size"] == shard.stat().st_size
    assert history.events() == ["snapshot"]
    assert not [n for n in os.listdir(tmp_path / "snaps") if n.startswith(".tmp")]


def test_one_snapshot_per_date_never_two(root: Path, tmp_path: Path) -> None:
    config = make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY)
    first = run(config, method="copy")
    write_hf_checkpoint(root, 500)
    second = run(config, method="copy")
    assert first.status == "done"
    assert second.status == "exists"
    assert os.listdir(tmp_path / "snaps" / "2026-06-01" / "run-a") == ["checkpoint-300"]


def test_at_start_up_before_the_scheduled_time_it_is_not_due(root: Path, tmp_path: Path) -> None:
    config = make_config([root], snapshots={"dir": tmp_path / "snaps", "at": "04:00"}, **DAILY)
    early = daily.run_daily_snapshot(config, now=NOW, history=NULL_HISTORY)
    assert early.status == "not_due" and early.ok
    assert not (tmp_path / "snaps" / "2026-06-01").exists()
    by_hand = daily.run_daily_snapshot(
        config, now=NOW, history=NULL_HISTORY, force=True, method="copy"
    )
    assert by_hand.status == "done"


@pytest.fixture
def machine_in_berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local zone is Europe/Berlin (as `TZ` sets it for libc and tzlocal)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


# 03:00 in Berlin in summer (CEST) and in winter (CET): whichever the season of the test run,
# a zone fixed at today's offset gets one of them an hour wrong.
BERLIN_03_00 = ["2026-07-15T03:00:00+02:00", "2026-10-26T03:00:00+01:00"]


@pytest.mark.parametrize("three", BERLIN_03_00)
def test_with_the_machines_zone_the_snapshot_runs_at_03_00_local_in_summer_and_winter(
    root: Path, tmp_path: Path, machine_in_berlin: None, three: str
) -> None:
    config = make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY).model_copy(
        update={"timezone": None}
    )
    at = datetime.fromisoformat(three)
    day = three[:10]
    early = daily.run_daily_snapshot(config, now=at - timedelta(minutes=1), history=NULL_HISTORY)
    assert early.status == "not_due" and early.date == day
    on_time = daily.run_daily_snapshot(config, now=at, history=NULL_HISTORY, method="copy")
    assert on_time.status == "done" and on_time.date == day
    assert (tmp_path / "snaps" / day / "run-a" / "checkpoint-300").is_dir()


@pytest.mark.parametrize("three", BERLIN_03_00)
def test_status_shows_the_next_snapshot_at_03_00_local_in_summer_and_winter(
    root: Path, tmp_path: Path, machine_in_berlin: None, three: str
) -> None:
    from daemon.commands.status import schedule_status

    config = make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY).model_copy(
        update={"timezone": None, "state_dir": str(tmp_path / "state")}
    )
    at = datetime.fromisoformat(three)
    noon_before = at - timedelta(hours=15)
    (tmp_path / "snaps" / noon_before.date().isoformat()).mkdir(parents=True)  # taken already
    upcoming = schedule_status(config, now=noon_before.timestamp())["next"]["snapshot"]
    assert datetime.fromisoformat(upcoming) == at
    assert upcoming == at.astimezone(UTC).isoformat()


def test_scope_all_takes_every_kept_complete_checkpoint(root: Path, tmp_path: Path) -> None:
    config = make_config([root], snapshots={"dir": tmp_path / "snaps", "scope": "all"}, **DAILY)
    assert run(config, method="copy").status == "done"
    assert sorted(os.listdir(tmp_path / "snaps" / "2026-06-01" / "run-a")) == [
        "checkpoint-100",
        "checkpoint-200",
        "checkpoint-300",
    ]


def test_two_roots_with_the_same_folder_name_do_not_collide(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
    write_hf_checkpoint(first, 1)
    write_hf_checkpoint(second, 2)
    config = make_config([first, second], snapshots={"dir": tmp_path / "snaps"}, **DAILY)
    assert run(config, method="copy").status == "done"
    assert sorted(os.listdir(tmp_path / "snaps" / "2026-06-01")) == [
        "MANIFEST.json",
        "run",
        "run-2",
    ]


def test_auto_on_one_filesystem_links_write_once_files_but_never_mutable_ones(
    root: Path, tmp_path: Path
) -> None:
    config = make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY)
    report = run(config)
    assert report.status == "done"
    source = root / "checkpoint-300"
    target = tmp_path / "snaps" / "2026-06-01" / "run-a" / "checkpoint-300"
    shard_shared = (source / "shard-0.safetensors").stat().st_ino == (
        target / "shard-0.safetensors"
    ).stat().st_ino
    # Either a reflink (own inode, shared blocks) or a hard link (same inode): never a copy.
    assert report.by_method.get("copy", 0) == 1, report.by_method
    assert shard_shared or report.by_method.get("reflink")
    # last.pt is rewritten in place by trainers: its own inode, its own bytes.
    assert (source / "last.pt").stat().st_ino != (target / "last.pt").stat().st_ino
    assert (target / "last.pt").read_bytes() == (source / "last.pt").read_bytes()
    (source / "last.pt").write_bytes(b"rewritten by the trainer")
    assert (target / "last.pt").read_bytes() != b"rewritten by the trainer"


def test_keep_removes_the_oldest_date_folders(root: Path, tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    for day in ("2026-05-28", "2026-05-29", "2026-05-30", "2026-05-31"):
        (snaps / day / "run-a").mkdir(parents=True)
    # A link to somewhere else inside an old snapshot: removal must not follow it.
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keepme").write_text("x")
    (snaps / "2026-05-28" / "link").symlink_to(outside)
    history = RecordingHistory()
    config = make_config([root], snapshots={"dir": snaps, "keep": 3}, **DAILY)
    report = run(config, history, method="copy")
    assert report.status == "done"
    assert report.removed == ("2026-05-28", "2026-05-29")
    assert sorted(os.listdir(snaps)) == [".ckptd-trash", "2026-05-30", "2026-05-31", "2026-06-01"]
    assert os.listdir(snaps / ".ckptd-trash") == []
    assert (outside / "keepme").exists()
    assert history.events().count("snapshot_removed") == 2


def test_a_snapshot_that_would_pass_critical_is_skipped_not_started(
    root: Path, tmp_path: Path
) -> None:
    history = RecordingHistory()
    config = make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY).model_copy(
        update={"disk": DiskConfig(critical_percent=0.001)}
    )
    report = run(config, history, method="copy")
    assert report.status == "skipped"
    assert "critical" in (report.reason or "")
    assert history.events() == ["snapshot_skipped"]
    assert os.listdir(tmp_path / "snaps") == []


def test_leftover_temporary_folder_of_a_dead_process_is_removed(root: Path, tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    dead = subprocess.run(["true"], check=True)  # noqa: F841 - a pid that is gone now
    leftover = snaps / ".tmp-2026-05-31-999999999"
    leftover.mkdir(parents=True)
    (leftover / "half").write_bytes(b"x")
    assert (
        run(make_config([root], snapshots={"dir": snaps}, **DAILY), method="copy").status == "done"
    )
    assert not leftover.exists()


def test_source_pruned_away_in_the_middle_abandons_the_snapshot(root: Path, tmp_path: Path) -> None:
    history = RecordingHistory()
    config = make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY)
    placed: list[str] = []

    def prune_source_midway(item: FileItem) -> None:
        if item.kind == "file":
            placed.append(item.relative)
        if len(placed) == 2 and (root / "checkpoint-300").exists():
            # What pruning does: one rename into the trash, then removal.
            trash = root / ".ckptd-trash"
            trash.mkdir(exist_ok=True)
            os.rename(root / "checkpoint-300", trash / "checkpoint-300")
            shutil.rmtree(trash / "checkpoint-300")

    report = run(config, history, method="copy", between_files=prune_source_midway)
    assert report.status == "failed"
    assert "vanished" in (report.reason or ""), report.reason
    assert history.events() == ["snapshot_failed"]
    assert os.listdir(tmp_path / "snaps") in ([], [".ckptd-trash"])
    assert not os.path.exists(tmp_path / "snaps" / "2026-06-01")


def test_verify_reports_missing_extra_size_and_checksum(root: Path, tmp_path: Path) -> None:
    config = make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY)
    assert run(config, method="copy").status == "done"
    path = verify.resolve_snapshot(str(tmp_path / "snaps"), "latest")
    clean = verify.verify_snapshot(path)
    assert clean.ok and clean.checked == 4
    checkpoint = Path(path) / "run-a" / "checkpoint-300"
    (checkpoint / "trainer_state.json").unlink()
    (checkpoint / "stray.bin").write_bytes(b"stray")
    (checkpoint / "last.pt").write_bytes(b"short")
    shard = checkpoint / "shard-0.safetensors"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = verify.verify_snapshot(path)
    assert not result.ok
    assert result.missing == ("run-a/checkpoint-300/trainer_state.json",)
    assert result.extra == ("run-a/checkpoint-300/stray.bin",)
    assert [line.split(":")[0] for line in result.size] == ["run-a/checkpoint-300/last.pt"]
    assert [line.split(":")[0] for line in result.checksum] == [
        "run-a/checkpoint-300/shard-0.safetensors"
    ]


def test_verify_seals_linked_files_then_catches_a_rewrite(root: Path, tmp_path: Path) -> None:
    config = make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY)
    report = run(config, method="hardlink")
    assert report.status == "done"
    assert report.by_method == {"hardlink": 3, "copy": 1}
    path = verify.resolve_snapshot(str(tmp_path / "snaps"), "2026-06-01")
    first = verify.verify_snapshot(path)
    assert first.ok and first.sealed == 3
    manifest = json.loads((Path(path) / "MANIFEST.json").read_text())
    assert all(record["sha256"] for record in manifest["files"])
    second = verify.verify_snapshot(path)
    assert second.ok and second.sealed == 0
    # Flipping a byte of the shared inode (bit rot, or someone writing into the checkpoint).
    shard = root / "checkpoint-300" / "shard-1.safetensors"
    with open(shard, "r+b") as handle:
        handle.seek(10)
        byte = handle.read(1)
        handle.seek(10)
        handle.write(bytes([byte[0] ^ 1]))
    third = verify.verify_snapshot(path)
    assert [line.split(":")[0] for line in third.checksum] == [
        "run-a/checkpoint-300/shard-1.safetensors"
    ]


def test_explicit_hardlink_across_filesystems_is_a_clear_failure(
    root: Path, tmpfs: Callable[[int], Path]
) -> None:
    mount = tmpfs(4 << 20)
    history = RecordingHistory()
    report = run(
        make_config([root], snapshots={"dir": mount / "snaps"}, **DAILY), history, method="hardlink"
    )
    assert report.status == "failed"
    assert "another filesystem" in (report.reason or "")
    assert history.events() == ["snapshot_failed"]


def test_explicit_reflink_where_unsupported_is_a_clear_failure(
    root: Path, tmpfs: Callable[[int], Path]
) -> None:
    mount = tmpfs(4 << 20)
    report = run(make_config([root], snapshots={"dir": mount / "snaps"}, **DAILY), method="reflink")
    assert report.status == "failed"
    assert "reflink" in (report.reason or "") and "cannot clone" in (report.reason or "")


def test_disk_full_in_the_middle_of_a_copy_abandons_the_snapshot(
    tmp_path: Path, tmpfs: Callable[[int], Path]
) -> None:
    mount = tmpfs(16 << 20)
    root = tmp_path / "big-run"
    write_hf_checkpoint(root, 100, size=5 << 20, files=2)  # 10 MB: fits when planned
    history = RecordingHistory()
    config = make_config([root], snapshots={"dir": mount / "snaps"}, **DAILY)
    filler = mount / "another-writer.bin"

    def someone_else_fills_the_disk(item: FileItem) -> None:
        # After the first shard is in, another writer takes all but 1 MB: the next shard
        # (5 MB) runs into ENOSPC in the middle of its copy.
        if item.relative.endswith("shard-1.safetensors") and not filler.exists():
            free = shutil.disk_usage(mount).free
            filler.write_bytes(os.urandom(free - (1 << 20)))

    report = run(config, history, method="copy", between_files=someone_else_fills_the_disk)
    assert report.status == "failed"
    assert "disk full" in (report.reason or ""), report.reason
    assert history.events() == ["snapshot_failed"]
    assert not (mount / "snaps" / "2026-06-01").exists()
    assert [n for n in os.listdir(mount / "snaps") if n != ".ckptd-trash"] == []
    assert os.listdir(mount / "snaps" / ".ckptd-trash") == []
    # Everything the snapshot wrote was given back.
    filler.unlink()
    assert shutil.disk_usage(mount).used < 1 << 20
    # And the next attempt, with room again, succeeds.
    assert run(config, history, method="copy").status == "done"


def test_stop_mid_snapshot_abandons_it(root: Path, tmp_path: Path) -> None:
    import threading

    stop = threading.Event()
    history = RecordingHistory()

    def shutdown_requested(item: FileItem) -> None:
        if item.kind == "file":
            stop.set()  # SIGTERM arrives while the first file is being placed

    report = run(
        make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY),
        history,
        method="copy",
        stop=stop,
        between_files=shutdown_requested,
    )
    assert report.status == "stopped"
    assert history.events() == ["snapshot_failed"]
    assert not (tmp_path / "snaps" / "2026-06-01").exists()
    assert [n for n in os.listdir(tmp_path / "snaps") if n.startswith(".tmp")] == []


def test_symlinks_inside_a_checkpoint_stay_links(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(os.urandom(4096))
    (root / "checkpoint-300" / "tokenizer.json").symlink_to(outside)
    settled = NOW.timestamp() - 3600
    os.utime(root / "checkpoint-300" / "tokenizer.json", (settled, settled), follow_symlinks=False)
    os.utime(root / "checkpoint-300", (settled, settled))
    report = run(make_config([root], snapshots={"dir": tmp_path / "snaps"}, **DAILY), method="copy")
    assert report.status == "done"
    link = tmp_path / "snaps" / "2026-06-01" / "run-a" / "checkpoint-300" / "tokenizer.json"
    assert link.is_symlink() and os.readlink(link) == str(outside)
    assert verify.verify_snapshot(str(tmp_path / "snaps" / "2026-06-01")).ok


def test_a_missing_root_does_not_cost_the_others_their_snapshot(root: Path, tmp_path: Path) -> None:
    config = make_config([tmp_path / "gone", root], snapshots={"dir": tmp_path / "snaps"}, **DAILY)
    report = run(config, method="copy")
    assert report.status == "done"
    assert report.checkpoints == ("run-a/checkpoint-300",)
    assert len(report.errors) == 1 and "gone" in report.errors[0]


def test_the_critical_estimate_counts_copies_not_links(
    tmp_path: Path, tmpfs: Callable[[int], Path]
) -> None:
    mount = tmpfs(16 << 20)
    root = mount / "run"
    write_hf_checkpoint(root, 100, size=3 << 20, files=2)  # 6 MB: 37.5 % used
    config = make_config([root], snapshots={"dir": mount / "snaps"}, **DAILY).model_copy(
        update={"disk": DiskConfig(critical_percent=50)}
    )
    history = RecordingHistory()
    copied = run(config, history, method="copy")  # would write 6 MB more: 75 %
    assert copied.status == "skipped" and "to 75.1% used" in (copied.reason or "")
    linked = run(config, history, method="hardlink")  # writes (almost) nothing
    assert linked.status == "done", linked.reason
    assert linked.by_method == {"hardlink": 3, "copy": 1}  # last.pt (1 KB) is copied
    assert history.events() == ["snapshot_skipped", "snapshot"]
