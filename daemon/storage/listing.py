"""Discovery over object listings: a checkpoint is a prefix (`checkpoint-1200/`), its size and
time come from the listing, and it is complete only by its marker object plus settle time.

Listing cost stays bounded while the daemon polls (`watch: poll`): the first poll lists the
root recursively once (1 request per 1,000 objects); every later poll lists only the root's
top level (1 request per 1,000 checkpoints) and then the members of checkpoints it has not
seen complete yet — a new one, or one still being written. A complete checkpoint never
changes, so its members are listed once, like the local size cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from daemon.storage.base import ObjectInfo, ObjectStore
from daemon.storage.journal import OWN_PREFIX, CheckpointObjects
from daemon.storage.url import StorageUrl

# More new prefixes than this in one poll: one recursive listing is cheaper than one per prefix.
RELIST_THRESHOLD = 50


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A checkpoint prefix as listed: every object under it, its marker keys, total size and
    the newest object's time (settle time counts from it)."""

    name: str
    prefix: str
    objects: tuple[ObjectInfo, ...]
    markers: tuple[str, ...]

    @property
    def size(self) -> int:
        return sum(item.size for item in self.objects)

    @property
    def mtime(self) -> float:
        return max((item.mtime for item in self.objects), default=0.0)

    def incomplete_reason(self, now: float, settle_seconds: float) -> str | None:
        """Given the time and the settle time, return why it is not complete, or None."""
        if not self.markers:
            return "no marker object"
        age = now - self.mtime
        if age < settle_seconds:
            return f"settling: written {age:.0f} s ago"
        return None

    def to_delete(self) -> CheckpointObjects:
        """Return it as the journal's deletion unit (markers first)."""
        return CheckpointObjects(self.name, self.markers, self.objects, self.prefix)


def _is_marker(key: str, markers: frozenset[str]) -> bool:
    return key.rsplit("/", 1)[-1] in markers


def group(
    root: StorageUrl, objects: Iterable[ObjectInfo], markers: frozenset[str]
) -> dict[str, RemoteCheckpoint]:
    """Given a recursive listing of a root, return its first-level prefixes as checkpoints
    (ckptd's own `.ckptd-*` prefixes and top-level objects left out)."""
    top = root.directory()
    members: dict[str, list[ObjectInfo]] = {}
    for item in objects:
        name, slash, _rest = item.key[len(top) :].partition("/")
        if slash and not name.startswith(OWN_PREFIX):
            members.setdefault(name, []).append(item)
    return {name: _checkpoint(top, name, items, markers) for name, items in members.items()}


def _checkpoint(
    top: str, name: str, items: list[ObjectInfo], markers: frozenset[str]
) -> RemoteCheckpoint:
    return RemoteCheckpoint(
        name=name,
        prefix=f"{top}{name}/",
        objects=tuple(items),
        markers=tuple(item.key for item in items if _is_marker(item.key, markers)),
    )


@dataclass
class Poller:
    """The listing state of one root between polls (members of complete checkpoints kept)."""

    store: ObjectStore
    root: StorageUrl
    markers: frozenset[str]
    settle_seconds: float = 0.0
    known: dict[str, RemoteCheckpoint] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)
    polls: int = 0
    # Objects directly in the root (TensorFlow's `ckpt-5.index`, a `latest` tracker), by name:
    # their LastModified (a rewritten tracker is news too).
    top_objects: dict[str, float] = field(default_factory=dict)

    def poll(self, now: float) -> Mapping[str, RemoteCheckpoint]:
        """Given the time, list what changed since the last poll; return every checkpoint."""
        top = self.root.directory()
        if self.polls == 0:
            self._list_all(top)
        else:
            self._poll_top(top)
        self.polls += 1
        self.settled = {
            name
            for name, checkpoint in self.known.items()
            if checkpoint.incomplete_reason(now, self.settle_seconds) is None
        }
        return self.known

    def _list_all(self, top: str) -> None:
        objects = list(self.store.list_tree(top))
        self.known = group(self.root, objects, self.markers)
        self.top_objects = {
            item.key[len(top) :]: item.mtime
            for item in objects
            if "/" not in item.key[len(top) :] and not item.key[len(top) :].startswith(OWN_PREFIX)
        }

    def _poll_top(self, top: str) -> None:
        present: set[str] = set()
        top_objects: dict[str, float] = {}
        for entry in self.store.list_top(top):
            if entry.name.startswith(OWN_PREFIX):
                continue
            if entry.is_prefix:
                present.add(entry.name)
            else:
                top_objects[entry.name] = entry.mtime
        self.top_objects = top_objects
        for gone in set(self.known) - present:
            del self.known[gone]
        stale = sorted(present - self.settled)
        if len(stale) > RELIST_THRESHOLD:
            self._list_all(top)
            return
        for name in stale:
            items = list(self.store.list_tree(f"{top}{name}/"))
            if items:
                self.known[name] = _checkpoint(top, name, items, self.markers)
            else:
                self.known.pop(name, None)
