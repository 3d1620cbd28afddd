"""Integrity checks facing hostile roots, races, stops; the result cache and the background pass."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from daemon.integrity.background import BackgroundVerifier, Job, io_priority_class
from daemon.integrity.cache import IntegrityCache, check_cached
from daemon.integrity.check import check_checkpoint, signature_of
from daemon.integrity.result import IntegrityResult

TREES = Path(__file__).resolve().parents[1] / "fixtures" / "integrity" / "trees"


def copy(fixture: str, tmp_path: Path) -> Path:
    root = tmp_path / fixture
    shutil.copytree(TREES / fixture, root, symlinks=True)
    return root


def safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# --- hostile files ------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_a_fifo_in_place_of_a_weights_file_neither_hangs_nor_passes(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    os.mkfifo(folder / "model.safetensors")
    os.mkfifo(folder / "notes.fifo")
    result = check_checkpoint(tmp_path, "checkpoint-1", "hf", deep=True)
    assert result.status == "corrupt"
    assert result.problems == ("model.safetensors: not a regular file",)
    assert "notes.fifo: not a regular file" in result.skipped


def test_symlinks_inside_a_checkpoint_are_never_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(
        safetensors_bytes({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"1234")
    )
    root = tmp_path / "root"
    folder = root / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    os.symlink(secret, folder / "model.safetensors")
    os.symlink(tmp_path, folder / "escape")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model.safetensors"}})
    )
    result = check_checkpoint(root, "checkpoint-1", "hf")
    assert result.status == "unknown"
    assert "model.safetensors: a symbolic link (not followed)" in result.skipped
    assert "escape: a symbolic link (not followed)" in result.skipped
    assert "model.safetensors" not in result.checked_files
    # The checkpoint itself as a symlink: not followed either.
    os.symlink("checkpoint-1", root / "checkpoint-2")
    linked = check_checkpoint(root, "checkpoint-2", "hf")
    assert linked.status == "unknown" and linked.checked_files == ()
    assert "not found (or a symbolic link" in linked.skipped[0]


def test_an_absurd_safetensors_header_length_is_damage_not_an_allocation(tmp_path: Path) -> None:
    (tmp_path / "model_1.pt").write_bytes(b"")  # a neighbour, untouched
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    result = check_checkpoint(tmp_path, "checkpoint-1", "hf", deep=True)
    assert result.problems == (
        "model.safetensors: header length 1152921504606846976 is outside 1..100000000",
    )


class _Exploit:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {_Exploit.marker}",))

    marker = ""


def test_a_hostile_pickle_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    payload = pickle.dumps({"state": _Exploit(), "eval": (eval, ("1+1",))}, protocol=2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("model_1/data.pkl", payload)
        archive.writestr("model_1/version", "3\n")
    (tmp_path / "model_1.pt").write_bytes(buffer.getvalue())
    (tmp_path / "model_2.pt").write_bytes(payload)  # a bare pickle too
    for name in ("model_1.pt", "model_2.pt"):
        result = check_checkpoint(tmp_path, name, "pt", deep=True)
        assert result.status == "ok", result.problems
    assert not marker.exists()


# --- races, stops, progress ---------------------------------------------------------------------


def test_a_checkpoint_changing_while_checked_is_unknown_and_not_cacheable(tmp_path: Path) -> None:
    root = copy("hf", tmp_path)
    state = root / "checkpoint-10" / "trainer_state.json"

    def trainer_resumes(_: int) -> None:  # called after each chunk of the deep pass
        state.write_text('{"global_step": 11}')

    result = check_checkpoint(root, "checkpoint-10", "hf", deep=True, progress=trainer_resumes)
    assert result.status == "unknown" and result.changed and not result.cacheable
    assert "checkpoint-10: changed while checking" in result.skipped
    cache = IntegrityCache()
    assert cache.store(str(root), result) is False


def test_a_stop_ends_the_deep_pass_between_chunks(tmp_path: Path) -> None:
    root = copy("hf", tmp_path)
    stop = threading.Event()
    chunks: list[int] = []

    def progress(count: int) -> None:
        chunks.append(count)
        stop.set()

    result = check_checkpoint(root, "checkpoint-10", "hf", deep=True, stop=stop, progress=progress)
    assert result.status == "unknown" and result.stopped and not result.cacheable
    assert len(chunks) == 1  # nothing read after the stop
    full = check_checkpoint(root, "checkpoint-10", "hf", deep=True, progress=chunks.append)
    assert full.status == "ok" and sum(chunks[1:]) == full.bytes_read > 0


def test_unreadable_files_make_the_result_unknown(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    root = copy("hf", tmp_path)
    os.chmod(root / "checkpoint-10" / "optimizer.pt", 0)
    result = check_checkpoint(root, "checkpoint-10", "hf")
    assert result.status == "unknown"
    assert any(line.startswith("optimizer.pt: cannot be read") for line in result.skipped)


def test_a_missing_checkpoint_is_unknown_with_an_empty_signature(tmp_path: Path) -> None:
    result = check_checkpoint(tmp_path, "checkpoint-404", "hf")
    assert result.status == "unknown" and result.signature.entries == ()
    assert not result.cacheable
    assert signature_of(tmp_path, "checkpoint-404", "hf").entries == ()


# --- the cache ----------------------------------------------------------------------------------


def test_each_checkpoint_is_checked_once_while_its_signature_holds(tmp_path: Path) -> None:
    root = copy("tf", tmp_path)
    cache_path = tmp_path / "state" / "integrity-cache.json"
    cache = IntegrityCache(str(cache_path))
    first = check_cached(cache, str(root), "ckpt-1", "tf")
    assert first.status == "ok" and cache.save()
    # A fresh process: the result is read back and reused without reading any file.
    reloaded = IntegrityCache(str(cache_path))
    again = check_cached(reloaded, str(root), "ckpt-1", "tf")
    assert again.status == "ok" and again.checked_files == first.checked_files
    assert again.signature == first.signature
    # A cheap result does not answer a deep question; the deep one then answers both.
    assert reloaded.lookup(str(root), "ckpt-1", first.signature, deep=True) is None
    deep = check_cached(reloaded, str(root), "ckpt-1", "tf", deep=True)
    assert deep.deep and deep.bytes_read > 0
    assert reloaded.lookup(str(root), "ckpt-1", first.signature, deep=False).deep  # type: ignore[union-attr]
    # Any change of size or mtime invalidates it: the shard is checked (and found broken) anew.
    with open(root / "ckpt-1.data-00001-of-00002", "r+b") as handle:
        handle.truncate(100)
    assert check_cached(reloaded, str(root), "ckpt-1", "tf").status == "corrupt"
    reloaded.retain(str(root), [])
    assert reloaded.results(str(root)) == {}


def test_an_unreadable_cache_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "integrity-cache.json"
    path.write_text("{not json")
    cache = IntegrityCache(str(path))
    assert cache.results("/x") == {}
    path.write_text(json.dumps({"version": 1, "roots": {"/x": {"a": {"status": "weird"}}}}))
    assert IntegrityCache(str(path)).results("/x") == {}


# --- the background pass ------------------------------------------------------------------------


def test_the_background_verifier_deep_checks_at_idle_io_priority(tmp_path: Path) -> None:
    root = copy("dcp", tmp_path)
    broken = copy("deepspeed", tmp_path)
    with open(broken / "global_step1" / "mp_rank_00_model_states.pt", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\xff\xff\xff\xff")  # inside a member's data: only the CRC sees it
    done: list[tuple[Job, IntegrityResult]] = []
    finished = threading.Event()
    priorities: list[int | None] = []

    def on_result(job: Job, result: IntegrityResult) -> None:
        priorities.append(io_priority_class())
        done.append((job, result))
        if len(done) == 2:
            finished.set()

    cache = IntegrityCache()
    verifier = BackgroundVerifier(cache, on_result)
    verifier.start()
    try:
        assert verifier.submit(str(root), "step_10", "dcp")
        assert verifier.submit(str(broken), "global_step1", "deepspeed")
        assert finished.wait(30)
    finally:
        verifier.stop()
    statuses = {job.name: result.status for job, result in done}
    assert statuses == {"step_10": "ok", "global_step1": "corrupt"}
    assert all(result.deep for _, result in done)
    if verifier.idle_priority:
        assert priorities == [3, 3]  # the idle class, in the verifier's own thread
    assert cache.lookup(str(root), "step_10", signature_of(root, "step_10", "dcp"), deep=True)


def test_stopping_the_background_verifier_ends_a_pass_promptly(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    # A 256 MiB stored member: a long deep pass (sparse, so it costs no disk).
    big = root / "model_1.pt"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("model_1/data.pkl", pickle.dumps({}, protocol=2))
        with archive.open("model_1/data/0", "w", force_zip64=True) as member:
            block = b"\0" * (1 << 20)
            for _ in range(256):
                member.write(block)
    results: list[IntegrityResult] = []
    started = threading.Event()
    verifier = BackgroundVerifier(
        IntegrityCache(),
        lambda job, result: results.append(result),
        progress=lambda n: started.set(),
    )
    verifier.start()
    verifier.submit(str(root), "model_1.pt", "pt")
    assert started.wait(30)
    began = time.monotonic()
    verifier.stop()
    assert time.monotonic() - began < 5
    assert results == []  # a stopped pass reports nothing and caches nothing
