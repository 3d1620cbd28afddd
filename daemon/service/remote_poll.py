"""`ckptd run` on object-storage roots: poll each one every `poll_interval` (default 30 s).

Object storage sends no events. Each root keeps a `daemon.storage.listing.Poller`: its first
poll lists the root recursively once, every later poll only the root's top level plus the
members of checkpoints not seen complete yet, so the listing cost per poll is bounded by the
number of checkpoints (1 request per 1,000) and new checkpoints' objects, never all objects.

A poll says whether something new could be pruned: a checkpoint prefix that became complete
(its marker object is there and nothing was written under it for the settle time), or a
change among the objects directly in the root (a TensorFlow `ckpt-5.index`, a tracker such as
`latest` rewritten). The worker then prunes the root as it does after a local checkpoint
(`prune_root`, which lists the root afresh and plans from that listing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.config import RootConfig
from daemon.discovery.remote import open_root_store
from daemon.pruning.remote import MARKER_NAMES
from daemon.storage.listing import Poller

# The completion markers a poll looks for (any layout's; the prune's own scan decides).
POLL_MARKERS = frozenset(MARKER_NAMES)


@dataclass
class _Watched:
    """One polled root: the options it was opened with, its poller, what the last poll saw."""

    options: dict[str, object]
    poller: Poller
    seen: frozenset[tuple[str, float]] = frozenset()


@dataclass
class RemotePolls:
    """The worker's pollers, one per object-storage root (rebuilt when its config changes)."""

    roots: dict[str, _Watched] = field(default_factory=dict)

    def poll(self, root: RootConfig, *, now: float, settle_seconds: float) -> bool:
        """Given an object-storage root, the time and its settle time, list what changed since
        the last poll; return whether something new may be prunable. The first poll of a root
        says so whenever a complete checkpoint is there: one saved between the daemon's
        start-up prune and this poll must not wait for the next one."""
        watched = self.roots.get(root.path)
        if watched is None or watched.options != root.storage_options:
            url, store = open_root_store(root)
            poller = Poller(store, url, POLL_MARKERS, settle_seconds=settle_seconds)
            watched = _Watched(dict(root.storage_options), poller)
            self.roots[root.path] = watched
        watched.poller.settle_seconds = settle_seconds
        watched.poller.poll(now)
        seen = frozenset((name, 0.0) for name in watched.poller.settled) | frozenset(
            watched.poller.top_objects.items()
        )
        news = bool(seen - watched.seen)
        watched.seen = seen
        return news

    def retain(self, paths: set[str]) -> None:
        """Given the object-storage roots configured now, forget the pollers of the others."""
        for path in set(self.roots) - paths:
            del self.roots[path]

    def polled(self) -> int:
        """Return how many object-storage roots answered a poll (status: "watching")."""
        return sum(1 for watched in self.roots.values() if watched.poller.polls > 0)

    def requests(self, path: str) -> int:
        """Given a root, return the list requests its store made so far (tests, status)."""
        watched = self.roots.get(path)
        counted = getattr(watched.poller.store, "requests", None) if watched else None
        return sum(counted.values()) if counted is not None else 0
