"""A root opened once per run, and checked against the folder it was when first seen.

A root's owner may own its parent folder too, and so swap the root for a symlink to someone
else's folder between two runs (or during one). ckptd therefore never resolves a root's path
again mid-run: `open_root` opens it once (`O_DIRECTORY`) and everything that changes files works
relative to that descriptor (daemon/fsio.py). And the folder it opens must be the one recorded
when the root was first seen: its identity — device, inode and owner — is kept in
`<state_dir>/roots.json` (when the daemon's state folder exists: the daemon, or a CLI run
whose config names it). A different folder at that path refuses the root, with what was there
and what is there now; when the change is intended (the folder re-created by an admin),
`ckptd forget-root PATH` forgets the old identity and the next run records the new one.

`roots.json` also keeps, per root, the refusal last reported (a changed root, a trash ckptd did
not make), so a daemon retrying every few minutes records it in the history once and
`ckptd status` shows it until it clears.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from daemon.errors import SafetyRefusal, UsageError
from daemon.fsio import At, Dir
from daemon.jsonfile import replace_file

ROOTS_FILE = "roots.json"
_LOCK_FILE = ".roots.lock"


@dataclass(frozen=True)
class Identity:
    """Given a folder's status: which folder it is (device, inode) and whose (owner)."""

    dev: int
    ino: int
    uid: int

    @classmethod
    def of(cls, status: os.stat_result) -> Identity:
        return cls(status.st_dev, status.st_ino, status.st_uid)

    def describe(self) -> str:
        return f"dev:ino {self.dev}:{self.ino} owned by uid {self.uid}"

    def to_json(self) -> dict[str, int]:
        return {"dev": self.dev, "ino": self.ino, "uid": self.uid}

    @classmethod
    def from_json(cls, value: object) -> Identity | None:
        if not isinstance(value, dict):
            return None
        numbers = [value.get(key) for key in ("dev", "ino", "uid")]
        if not all(isinstance(number, int) for number in numbers):
            return None
        dev, ino, uid = (int(number) for number in numbers)  # type: ignore[arg-type]
        return cls(dev, ino, uid)


class RootChanged(SafetyRefusal):
    """The folder at a root's path is not the one recorded when the root was first seen."""


def changed_message(path: str, recorded: Identity, now: Identity, store_path: str) -> str:
    """Given a root and its two identities, return the refusal a person reads."""
    return (
        f"root identity changed: {path} was {recorded.describe()} when first seen, now "
        f"{now.describe()}; ckptd will not touch it (a swapped folder or symlink). If this is "
        f"intended (the folder was re-created), run `ckptd forget-root {path}` "
        f"(it forgets the entry in {store_path}) and the next run records the new one"
    )


