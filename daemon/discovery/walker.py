"""Walking checkpoints: the one hot loop of discovery, and the ways it runs in parallel.

A cold scan of 10,000 checkpoints of 20 files stats 200,000 files; everything per file here
is written for that (one `DirEntry.stat` per entry, no other object per file). Imports only
the standard library and `daemon.fsio`/`daemon.discovery.sizecache`, so a helper process can run it
without loading the rest of the daemon.

Parallelism, measured on the 2-CPU benchmark machine (bench/bench_scan.py):
- page cache warm: the walk is CPU-bound in Python (~2 us per file against du's ~1.3 us).
  Threads only fight over the GIL (2x slower), so a large walk gives half of the folders to one
  helper *process* (`python -I -S`, ~40 ms to start) and walks the other half itself.
- page cache cold (a daemon start after a reboot): the walk waits on the disk. Threads overlap
  the stat calls (they release the GIL); a walk switches to them once a batch had to read from
  the disk, as the thread's own block-input count (getrusage RUSAGE_THREAD) says, which a busy
  machine cannot fake the way it distorts timings. The helper process does the same.

Every path inside a root is hostile: its owner may swap any folder for a symlink (to `/`, say)
between the moment the walk saw a folder and the moment it lists it. So a walk of the local disk
never lists by path: the root is opened once, each checkpoint folder relative to it and each
sub-folder relative to its parent (`O_DIRECTORY|O_NOFOLLOW`), listed through that descriptor,
its entries stat-ed without following. A symlink found where a folder was listed is counted as
the link itself (as the walk counts every symlink it lists), never followed. The helper process
is handed the root's descriptor and the checkpoints' names: it walks the very same folder.
A FileSystem without descriptors (object storage's listing: no symlinks, nothing to race) is
walked by path through its own methods, by the same code.
"""

from __future__ import annotations

import contextlib
import errno
import marshal
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any, NamedTuple

from daemon.discovery.sizecache import Identity, WalkResult
from daemon.fsio import DIRECTORY_FLAGS, At, Dir, FileSystem, LocalFileSystem

try:
    import resource
except ImportError:  # not on every platform
    resource = None  # type: ignore[assignment]

# Files whose presence at the top of a checkpoint folder discovery cares about.
HF_INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"  # transformers' JIT save in progress
DCP_RANK0_METADATA = "__0.metadata"  # dcp with use_collectives=False: one per rank, no .metadata
MARKER_NAMES = frozenset(
    {
        "trainer_state.json",
        HF_INCOMPLETE_MARKER,
        "commit_success.txt",
        "_CHECKPOINT_METADATA",
        ".metadata",
        DCP_RANK0_METADATA,
        ".keep",
        "metrics.json",
        ".ckptd-slim.json",  # a slimmed checkpoint (daemon/slimming.py)
    }
)
DISTCP_MARKER = "*.distcp"
# Files that are not the framework's writes: a person's pin and ckptd's own slim record. Their
# times do not date the checkpoint (a pin dropped into an old folder is not a new save).
UNDATED = frozenset({".keep", ".ckptd-slim.json"})
# The marker whose stat joins a folder's fingerprint: rewritten whenever the save is redone.
FINGERPRINT_MARKERS = (
    "trainer_state.json",
    ".metadata",
    DCP_RANK0_METADATA,
    "_CHECKPOINT_METADATA",
    "commit_success.txt",
)


def fingerprint_markers_of(markers: frozenset[str]) -> str | None:
    """Given a walk's markers, return the one whose stat joins the fingerprint (or None)."""
    return next((marker for marker in FINGERPRINT_MARKERS if marker in markers), None)


def scandir_of(fs: FileSystem) -> Callable[[str], Any]:
    # The real filesystem's wrapper generator costs a frame resume per file (~0.2 us, 10% of a
    # cold scan): call os.scandir directly there. Any other FileSystem (tests' misbehaving
    # ones, object storage later) is used through its own method.
    return os.scandir if type(fs) is LocalFileSystem else fs.scandir


