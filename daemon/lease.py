"""One pruner per root: a lease naming host, PID and expiry, renewed while the daemon runs.

Two ckptd daemons that see the same root (nodes sharing an NFS or Lustre mount, or an
object-storage prefix) must not both prune it. The one holding the lease prunes; the other says
so in `status` and prunes nothing there. A lease is taken over only once it has expired.

Every change of the lease is a compare-and-swap on the state last read, so each state has
exactly one successor, whether it is a renewal by the holder or a takeover by another node:

- **Object storage**: the lease object `<root>/.ckptd-lease` is created with `If-None-Match: *`
  and replaced with `If-Match: <ETag read>` (S3 answers 412 to the loser). A server that
  ignores the conditions is detected by a probe before the first acquisition and refused.
- **POSIX** (local and shared mounts): the lease file `<root>/.ckptd-lease` is created by
  `link()`ing a fully written temporary file to that name (fails if the name exists: no reader
  ever sees a half-written lease). To replace state S, a taker or the renewing holder must
  first create the claim file `.ckptd-lease.claim-<id of S>` exclusively (`O_CREAT|O_EXCL`);
  the one that wins re-reads the lease, checks it is still S, and renames a fresh file over
  it. Losers of the claim, and a winner that finds S already replaced, give up.

NFS: `O_EXCL` is atomic on NFSv3 and later. `link()` over NFS can report an error for a link
that was made (a retransmitted request); as the open(2) manual advises, the link count of the
temporary file then tells whether it worked. Reads rely on close-to-open consistency (the
default; not with the `nocto` mount option). The open-file veto of ckptd only sees processes
on its own machine; on a shared mount, completeness markers, settle time, holds and this
lease are what protect a checkpoint another node writes.

Clocks: `expires` is wall-clock time, written by the holder. The holder acts only while
`now < expires - skew`; another node takes over only when `now > expires + skew`. Clocks that
differ by less than `skew` therefore never let two nodes act at once. Renewal happens every
third of the duration.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

from daemon.errors import CkptdError
from daemon.storage.base import ObjectStore
from daemon.storage.url import StorageUrl

LEASE_NAME = ".ckptd-lease"
DEFAULT_DURATION = 120.0
DEFAULT_SKEW = 30.0
_READ_LIMIT = 4096


class LeaseError(CkptdError):
    """The lease cannot be used safely (a symlink or folder in its place, a store that ignores
    conditional writes): prune nothing in that root."""


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a lease (host, PID, a random token per daemon) and until when (epoch s)."""

    host: str
    pid: int
    expires: float
    token: str
    acquired: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def decode(data: bytes) -> LeaseInfo | None:
        """Given lease bytes, return the holder, or None when they are not a lease."""
        try:
            raw = json.loads(data)
            return LeaseInfo(
                host=str(raw["host"]),
                pid=int(raw["pid"]),
                expires=float(raw["expires"]),
                token=str(raw["token"]),
                acquired=float(raw["acquired"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


class LeaseState(NamedTuple):
    """The lease as last read: its holder (None when unreadable), a version that changes with
    every write (ETag, or inode+content hash) and its modification time."""

    info: LeaseInfo | None
    version: str
    mtime: float


class Lease:
    """The protocol, over a backend's read, create and compare-and-swap (subclasses)."""

    def __init__(
        self, duration: float = DEFAULT_DURATION, skew: float = DEFAULT_SKEW, host: str = ""
    ) -> None:
        if duration <= 2 * skew:
            raise ValueError(f"lease duration {duration} s must exceed twice the skew {skew} s")
        self.duration = duration
        self.skew = skew
        self.host = host or socket.gethostname()
        self.pid = os.getpid()
        self.token = secrets.token_hex(16)
        self.held = False
        self.expires = 0.0
        self.renewed = 0.0

    # --- what a backend provides -----------------------------------------------------------

    def _read(self) -> LeaseState | None:
        raise NotImplementedError

    def _create(self, data: bytes) -> bool:
        raise NotImplementedError

    def _replace(self, state: LeaseState, data: bytes) -> bool:
        raise NotImplementedError

    # --- the protocol ----------------------------------------------------------------------

    def _mine(self, now: float) -> LeaseInfo:
        return LeaseInfo(self.host, self.pid, now + self.duration, self.token, now)

    def _expired(self, state: LeaseState, now: float) -> bool:
        if state.info is None:
            # Unreadable (not ours, or a foreign writer's): count from its last write.
            return now > state.mtime + self.duration + self.skew
        return now > state.info.expires + self.skew

    def _swap(self, state: LeaseState, now: float) -> bool:
        self.held = self._replace(state, self._mine(now).encode())
        if self.held:
            self.expires, self.renewed = now + self.duration, now
        return self.held

    def acquire(self, now: float) -> bool:
        """Given the time, take the lease if it is free, expired or already ours; return
        whether this daemon now holds it."""
        state = self._read()
        if state is None:
            if self._create(self._mine(now).encode()):
                self.held, self.expires, self.renewed = True, now + self.duration, now
                return True
            state = self._read()
            if state is None:
                self.held = False
                return False
        if state.info is not None and state.info.token == self.token:
            return self._swap(state, now)
        if not self._expired(state, now):
            self.held = False
            return False
        return self._swap(state, now)

    def take_from_dead(self, now: float, gone: Callable[[LeaseInfo], bool]) -> bool:
        """Given the time and a test that tells a holder gone for certain (a process of this
        very machine that no longer runs), take the lease from such a holder before its
        expiry, by the same compare-and-swap; return whether this daemon holds it now."""
        state = self._read()
        if state is None or state.info is None or state.info.expires <= 0:
            return False
        if state.info.token == self.token or not gone(state.info):
            return False
        return self._swap(state, now)

    def renew(self, now: float) -> bool:
        """Given the time, extend a lease this daemon holds; return whether it still holds it
        (False: taken over after it expired, or released by hand)."""
        if not self.held:
            return False
        state = self._read()
        if state is None or state.info is None or state.info.token != self.token:
            self.held = False
            return False
        return self._swap(state, now)

    def renewal_due(self, now: float) -> bool:
        """Given the time, return whether a third of the duration passed since the last write."""
        return now >= self.renewed + self.duration / 3

    def valid(self, now: float) -> bool:
        """Given the time, return whether this daemon may act on the root now (it holds the
        lease and is more than `skew` from its expiry)."""
        return self.held and now < self.expires - self.skew

    def release(self) -> None:
        """Give the lease up (written as expired), if this daemon holds it."""
        if not self.held:
            return
        self.held = False
        state = self._read()
        if state is None or state.info is None or state.info.token != self.token:
            return
        released = LeaseInfo(self.host, self.pid, 0.0, self.token, state.info.acquired)
        self._replace(state, released.encode())

    def written(self) -> LeaseInfo | None:
        """Return the lease as written, even expired or released (None: none, unreadable)."""
        state = self._read()
        return state.info if state is not None else None

    def holder(self) -> LeaseInfo | None:
        """Return who holds the lease as written (None: nobody, released, or unreadable)."""
        state = self._read()
        if state is None or state.info is None or state.info.expires <= 0:
            return None
        return state.info


# --- POSIX -------------------------------------------------------------------------------


def _exclusive_create(directory: str, name: str, data: bytes) -> bool:
    """Given a folder, a name and bytes, create that file with exactly those bytes only if the
    name is free; return whether this call created it (NFS-safe: link + link count)."""
    temporary = os.path.join(directory, f"{LEASE_NAME}.tmp-{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temporary, flags, 0o644)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
        try:
            os.link(temporary, os.path.join(directory, name), follow_symlinks=False)
            return True
        except FileExistsError:
            # Over NFS a retransmitted LINK can fail although the first one worked.
            return os.fstat(descriptor).st_nlink == 2
    finally:
        os.close(descriptor)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


class PosixLease(Lease):
    """The lease as the file `<root>/.ckptd-lease` on a local or shared POSIX filesystem."""

    def __init__(
        self,
        root: str,
        duration: float = DEFAULT_DURATION,
        skew: float = DEFAULT_SKEW,
        host: str = "",
    ) -> None:
        super().__init__(duration, skew, host)
        self.root = root
        self.path = os.path.join(root, LEASE_NAME)

    def _read(self) -> LeaseState | None:
        try:
            descriptor = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise LeaseError(f"{self.path} is a symlink: refusing to use it") from None
            raise
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise LeaseError(f"{self.path} is not a regular file: refusing to use it")
            data = os.read(descriptor, _READ_LIMIT)
        finally:
            os.close(descriptor)
        digest = hashlib.sha256(data).hexdigest()[:32]
        version = f"{status.st_dev}-{status.st_ino}-{status.st_mtime_ns}-{digest}"
        return LeaseState(LeaseInfo.decode(data), version, status.st_mtime)

    def _create(self, data: bytes) -> bool:
        return _exclusive_create(self.root, LEASE_NAME, data)

    def _replace(self, state: LeaseState, data: bytes) -> bool:
        claim = f"{LEASE_NAME}.claim-{hashlib.sha256(state.version.encode()).hexdigest()[:32]}"
        if not _exclusive_create(self.root, claim, self.token.encode()):
            # Lost to another claimant, or a daemon crashed holding this claim: sweep claims
            # old beyond any live use so that the next attempt can go on.
            self._sweep(time.time())
            return False
        try:
            current = self._read()
            if current is None or current.version != state.version:
                return False  # replaced between our read and our claim
            temporary = os.path.join(self.root, f"{LEASE_NAME}.tmp-{secrets.token_hex(8)}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            descriptor = os.open(temporary, flags, 0o644)
            try:
                os.write(descriptor, data)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            if _read_text(os.path.join(self.root, claim)) != self.token:
                return False  # swept as stale while we paused: another may be claiming
            os.rename(temporary, self.path)
            _fsync_directory(self.root)
            return True
        finally:
            # Safe to drop at once: a late claimant of the old state finds it replaced.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.root, claim))

    def _sweep(self, now: float) -> None:
        """Remove claim and temporary files that crashed daemons left (old beyond any use)."""
        horizon = now - (self.duration + self.skew)
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.name.startswith(f"{LEASE_NAME}.") or entry.is_symlink():
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat(follow_symlinks=False).st_mtime < horizon:
                        os.unlink(entry.path)


def _read_text(path: str) -> str:
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    try:
        return os.read(descriptor, _READ_LIMIT).decode(errors="replace")
    finally:
        os.close(descriptor)


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- object storage ----------------------------------------------------------------------


class ObjectLease(Lease):
    """The lease as the object `<root>/.ckptd-lease`, through conditional writes."""

    def __init__(
        self,
        store: ObjectStore,
        root: StorageUrl,
        duration: float = DEFAULT_DURATION,
        skew: float = DEFAULT_SKEW,
        host: str = "",
    ) -> None:
        super().__init__(duration, skew, host)
        self.store = store
        self.key = root.key(LEASE_NAME)
        self.scheme = root.scheme
        self._probed = False

    def _probe(self) -> None:
        """Refuse a store that ignores `If-None-Match` (two writers would both win)."""
        if self._probed:
            return
        probe = f"{self.key}.probe-{self.token}"
        try:
            first = self.store.put_if_absent(probe, b"probe")
            second = self.store.put_if_absent(probe, b"probe")
        finally:
            self.store.delete_batch([probe])
        if not first or second:
            raise LeaseError(
                f"{self.scheme}://{self.store.bucket}/{self.key}: the server ignores conditional"
                " writes (If-None-Match); a lease cannot be held there safely"
            )
        self._probed = True

    def _read(self) -> LeaseState | None:
        found = self.store.read_with_etag(self.key, _READ_LIMIT)
        if found is None:
            return None
        data, etag = found
        info = LeaseInfo.decode(data)
        mtime = 0.0
        if info is None:
            head = self.store.head(self.key)
            mtime = head.mtime if head is not None else 0.0
        return LeaseState(info, etag, mtime)

    def _create(self, data: bytes) -> bool:
        self._probe()
        return self.store.put_if_absent(self.key, data)

    def _replace(self, state: LeaseState, data: bytes) -> bool:
        self._probe()
        return self.store.replace_if_match(self.key, data, state.version)
