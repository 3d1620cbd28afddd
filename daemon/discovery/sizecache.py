"""What a walk of one checkpoint found, remembered so a complete checkpoint is walked once.

A complete checkpoint never changes, so its size, freeable bytes, newest mtime and the marker
files inside it are computed by one walk and kept here, in memory and (given a path) in a JSON
file in `state_dir`, so a daemon restart does not walk 10,000 checkpoints again.

Keying, and what proves "unchanged": each entry is keyed by root and checkpoint name and holds
the checkpoint's *identity*: for every root entry it consists of, `(name, inode, is_dir)` as
the directory listing reports them (`os.scandir` gives the inode and type for free). A rescan
therefore costs one listing of the root and no stat per checkpoint: at 10,000 checkpoints a
stat each would cost about 16 ms on its own, most of the 20 ms budget of a rescan. A folder
deleted and re-created gets a new inode in the listing and is walked again.

What the listing cannot see, a change *inside* an unchanged folder (a `.keep` dropped in, a
resumed trainer overwriting `checkpoint-600/` in place), is caught by the `fingerprint`: the
stat of every member (inode, mtime, ctime, size) plus the stat of its marker file. Discovery
re-checks the fingerprint (two `lstat`s) for the checkpoints that matter: the newest of each
series, any names the caller asks for (planning asks for every checkpoint a plan would
delete, right before handing the plan on), or all of them with `verify=True`.

Only *final* walks are cached: settled (nothing written for `settle_seconds`), marker present,
nothing vanished or unreadable during the walk. Anything else is walked again on every scan
(there are few: the checkpoint being written, a crashed save's leftovers).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from daemon.jsonfile import StreamedArray, StreamedObject, write_json

CACHE_FILE_NAME = "size-cache.json"
# 2: walks note transformers' checkpoint-is-incomplete.txt and dcp's __0.metadata; a walk of
# an older version could call a JIT save cut off mid-way complete, so it is walked again.
_FORMAT_VERSION = 2

Member = tuple[str, int, bool]
"""One root entry of a checkpoint as `(name, inode, is_dir)`, as the directory listing says."""

Identity = tuple[Member, ...]
"""A checkpoint's root entries (`Member`s), sorted by name."""


_NO_METRICS: Mapping[str, float] = MappingProxyType({})


def _empty_metrics() -> Mapping[str, float]:
    return _NO_METRICS


