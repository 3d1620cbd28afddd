"""One pruner per shared root: the lease of daemon/lease.py, taken at the start of every prune.

A root is *shared* when several machines' ckptd daemons may see it: `shared: true`, or
`shared: auto` (the default) on a network or cluster filesystem (daemon/disk/mounts.py:
NFS, Lustre, GPFS, Weka, CephFS, BeeGFS, GlusterFS, shared FUSE mounts), and every root on
object storage. `prune_root` calls `check` first: on a shared root it takes (or renews) the
root's lease, or refuses the whole prune when another live holder has it — a `prune_refused`
record naming the holder's host, PID and expiry, once per holder — so the node that does not
hold the lease prunes nothing there, its trash and abandoned saves included.

Who is who: a lease names this machine by `node_name` (config; default the hostname) and
this process's PID, with a random token per process and root. `ckptd run` keeps its leases
(`keep_leases`), renews them every third of their duration on a thread of its own
(`maintain`, the scheduler's "lease" job: a long prune never delays a renewal), takes over an
expired one there, and releases them when it stops cleanly. Any other process (`ckptd prune`)
releases what it took when it exits. While a prune deletes, `LeaseCheck.guard` turns the
lease's loss into the prune's `stop` (finish the deletion in progress, start no other): a
holder whose renewals failed for a whole duration stops before another node may start.

`ckptd prune` on the machine whose daemon holds the lease does not fight its own daemon: the
root lock (`flock`) already keeps two prunes on one machine apart, so it prunes under the
daemon's lease while that lease is valid and names this host and a live ckptd process.

What a person does to a shared root's trash by hand (`ckptd trash purge`, `ckptd trash
restore`) goes through the same `check` (`taken`): on a standby node it is refused, naming the
holder and its expiry, and a lease the command took is given back when it ends. `ckptd plan`
only looks (`standby`): it says which node will apply the plan.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import psutil

from daemon.clock import utc_iso
from daemon.config import Config, LeaseConfig, RootConfig
from daemon.disk.mounts import filesystem_type, is_shared_filesystem
from daemon.errors import SafetyRefusal
from daemon.history.events import PruneRefused
from daemon.history.log import NULL_HISTORY, History
from daemon.lease import Lease, LeaseError, LeaseInfo, ObjectLease, PosixLease
from daemon.logs import get_logger
from daemon.rootdir import root_key
from daemon.storage.base import ObjectStore
from daemon.storage.url import StorageUrlError, is_remote, parse

log = get_logger("ckptd.lease")

# How often a prune that relies on another process's lease (its own daemon's) re-reads it.
_REREAD_SECONDS = 1.0


def node_name(config: Config) -> str:
    """Given the config, return this machine's name in leases (`node_name`, else hostname)."""
    return config.node_name or socket.gethostname()


def lease_settings(config: Config, root: RootConfig) -> LeaseConfig:
    """Given a root, return its lease duration and skew (its own, else `defaults.lease`)."""
    return root.lease if root.lease is not None else config.defaults.lease


def is_shared(config: Config, root: RootConfig) -> bool:
    """Given a root, return whether other machines' daemons may prune it too (then only the
    lease holder prunes): object storage always; else `shared`, where auto asks the mount."""
    if is_remote(root.path):
        return True
    setting = root.shared if root.shared is not None else config.defaults.shared
    if setting == "auto":
        return is_shared_filesystem(filesystem_type(root.path))
    return bool(setting)


def lease_key(root: RootConfig) -> str:
    """Given a root, return the key its lease is kept under in this process."""
    return root.path.rstrip("/") if is_remote(root.path) else root_key(root.path)


def report_root(root: RootConfig) -> str:
    """Given a root, return its path as reports and the history name it (real path; a URL)."""
    return root.path if is_remote(root.path) else os.path.realpath(root.path)


def _open_store(root: RootConfig) -> tuple[Any, ObjectStore]:
    # Imported here: botocore loads only for a remote root.
    from daemon.storage import open_store

    return open_store(root.path, getattr(root, "storage_options", None))


