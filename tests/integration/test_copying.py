"""The placement primitives on real filesystems: reflink on loop-mounted XFS, links, copies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.config import Config, DefaultsConfig, DiskConfig, RootConfig, SnapshotsConfig
from daemon.history.log import NULL_HISTORY
from daemon.snapshots import copying, daily, verify


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A small reflink-capable XFS on a loop device (skipped where that cannot be had)."""
    if os.geteuid() != 0:
        pytest.skip("loop-mounting XFS needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is missing (apt-get install xfsprogs)")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as handle:
        handle.truncate(320 << 20)  # sparse: costs nothing until written; XFS needs >= 300 MB
    made = _run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)])
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.strip()}")
    mount_point = tmp_path / "xfs"
    mount_point.mkdir()
    mounted = _run(["mount", "-o", "loop", str(image), str(mount_point)])
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount XFS: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        _run(["umount", str(mount_point)])


def shared_extents(path: Path) -> bool:
    """Given a file, return whether filefrag reports any of its extents as shared."""
    if shutil.which("filefrag") is None:
        pytest.skip("filefrag is missing (e2fsprogs)")
    output = _run(["filefrag", "-v", str(path)]).stdout
    return any("shared" in line for line in output.splitlines()[3:])


def test_reflink_on_xfs_shares_blocks_and_copies_on_write(xfs: Path) -> None:
    source = xfs / "model.safetensors"
    data = os.urandom(3 << 20)
    source.write_bytes(data)
    os.sync()
    clone = xfs / "clone.safetensors"
    copying.reflink(str(source), str(clone))
    assert clone.read_bytes() == data
    assert clone.stat().st_ino != source.stat().st_ino
    os.sync()
    assert shared_extents(clone) and shared_extents(source)
    assert clone.stat().st_mtime_ns == source.stat().st_mtime_ns
    # A rewrite of the source does not reach the clone (copy on write).
    with open(source, "r+b") as handle:
        handle.write(b"\0" * 4096)
    assert clone.read_bytes() == data


def test_reflink_where_unsupported_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "a.bin"
    source.write_bytes(b"x" * 10000)
    target = tmp_path / "b.bin"
    filesystem = _run(["stat", "-f", "-c", "%T", str(tmp_path)]).stdout.strip()
    if filesystem in ("xfs", "btrfs"):
        pytest.skip(f"{tmp_path} is on {filesystem}, which can reflink")
    with pytest.raises(copying.ReflinkUnsupported):
        copying.reflink(str(source), str(target))
    assert not target.exists()


def test_copy_file_is_a_faithful_independent_copy(tmp_path: Path) -> None:
    source = tmp_path / "a.bin"
    data = os.urandom((8 << 20) + 123)  # more than one chunk
    source.write_bytes(data)
    os.chmod(source, 0o640)
    seen: list[int] = []
    written = copying.copy_file(str(source), str(tmp_path / "b.bin"), on_bytes=seen.append)
    copy = tmp_path / "b.bin"
    assert written == len(data) == sum(seen)
    assert copy.read_bytes() == data
    assert copy.stat().st_ino != source.stat().st_ino
    assert (copy.stat().st_mode & 0o777) == 0o640
    assert copy.stat().st_mtime_ns == source.stat().st_mtime_ns
    assert copying.sha256_file(str(copy)) == copying.sha256_file(str(source))


def test_copy_file_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    with pytest.raises(FileExistsError):
        copying.copy_file(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"b"


def test_hardlink_across_filesystems_is_refused_clearly(tmp_path: Path) -> None:
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    (tmp_path / "a").write_bytes(b"a")
    target = f"/dev/shm/ckptd-test-{os.getpid()}"
    with pytest.raises(copying.HardlinkUnsupported):
        copying.hardlink(str(tmp_path / "a"), target)
    assert not os.path.exists(target)


@pytest.mark.parametrize(
    ("requested", "mutable", "complete", "reflink_works", "same", "expected"),
    [
        ("auto", False, True, True, True, "reflink"),
        ("auto", True, True, True, True, "reflink"),  # a clone is safe for rewritten files
        ("auto", False, True, False, True, "hardlink"),
        ("auto", True, True, False, True, "copy"),  # never hard-link a mutable file
        ("auto", False, False, False, True, "copy"),  # nor a file of an incomplete checkpoint
        ("auto", False, True, False, False, "copy"),  # another filesystem
        ("hardlink", False, True, True, True, "hardlink"),
        ("hardlink", True, True, True, True, "copy"),
        ("copy", False, True, True, True, "copy"),
        ("reflink", True, True, True, True, "reflink"),
    ],
)
def test_choose_method(
    requested: copying.Requested,
    mutable: bool,
    complete: bool,
    reflink_works: bool,
    same: bool,
    expected: str,
) -> None:
    assert (
        copying.choose_method(
            requested,
            mutable=mutable,
            complete=complete,
            reflink_works=reflink_works,
            same_filesystem=same,
        )
        == expected
    )


def test_is_mutable_matches_names_and_paths() -> None:
    globs = ["last.pt", "best.pt", "last.ckpt", "optimizer/*.tmp"]
    assert copying.is_mutable("checkpoint-5/last.pt", globs)
    assert copying.is_mutable("last.ckpt", globs)
    assert copying.is_mutable("optimizer/a.tmp", globs)
    assert not copying.is_mutable("checkpoint-5/model.safetensors", globs)


def test_snapshot_in_auto_mode_on_xfs_reflinks_everything(xfs: Path) -> None:
    root = xfs / "run"
    checkpoint = root / "checkpoint-7"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(os.urandom(2 << 20))
    (checkpoint / "last.pt").write_bytes(os.urandom(1 << 20))
    (checkpoint / "trainer_state.json").write_text("{}")
    os.sync()

    config = Config(
        timezone="UTC",
        defaults=DefaultsConfig(settle_seconds=0),
        roots=[RootConfig(path=str(root), layout="hf")],
        snapshots=SnapshotsConfig(dir=str(xfs / "snapshots")),
        disk=DiskConfig(critical_percent=100),
    )
    now = datetime.now(UTC) + timedelta(seconds=1)
    report = daily.run_daily_snapshot(config, now=now, history=NULL_HISTORY, force=True)
    day = now.date().isoformat()
    assert report.status == "done", report
    assert report.by_method == {"reflink": 3}
    assert report.bytes_written == 0
    target = xfs / "snapshots" / day / "run" / "checkpoint-7"
    os.sync()
    assert shared_extents(target / "model.safetensors")
    assert (target / "last.pt").stat().st_ino != (checkpoint / "last.pt").stat().st_ino
    manifest = json.loads((xfs / "snapshots" / day / "MANIFEST.json").read_text())
    assert {record["method"] for record in manifest["files"]} == {"reflink"}
    assert verify.verify_snapshot(str(target.parent.parent)).ok


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 16) * 3, (1 << 16) * 3 + 17])
def test_sha256_in_mapped_windows_matches_hashlib(
    tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    monkeypatch.setattr(copying, "HASH_WINDOW", 1 << 16)  # several windows, a ragged end
    path = tmp_path / "data.bin"
    data = os.urandom(size)
    path.write_bytes(data)
    assert copying.sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
