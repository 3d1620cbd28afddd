"""A filesystem that misbehaves on purpose: discovery never crashes, and never calls a
half-seen checkpoint complete."""

from __future__ import annotations

import errno
import gc
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import daemon.discovery.walker as walker
from daemon.config import RootConfig
from daemon.discovery.scan import ScanResult, scan
from daemon.discovery.sizecache import SizeCache
from daemon.errors import UsageError
from daemon.fsio import At, Dir, DirEntryLike, LocalFileSystem
from tests.layouts_fixtures import age, hf_run


class _VanishingEntry:
    """A directory entry whose file is deleted right after the listing saw it."""

    def __init__(self, entry: os.DirEntry[str], path: str | None = None) -> None:
        self._entry = entry
        self.name = entry.name
        self.path = path or entry.path

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_file(follow_symlinks=follow_symlinks)

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def inode(self) -> int:
        return self._entry.inode()

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        os.unlink(self.path)  # the trainer removes its temporary file right now
        return self._entry.stat(follow_symlinks=follow_symlinks)


class MisbehavingFileSystem(LocalFileSystem):
    """Given paths to break, the real filesystem with those breaks."""

    def __init__(
        self,
        *,
        vanishing_files: set[str] = frozenset(),  # type: ignore[assignment]
        vanishing_folders: set[str] = frozenset(),  # type: ignore[assignment]
        unreadable: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.vanishing_files = vanishing_files
        self.vanishing_folders = vanishing_folders
        self.unreadable = unreadable
        self.scandir_calls: list[str] = []

    def scandir(self, path: str) -> Iterator[DirEntryLike]:
        self.scandir_calls.append(path)
        name = os.path.basename(path)
        if name in self.unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        if name in self.vanishing_folders:
            shutil.rmtree(path)  # deleted between the root listing and the walk
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name in self.vanishing_files:
                    yield _VanishingEntry(entry)
                else:
                    yield entry

    # The walk opens each folder relative to its parent and lists it through the descriptor:
    # the same breaks, injected there.
    def open_dir(self, at: At) -> int:
        if at.name in self.unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", at.path)
        if at.name in self.vanishing_folders:
            shutil.rmtree(at.path)  # deleted between the root listing and the walk
        return super().open_dir(at)

    def scandir_at(self, directory: Dir) -> Iterator[DirEntryLike]:
        self.scandir_calls.append(directory.path)
        for entry in super().scandir_at(directory):
            if entry.name in self.vanishing_files:
                yield _VanishingEntry(entry, os.path.join(directory.path, entry.name))  # type: ignore[arg-type]
            else:
                yield entry


def run_scan(root: Path, fs: LocalFileSystem, cache: SizeCache | None = None) -> ScanResult:
    return scan(RootConfig(path=str(root)), now=time.time(), settle_seconds=60, fs=fs, cache=cache)


def test_a_file_vanishing_between_listing_and_stat(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200])
    fs = MisbehavingFileSystem(vanishing_files={"rng_state.pth"})
    cache = SizeCache()
    result = run_scan(tmp_path, fs, cache)
    assert [c.name for c in result.checkpoints] == ["checkpoint-100", "checkpoint-200"]
    for checkpoint in result.checkpoints:
        assert checkpoint.complete is False
        assert checkpoint.incomplete_reason == "changed while scanning: a file vanished"
    assert len(cache) == 0  # a walk that saw a change is never cached
    # The deletion is a write: the next scan sees the folders complete (trainer_state.json,
    # written last, is there) but not final until they settle, then cached.
    again = run_scan(tmp_path, LocalFileSystem(), cache)
    assert all(c.complete for c in again.checkpoints) and len(cache) == 0
    for checkpoint in again.checkpoints:
        age(tmp_path / checkpoint.name)
    assert all(c.complete for c in run_scan(tmp_path, LocalFileSystem(), cache).checkpoints)
    assert len(cache) == 2
    assert not (tmp_path / "checkpoint-100" / "rng_state.pth").exists()


def test_a_folder_vanishing_between_listing_and_walk_is_simply_gone(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200, 300])
    fs = MisbehavingFileSystem(vanishing_folders={"checkpoint-200"})
    result = run_scan(tmp_path, fs)
    assert [c.name for c in result.checkpoints] == ["checkpoint-100", "checkpoint-300"]


