"""The snapshot against a root's owner racing it: sources swapped between planning and placing.

ckptd runs as root; the owner of a training root may swap a checkpoint's file for a FIFO, a
symlink to a file outside the root (a secret of root's), or a device node, or swap a folder on
its path for a symlink out of the root, after the snapshot was planned. The snapshot must come
back promptly with that file refused (a failed snapshot, recorded), put nothing from outside the
root into the snapshot folder and make no hard link to an outside inode.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.rootdir import Identity
from daemon.snapshots import daily, execute, verify
from daemon.snapshots.plan import FileItem, build_snapshot_plan, reflink_probe
from daemon.snapshots.sources import PlannedRoot, RefusedSource, Sources
from tests.configs import DAILY, make_config
from tests.integration.test_copying import xfs  # noqa: F401 (the fixture)
from tests.integration.test_snapshot import (
    NOW,
    RecordingHistory,
    run,
    write_hf_checkpoint,
)

# The longest a snapshot with a refused file may take here (a blocked open never returns).
PROMPT = 20.0
SHARD = "checkpoint-300/shard-0.safetensors"
NESTED = "checkpoint-300/optimizer/state.bin"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "run-a"
    checkpoint = write_hf_checkpoint(folder, 300)
    (checkpoint / "optimizer").mkdir()
    (checkpoint / "optimizer" / "state.bin").write_bytes(os.urandom(4096))
    settled = NOW.timestamp() - 3600
    for path in [*checkpoint.rglob("*"), checkpoint]:
        os.utime(path, (settled, settled))
    return folder


@pytest.fixture
def secret(tmp_path: Path, root: Path) -> Path:
    """A file of root's outside every root, as long as the shard it will stand in for (so a
    size check alone would not notice the swap)."""
    path = tmp_path / "etc" / "shadow"
    path.parent.mkdir()
    path.write_bytes(b"SECRET" * ((root / SHARD).stat().st_size // 6 + 1))
    os.truncate(path, (root / SHARD).stat().st_size)
    path.chmod(0o600)
    return path


def snapshot_config(roots: list[Path], snapshots: Path) -> Config:
    return make_config(roots, snapshots={"dir": snapshots}, **DAILY)


def run_promptly(config: Config, **options: object) -> tuple[daily.SnapshotReport, list[str]]:
    """Given a config, take the snapshot in a thread; fail the test when it does not return
    within PROMPT seconds (the worker blocked on a FIFO), else return the report and history."""
    history = RecordingHistory()
    reports: list[daily.SnapshotReport] = []
    worker = threading.Thread(
        target=lambda: reports.append(run(config, history, **options)), daemon=True
    )
    worker.start()
    worker.join(PROMPT)
    assert not worker.is_alive(), f"the snapshot still blocks after {PROMPT:g} s"
    assert reports, "the snapshot raised instead of reporting"
    return reports[0], history.events()


def when_placing(relative: str, swap: Callable[[], None]) -> Callable[[FileItem], None]:
    """Given a path in the snapshot and a swap, return the hook that swaps just before that
    file is placed: after the snapshot was planned."""

    def hook(item: FileItem) -> None:
        if item.relative == f"run-a/{relative}":
            swap()

    return hook


def fifo_for(path: Path) -> Callable[[], None]:
    def swap() -> None:
        path.unlink()
        os.mkfifo(path)

    return swap


def release(fifo: Path) -> None:
    """Given a FIFO a reader may be blocked on (the bug), open and close its other end, so that
    reader gets its end of file and lets go (ENXIO: nobody is waiting on it)."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def symlink_for(path: Path, target: Path) -> Callable[[], None]:
    def swap() -> None:
        path.unlink()
        path.symlink_to(target)

    return swap


def folder_symlink_for(folder: Path, target: Path) -> Callable[[], None]:
    """Given a folder and one outside holding the same names, swap the first for a symlink to
    the second."""

    def swap() -> None:
        os.rename(folder, folder.with_name(folder.name + ".moved"))
        folder.symlink_to(target, target_is_directory=True)

    return swap