_ADAPT_BATCH = 64
_WALK_THREADS = 4
_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None) if resource else None
# Checkpoints to walk before a helper process pays for its start (~40 ms = ~800 folders).
HELPER_MINIMUM = 2000
# This process walks a little more than half: the helper starts ~40 ms late.
_OWN_SHARE = 0.55
# daemon/discovery/walker.py -> the folder holding the `daemon` package.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _blocks_read() -> int:
    if _RUSAGE_THREAD is None:
        return 0
    return int(resource.getrusage(_RUSAGE_THREAD).ru_inblock)


def walk_many(
    fs: FileSystem, root_path: str, identities: list[Identity], want_distcp: bool
) -> list[WalkResult | None]:
    """Given checkpoints to walk, return their walks in order: a large walk of the real
    filesystem shares the work with a helper process (see the module docstring)."""
    if not identities:
        return []
    root_fd = open_root(fs, root_path)
    if root_fd == _NO_ROOT:
        return [None] * len(identities)  # the root went away: so did every checkpoint in it
    try:
        return _walk_many_in(fs, root_path, root_fd, identities, want_distcp)
    finally:
        if root_fd is not None:
            os.close(root_fd)


def _walk_many_in(
    fs: FileSystem,
    root_path: str,
    root_fd: int | None,
    identities: list[Identity],
    want_distcp: bool,
) -> list[WalkResult | None]:
    """`walk_many` with the root open (`root_fd`; None for a FileSystem walked by path)."""
    helper: _Helper | None = None
    split = len(identities)
    if (
        len(identities) >= HELPER_MINIMUM
        and type(fs) is LocalFileSystem
        and root_fd is not None
        and (os.cpu_count() or 1) > 1
    ):
        split = int(len(identities) * _OWN_SHARE)
        helper = _Helper.start(root_path, root_fd, identities[split:], want_distcp)
        if helper is None:
            split = len(identities)
    walks = walk_adaptively(fs, root_path, identities[:split], want_distcp, root_fd=root_fd)
    if helper is not None:
        theirs = helper.finish(len(identities) - split)
        if theirs is None:  # the helper failed: its share is walked here after all
            theirs = walk_adaptively(
                fs, root_path, identities[split:], want_distcp, root_fd=root_fd
            )
        walks.extend(theirs)
    return walks


# `open_root`'s answer when the root cannot be opened (None: a FileSystem walked by path).
_NO_ROOT = -1


def open_root(fs: FileSystem, root_path: str) -> int | None:
    """Given a root, return a descriptor of it for a walk of the local disk (the caller's to
    close), None for a FileSystem walked by path, or `_NO_ROOT` when it cannot be opened.

    The root is the configured, trusted path (it may be reached through a symlink); nothing
    below it is: everything below is opened relative to this descriptor."""
    if not isinstance(fs, LocalFileSystem):
        return None
    try:
        return os.open(root_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return _NO_ROOT


def walk_adaptively(
    fs: FileSystem,
    root_path: str,
    identities: Sequence[Identity],
    want_distcp: bool,
    *,
    root_fd: int | None = None,
) -> list[WalkResult | None]:
    """Given checkpoints to walk (in the root open as `root_fd`, when given), walk them in
    order in this thread, and in threads once a batch had to read from the disk (see the
    module docstring)."""
    walks: list[WalkResult | None] = []
    index = 0
    count = len(identities)
    while index < count:
        batch = identities[index : index + _ADAPT_BATCH]
        blocks_before = _blocks_read()
        walks.extend(
            walk_checkpoint(fs, root_path, identity, want_distcp, root_fd=root_fd)
            for identity in batch
        )
        index += len(batch)
        if index < count and _blocks_read() - blocks_before > len(batch):
            rest = identities[index:]
            with ThreadPoolExecutor(_WALK_THREADS, thread_name_prefix="ckptd-walk") as pool:
                walks.extend(
                    pool.map(
                        lambda identity: walk_checkpoint(
                            fs, root_path, identity, want_distcp, root_fd=root_fd
                        ),
                        rest,
                    )
                )
            break
    return walks


class _Helper:
    """A `python -I -S` process walking a share of the checkpoints (marshal in and out)."""

    def __init__(self, process: subprocess.Popen[bytes], feeder: threading.Thread) -> None:
        self.process = process
        self.feeder = feeder

    @classmethod
    def start(
        cls, root_path: str, root_fd: int, identities: Sequence[Identity], want_distcp: bool
    ) -> _Helper | None:
        """Given the root (its path and an open descriptor, which the helper inherits at the
        same number and walks below: it never opens the root's path again) and checkpoints,
        start a helper walking them; None when it could not be started."""
        code = (
            f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
            "from daemon.discovery.walker import serve; serve()"
        )
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                pass_fds=(root_fd,),
            )
        except OSError:
            return None
        payload = marshal.dumps((root_path, root_fd, want_distcp, list(identities)))
        # Fed from a thread: the payload outgrows the pipe while the helper is still starting,
        # and this thread has its own share to walk meanwhile.
        feeder = threading.Thread(
            target=_feed, args=(process, payload), name="ckptd-walk-feed", daemon=True
        )
        feeder.start()
        return cls(process, feeder)

    def finish(self, expected: int) -> list[WalkResult | None] | None:
        """Given how many walks were asked for, return them, or None if the helper failed."""
        assert self.process.stdout is not None
        try:
            output = self.process.stdout.read()
        finally:
            self.process.stdout.close()
            self.process.wait()
            self.feeder.join()
        if self.process.returncode != 0:
            return None
        try:
            rows = marshal.loads(output)
        except (EOFError, ValueError, TypeError):
            return None
        if not isinstance(rows, list) or len(rows) != expected:
            return None
        return [None if row is None else _from_row(row) for row in rows]