@dataclass(frozen=True, slots=True)
class WalkResult:
    """Given one walk of one checkpoint: what it found.

    `markers` are the names of known marker files found at its top (`trainer_state.json`,
    `.metadata`, `.keep`, `*.distcp` as `"*.distcp"`, ...). `metrics` and
    `best_model_checkpoint` come from `trainer_state.json` or a metrics sidecar. `fingerprint`
    is the stat proof described in the module docstring. `error` says why the walk is not to
    be trusted (unreadable, something vanished while walking); such walks are never cached.
    """

    size_bytes: int
    freeable_bytes: int
    mtime_ns: int
    markers: frozenset[str] = frozenset()
    metrics: Mapping[str, float] = field(default_factory=_empty_metrics)
    best_model_checkpoint: str | None = None
    fingerprint: tuple[int, ...] = ()
    error: str | None = None
    # Whether trainer_state.json / metrics sidecars were read (they are read only when needed:
    # for keep_best, or for the newest checkpoint's best_model_checkpoint).
    state_read: bool = False
    # Whether trainer_state.json was there but could not be parsed (a save cut off inside it).
    state_unreadable: bool = False
    # Files and folders seen inside (to tell an I/O-bound walk from a CPU-bound one).
    entry_count: int = 0

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9

    def to_json(self) -> dict[str, Any]:
        """Given a walk, return it as a JSON-ready dict."""
        return {
            "size": self.size_bytes,
            "freeable": self.freeable_bytes,
            "mtime_ns": self.mtime_ns,
            "markers": sorted(self.markers),
            "metrics": dict(self.metrics),
            "best": self.best_model_checkpoint,
            "fingerprint": list(self.fingerprint),
            "state_read": self.state_read,
            "state_unreadable": self.state_unreadable,
            "entries": self.entry_count,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> WalkResult:
        """Given a dict written by `to_json`, return the walk (KeyError/TypeError if malformed)."""
        raw_metrics = document["metrics"]
        metrics = (
            MappingProxyType({str(key): float(value) for key, value in raw_metrics.items()})
            if raw_metrics
            else _NO_METRICS
        )
        best = document["best"]
        return cls(
            size_bytes=int(document["size"]),
            freeable_bytes=int(document["freeable"]),
            mtime_ns=int(document["mtime_ns"]),
            markers=frozenset(str(marker) for marker in document["markers"]),
            metrics=metrics,
            best_model_checkpoint=str(best) if best is not None else None,
            fingerprint=tuple(int(number) for number in document["fingerprint"]),
            state_read=bool(document.get("state_read", False)),
            state_unreadable=bool(document.get("state_unreadable", False)),
            entry_count=int(document.get("entries", 0)),
        )


class CacheEntry:
    """One cached checkpoint: its identity, its walk, and (in memory only) what discovery last
    made of it: its record of the scan (`found`) and the Checkpoint value built from it with the
    key it was built under, so an unchanged checkpoint costs no new object on a rescan."""

    __slots__ = ("built", "built_key", "found", "identity", "walk")

    def __init__(self, identity: Identity, walk: WalkResult) -> None:
        self.identity = identity
        self.walk = walk
        # Discovery's own values (typed there): the scan record and the built Checkpoint.
        self.found: Any = None
        self.built: Any = None
        self.built_key: tuple[object, ...] | None = None


class SizeCache:
    """Given an optional JSON file path, a thread-safe cache of final checkpoint walks.

    Discovery calls `lookup`/`store`/`retain`; the owner calls `save()` when convenient (after
    a scan, off the hot path): it writes only when something changed, atomically.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._roots: dict[str, dict[str, CacheEntry]] = {}
        # In memory only: per root, what each entry name means under a layout or patterns.
        self._name_memos: dict[tuple[str, tuple[str, ...]], dict[Any, Any]] = {}
        self._dirty = False
        self.hits = 0
        self.misses = 0
        self.load_error: str | None = None
        if path is not None:
            self._load(path)

    @classmethod
    def in_state_dir(cls, state_dir: str) -> SizeCache:
        """Given the daemon's state_dir, return the cache persisted there."""
        return cls(os.path.join(state_dir, CACHE_FILE_NAME))

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._roots.values())

    def entries(self, root: str) -> dict[str, CacheEntry]:
        """Given a root, return a snapshot of its cached entries by checkpoint name (a copy: a
        scan reads it without holding the lock per checkpoint)."""
        with self._lock:
            return dict(self._roots.get(root, ()))

    def name_memo(self, root: str, signature: tuple[str, ...]) -> dict[Any, Any]:
        """Given a root and what its names are matched against (layout or patterns), return the
        memo of (name, is_dir) -> match that discovery fills: a name means the same thing on
        every scan, so each name is matched once. Dropped when it outgrows the root."""
        with self._lock:
            key = (root, signature)
            memo = self._name_memos.get(key)
            if memo is None:
                stale = [other for other in self._name_memos if other[0] == root]
                for other in stale:
                    del self._name_memos[other]
                memo = self._name_memos[key] = {}
            return memo

    def trim_name_memo(self, root: str, signature: tuple[str, ...], listed: int) -> None:
        """Given how many entries the root listed, forget the memo when it holds many more
        (names of deleted entries), so it never grows without bound."""
        with self._lock:
            memo = self._name_memos.get((root, signature))
            if memo is not None and len(memo) > 2 * listed + 1000:
                memo.clear()

    def lookup(self, root: str, name: str, identity: Identity) -> CacheEntry | None:
        """Given a root, a checkpoint name and its identity now, return the cached entry if it
        is for that very identity, else None."""
        with self._lock:
            entries = self._roots.get(root)
            entry = entries.get(name) if entries is not None else None
            if entry is not None and entry.identity == identity:
                self.hits += 1
                return entry
            self.misses += 1
            return None

    def store(self, root: str, name: str, identity: Identity, walk: WalkResult) -> CacheEntry:
        """Given a final walk of a checkpoint, remember it and return its entry."""
        entry = CacheEntry(identity, walk)
        with self._lock:
            self._roots.setdefault(root, {})[name] = entry
            self._dirty = True
        return entry

    def forget(self, root: str, name: str) -> None:
        """Given a checkpoint, drop what is cached of it (it changed or was deleted)."""
        with self._lock:
            entries = self._roots.get(root)
            if entries is not None and entries.pop(name, None) is not None:
                self._dirty = True

    def retain(self, root: str, names: Collection[str]) -> None:
        """Given a root and the checkpoint names present now, drop the cached others."""
        present = names if isinstance(names, set | frozenset) else set(names)
        with self._lock:
            entries = self._roots.get(root)
            if not entries:
                return
            stale = entries.keys() - present
            for name in stale:
                del entries[name]
            if stale:
                self._dirty = True

    @property
    def dirty(self) -> bool:
        with self._lock:
            return self._dirty

    def save(self) -> bool:
        """Given a cache with a path, write it if it changed since the last save/load (to a
        temporary file, fsynced, renamed over the old one) and return whether it wrote."""
        if self.path is None:
            return False
        # One save at a time, so an older snapshot never replaces a newer file.
        with self._save_lock:
            return self._save(self.path)

    def _save(self, path: str) -> bool:
        with self._lock:
            if not self._dirty:
                return False
            # Copies of the mappings only; each entry is encoded as it is written (daemon/jsonfile).
            roots = {root: dict(entries) for root, entries in self._roots.items()}
            self._dirty = False
        document = StreamedObject(
            [("version", _FORMAT_VERSION), ("entries", StreamedArray(_entries_json(roots)))]
        )
        try:
            write_json(path, document)
        except BaseException:
            with self._lock:
                self._dirty = True
            raise
        return True

    def _load(self, path: str) -> None:
        # A missing, unreadable or malformed cache only costs a walk: it is never an error.
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            self.load_error = f"{path}: {error}"
            return
        try:
            version = document.get("version")
            if (
                isinstance(version, int)
                and not isinstance(version, bool)
                and version < _FORMAT_VERSION
            ):
                return  # an older daemon's cache: what it did not note costs one walk, no error
            if version != _FORMAT_VERSION:
                raise ValueError(f"version {version!r}")
            roots: dict[str, dict[str, CacheEntry]] = {}
            for item in document["entries"]:
                identity: Identity = tuple(
                    (str(name), int(inode), bool(is_dir))
                    for name, inode, is_dir in item["identity"]
                )
                roots.setdefault(str(item["root"]), {})[str(item["name"])] = CacheEntry(
                    identity, WalkResult.from_json(item["walk"])
                )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            self.load_error = f"{path}: malformed cache ({error!r}); starting empty"
            return
        self._roots = roots


def _entries_json(roots: Mapping[str, Mapping[str, CacheEntry]]) -> Iterator[dict[str, Any]]:
    """Given the entries by root, return each one's JSON form, one at a time."""
    for root, entries in roots.items():
        for name, entry in entries.items():
            yield {
                "root": root,
                "name": name,
                "identity": [list(part) for part in entry.identity],
                "walk": entry.walk.to_json(),
            }