def snapshot_contents(snaps: Path) -> list[bytes]:
    """Given the snapshots folder, return the content of every regular file in it (whatever
    the outcome: a failed snapshot's leftovers count too), following no symlink."""
    found: list[bytes] = []
    for folder, _folders, files in os.walk(snaps):
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(Path(path).read_bytes())
    return found


def assert_refused(
    report: daily.SnapshotReport, events: list[str], snaps: Path, relative: str, why: str
) -> None:
    assert report.status == "failed", report
    assert report.reason is not None
    assert "refused a source file" in report.reason and relative in report.reason, report.reason
    assert why in report.reason, report.reason
    assert events == ["snapshot_failed"]
    assert not (snaps / "2026-06-01").exists()


@pytest.mark.parametrize("method", ["copy", "hardlink"])
def test_a_fifo_swapped_in_after_planning_fails_the_item_promptly(
    root: Path, tmp_path: Path, method: str
) -> None:
    shard = root / SHARD
    try:
        report, events = run_promptly(
            snapshot_config([root], tmp_path / "snaps"),
            method=method,
            between_files=when_placing(SHARD, fifo_for(shard)),
        )
    finally:
        release(shard)
    assert_refused(report, events, tmp_path / "snaps", SHARD, "a FIFO")


@pytest.mark.parametrize("method", ["copy", "hardlink"])
def test_a_symlink_out_of_the_root_swapped_in_for_a_file_is_refused(
    root: Path, tmp_path: Path, secret: Path, method: str
) -> None:
    snaps = tmp_path / "snaps"
    report, events = run_promptly(
        snapshot_config([root], snaps),
        method=method,
        between_files=when_placing(SHARD, symlink_for(root / SHARD, secret)),
    )
    assert_refused(report, events, snaps, SHARD, "a symlink")
    assert not any(b"SECRET" in content for content in snapshot_contents(snaps))
    assert secret.stat().st_nlink == 1  # no hard link to it anywhere


@pytest.mark.parametrize("method", ["copy", "hardlink"])
def test_a_folder_on_the_path_swapped_for_a_symlink_out_of_the_root_is_refused(
    root: Path, tmp_path: Path, method: str
) -> None:
    outside = tmp_path / "etc"
    outside.mkdir()
    state = outside / "state.bin"
    state.write_bytes(b"SECRET" * 1000)
    os.truncate(state, 4096)  # the planned size
    snaps = tmp_path / "snaps"
    report, events = run_promptly(
        snapshot_config([root], snaps),
        method=method,
        between_files=when_placing(NESTED, folder_symlink_for((root / NESTED).parent, outside)),
    )
    assert_refused(report, events, snaps, NESTED, "symlink")
    assert not any(b"SECRET" in content for content in snapshot_contents(snaps))
    assert state.stat().st_nlink == 1