def _feed(process: subprocess.Popen[bytes], payload: bytes) -> None:
    assert process.stdin is not None
    # The helper may die; finish() notices and the work is done here instead.
    with contextlib.suppress(OSError):
        process.stdin.write(payload)
    with contextlib.suppress(OSError):
        process.stdin.close()


def _to_row(walk: WalkResult) -> tuple[Any, ...]:
    return (
        walk.size_bytes,
        walk.freeable_bytes,
        walk.mtime_ns,
        walk.markers,
        walk.fingerprint,
        walk.error,
        walk.entry_count,
    )


def _from_row(row: tuple[Any, ...]) -> WalkResult:
    size, freeable, mtime_ns, markers, fingerprint, error, entry_count = row
    return WalkResult(
        size_bytes=size,
        freeable_bytes=freeable,
        mtime_ns=mtime_ns,
        markers=markers,
        fingerprint=fingerprint,
        error=error,
        entry_count=entry_count,
    )


def serve() -> None:
    """The helper process: read (root path, root descriptor, want_distcp, identities) from
    stdin, walk them below the inherited descriptor, write the walks to stdout (marshal)."""
    root_path, root_fd, want_distcp, identities = marshal.loads(sys.stdin.buffer.read())
    walks = walk_adaptively(LocalFileSystem(), root_path, identities, want_distcp, root_fd=root_fd)
    sys.stdout.buffer.write(marshal.dumps([None if w is None else _to_row(w) for w in walks]))
    sys.stdout.buffer.flush()


class _Access(NamedTuple):
    """How a walk opens, lists, stats and closes folders: relative to open descriptors on the
    local disk (`handle` is a descriptor), by path on a FileSystem without descriptors
    (`handle` is the path). Every callable takes the path too, for messages and for tests'
    misbehaving FileSystems that break things by path."""

    open_folder: Callable[[Any, str, str], Any]  # (parent handle, name, path) -> handle
    list_folder: Callable[[Any, str], Any]  # (handle, path) -> closable iterator of entries
    lstat_at: Callable[[Any, str, str], os.stat_result]  # (parent handle, name, path)
    close: Callable[[Any], None]


def _open_folder_at(parent: int, name: str, path: str) -> int:
    return os.open(name, DIRECTORY_FLAGS, dir_fd=parent)


def _list_folder_at(descriptor: int, path: str) -> Iterator[os.DirEntry[str]]:
    return os.scandir(descriptor)


def _lstat_at(parent: int, name: str, path: str) -> os.stat_result:
    return os.stat(name, dir_fd=parent, follow_symlinks=False)


def _no_close(handle: object) -> None:
    pass


# The real filesystem: system calls directly (a FileSystem method per folder is a frame more).
_LOCAL_ACCESS = _Access(_open_folder_at, _list_folder_at, _lstat_at, os.close)


