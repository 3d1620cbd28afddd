"""ckptd's own files in its state folder (state.json, roots.json, the size cache, the integrity
cache, the user's test results) and the metrics textfile, each written whole by
`replace_file`: a temporary file beside it, renamed over the old one, so a reader sees the old
file or the new one, never half of one. Mode 0644: `ckptd status` and `check`, and
node_exporter, run as other users.

They are written in pieces, one checkpoint's entry at a time, never built first as one document
and one string. Built whole, the integrity cache of 3,000 checkpoints was a 5 MB peak at every
save (after every prune), and Python's allocator keeps the pages such a peak touched: the idle
daemon grew by 4-6 MB within a few saves (bench/bench_daemon.py measures the idle size again
after pruning new checkpoints). Written in pieces, the peak is one entry (tests/unit/
test_jsonfile.py bounds it); bench/bench_scan.py prints the time of a save (the size cache of
10,000 checkpoints: 50 ms).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, ClassVar, Generic, Protocol, TypeVar

_encode = json.JSONEncoder(separators=(",", ":")).encode

# The file's write buffer: the pieces are small, the system calls should not be.
_BUFFER_BYTES = 1 << 16


@dataclass(frozen=True, slots=True)
class StreamedObject:
    """Given (key, value) pairs produced on demand: a JSON object encoded one pair at a time.
    A value may itself be streamed."""

    pairs: Iterable[tuple[str, object]]


@dataclass(frozen=True, slots=True)
class StreamedArray:
    """Given values produced on demand: a JSON array encoded one value at a time."""

    values: Iterable[object]


class Record(Protocol):
    """What a per-checkpoint record of a cache is to this module: something with a JSON form."""

    def to_json(self) -> dict[str, Any]: ...


def roots_document(version: int, roots: Mapping[str, Mapping[str, Record]]) -> StreamedObject:
    """Given a format version and records by root and checkpoint name, return the document
    `{"version": V, "roots": {root: {name: record}}}`, each record encoded as it is written."""
    return StreamedObject(
        [
            ("version", version),
            (
                "roots",
                StreamedObject(
                    (
                        root,
                        StreamedObject((name, record.to_json()) for name, record in named.items()),
                    )
                    for root, named in roots.items()
                ),
            ),
        ]
    )


RecordT = TypeVar("RecordT", bound=Record)


class RecordsByRoot(Generic[RecordT]):
    """Given an optional file path: records by root and checkpoint name (the integrity cache,
    the user's test results), thread-safe, saved whole when they changed.

    One save at a time, each taking its copy and writing it under the same lock: two threads
    save these (the worker after a prune, the deep pass after a check), and an older copy
    written last would replace a newer file, and the newer result be lost once marked saved."""

    VERSION: ClassVar[int] = 1

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._roots: dict[str, dict[str, RecordT]] = {}
        self._dirty = False

    def save(self) -> bool:
        """Write the file if anything changed (temporary file, fsync, rename); return whether it
        wrote. Without a path, or on an error, nothing is written."""
        if self.path is None:
            return False
        with self._save_lock:
            with self._lock:
                if not self._dirty:
                    return False
                # Copies of the mappings only: the records are frozen, encoded one by one.
                roots = {root: dict(named) for root, named in self._roots.items()}
                self._dirty = False
            try:
                write_json(self.path, roots_document(self.VERSION, roots))
            except OSError:
                with self._lock:
                    self._dirty = True
                return False
        return True


def _records(named: Mapping[str, Record]) -> StreamedObject:
    return StreamedObject((name, record.to_json()) for name, record in named.items())


def pieces(value: object) -> Iterator[str]:
    """Given a JSON value whose objects and arrays may be streamed, return its text in pieces
    (`"".join` of them is the compact JSON text)."""
    if isinstance(value, StreamedObject):
        yield "{"
        for index, (key, item) in enumerate(value.pairs):
            yield f"{',' if index else ''}{_encode(key)}:"
            yield from pieces(item)
        yield "}"
    elif isinstance(value, StreamedArray):
        yield "["
        for index, item in enumerate(value.values):
            if index:
                yield ","
            yield from pieces(item)
        yield "]"
    else:
        yield _encode(value)


def replace_file(path: str, write: Callable[[IO[str]], object], *, durable: bool = True) -> None:
    """Given a path and what to write into it, replace the file in one rename (fsynced first
    when `durable`); OSError when it cannot be, and no temporary file is left behind."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    # A dot name not ending like the file: node_exporter's textfile collector skips it.
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", buffering=_BUFFER_BYTES) as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)  # mkstemp makes it 0600
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_json(path: str, document: object) -> None:
    """Given a path and a JSON document (parts of it may be streamed), write it whole and
    durably, in pieces (OSError when it cannot be)."""

    def write(handle: IO[str]) -> None:
        for piece in pieces(document):
            handle.write(piece)

    replace_file(path, write)