def test_a_device_node_swapped_in_is_never_opened(root: Path, tmp_path: Path) -> None:
    shard = root / SHARD

    def device() -> None:
        shard.unlink()
        try:
            os.mknod(shard, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
        except PermissionError:
            pytest.skip("making a device node needs root")

    report, events = run_promptly(
        snapshot_config([root], tmp_path / "snaps"),
        method="copy",
        between_files=when_placing(SHARD, device),
    )
    assert_refused(report, events, tmp_path / "snaps", SHARD, "a character device")


def test_a_root_swapped_for_a_symlink_after_planning_is_not_read(
    root: Path, tmp_path: Path
) -> None:
    decoy = tmp_path / "someone-else"
    write_hf_checkpoint(decoy, 300)
    (decoy / "checkpoint-300" / "optimizer").mkdir()
    (decoy / "checkpoint-300" / "optimizer" / "state.bin").write_bytes(b"SECRET" * 1000)
    os.truncate(decoy / "checkpoint-300" / "optimizer" / "state.bin", 4096)

    def swap_root() -> None:
        os.rename(root, root.with_name("run-a.moved"))
        root.symlink_to(decoy, target_is_directory=True)

    snaps = tmp_path / "snaps"
    report, events = run_promptly(
        snapshot_config([root], snaps),
        method="copy",
        between_files=when_placing("checkpoint-300", swap_root),
    )
    assert report.status == "failed"
    assert "root changed since the snapshot was planned" in (report.reason or ""), report
    assert events == ["snapshot_failed"]
    assert not any(b"SECRET" in content for content in snapshot_contents(snaps))


def test_planned_then_swapped_then_executed_refuses_the_file(
    root: Path, tmp_path: Path, secret: Path
) -> None:
    config = snapshot_config([root], tmp_path / "snaps")
    snapshot_plan = build_snapshot_plan(
        config, now=NOW.timestamp(), plan=daily._default_plan, method="copy"
    )
    symlink_for(root / SHARD, secret)()
    temporary = str(tmp_path / "snaps" / ".tmp-2026-06-01-1")
    with pytest.raises(RefusedSource, match="symlink") as refused:
        execute.execute_snapshot_plan(snapshot_plan, temporary)
    assert refused.value.filename == str(root / SHARD)
    assert not any(b"SECRET" in content for content in snapshot_contents(tmp_path / "snaps"))


def test_the_reflink_probe_does_not_wait_on_a_fifo(root: Path, tmp_path: Path) -> None:
    shard = root / SHARD
    item = FileItem(str(shard), f"run-a/{SHARD}", "file", root=str(root), inside=SHARD)
    planned = PlannedRoot(str(root), Identity.of(os.stat(root)))
    fifo_for(shard)()
    answers: list[bool] = []

    def probe() -> None:
        with Sources([planned]) as sources:
            answers.append(reflink_probe(item, str(tmp_path), sources))

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(PROMPT)
    blocked = worker.is_alive()
    release(shard)
    assert not blocked, f"the probe still blocks after {PROMPT:g} s"
    assert answers == [False]


def test_a_copy_never_takes_a_setuid_bit_from_a_root(root: Path, tmp_path: Path) -> None:
    (root / SHARD).chmod(0o4755)
    report = run(snapshot_config([root], tmp_path / "snaps"), method="copy")
    assert report.status == "done", report
    copied = tmp_path / "snaps" / "2026-06-01" / "run-a" / SHARD
    assert stat.S_IMODE(copied.stat().st_mode) == 0o755


def test_verify_does_not_wait_on_a_fifo_in_the_snapshot(root: Path, tmp_path: Path) -> None:
    empty = root / "checkpoint-300" / "notes.txt"
    empty.write_bytes(b"")
    settled = NOW.timestamp() - 3600
    os.utime(empty, (settled, settled))
    os.utime(empty.parent, (settled, settled))
    assert run(snapshot_config([root], tmp_path / "snaps"), method="copy").status == "done"
    snapshot = tmp_path / "snaps" / "2026-06-01"
    fifo_for(snapshot / "run-a" / "checkpoint-300" / "notes.txt")()
    results: list[verify.VerifyResult] = []
    worker = threading.Thread(
        target=lambda: results.append(verify.verify_snapshot(str(snapshot))), daemon=True
    )
    worker.start()
    worker.join(PROMPT)
    blocked = worker.is_alive()
    release(snapshot / "run-a" / "checkpoint-300" / "notes.txt")
    assert not blocked, f"verify still blocks after {PROMPT:g} s"
    assert not results[0].ok
    assert results[0].checksum == ("run-a/checkpoint-300/notes.txt: not a regular file any more",)


@pytest.mark.parametrize("swap", ["fifo", "symlink"])
def test_on_a_reflink_filesystem_a_swapped_source_is_refused(
    xfs: Path,  # noqa: F811 (the fixture imported above)
    swap: str,
) -> None:
    root = xfs / "run-a"
    write_hf_checkpoint(root, 300)
    secret = xfs / "shadow"
    secret.write_bytes(b"SECRET" * 20000)
    os.truncate(secret, (root / SHARD).stat().st_size)
    change = fifo_for(root / SHARD) if swap == "fifo" else symlink_for(root / SHARD, secret)
    try:
        report, events = run_promptly(
            snapshot_config([root], xfs / "snaps"),
            method="reflink",
            between_files=when_placing(SHARD, change),
        )
    finally:
        release(root / SHARD)
    assert_refused(report, events, xfs / "snaps", SHARD, "a FIFO" if swap == "fifo" else "symlink")
    assert not any(b"SECRET" in content for content in snapshot_contents(xfs / "snaps"))