def _access_of(fs: FileSystem) -> _Access:
    """Given a FileSystem, return how a walk goes through it (see `_Access`)."""
    if type(fs) is LocalFileSystem:
        return _LOCAL_ACCESS
    if isinstance(fs, LocalFileSystem):  # tests' misbehaving ones: their methods, by descriptor
        return _Access(
            lambda parent, name, path: fs.open_dir(At(parent, name, path)),
            lambda descriptor, path: fs.scandir_at(Dir(descriptor, path)),
            lambda parent, name, path: fs.lstat_at(At(parent, name, path)),
            os.close,
        )
    return _Access(
        lambda parent, name, path: path,
        lambda handle, path: fs.scandir(path),
        lambda parent, name, path: fs.lstat(path),
        _no_close,
    )


def walk_checkpoint(
    fs: FileSystem,
    root_path: str,
    members: Sequence[tuple[str, int, bool]],
    want_distcp: bool = False,
    *,
    root_fd: int | None = None,
) -> WalkResult | None:
    """Given a checkpoint's root entries (in the root open as `root_fd`, else opened here),
    walk them (never following a symlink) and return what was found, or None when the
    checkpoint vanished before it could be looked at."""
    if root_fd is not None:
        return _walk(_access_of(fs), root_fd, root_path, members, want_distcp)
    opened = open_root(fs, root_path)
    if opened == _NO_ROOT:
        return None  # the root went away: so did the checkpoint
    if opened is None:
        return _walk(_access_of(fs), root_path, root_path, members, want_distcp)
    try:
        return _walk(_access_of(fs), opened, root_path, members, want_distcp)
    finally:
        os.close(opened)


def _walk(
    access: _Access,
    root: Any,
    root_path: str,
    members: Sequence[tuple[str, int, bool]],
    want_distcp: bool,
) -> WalkResult | None:
    """`walk_checkpoint` with the root open as `root` (a handle of `access`)."""
    tally = _Tally()
    fingerprint: list[int] = []
    present = 0
    for member, _, _ in members:
        path = f"{root_path}/{member}"
        status = _lstat_member(access, root, member, path, tally)
        if status is None:
            continue
        present += 1
        fingerprint += (status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size)
        if status.st_mode & 0o170000 != 0o040000:
            tally.newest = max(tally.newest, status.st_mtime_ns)
            _count_member_file(tally, member, status)
            continue
        # A folder: one listing per folder, one lstat per entry, no other object per file.
        # The top level is walked apart from the rest: only there are marker names looked at.
        # Its own mtime dates the last entry made or removed in it (a trainer's temporary file
        # removed is a write), except when that was a `.keep` or ckptd's slim record: a pin
        # dropped into an old folder must not make it look written now (settling, or a restart
        # to the lineage).
        tally.undated = 0
        if not _walk_folder_member(access, root, root_path, member, tally, want_distcp):
            present -= 1  # the whole folder went away after the lstat
        if status.st_mtime_ns > tally.undated:
            tally.newest = max(tally.newest, status.st_mtime_ns)
        marker = next((m for m in FINGERPRINT_MARKERS if m in tally.marker_stats), None)
        if marker is not None:
            fingerprint += tally.marker_stats[marker]
    if present <= 0:
        return None
    return tally.result(tuple(fingerprint))


def _walk_folder_member(
    access: _Access, root: Any, root_path: str, member: str, tally: _Tally, want_distcp: bool
) -> bool:
    """Given a root entry seen as a folder, open it (never following) and count everything in
    it; return False when it vanished. One swapped for a symlink (or anything but a folder)
    since it was seen is counted as what stands there now, never opened."""
    path = f"{root_path}/{member}"
    try:
        handle = access.open_folder(root, member, path)
    except FileNotFoundError:
        tally.error = tally.error or f"changed while scanning: {member} vanished"
        return False
    except OSError as failure:
        if failure.errno not in (errno.ELOOP, errno.ENOTDIR):
            tally.error = f"unreadable: {member}: {failure.strerror}"
            return True
        status = _lstat_member(access, root, member, path, tally)
        if status is None:
            return False
        tally.error = tally.error or f"changed while scanning: {member} was replaced"
        tally.newest = max(tally.newest, status.st_mtime_ns)
        _count_member_file(tally, member, status)
        return True
    try:
        folders: list[str] = []
        present = _walk_top(access, handle, path, member, tally, folders, want_distcp)
        if folders:
            _walk_below(access, handle, root_path, member, folders, tally)
        return present
    finally:
        access.close(handle)


