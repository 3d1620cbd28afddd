"""Discovery's walk of a root its owner races: a folder swapped for a symlink out of the root.

ckptd runs as root; the walk of a checkpoint lists every folder below it. If the owner swaps a
folder for a symlink to an outside tree between the moment the walk saw it (a folder) and the
moment it lists it, a walk by path would list and descend the outside tree: a denial of service
(the whole filesystem walked), and outside sizes and mtimes in the plan (a newer outside mtime
makes an old checkpoint look "settling"). The walk opens each folder relative to its parent
with O_NOFOLLOW and lists it through that descriptor: nothing from outside is ever counted.

The outside tree here is unmistakable: many files, each a sparse GiB (st_size), all dated a
year into the future. Any of it in a walk shows as a size, an entry count or an mtime no
checkpoint of the root has.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import daemon.discovery.walker as walker
from daemon.config import RootConfig
from daemon.discovery.scan import ScanResult, scan
from daemon.discovery.sizecache import WalkResult
from daemon.fsio import At, DirEntryLike, FileSystem, LocalFileSystem
from tests.hostile.conftest import RACE_SECONDS
from tests.layouts_fixtures import age, hf_checkpoint, write_file

pytestmark = pytest.mark.hostile

OUTSIDE_FILES = 400
OUTSIDE_FILE_BYTES = 1 << 30  # sparse: its st_size is what a walk would count
FUTURE_NS = int((time.time() + 365 * 86400) * 1e9)  # every outside entry's mtime
# No checkpoint of the roots below comes near these: anything above is from outside.
SIZE_LIMIT = OUTSIDE_FILE_BYTES
ENTRIES_LIMIT = 100


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A tree outside the root: many large (sparse) files dated in the future."""
    top = tmp_path / "outside"
    top.mkdir()
    for index in range(OUTSIDE_FILES):
        with open(top / f"f{index:04}", "wb") as handle:
            handle.truncate(OUTSIDE_FILE_BYTES)
    (top / "inner").mkdir()
    (top / "inner" / "recent.bin").write_bytes(b"x")
    for path in (*top.iterdir(), top / "inner" / "recent.bin", top):
        os.utime(path, ns=(FUTURE_NS, FUTURE_NS), follow_symlinks=False)
    return top


def checkpoint_with_subfolders(root: Path, step: int) -> Path:
    """Given a root, write an hf checkpoint with sub-folders (`optimizer/deep/`), settled."""
    folder = hf_checkpoint(root, step, age_seconds=None)
    write_file(folder / "optimizer" / "state-0.bin", 1000)
    write_file(folder / "optimizer" / "deep" / "state-1.bin", 1000)
    return age(folder)


def assert_nothing_from_outside(walk: WalkResult | None) -> None:
    assert walk is not None
    assert walk.size_bytes < SIZE_LIMIT, f"an outside size was counted: {walk.size_bytes}"
    assert walk.freeable_bytes < SIZE_LIMIT
    assert walk.entry_count < ENTRIES_LIMIT, f"outside entries were counted: {walk.entry_count}"
    assert walk.mtime_ns < FUTURE_NS, "an outside mtime dates the checkpoint"


class Swap:
    """Given a folder of the root and an outside tree: move the folder out of the root and put
    a symlink to the outside tree in its place, once, when `trigger` says it is time."""

    def __init__(self, folder: Path, outside: Path, parking: Path) -> None:
        self.folder = folder
        self.outside = outside
        self.parking = parking
        status = folder.stat()
        self.identity = (status.st_dev, status.st_ino)
        self.done = False

    def trigger(self, status: os.stat_result) -> None:
        if not self.done and (status.st_dev, status.st_ino) == self.identity:
            self.done = True
            os.rename(self.folder, self.parking)
            os.symlink(self.outside, self.folder)


def arm_os_swap(monkeypatch: pytest.MonkeyPatch, swap: Swap) -> None:
    """Make the swap happen the moment the walk is about to open or list the folder: after
    it was seen to be a folder, before anything in it is read (the owner winning the race
    every time). Hooks os.open (a walk opening it relative to its parent) and os.scandir (a
    walk listing it by path)."""
    real_open, real_scandir = os.open, os.scandir

    def hooked_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & os.O_DIRECTORY:
            with contextlib.suppress(OSError, TypeError):
                swap.trigger(os.stat(path, dir_fd=dir_fd, follow_symlinks=False))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def hooked_scandir(path: Any = ".") -> Any:
        if isinstance(path, str | bytes | os.PathLike):
            with contextlib.suppress(OSError):
                swap.trigger(os.stat(path, follow_symlinks=False))
        return real_scandir(path)

    monkeypatch.setattr(os, "open", hooked_open)
    monkeypatch.setattr(os, "scandir", hooked_scandir)