def test_an_unreadable_checkpoint_is_incomplete_not_a_crash(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200])
    fs = MisbehavingFileSystem(unreadable={"checkpoint-100"})
    found = {c.name: c for c in run_scan(tmp_path, fs).checkpoints}
    assert found["checkpoint-100"].complete is False
    assert found["checkpoint-100"].incomplete_reason == (
        "unreadable: checkpoint-100: Permission denied"
    )
    assert found["checkpoint-200"].complete


def test_an_unreadable_root_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    hf_run(tmp_path, [100])
    fs = MisbehavingFileSystem(unreadable={tmp_path.name})
    with pytest.raises(UsageError, match=f"{tmp_path}: root cannot be read"):
        run_scan(tmp_path, fs)


def test_the_real_filesystem_path_and_the_injected_one_agree(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200], sharded=True)
    fs = MisbehavingFileSystem()
    assert run_scan(tmp_path, fs).checkpoints == run_scan(tmp_path, LocalFileSystem()).checkpoints
    assert fs.scandir_calls  # the injected filesystem was really used


def test_walks_move_to_threads_when_the_disk_is_read_and_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_run(tmp_path, range(100, 20100, 100), model_bytes=10)
    sequential = run_scan(tmp_path, LocalFileSystem())
    reads = iter(range(0, 10**9, 10**6))  # every batch "read" a million blocks: cold disk
    monkeypatch.setattr(walker, "_blocks_read", lambda: next(reads))
    threaded_threads: set[str] = set()
    real_walk = walker.walk_checkpoint

    def recording_walk(*args: object, **kwargs: object) -> object:
        threaded_threads.add(threading.current_thread().name)
        return real_walk(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(walker, "walk_checkpoint", recording_walk)
    threaded = run_scan(tmp_path, LocalFileSystem())
    assert any(name.startswith("ckptd-walk") for name in threaded_threads)
    assert threaded.checkpoints == sequential.checkpoints
    assert len(threaded.checkpoints) == 200


def test_scan_leaves_the_garbage_collector_as_it_found_it(tmp_path: Path) -> None:
    hf_run(tmp_path, [100])
    assert gc.isenabled()
    run_scan(tmp_path, LocalFileSystem())
    assert gc.isenabled()
    gc.disable()
    try:
        run_scan(tmp_path, LocalFileSystem())
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_large_walk_shares_the_work_with_a_helper_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_run(tmp_path, range(100, 3100, 100), model_bytes=10)
    (tmp_path / "checkpoint-3000" / "optimizer.pt").unlink()  # one differs from the others
    age(tmp_path / "checkpoint-3000")
    sequential = run_scan(tmp_path, MisbehavingFileSystem())  # not the real fs: no helper
    started: list[list[str]] = []
    real_start = walker._Helper.start

    def recording_start(*args: object) -> object:
        helper = real_start(*args)  # type: ignore[arg-type]
        assert helper is not None
        started.append(list(helper.process.args))  # type: ignore[arg-type]
        return helper

    finished: list[bool] = []
    real_finish = walker._Helper.finish

    def recording_finish(self: object, expected: int) -> object:
        walks = real_finish(self, expected)  # type: ignore[arg-type]
        finished.append(walks is not None)  # None: the helper failed, this process walked it all
        return walks

    monkeypatch.setattr(walker, "HELPER_MINIMUM", 10)
    monkeypatch.setattr(walker._Helper, "start", recording_start)
    monkeypatch.setattr(walker._Helper, "finish", recording_finish)
    shared = run_scan(tmp_path, LocalFileSystem())
    assert len(started) == 1 and started[0][1:3] == ["-I", "-S"]
    assert finished == [True], "the helper process failed; its share was walked here instead"
    assert shared.checkpoints == sequential.checkpoints
    assert len(shared.checkpoints) == 30


def test_a_failing_helper_process_costs_time_not_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_run(tmp_path, range(100, 2100, 100), model_bytes=10)
    expected = run_scan(tmp_path, MisbehavingFileSystem()).checkpoints
    monkeypatch.setattr(walker, "HELPER_MINIMUM", 10)
    monkeypatch.setattr(walker, "_PACKAGE_PARENT", str(tmp_path / "no-such-package"))
    assert run_scan(tmp_path, LocalFileSystem()).checkpoints == expected
