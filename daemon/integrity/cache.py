"""Integrity results remembered while their checkpoint is unchanged: each checkpoint checked once.

A result is keyed by root and checkpoint name and holds the digest of the signature it was
computed for (every entry's path, kind, size and mtime: `daemon/integrity/result.py`). A lookup
walks the checkpoint (no file is read) and reuses the result when the digest is the same; a deep
result also answers a cheap lookup, never the other way round. Results that are not
`cacheable` (stopped, changed while checked, checkpoint absent) are never stored.

On disk (given a path, normally `<state_dir>/integrity-cache.json`): `{"version": 1,
"roots": {root: {name: {"digest", "status", "deep", "layout", "problems", "skipped",
"checked_files", "checked_at", "entries", "bytes"}}}}`, written to a temporary file and renamed.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

from daemon.integrity.check import check_checkpoint, signature_of
from daemon.integrity.result import IntegrityResult, Signature, Status
from daemon.jsonfile import RecordsByRoot

CACHE_FILE_NAME: Final = "integrity-cache.json"
_VERSION: Final = 1
_STATUSES: Final = ("ok", "corrupt", "unknown")


@dataclass(frozen=True, slots=True)
class CachedResult:
    """A remembered result: the verdict and what it was for."""

    digest: str
    layout: str
    status: Status
    deep: bool
    problems: tuple[str, ...]
    skipped: tuple[str, ...]
    checked_files: tuple[str, ...]
    checked_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "layout": self.layout,
            "status": self.status,
            "deep": self.deep,
            "problems": list(self.problems),
            "skipped": list(self.skipped),
            "checked_files": list(self.checked_files),
            "checked_at": self.checked_at,
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> CachedResult:
        """Given a dict written by `to_json`, return it (KeyError/TypeError/ValueError when not)."""
        status = document["status"]
        if status not in _STATUSES:
            raise ValueError(f"status {status!r}")
        return cls(
            digest=str(document["digest"]),
            layout=str(document["layout"]),
            status=status,
            deep=bool(document["deep"]),
            problems=tuple(str(line) for line in document["problems"]),
            skipped=tuple(str(line) for line in document["skipped"]),
            checked_files=tuple(str(path) for path in document["checked_files"]),
            checked_at=float(document["checked_at"]),
        )

    def result(self, name: str, signature: Signature) -> IntegrityResult:
        """Given the checkpoint's name and current signature (same digest), return the result."""
        return IntegrityResult(
            checkpoint=name,
            layout=self.layout,
            status=self.status,
            problems=self.problems,
            skipped=self.skipped,
            checked_files=self.checked_files,
            signature=signature,
            deep=self.deep,
        )


class IntegrityCache(RecordsByRoot[CachedResult]):
    """Given an optional file path: integrity results by (root, checkpoint). Thread-safe."""

    VERSION = _VERSION

    def __init__(self, path: str | None = None) -> None:
        super().__init__(path)
        if path is not None:
            self._load(path)

    @classmethod
    def in_state_dir(cls, state_dir: str) -> IntegrityCache:
        return cls(os.path.join(state_dir, CACHE_FILE_NAME))

    def lookup(
        self, root: str, name: str, signature: Signature, *, deep: bool = False
    ) -> IntegrityResult | None:
        """Given a checkpoint and its signature now, return its remembered result when it is for
        that signature (and deep, if `deep` is asked), else None."""
        if not signature.entries:
            return None
        with self._lock:
            cached = self._roots.get(root, {}).get(name)
        if cached is None or cached.digest != signature.digest or (deep and not cached.deep):
            return None
        return cached.result(name, signature)

    def store(self, root: str, result: IntegrityResult, *, now: float | None = None) -> bool:
        """Given a result, remember it (unless not cacheable, or a deep result for the same
        signature is already there and this one is cheap); return whether it was stored."""
        if not result.cacheable:
            return False
        digest = result.signature.digest
        with self._lock:
            entries = self._roots.setdefault(root, {})
            existing = entries.get(result.checkpoint)
            if (
                existing is not None
                and existing.digest == digest
                and existing.deep
                and not (result.deep)
            ):
                return False
            entries[result.checkpoint] = CachedResult(
                digest,
                result.layout,
                result.status,
                result.deep,
                result.problems,
                result.skipped,
                result.checked_files,
                time.time() if now is None else now,
            )
            self._dirty = True
        return True

    def results(self, root: str) -> dict[str, CachedResult]:
        """Given a root, return a copy of its remembered results by checkpoint name."""
        with self._lock:
            return dict(self._roots.get(root, {}))

    def retain(self, root: str, names: Collection[str]) -> None:
        """Given a root and the names of its checkpoints now, forget every other one."""
        keep = set(names)
        with self._lock:
            entries = self._roots.get(root)
            if entries is None:
                return
            for name in [name for name in entries if name not in keep]:
                del entries[name]
                self._dirty = True

    def _load(self, path: str) -> None:
        try:
            with open(path, "rb") as handle:
                document = json.loads(handle.read())
            if document.get("version") != _VERSION:
                return
            for root, entries in document["roots"].items():
                loaded = {name: CachedResult.from_json(entry) for name, entry in entries.items()}
                self._roots[str(root)] = loaded
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._roots = {}  # unreadable or from another version: check again


def check_cached(
    cache: IntegrityCache,
    root: str,
    name: str,
    layout: str,
    *,
    deep: bool = False,
    stop: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
) -> IntegrityResult:
    """Given a cache, a root, a checkpoint and its layout: return the remembered result while
    the checkpoint is unchanged, else check it (and remember the result)."""
    found = cache.lookup(root, name, signature_of(root, name, layout), deep=deep)
    if found is not None:
        return found
    result = check_checkpoint(root, name, layout, deep=deep, stop=stop, progress=progress)
    cache.store(root, result)
    return result