class _Tally:
    """What one walk counted so far. Updated once per folder (the per-file loops count in local
    variables, which is what keeps them fast), read once at the end."""

    __slots__ = (
        "entries",
        "error",
        "linked",
        "marker_stats",
        "markers",
        "newest",
        "size",
        "undated",
    )

    def __init__(self) -> None:
        self.size = 0  # bytes of files with a single link
        self.newest = 0  # newest mtime_ns
        self.undated = 0  # newest mtime_ns of an UNDATED file at the top of the folder walked
        self.entries = 0
        self.error: str | None = None
        self.markers: set[str] = set()
        self.marker_stats: dict[str, tuple[int, int, int]] = {}  # name -> (ino, mtime, size)
        self.linked: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [size, nlink, seen]

    def result(self, fingerprint: tuple[int, ...]) -> WalkResult:
        """Given the walk's fingerprint, return what it found: a file with several links adds
        to `size_bytes` once, and to `freeable_bytes` only if all its links were seen."""
        size = freeable = self.size
        for file_size, link_count, seen in self.linked.values():
            size += file_size
            if seen >= link_count:
                freeable += file_size
        return WalkResult(
            size_bytes=size,
            freeable_bytes=freeable,
            mtime_ns=self.newest,
            markers=frozenset(self.markers),
            fingerprint=fingerprint,
            error=self.error,
            entry_count=self.entries,
        )


def _lstat_member(
    access: _Access, root: Any, member: str, path: str, tally: _Tally
) -> os.stat_result | None:
    """Given a checkpoint's root entry, return its lstat, or None (and the error noted) when
    it vanished or cannot be read."""
    try:
        return access.lstat_at(root, member, path)
    except FileNotFoundError:
        tally.error = tally.error or f"changed while scanning: {member} vanished"
    except OSError as failure:
        tally.error = f"unreadable: {member}: {failure.strerror}"
    return None


def _count_member_file(tally: _Tally, member: str, status: os.stat_result) -> None:
    tally.entries += 1
    if member.endswith(".index"):
        tally.markers.add("index")
    if status.st_nlink > 1:
        _count_link(tally.linked, status)
    else:
        tally.size += status.st_size


def _walk_top(
    access: _Access,
    handle: Any,
    path: str,
    member: str,
    tally: _Tally,
    folders: list[str],
    want_distcp: bool,
) -> bool:
    """Given an open checkpoint folder, count its top-level entries, note its markers and add
    the names of its sub-folders to `folders`; return False when the folder itself vanished."""
    size, newest, count, error = tally.size, tally.newest, tally.entries, tally.error
    markers, marker_stats, linked = tally.markers, tally.marker_stats, tally.linked
    marker_names = MARKER_NAMES
    present = True
    try:
        with closing(access.list_folder(handle, path)) as entries:
            for entry in entries:
                count += 1
                try:
                    status = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    # A trainer removing its own temporary file: counted as gone.
                    error = error or "changed while scanning: a file vanished"
                    continue
                if status.st_mtime_ns > newest:
                    if entry.name in UNDATED:
                        tally.undated = max(tally.undated, status.st_mtime_ns)
                    else:
                        newest = status.st_mtime_ns
                if status.st_mode & 0o170000 == 0o040000:
                    folders.append(entry.name)
                    continue
                if status.st_nlink > 1:
                    _count_link(linked, status)
                else:
                    size += status.st_size
                name = entry.name
                if name in marker_names:
                    markers.add(name)
                    marker_stats[name] = (status.st_ino, status.st_mtime_ns, status.st_size)
                elif want_distcp and name.endswith(".distcp"):
                    markers.add(DISTCP_MARKER)
    except FileNotFoundError:
        present = False
        error = error or f"changed while scanning: {member} vanished"
    except OSError as failure:
        error = f"unreadable: {member}: {failure.strerror}"
    tally.size, tally.newest, tally.entries, tally.error = size, newest, count, error
    return present


