"""ckptd's own JSON files: streamed pieces give the same text as one `json.dumps`, a failed
write leaves nothing behind, and saving a large cache does not build it whole in memory."""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
from pathlib import Path

import pytest

from daemon.integrity.cache import IntegrityCache
from daemon.integrity.result import IntegrityResult, Signature, SignatureEntry
from daemon.jsonfile import StreamedArray, StreamedObject, pieces, write_json

ENTRIES: list[dict[str, object]] = [
    {"name": f"checkpoint-{i}", "ok": i % 2 == 0, "size": i * 1.5, "note": None, "u": "é\n"}
    for i in range(50)
]
DOCUMENT = {"version": 2, "entries": ENTRIES, "empty": {}, "none": []}


def test_streamed_pieces_are_the_compact_json_text() -> None:
    streamed = StreamedObject(
        [
            ("version", 2),
            ("entries", StreamedArray(iter(ENTRIES))),
            ("empty", StreamedObject(iter([]))),
            ("none", StreamedArray(iter([]))),
        ]
    )
    assert "".join(pieces(streamed)) == json.dumps(DOCUMENT, separators=(",", ":"))


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    path.write_text('{"old": true}')

    def failing() -> object:
        yield ("a", 1)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_json(str(path), StreamedObject(failing()))  # type: ignore[arg-type]
    assert path.read_text() == '{"old": true}'
    assert os.listdir(tmp_path) == ["cache.json"]


def _result(index: int) -> IntegrityResult:
    entries = (
        SignatureEntry("model.safetensors", "file", 4096 + index, 1_700_000_000_000_000_000),
        SignatureEntry("trainer_state.json", "file", 120, 1_700_000_000_000_000_000),
    )
    return IntegrityResult(
        checkpoint=f"checkpoint-{index * 10}",
        layout="hf",
        status="ok",
        checked_files=("model.safetensors", "trainer_state.json"),
        signature=Signature(entries),
    )


def test_saving_a_large_integrity_cache_does_not_build_it_whole(tmp_path: Path) -> None:
    """The daemon saves this cache after every prune; built as one document and one string,
    3,000 entries were a 2.5 MB peak each time, which the allocator kept resident."""
    cache = IntegrityCache(str(tmp_path / "integrity-cache.json"))
    for index in range(3000):
        cache.store("/data/run", _result(index), now=1_700_000_000.0)
    tracemalloc.start()
    try:
        assert cache.save()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    written = (tmp_path / "integrity-cache.json").stat().st_size
    assert written > 500_000
    # A copy of the name -> result mapping and one entry at a time: a fraction of the file.
    assert peak < written / 2
    again = IntegrityCache(str(tmp_path / "integrity-cache.json"))
    assert again.results("/data/run") == cache.results("/data/run")
    assert len(again.results("/data/run")) == 3000


def test_a_slow_save_never_replaces_a_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker and the deep pass both save the integrity cache: a save that took its copy
    first and wrote last would put the older cache on disk and mark the newer result saved."""
    import daemon.jsonfile as jsonfile

    path = tmp_path / "integrity-cache.json"
    cache = IntegrityCache(str(path))
    cache.store("/data/run", _result(1), now=1.0)
    first_writing, let_first_finish = threading.Event(), threading.Event()
    real_write = jsonfile.write_json

    def slow_first_write(where: str, document: object) -> None:
        if not first_writing.is_set():
            first_writing.set()
            assert let_first_finish.wait(10)
        real_write(where, document)

    monkeypatch.setattr(jsonfile, "write_json", slow_first_write)
    first = threading.Thread(target=cache.save)
    first.start()
    assert first_writing.wait(10)
    cache.store("/data/run", _result(2), now=2.0)  # the deep pass's newer result
    second = threading.Thread(target=cache.save)
    second.start()
    second.join(0.5)  # without one save at a time, it writes the newer file now
    let_first_finish.set()
    first.join(10)
    second.join(10)
    on_disk = IntegrityCache(str(path)).results("/data/run")
    assert sorted(on_disk) == ["checkpoint-10", "checkpoint-20"]