def new_lease(
    config: Config, root: RootConfig, store: ObjectStore | None = None, host: str = ""
) -> Lease:
    """Given a shared root (and its store, for a remote root: opened here when not given),
    return a lease object for it (nothing is read or written yet)."""
    settings = lease_settings(config, root)
    host = host or node_name(config)
    if not is_remote(root.path):
        return PosixLease(root.path, settings.duration, settings.skew, host)
    url = parse(root.path)
    if store is None:
        url, store = _open_store(root)
    return ObjectLease(store, url, settings.duration, settings.skew, host)


class LeaseHeldElsewhere(SafetyRefusal):
    """Another node holds this shared root's lease: this daemon changes nothing there (the
    disk check's emptying of a trash that node owns, too; `ckptd trash purge` and `restore`
    on a standby node: refused, exit 3). `holder`: who holds it (None: unknown)."""

    def __init__(self, reason: str, holder: LeaseInfo | None = None) -> None:
        super().__init__(reason)
        self.holder = holder


@dataclass(frozen=True)
class LeaseRefusal:
    """Given a prune refused because of the lease: why, and who holds it (None: unknown)."""

    reason: str
    holder: LeaseInfo | None = None


class LeaseCheck(NamedTuple):
    """Given `check`'s answer: the refusal (None: go ahead) and what the prune runs under."""

    refusal: LeaseRefusal | None
    valid: Callable[[float], bool] | None = None  # None: not a shared root

    def guard(self, stop: threading.Event | None) -> threading.Event | None:
        """Given the prune's stop event, return one that is also set once the lease the prune
        runs under is no longer valid (the deleter asks it between deletions)."""
        if self.valid is None:
            return stop
        return WhileHeld(stop, self.valid)


