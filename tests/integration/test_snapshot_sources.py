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
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, RootConfig
from daemon.discovery.scan import ScanResult
from daemon.rootdir import Identity, IdentityStore, root_key
from daemon.snapshots import daily, execute, verify
from daemon.snapshots.plan import FileItem, SnapshotPlan, build_snapshot_plan, reflink_probe
from daemon.snapshots.sources import PlannedRoot, RefusedSource, Sources
from policies.model import Plan
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
    # Random, but not starting with 0x80: the integrity check reads such a `.bin` as a pickle,
    # calls the checkpoint corrupt and nothing is snapshotted (1 run in 256).
    (checkpoint / "optimizer" / "state.bin").write_bytes(b"\0" + os.urandom(4095))
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


# --- planning: the walk that lists a checkpoint never lists anything outside the root ---------
#
# The owner swaps a checkpoint folder or a folder inside it for a symlink to a folder outside
# the root (one holding `outside-secret`) while the snapshot plan is being made: no name from
# there may appear in the plan, and no size of it may count in the plan's bytes.

OUTSIDE_NAME = "outside-secret"
NESTED_DIR = "checkpoint-300/optimizer"
OUTSIDE_SIZE = 3 << 20  # larger than the whole checkpoint: it would show in bytes_total


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside every root, as another user's or /etc would be."""
    folder = tmp_path / "elsewhere"
    (folder / "inner").mkdir(parents=True)
    (folder / OUTSIDE_NAME).write_bytes(b"SECRET" * (OUTSIDE_SIZE // 6))
    (folder / "inner" / OUTSIDE_NAME).write_bytes(b"SECRET")
    return folder


def real_files(root: Path) -> dict[str, int]:
    """Given a root, return the size of each regular file below it by its name in the snapshot
    (`run-a/...`), following no symlink."""
    found: dict[str, int] = {}
    for folder, _folders, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            if stat.S_ISREG(path.lstat().st_mode):
                found[f"run-a/{path.relative_to(root)}"] = path.lstat().st_size
    return found


def assert_nothing_from_outside(
    snapshot_plan: SnapshotPlan, root: Path, files: dict[str, int]
) -> None:
    """Given a plan and the root's files before any swap, check that the plan names nothing
    outside the root and counts no size read from outside it."""
    for item in snapshot_plan.items:
        texts = (item.relative, item.inside, item.source, item.link_target or "")
        assert not any(OUTSIDE_NAME in text for text in texts), item
        assert item.source.startswith(f"{root}/"), item
        if item.kind == "file":
            assert files.get(item.relative) == item.size, item
    assert not any(OUTSIDE_NAME in error for error in snapshot_plan.errors), snapshot_plan.errors
    assert snapshot_plan.bytes_total <= sum(files.values()) < OUTSIDE_SIZE


def swap_when_listed(
    monkeypatch: pytest.MonkeyPatch, folder: Path, swap: Callable[[], None]
) -> Callable[..., tuple[ScanResult, Plan]]:
    """Given a folder of the root and a swap, return the plan function for
    `build_snapshot_plan` that plans the root as usual, then makes the swap happen the moment
    the snapshot walk is about to list that folder: after the walk looked at it (a folder),
    before its entries are read — the owner winning the race, every time."""
    target = folder.stat()
    real_scandir = os.scandir
    swapped: list[bool] = []

    def scandir(path: Any = ".") -> Any:
        if not swapped:
            with contextlib.suppress(OSError):
                status = os.fstat(path) if isinstance(path, int) else os.stat(path)
                if (status.st_dev, status.st_ino) == (target.st_dev, target.st_ino):
                    swapped.append(True)
                    swap()
        return real_scandir(path)

    def plan(config: Config, root: RootConfig, *, now: float) -> tuple[ScanResult, Plan]:
        planned = daily._default_plan(config, root, now=now)
        monkeypatch.setattr(os, "scandir", scandir)  # discovery is done: arm it for the walk
        return planned

    return plan


@pytest.mark.parametrize("which", ["checkpoint-300", "checkpoint-300/optimizer"])
def test_a_folder_swapped_for_a_symlink_out_of_the_root_while_listed_lists_nothing_outside(
    root: Path, tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    files = real_files(root)
    config = snapshot_config([root], tmp_path / "snaps")
    plan = swap_when_listed(monkeypatch, root / which, folder_symlink_for(root / which, outside))
    snapshot_plan = build_snapshot_plan(config, now=NOW.timestamp(), plan=plan, method="copy")
    monkeypatch.undo()
    assert (root / which).is_symlink(), f"the swap did not happen: {snapshot_plan}"
    assert_nothing_from_outside(snapshot_plan, root, files)
    # What the walk listed is the folder it opened (now renamed aside), all of it.
    assert {item.relative for item in snapshot_plan.items if item.kind == "file"} == set(files)


def test_a_checkpoint_swapped_for_a_symlink_after_discovery_is_skipped_and_said(
    root: Path, tmp_path: Path, outside: Path
) -> None:
    files = real_files(root)
    config = snapshot_config([root], tmp_path / "snaps")
    swap = folder_symlink_for(root / "checkpoint-300", outside)

    def plan(config: Config, root_config: RootConfig, *, now: float) -> tuple[ScanResult, Plan]:
        planned = daily._default_plan(config, root_config, now=now)
        swap()  # after discovery saw a folder, before the snapshot walk
        return planned

    snapshot_plan = build_snapshot_plan(config, now=NOW.timestamp(), plan=plan, method="copy")
    assert_nothing_from_outside(snapshot_plan, root, files)
    assert snapshot_plan.items == () and snapshot_plan.checkpoints == ()
    assert snapshot_plan.bytes_total == 0
    assert snapshot_plan.errors == (
        f"{root}/checkpoint-300: skipped: a symlink where a folder was listed, never followed "
        "inside a root",
    )


# The flipper: swaps a folder of the root and a symlink to a folder outside (kept at a spare name
# outside the root, on the same filesystem), back and forth, until killed. RENAME_EXCHANGE swaps
# both names in one step (the name always exists); three renames where it is missing.
_FLIPPER = """
import ctypes, os, sys, time
folder, outside, spare = sys.argv[1:4]
os.symlink(outside, spare)
exchange = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
def flip():
    if exchange is not None and exchange(
        AT_FDCWD, folder.encode(), AT_FDCWD, spare.encode(), RENAME_EXCHANGE
    ) == 0:
        return
    os.rename(folder, spare + ".t")
    os.rename(spare, folder)
    os.rename(spare + ".t", spare)
print("flipping", flush=True)
while True:
    flip()
    time.sleep(0.0001)  # each state lasts about as long as a walk takes to list a folder
"""


def test_a_folder_flipped_by_a_racing_process_never_shows_outside_names_in_any_plan(
    root: Path, tmp_path: Path, outside: Path
) -> None:
    files = real_files(root)
    config = snapshot_config([root], tmp_path / "snaps")
    scanned = daily._default_plan(config, config.roots[0], now=NOW.timestamp())

    def plan(_config: Config, _root: RootConfig, *, now: float) -> tuple[ScanResult, Plan]:
        return scanned  # discovery once: every build is the snapshot walk, racing

    flipper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _FLIPPER,
            str(root / NESTED_DIR),
            str(outside),
            str(tmp_path / "spare"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    built = failed = 0
    seen: set[str] = set()  # what the folder was in each plan: "dir", "symlink", "skipped"
    try:
        assert flipper.stdout is not None and flipper.stdout.readline() == "flipping\n"
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline and built < 2000:
            try:
                snapshot_plan = build_snapshot_plan(
                    config, now=NOW.timestamp(), plan=plan, method="copy"
                )
            except OSError:
                # Changed while walked (gone between two renames, a link no more by the time
                # it is read): the owner may spoil her own snapshot, just not read outside.
                failed += 1
                continue
            built += 1
            assert_nothing_from_outside(snapshot_plan, root, files)
            kinds = {i.kind for i in snapshot_plan.items if i.relative == f"run-a/{NESTED_DIR}"}
            seen.update(kinds or {"skipped"})
    finally:
        flipper.kill()
        flipper.wait()
    assert flipper.returncode == -9, "the flipper died early: the race was not run"
    assert built >= 50, (built, failed)
    assert {"dir", "symlink"} <= seen, f"the walks never met both states: {seen}"


def test_a_root_swapped_for_a_symlink_after_discovery_is_not_walked(
    root: Path, tmp_path: Path, outside: Path
) -> None:
    # The decoy holds the checkpoint names discovery saw, so only the root's identity tells.
    (outside / "checkpoint-300").mkdir()
    (outside / "checkpoint-300" / OUTSIDE_NAME).write_bytes(b"SECRET")
    state = tmp_path / "state"
    state.mkdir()
    IdentityStore(str(state)).remember(root_key(str(root)), Identity.of(root.stat()))
    config = make_config([root], snapshots={"dir": tmp_path / "snaps"}, state_dir=state, **DAILY)

    def plan(config: Config, root_config: RootConfig, *, now: float) -> tuple[ScanResult, Plan]:
        planned = daily._default_plan(config, root_config, now=now)
        os.rename(root, root.with_name("run-a.moved"))  # after discovery, before the walk
        root.symlink_to(outside, target_is_directory=True)
        return planned

    snapshot_plan = build_snapshot_plan(config, now=NOW.timestamp(), plan=plan, method="copy")
    assert_nothing_from_outside(snapshot_plan, root, {})
    assert snapshot_plan.items == () and snapshot_plan.roots == ()
    assert len(snapshot_plan.errors) == 1 and "root identity changed" in snapshot_plan.errors[0]