class IdentityStore:
    """Given the daemon's state folder: the identity of each root when first seen, and the
    refusal last reported for it, in `<state_dir>/roots.json` (replaced whole, under a lock)."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, ROOTS_FILE)

    @classmethod
    def in_state_dir(cls, state_dir: str) -> IdentityStore | None:
        """Given a config's state_dir, return its store; None when that folder does not exist
        (a bare `ckptd prune ROOT` by a user: nothing of the daemon's to record into)."""
        return cls(state_dir) if os.path.isdir(state_dir) else None

    def read(self) -> dict[str, Any]:
        """Given the store, return its document (empty when absent or unreadable)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                document = json.load(handle)
        except (OSError, ValueError):
            return {"roots": {}}
        if not isinstance(document, dict) or not isinstance(document.get("roots"), dict):
            return {"roots": {}}
        return document

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, Any]]:
        """Hold the store's lock while the caller changes the document; then write it whole."""
        descriptor = os.open(
            os.path.join(self.state_dir, _LOCK_FILE),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            document = self.read()
            yield document
            self._write(document)
        finally:
            os.close(descriptor)

    def _write(self, document: dict[str, Any]) -> None:
        replace_file(
            self.path, lambda handle: json.dump(document, handle, indent=1, sort_keys=True)
        )

    def recorded(self, root: str) -> Identity | None:
        entry = self.read()["roots"].get(root)
        return Identity.from_json(entry)

    def remember(self, root: str, identity: Identity) -> None:
        """Given a root seen for the first time, record its identity (unless one is there)."""
        with self._changing() as document:
            if Identity.from_json(document["roots"].get(root)) is None:
                entry = identity.to_json() | {"first_seen": datetime.now(UTC).isoformat()}
                document["roots"][root] = entry

    def forget(self, root: str) -> Identity | None:
        """Given a root, forget its recorded identity and refusal; return the identity."""
        with self._changing() as document:
            entry = document["roots"].pop(root, None)
            document.setdefault("refused", {}).pop(root, None)
        return Identity.from_json(entry)

    def refusals(self) -> dict[str, str]:
        """Given the store, return the refusal last reported per root."""
        refused = self.read().get("refused")
        if not isinstance(refused, dict):
            return {}
        return {str(key): str(value) for key, value in refused.items()}

    def note_refusal(self, root: str, reason: str) -> bool:
        """Given a root refused for a reason, remember it; return whether it is news (not the
        refusal already reported), i.e. whether to record it in the history."""
        if self.refusals().get(root) == reason:
            return False
        with self._changing() as document:
            document.setdefault("refused", {})[root] = reason
        return True

    def clear_refusal(self, root: str) -> None:
        """Given a root that ran normally, forget any refusal reported for it."""
        if root not in self.refusals():
            return
        with self._changing() as document:
            document.setdefault("refused", {}).pop(root, None)


def root_key(path: str) -> str:
    """Given a root's path as configured, return the key its identity is kept under: the
    absolute path, not resolved (resolving would follow the very symlink an attacker swaps)."""
    return os.path.abspath(path)


@dataclass
class RootDir:
    """An open root: the descriptor every change inside it is relative to, the path it was
    configured as (`key`), the real path it had when opened (`path`, for messages, discovery
    and the history) and its identity."""

    key: str
    path: str
    fd: int
    identity: Identity

    def dir(self) -> Dir:
        return Dir(self.fd, self.path)

    def at(self, name: str) -> At:
        return self.dir().at(name)

    def verify_path(self) -> None:
        """Raise RootChanged when the root's path no longer leads to the folder opened (it was
        swapped during the run); what discovery read by path then was not this root."""
        for path in (self.key, self.path):
            try:
                now = Identity.of(os.stat(path))
            except OSError as error:
                raise RootChanged(
                    f"root changed during the run: {path}: {error.strerror or error}"
                ) from None
            if now != self.identity:
                raise RootChanged(
                    f"root changed during the run: {path} was {self.identity.describe()}, "
                    f"now {now.describe()}; nothing deleted"
                )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RootDir:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_root(path: str, *, store: IdentityStore | None = None) -> RootDir:
    """Given a root's path, open it once and check it is the folder first seen there.

    The path is followed as configured (an admin may name a root through a symlink); what it
    leads to must have the identity recorded in `store` (recorded now when there is none).
    Raises UsageError when it is not a folder, RootChanged when it is another folder.
    """
    key = root_key(path)
    try:
        descriptor = os.open(key, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{path}: not a folder") from None
    try:
        identity = Identity.of(os.fstat(descriptor))
        if store is not None:
            recorded = store.recorded(key)
            if recorded is None:
                # A state folder ckptd cannot write (a user's run with the daemon's config):
                # nothing recorded, the run still works on this one descriptor throughout.
                with contextlib.suppress(OSError):
                    store.remember(key, identity)
            elif recorded != identity:
                raise RootChanged(changed_message(key, recorded, identity, store.path))
        real = _real_path(descriptor, key)
    except BaseException:
        os.close(descriptor)
        raise
    return RootDir(key=key, path=real, fd=descriptor, identity=identity)


def _real_path(descriptor: int, path: str) -> str:
    """Given an open folder, return the path it is at (from /proc, else resolved by path)."""
    with contextlib.suppress(OSError):
        real = os.readlink(f"/proc/self/fd/{descriptor}")
        if real.startswith("/"):
            return real
    return os.path.realpath(path)


@contextlib.contextmanager
def opened(root: str | RootDir) -> Iterator[RootDir]:
    """Given a root's path (opened here without an identity check, and closed after) or an
    open root (used as it is), yield the open root."""
    if isinstance(root, RootDir):
        yield root
        return
    with open_root(root) as root_dir:
        yield root_dir