class WhileHeld(threading.Event):
    """Given a stop event (or None) and a lease's validity test, answer `is_set()` as "stop,
    or the lease is no longer valid"."""

    def __init__(self, stop: threading.Event | None, valid: Callable[[float], bool]) -> None:
        super().__init__()
        self._stop = stop
        self._valid = valid

    def is_set(self) -> bool:
        stopped = self._stop is not None and self._stop.is_set()
        return stopped or not self._valid(time.time())

    def set(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self.is_set():
            return True
        if self._stop is not None:
            self._stop.wait(timeout)
        elif timeout:
            time.sleep(timeout)
        return self.is_set()


class Leases:
    """Given this process, the leases it holds or tries: one per shared root, renewed and
    released here. All access under one lock (the worker checks, the lease thread renews)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._leases: dict[str, Lease] = {}
        self._recorded: dict[str, str] = {}  # root -> the holder last recorded as refusing
        self.keep = False
        self._exit_hook = False

    def lease_for(
        self, config: Config, root: RootConfig, store: ObjectStore | None = None
    ) -> Lease | None:
        """Given a root, return this process's lease object for it (None: not shared)."""
        if not is_shared(config, root):
            return None
        key = lease_key(root)
        settings = lease_settings(config, root)
        with self.lock:
            lease = self._leases.get(key)
            if lease is not None and lease.host != node_name(config):
                self._release(lease)  # node_name changed by a reload: a new identity
                lease = None
            if lease is None:
                lease = new_lease(config, root, store)
                self._leases[key] = lease
            # A reload may change the duration and skew; the next write uses them.
            lease.duration, lease.skew = float(settings.duration), float(settings.skew)
            if not self._exit_hook:
                atexit.register(self._at_exit)
                self._exit_hook = True
            return lease

    def held(self, key: str) -> Lease | None:
        """Given a root's key, return this process's lease of it if held now."""
        with self.lock:
            lease = self._leases.get(key)
            return lease if lease is not None and lease.held else None

    def renewing_validity(self, lease: Lease) -> Callable[[float], bool]:
        """Given a held lease, return its validity test for a long prune: it renews the lease
        when a third of its duration passed (a `ckptd prune` has no lease thread)."""

        def valid(now: float) -> bool:
            with self.lock:
                if lease.held and lease.renewal_due(now):
                    with contextlib.suppress(LeaseError, OSError):
                        lease.renew(now)
                return lease.valid(now)

        return valid

    def note_refusal(self, key: str, refusal: LeaseRefusal) -> bool:
        """Given a refusal, return whether it is news (another holder than the last one
        recorded for this root); remember it."""
        holder = refusal.holder
        who = f"{holder.host}/{holder.pid}/{holder.token}" if holder else refusal.reason
        with self.lock:
            news = self._recorded.get(key) != who
            self._recorded[key] = who
            return news

    def forget_refusal(self, key: str) -> None:
        with self.lock:
            self._recorded.pop(key, None)

    def maintain(self, config: Config, now: float | None = None) -> list[str]:
        """Given the config (the daemon's lease thread, every third of a duration), renew
        each lease held, try to take each one not held (a holder gone: its lease expired),
        release the leases of roots no longer shared; return the roots newly taken."""
        taken: list[str] = []
        wanted: dict[str, RootConfig] = {}
        for root in config.roots:
            with contextlib.suppress(LeaseError, StorageUrlError, OSError):
                if self.lease_for(config, root) is not None:
                    wanted[lease_key(root)] = root
        with self.lock:
            for key in [key for key in self._leases if key not in wanted]:
                self._release(self._leases.pop(key))
            for key, root in wanted.items():
                if self._maintain_one(key, root, now if now is not None else time.time()):
                    taken.append(root.path)
        return taken

    def _maintain_one(self, key: str, root: RootConfig, now: float) -> bool:
        """Given a shared root, renew or take its lease; return whether it was newly taken."""
        lease = self._leases[key]
        if not is_remote(root.path) and not os.path.isdir(root.path):
            return False
        was_held = lease.held
        try:
            if was_held and lease.renew(now):
                return False
            if lease.acquire(now) or lease.take_from_dead(now, _gone_from(lease)):
                log.info(
                    "lease_taken",
                    root=root.path,
                    host=lease.host,
                    expires=utc_iso(lease.expires, timespec="seconds"),
                )
                self.forget_refusal(key)
                return True
        except (LeaseError, OSError) as error:
            log.warning("lease_unusable", root=root.path, error=str(error))
            lease.held = False
        if was_held:
            log.warning("lease_lost", root=root.path, note="another node took it over")
        return False

    def release(self, key: str) -> None:
        """Given a root's key, give up this process's lease of it (if held) and forget it."""
        with self.lock:
            lease = self._leases.pop(key, None)
            if lease is not None:
                self._release(lease)

    def release_all(self) -> None:
        """Give up every lease this process holds (a clean stop)."""
        with self.lock:
            for lease in self._leases.values():
                self._release(lease)
            self._leases.clear()

    @staticmethod
    def _release(lease: Lease) -> None:
        with contextlib.suppress(LeaseError, OSError):
            lease.release()

    def _at_exit(self) -> None:
        # A daemon releases at a clean stop only (a worker still deleting keeps its lease).
        if not self.keep:
            self.release_all()


LEASES = Leases()


def keep_leases() -> None:
    """Mark this process as the daemon: its leases outlive each prune (renewed by `maintain`,
    released by `release_all` at a clean stop)."""
    LEASES.keep = True


def _free(lease: Lease, now: float) -> tuple[bool, LeaseInfo | None]:
    """Given a lease not taken (a dry run only looks), return whether a prune could take it
    now, and its holder."""
    holder = lease.holder()
    if holder is None or holder.token == lease.token:
        return True, holder
    return now > holder.expires + lease.skew, holder


def _gone_from(lease: Lease) -> Callable[[LeaseInfo], bool]:
    """Given this process's lease, return a test that tells a holder gone for certain: one of
    this very machine (its node name) whose process no longer runs, or whose PID now belongs
    to a process started after the holder last wrote (`ckptd prune` killed, then run again,
    need not wait for its lease to expire). A holder of another machine is never gone."""

    def gone(holder: LeaseInfo) -> bool:
        if holder.host != lease.host or holder.pid == os.getpid():
            return False
        try:
            started = psutil.Process(holder.pid).create_time()
        except psutil.NoSuchProcess:
            return True
        except (psutil.Error, OSError):
            return False
        return started > holder.acquired + 1.0

    return gone


def _sibling(lease: Lease, holder: LeaseInfo | None, now: float) -> bool:
    """Given the holder of a lease this process did not get, return whether it is a live
    ckptd process of this very machine with a valid lease (its own daemon)."""
    if holder is None or holder.host != lease.host or holder.pid == os.getpid():
        return False
    if now >= holder.expires - lease.skew:
        return False
    try:
        command = " ".join(psutil.Process(holder.pid).cmdline())
    except (psutil.Error, OSError):
        return False
    return "ckptd" in command or "daemon" in command


def _sibling_validity(lease: Lease, holder: LeaseInfo) -> Callable[[float], bool]:
    """Given this machine's daemon's lease, return a validity test that re-reads it at most
    every `_REREAD_SECONDS`: valid while the same holder has it, short of its expiry."""
    seen = {"at": time.time(), "expires": holder.expires}

    def valid(now: float) -> bool:
        if now - seen["at"] >= _REREAD_SECONDS:
            seen["at"] = now
            try:
                current = lease.holder()
            except (LeaseError, OSError):
                current = None
            same = current is not None and current.token == holder.token
            seen["expires"] = current.expires if current is not None and same else 0.0
        return now < seen["expires"] - lease.skew

    return valid


def describe(holder: LeaseInfo | None, skew: float) -> str:
    """Given the holder of a lease (None: unreadable or lost in a race), return the refusal
    sentence naming it."""
    if holder is None:
        return (
            "another node holds this shared root's lease (it changed hands as this daemon"
            " tried, or its lease file is unreadable): only the lease holder prunes here"
        )
    return (
        f"another node holds this shared root's lease: {holder.host} pid {holder.pid} until"
        f" {utc_iso(holder.expires, timespec='seconds')}; only it prunes here (taken over"
        f" {skew:g} s after it expires unrenewed)"
    )


def check(
    config: Config,
    root: RootConfig,
    *,
    dry_run: bool,
    history: History,
    store: ObjectStore | None = None,
) -> LeaseCheck:
    """Given a root about to be pruned, take or renew its lease when it is shared; return a
    refusal when another live holder has it (recorded as `prune_refused`, once per holder;
    a dry run takes nothing and records nothing), else what the prune runs under."""
    try:
        lease = LEASES.lease_for(config, root, store)
    except (LeaseError, StorageUrlError, OSError) as error:
        return _refuse(root, LeaseRefusal(f"the lease of this shared root: {error}"), history)
    if lease is None or (not is_remote(root.path) and not os.path.isdir(root.path)):
        return LeaseCheck(None)  # not shared; a missing root is reported by the prune itself
    now = time.time()
    try:
        with LEASES.lock:
            if dry_run:
                ok, holder = _free(lease, now)
            else:
                ok = lease.acquire(now) or lease.take_from_dead(now, _gone_from(lease))
                ok = ok and lease.valid(now)
                holder = None if ok else lease.holder()
    except (LeaseError, OSError) as error:
        reason = f"the lease of this shared root cannot be used: {error}"
        return _refuse(root, LeaseRefusal(reason), history, dry_run=dry_run)
    if ok and dry_run:
        return LeaseCheck(None)  # it deletes nothing: no lease to keep valid
    if ok:
        LEASES.forget_refusal(lease_key(root))
        return LeaseCheck(None, LEASES.renewing_validity(lease))
    if holder is not None and _sibling(lease, holder, now):
        return LeaseCheck(None, _sibling_validity(lease, holder))
    refusal = LeaseRefusal(describe(holder, lease.skew), holder)
    return _refuse(root, refusal, history, dry_run=dry_run)


def require(config: Config, root: RootConfig, *, history: History) -> None:
    """Given a root about to be changed outside `prune_root` (the disk check empties its
    trash), raise LeaseHeldElsewhere when it is shared and another node holds its lease."""
    refusal = check(config, root, dry_run=False, history=history).refusal
    if refusal is not None:
        raise LeaseHeldElsewhere(refusal.reason)


@contextlib.contextmanager
def taken(
    config: Config,
    root: RootConfig,
    *,
    history: History = NULL_HISTORY,
    store: ObjectStore | None = None,
) -> Iterator[LeaseCheck]:
    """Given a root about to be changed by a command outside `prune_root` (`ckptd trash
    purge`, `restore`), take its lease as a prune does (`check`) and yield what the change
    runs under (its `guard` stops a long one when the lease is lost); raise
    LeaseHeldElsewhere, naming the holder, when another node holds it. On leaving, give the
    lease back if this call took it (a daemon's leases are its own to keep)."""
    key = lease_key(root)
    held_before = LEASES.held(key) is not None
    lease = check(config, root, dry_run=False, history=history, store=store)
    if lease.refusal is not None:
        raise LeaseHeldElsewhere(lease.refusal.reason, lease.refusal.holder)
    try:
        yield lease
    finally:
        if not held_before and not LEASES.keep:
            LEASES.release(key)


@dataclass(frozen=True)
class Standby:
    """Given a shared root whose lease another node holds: that node, its PID and the lease's
    expiry (epoch s); this node prunes nothing there until the lease lapses."""

    host: str
    pid: int
    expires: float

    def to_json(self) -> dict[str, Any]:
        """Return it as `plan --json` writes it (the expiry in UTC ISO 8601)."""
        return {
            "holder": {"host": self.host, "pid": self.pid},
            "expires": utc_iso(self.expires, timespec="seconds"),
        }

    def line(self, now: float) -> str:
        """Given the time, return the sentence `ckptd plan` prints under the root."""
        until = utc_iso(self.expires, timespec="seconds")
        if now > self.expires:
            # Expired, but not yet by the skew: no node may take it over before then.
            held = f"holds the lease (expired at {until}; taken over once past the skew)"
        else:
            held = f"holds the lease until {until}"
        return (
            f"this node is standby: {self.host} (pid {self.pid}) {held}; it prunes this root,"
            " this node applies nothing here"
        )


def standby(config: Config, root: RootConfig, store: ObjectStore | None = None) -> Standby | None:
    """Given a root, return who holds its lease when this node is standby there (a prune would
    be refused: another node holds the lease, not expired by more than the skew), else None.
    Read only: the lease is looked at as a dry-run prune does (`check`), nothing is taken."""
    refusal = check(config, root, dry_run=True, history=NULL_HISTORY, store=store).refusal
    if refusal is None or refusal.holder is None:
        return None
    holder = refusal.holder
    if holder.host == node_name(config):
        return None  # this node's own process: a prune here takes it or works under it
    return Standby(host=holder.host, pid=holder.pid, expires=holder.expires)


def _refuse(
    root: RootConfig, refusal: LeaseRefusal, history: History, *, dry_run: bool = False
) -> LeaseCheck:
    """Given a refusal, record it unless a dry run or already recorded for this holder."""
    if not dry_run and LEASES.note_refusal(lease_key(root), refusal):
        holder = refusal.holder
        history.record(
            PruneRefused(
                root=report_root(root),
                reason=refusal.reason,
                pids=(),
                cmdlines=(),
                holder_host=holder.host if holder else None,
                holder_pid=holder.pid if holder else None,
                lease_expires=utc_iso(holder.expires, timespec="seconds") if holder else None,
            )
        )
    return LeaseCheck(refusal)


def lease_status(config: Config, root: RootConfig, daemon_pid: int | None) -> dict[str, Any] | None:
    """Given a root and the PID of this machine's running daemon (None: not running), return
    its lease as `status` shows it (None when the root is not shared): the holder, its expiry
    and whether it is this machine's daemon."""
    try:
        if not is_shared(config, root):
            return None
        lease = new_lease(config, root)
        info = lease.written()  # an expired holder is shown too
    except (LeaseError, StorageUrlError, OSError) as error:
        return {"shared": True, "node": node_name(config), "error": str(error), "holder": None}
    now = time.time()
    if info is None or info.expires <= 0:
        return {"shared": True, "node": node_name(config), "holder": None, "ours": False}
    ours = info.host == node_name(config) and daemon_pid is not None and info.pid == daemon_pid
    return {
        "shared": True,
        "node": node_name(config),
        "holder": {"host": info.host, "pid": info.pid},
        "expires": utc_iso(info.expires, timespec="seconds"),
        "expired": now > info.expires,
        "ours": ours,
    }


__all__ = [
    "LEASES",
    "LeaseCheck",
    "LeaseHeldElsewhere",
    "LeaseRefusal",
    "Leases",
    "Standby",
    "WhileHeld",
    "check",
    "describe",
    "is_shared",
    "keep_leases",
    "lease_key",
    "lease_settings",
    "lease_status",
    "new_lease",
    "node_name",
    "report_root",
    "require",
    "standby",
    "taken",
]
