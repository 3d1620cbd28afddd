"""The size cache: walk once, notice changes, survive a restart, share between threads."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from daemon.config import RootConfig
from daemon.discovery.scan import ScanResult, scan
from daemon.discovery.sizecache import CACHE_FILE_NAME, SizeCache
from daemon.fsio import Dir, LocalFileSystem
from tests.layouts_fixtures import age, hf_checkpoint, hf_run, write_file, write_json


class CountingFileSystem(LocalFileSystem):
    """The real filesystem, counting folder listings (to prove what a rescan walks)."""

    def __init__(self) -> None:
        self.listed: list[str] = []

    def scandir(self, path: str):  # type: ignore[no-untyped-def]
        self.listed.append(path)
        return super().scandir(path)

    def scandir_at(self, directory: Dir):  # type: ignore[no-untyped-def]
        self.listed.append(directory.path)  # the walk lists through descriptors
        return super().scandir_at(directory)


def run_scan(
    root: Path, cache: SizeCache, fs: LocalFileSystem | None = None, **options: object
) -> ScanResult:
    return scan(
        RootConfig(path=str(root)),
        now=time.time(),
        settle_seconds=60,
        cache=cache,
        fs=fs or LocalFileSystem(),
        **options,  # type: ignore[arg-type]
    )


def test_rescan_after_one_new_checkpoint_lists_the_root_and_walks_only_it(tmp_path: Path) -> None:
    hf_run(tmp_path, range(100, 3100, 100))
    cache = SizeCache()
    first = run_scan(tmp_path, cache)
    assert first.walked == 30 and first.cache_hits == 0
    hf_checkpoint(tmp_path, 3100)
    fs = CountingFileSystem()
    second = run_scan(tmp_path, cache, fs)
    assert second.walked == 1 and second.cache_hits == 30
    # One listing of the root, one of the new folder; nothing else is walked.
    assert fs.listed == [str(tmp_path), str(tmp_path / "checkpoint-3100")]
    assert second.checkpoints[:30] == first.checkpoints
    # Unchanged checkpoints are the very same values (no new objects on a rescan).
    assert all(a is b for a, b in zip(first.checkpoints, second.checkpoints, strict=False))


def test_incomplete_checkpoints_are_not_cached_and_are_rewalked(tmp_path: Path) -> None:
    hf_run(tmp_path, [100])
    hf_checkpoint(tmp_path, 200, complete=False)
    hf_checkpoint(tmp_path, 300, age_seconds=None)  # settling
    cache = SizeCache()
    run_scan(tmp_path, cache)
    assert len(cache) == 1
    again = run_scan(tmp_path, cache)
    assert again.walked == 2 and again.cache_hits == 1
    # The interrupted save completes: noticed without any cache invalidation.
    write_json(tmp_path / "checkpoint-200" / "trainer_state.json", {"global_step": 200})
    age(tmp_path / "checkpoint-200")
    found = {c.name: c for c in run_scan(tmp_path, cache).checkpoints}
    assert found["checkpoint-200"].complete


def test_a_folder_replaced_under_the_same_name_is_walked_again(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200, 300])
    cache = SizeCache()
    run_scan(tmp_path, cache)
    # Saved elsewhere and renamed into place (while the old one exists: a new inode).
    staging = tmp_path.parent / f"{tmp_path.name}-staging"
    new = hf_checkpoint(staging, 100, model_bytes=100_000)
    shutil.rmtree(tmp_path / "checkpoint-100")
    new.rename(tmp_path / "checkpoint-100")
    result = run_scan(tmp_path, cache)
    assert result.walked == 1
    found = {c.name: c for c in result.checkpoints}
    assert found["checkpoint-100"].size_bytes == sum(
        path.stat().st_size for path in (tmp_path / "checkpoint-100").iterdir()
    )


def test_a_folder_recreated_in_place_is_caught_by_verification(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200, 300, 400])
    cache = SizeCache()
    run_scan(tmp_path, cache)
    shutil.rmtree(tmp_path / "checkpoint-100")
    hf_checkpoint(tmp_path, 100, model_bytes=100_000)  # may well reuse the freed inode
    result = run_scan(tmp_path, cache, verify=["checkpoint-100"])
    found = {c.name: c for c in result.checkpoints}
    assert found["checkpoint-100"].size_bytes == sum(
        path.stat().st_size for path in (tmp_path / "checkpoint-100").iterdir()
    )


def test_newest_checkpoint_overwritten_in_place_is_noticed(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200, 300])
    cache = SizeCache()
    run_scan(tmp_path, cache)
    # A resumed trainer saves checkpoint-300 again into the same folder: same inode and names.
    write_file(tmp_path / "checkpoint-300" / "model.safetensors", 50_000)
    write_json(tmp_path / "checkpoint-300" / "trainer_state.json", {"global_step": 300})
    result = run_scan(tmp_path, cache)
    found = {c.name: c for c in result.checkpoints}
    assert result.walked == 1 and found["checkpoint-300"].size_bytes > 50_000
    assert found["checkpoint-300"].complete  # its trainer_state.json is written last
    assert len(cache) == 2  # walked again, and not final until it settles


def test_keep_dropped_into_an_old_folder_is_seen_when_verified(tmp_path: Path) -> None:
    hf_run(tmp_path, range(100, 1100, 100))
    cache = SizeCache()
    run_scan(tmp_path, cache)
    (tmp_path / "checkpoint-100" / ".keep").touch()
    age(tmp_path / "checkpoint-100")  # settled again: only its ctime tells
    # The listing alone cannot see inside an old folder (that is the point of the cache)...
    plain = {c.name: c for c in run_scan(tmp_path, cache).checkpoints}
    assert plain["checkpoint-100"].pinned_by == ()
    # ...so whoever is about to delete it verifies it first (planning does, for deletions).
    verified = run_scan(tmp_path, cache, verify=["checkpoint-100"])
    assert verified.walked == 1
    assert {c.name: c for c in verified.checkpoints}["checkpoint-100"].pinned_by == (".keep",)
    assert run_scan(tmp_path, cache, verify=True).walked == 0


def test_deleted_checkpoints_leave_the_cache(tmp_path: Path) -> None:
    hf_run(tmp_path, [100, 200])
    cache = SizeCache()
    run_scan(tmp_path, cache)
    shutil.rmtree(tmp_path / "checkpoint-100")
    run_scan(tmp_path, cache)
    assert len(cache) == 1


def test_persisted_cache_makes_a_restart_cheap(tmp_path: Path) -> None:
    root = tmp_path / "run"
    hf_run(root, range(100, 1100, 100), eval_loss=0.5)
    state_dir = tmp_path / "state"
    cache = SizeCache.in_state_dir(str(state_dir))
    first = run_scan(root, cache, want_metrics=True)
    assert cache.save() is True
    assert cache.save() is False  # nothing changed since
    assert (state_dir / CACHE_FILE_NAME).exists()
    restarted = SizeCache.in_state_dir(str(state_dir))
    assert restarted.load_error is None and len(restarted) == 10
    fs = CountingFileSystem()
    again = run_scan(root, restarted, fs, want_metrics=True)
    assert again.walked == 0
    assert fs.listed[0] == str(root)
    assert [c.name for c in again.checkpoints] == [c.name for c in first.checkpoints]
    for before, after in zip(first.checkpoints, again.checkpoints, strict=True):
        assert (after.size_bytes, after.freeable_bytes, after.mtime, dict(after.metrics)) == (
            before.size_bytes,
            before.freeable_bytes,
            before.mtime,
            dict(before.metrics),
        )


def test_a_corrupt_cache_file_costs_a_walk_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / CACHE_FILE_NAME
    path.write_text('{"version": 2, "entries": [{"root": 3}]}')
    cache = SizeCache(str(path))
    assert len(cache) == 0 and "malformed" in str(cache.load_error)
    path.write_text("not json")
    assert SizeCache(str(path)).load_error is not None
    root = tmp_path / "run"
    hf_run(root, [100])
    assert run_scan(root, SizeCache(str(path))).walked == 1


def test_saved_file_is_complete_json_written_atomically(tmp_path: Path) -> None:
    root = tmp_path / "run"
    hf_run(root, [100, 200])
    cache = SizeCache(str(tmp_path / "cache.json"))
    run_scan(root, cache)
    cache.save()
    document = json.loads((tmp_path / "cache.json").read_text())
    assert document["version"] == 2
    assert sorted(entry["name"] for entry in document["entries"]) == [
        "checkpoint-100",
        "checkpoint-200",
    ]
    assert [p.name for p in tmp_path.iterdir() if ".tmp." in p.name] == []


def test_one_cache_shared_by_threads_scanning_at_once(tmp_path: Path) -> None:
    roots = [tmp_path / f"run{index}" for index in range(4)]
    for index, root in enumerate(roots):
        hf_run(root, range(100, 100 * (20 + index) + 1, 100))
    cache = SizeCache(str(tmp_path / "cache.json"))
    expected = {str(root): run_scan(root, SizeCache()).checkpoints for root in roots}
    failures: list[BaseException] = []

    def work(root: Path) -> None:
        try:
            for _ in range(5):
                result = run_scan(root, cache)
                assert result.checkpoints == expected[str(root)]
                cache.save()
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=work, args=(root,)) for root in roots * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(cache) == sum(20 + index for index in range(4))
    assert len(SizeCache(str(tmp_path / "cache.json"))) == len(cache)


def test_settled_mtime_is_unchanged_by_the_scan_itself(tmp_path: Path) -> None:
    hf_run(tmp_path, [100])
    before = os.stat(tmp_path / "checkpoint-100").st_mtime_ns
    run_scan(tmp_path, SizeCache(), want_metrics=True)
    assert os.stat(tmp_path / "checkpoint-100").st_mtime_ns == before


def test_a_cache_an_older_daemon_wrote_is_walked_again_without_an_error(tmp_path: Path) -> None:
    # Version 1 walks did not note transformers' checkpoint-is-incomplete.txt: a JIT save cut
    # off after its trainer_state.json was cached as final, and so stayed "complete".
    root = tmp_path / "run"
    hf_run(root, [100, 300, 400])
    cut_off = hf_checkpoint(root, 200, jit_incomplete=True)
    path = tmp_path / CACHE_FILE_NAME
    cache = SizeCache(str(path))
    run_scan(root, cache)
    cache.save()
    document = json.loads(path.read_text())
    stale = json.loads(json.dumps(document["entries"][0]))
    stale["name"] = "checkpoint-200"
    stale["identity"] = [["checkpoint-200", cut_off.stat().st_ino, True]]
    stale["walk"]["markers"] = ["trainer_state.json"]  # all a version-1 walk noted
    document["entries"].append(stale)
    # At the current version such an entry is trusted (no newest checkpoint: no stat re-check).
    path.write_text(json.dumps(document))
    trusted = run_scan(root, SizeCache(str(path)))
    assert trusted.walked == 0
    assert {c.name: c for c in trusted.checkpoints}["checkpoint-200"].complete
    document["version"] = 1
    path.write_text(json.dumps(document))
    older = SizeCache(str(path))
    assert len(older) == 0 and older.load_error is None
    result = run_scan(root, older)
    assert result.walked == 4
    assert {c.name: c for c in result.checkpoints}["checkpoint-200"].incomplete_reason == (
        "checkpoint-is-incomplete.txt inside (save in progress or interrupted)"
    )