class SwappingFileSystem(LocalFileSystem):
    """A FileSystem whose owner swaps the folder the moment the walk opens or lists it."""

    def __init__(self, swap: Swap) -> None:
        self.swap = swap

    def _maybe_swap(self, path: str) -> None:
        if path == str(self.swap.folder):
            self.swap.trigger(os.stat(path, follow_symlinks=False))

    def scandir(self, path: str) -> Iterator[DirEntryLike]:
        self._maybe_swap(path)
        return super().scandir(path)

    def open_dir(self, at: At) -> int:
        self._maybe_swap(at.path)
        return super().open_dir(at)


def walk_of(fs: FileSystem, root: Path, name: str) -> WalkResult | None:
    (walk,) = walker.walk_many(fs, str(root), [((name, 0, True),)], False)
    return walk


TARGETS = ["checkpoint-300", "checkpoint-300/optimizer", "checkpoint-300/optimizer/deep"]


@pytest.mark.parametrize("target", TARGETS)
def test_a_folder_swapped_for_a_symlink_as_the_walk_opens_it_counts_nothing_outside(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    root = tmp_path / "root"
    checkpoint_with_subfolders(root, 300)
    honest = walk_of(LocalFileSystem(), root, "checkpoint-300")
    assert honest is not None and honest.error is None
    swap = Swap(root / target, outside, tmp_path / "parked")
    before = len(os.listdir("/proc/self/fd"))
    arm_os_swap(monkeypatch, swap)
    walk = walk_of(LocalFileSystem(), root, "checkpoint-300")
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before, "a descriptor was left open"
    assert swap.done, "the walk never reached the folder"
    assert (root / target).is_symlink()
    assert_nothing_from_outside(walk)
    assert walk is not None
    # The symlink is counted as the link itself, and the walk as one that saw a change.
    assert walk.size_bytes <= honest.size_bytes
    assert walk.error is not None and walk.error.startswith("changed while scanning")


@pytest.mark.parametrize("target", TARGETS)
def test_a_misbehaving_filesystem_swapping_a_folder_shows_nothing_outside(
    tmp_path: Path, outside: Path, target: str
) -> None:
    root = tmp_path / "root"
    checkpoint_with_subfolders(root, 300)
    swap = Swap(root / target, outside, tmp_path / "parked")
    fs = SwappingFileSystem(swap)
    walk = walk_of(fs, root, "checkpoint-300")
    assert swap.done, "the walk never reached the folder"
    assert_nothing_from_outside(walk)


def test_a_folder_swapped_while_listed_shows_its_own_entries_not_the_outside(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Swapped after it was opened, as it is listed: the descriptor is the folder that was
    # opened (now moved away); what it holds is counted, nothing of what its name now is.
    root = tmp_path / "root"
    checkpoint_with_subfolders(root, 300)
    honest = walk_of(LocalFileSystem(), root, "checkpoint-300")
    assert honest is not None
    folder = root / "checkpoint-300" / "optimizer"
    swap = Swap(folder, outside, tmp_path / "parked")
    real_scandir = os.scandir

    def hooked_scandir(path: Any = ".") -> Any:
        try:
            status = os.fstat(path) if isinstance(path, int) else os.stat(path)
        except OSError:
            return real_scandir(path)
        swap.trigger(status)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", hooked_scandir)
    walk = walk_of(LocalFileSystem(), root, "checkpoint-300")
    monkeypatch.undo()
    assert swap.done
    assert_nothing_from_outside(walk)
    assert walk is not None and walk.size_bytes == honest.size_bytes


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_tree_deeper_than_the_walk_goes_is_unreadable_and_no_descriptor_is_left_open(
    tmp_path: Path,
) -> None:
    # One descriptor is open per level while a walk descends: an owner's tree of any depth
    # must not run ckptd out of descriptors. Deeper than MAX_DEPTH is left out and said.
    root = tmp_path / "root"
    folder = checkpoint_with_subfolders(root, 300)
    deep = folder / "optimizer" / "deep"
    for _ in range(walker.MAX_DEPTH + 10):
        deep = deep / "d"
    deep.mkdir(parents=True)
    write_file(deep / "state.bin", 10)
    before = open_descriptors()
    walk = walk_of(LocalFileSystem(), root, "checkpoint-300")
    assert open_descriptors() == before
    assert walk is not None and walk.error is not None
    assert walk.error.startswith("unreadable: checkpoint-300/optimizer/deep/d/")
    assert walk.error.endswith(f"more than {walker.MAX_DEPTH} folders deep")
    shallow = walk_of(LocalFileSystem(), root, "checkpoint-300")  # and again: nothing leaks
    assert shallow == walk and open_descriptors() == before


# --- a real race: another process flipping a folder while scans run ------------------------------

FLIPPER = """
import os, sys
folder, link, parked = sys.argv[1:4]
os.symlink(sys.argv[4], link)
while not os.path.exists(sys.argv[5]):
    os.rename(folder, parked)    # the real folder out of the way
    os.rename(link, folder)      # the symlink to the outside tree in its place
    os.rename(folder, link)
    os.rename(parked, folder)    # and back
"""


@contextlib.contextmanager
def flipping(folder: Path, outside: Path, parked: Path) -> Iterator[None]:
    """Given a folder of the root, flip it between itself and a symlink to `outside` from
    another process, as fast as it can, until the block ends."""
    stop = parked.with_name("stop")
    link = folder.with_name(folder.name + ".link")
    arguments = [str(folder), str(link), str(parked), str(outside), str(stop)]
    process = subprocess.Popen([sys.executable, "-c", FLIPPER, *arguments])
    try:
        while not link.is_symlink() and not folder.is_symlink():
            time.sleep(0.001)  # until it flips
        yield
    finally:
        stop.touch()
        process.wait(timeout=10)
    assert process.returncode == 0, "the flipping process failed"
    link.unlink()  # the folder is itself again; its symlink, ready to flip, goes


def scan_once(root: Path) -> ScanResult:
    return scan(RootConfig(path=str(root), layout="hf"), now=time.time(), settle_seconds=60)


@pytest.mark.parametrize("helper", [False, True], ids=["in-process", "helper-process"])
def test_scans_racing_a_folder_flipped_to_a_symlink_never_count_outside(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch, helper: bool
) -> None:
    root = tmp_path / "root"
    steps = range(100, 2100, 100)
    for step in steps:
        checkpoint_with_subfolders(root, step)
    honest = scan_once(root).checkpoints[-1]
    finished: list[bool] = []
    if helper:  # the helper process walks the later half, the flipped checkpoint among them
        monkeypatch.setattr(walker, "HELPER_MINIMUM", 10)
        real_finish = walker._Helper.finish

        def recording_finish(self: Any, expected: int) -> Any:
            walks = real_finish(self, expected)
            finished.append(walks is not None)  # None: it failed, this process walked it all
            return walks

        monkeypatch.setattr(walker._Helper, "finish", recording_finish)
    scans = raced = 0
    deadline = time.monotonic() + max(RACE_SECONDS, 1.0)
    with flipping(root / honest.name / "optimizer", outside, tmp_path / "parked"):
        while time.monotonic() < deadline or scans < 20:
            result = scan_once(root)
            scans += 1
            assert len(result.checkpoints) == len(steps)
            for checkpoint in result.checkpoints:
                assert checkpoint.size_bytes < SIZE_LIMIT, (checkpoint.name, checkpoint.size_bytes)
                assert checkpoint.freeable_bytes < SIZE_LIMIT
                assert checkpoint.mtime * 1e9 < FUTURE_NS - 86400 * 1e9, checkpoint.name
            racer = result.checkpoints[-1]
            raced += racer.size_bytes != honest.size_bytes or not racer.complete
    # The walks really met the flips (a symlink counted as itself, a folder away, a change
    # seen); once the flipping stops the folder is back and counted as before.
    assert raced > 0
    assert finished == ([True] * scans if helper else [])
    assert scan_once(root).checkpoints[-1].size_bytes == honest.size_bytes