# The most folders deep a walk descends below a checkpoint folder: each level holds one
# descriptor open while its sub-folders are walked (four walking threads and the helper, each
# at most this deep, stay far below the usual limit of 1024 descriptors). Deeper is left out
# and makes the walk unreadable (a checkpoint never has such a tree; only its owner can).
MAX_DEPTH = 64


class _Opened(NamedTuple):
    """A sub-folder opened for the walk: its handle, or None with what to note instead: a
    change (the stat of a symlink or file found in its place, if any) or why it is unreadable."""

    handle: Any
    changed: str | None = None
    unreadable: str | None = None
    replaced_by: os.stat_result | None = None


def _open_below(access: _Access, parent: Any, name: str, path: str, relative: str) -> _Opened:
    """Given an open folder and the name of a sub-folder it listed, open that (never
    following); a symlink or anything else swapped in since is stat-ed, not opened."""
    try:
        return _Opened(access.open_folder(parent, name, path))
    except FileNotFoundError:
        return _Opened(None, changed="changed while scanning: a folder vanished")
    except OSError as failure:
        if failure.errno not in (errno.ELOOP, errno.ENOTDIR):
            return _Opened(None, unreadable=f"unreadable: {relative}: {failure.strerror}")
    try:
        status = access.lstat_at(parent, name, path)
    except OSError:
        return _Opened(None, changed="changed while scanning: a folder vanished")
    return _Opened(
        None, changed="changed while scanning: a folder was replaced", replaced_by=status
    )


def _walk_below(
    access: _Access, top: Any, root_path: str, member: str, folders: list[str], tally: _Tally
) -> None:
    """Given an open checkpoint folder and the names of its sub-folders, count everything
    below them: depth first, each folder opened relative to its parent and listed through its
    descriptor, one descriptor open per level (see MAX_DEPTH)."""
    close = access.close
    # (handle, path relative to the root, sub-folders left); the bottom one is the caller's.
    stack: list[tuple[Any, str, list[str]]] = [(top, member, folders)]
    try:
        while stack:
            parent, relative, pending = stack[-1]
            if not pending:
                stack.pop()
                if stack:
                    close(parent)
                continue
            name = pending.pop()
            relative = f"{relative}/{name}"
            path = f"{root_path}/{relative}"
            if len(stack) > MAX_DEPTH:
                tally.error = f"unreadable: {relative}: more than {MAX_DEPTH} folders deep"
                continue
            opened = _open_below(access, parent, name, path, relative)
            if opened.handle is None:
                replaced = opened.replaced_by
                if replaced is not None:  # counted as the link (or file) itself, never followed
                    tally.newest = max(tally.newest, replaced.st_mtime_ns)
                    tally.size += replaced.st_size
                tally.error = opened.unreadable or tally.error or opened.changed
                continue
            below = _count_folder(access, opened.handle, path, relative, tally)
            if below:
                stack.append((opened.handle, relative, below))
            else:
                close(opened.handle)
    finally:
        for handle, _, _ in stack[1:]:
            close(handle)


def _count_folder(
    access: _Access, handle: Any, path: str, relative: str, tally: _Tally
) -> list[str]:
    """Given an open folder below a checkpoint folder, count its entries; return the names of
    its sub-folders."""
    size, newest, count, error = tally.size, tally.newest, tally.entries, tally.error
    linked = tally.linked
    below: list[str] = []
    try:
        with closing(access.list_folder(handle, path)) as entries:
            for entry in entries:
                count += 1
                try:
                    status = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    error = error or "changed while scanning: a file vanished"
                    continue
                if status.st_mtime_ns > newest:
                    newest = status.st_mtime_ns
                if status.st_mode & 0o170000 == 0o040000:
                    below.append(entry.name)
                elif status.st_nlink > 1:
                    _count_link(linked, status)
                else:
                    size += status.st_size
    except FileNotFoundError:
        error = error or "changed while scanning: a folder vanished"
    except OSError as failure:
        error = f"unreadable: {relative}: {failure.strerror}"
    tally.size, tally.newest, tally.entries, tally.error = size, newest, count, error
    return below


def _count_link(linked: dict[tuple[int, int], list[int]], status: os.stat_result) -> None:
    key = (status.st_dev, status.st_ino)
    seen = linked.get(key)
    if seen is None:
        linked[key] = [status.st_size, status.st_nlink, 1]
    else:
        seen[2] += 1
