"""ckptd's own JSON files: streamed pieces give the same text as one `json.dumps`, a failed
write leaves nothing behind, and saving a large cache does not build it whole in memory."""

from __future__ import annotations

import json
import os
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
