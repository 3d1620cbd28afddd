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
"""

from __future__ import annotations

import contextlib
import marshal
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

from daemon.discovery.sizecache import Identity, WalkResult
from daemon.fsio import FileSystem, LocalFileSystem

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
    helper: _Helper | None = None
    split = len(identities)
    if (
        len(identities) >= HELPER_MINIMUM
        and type(fs) is LocalFileSystem
        and (os.cpu_count() or 1) > 1
    ):
        split = int(len(identities) * _OWN_SHARE)
        helper = _Helper.start(root_path, identities[split:], want_distcp)
        if helper is None:
            split = len(identities)
    walks = walk_adaptively(fs, root_path, identities[:split], want_distcp)
    if helper is not None:
        theirs = helper.finish(len(identities) - split)
        if theirs is None:  # the helper failed: its share is walked here after all
            theirs = walk_adaptively(fs, root_path, identities[split:], want_distcp)
        walks.extend(theirs)
    return walks


def walk_adaptively(
    fs: FileSystem, root_path: str, identities: Sequence[Identity], want_distcp: bool
) -> list[WalkResult | None]:
    """Given checkpoints to walk, walk them in order in this thread, and in threads once a
    batch had to read from the disk (see the module docstring)."""
    walks: list[WalkResult | None] = []
    index = 0
    count = len(identities)
    while index < count:
        batch = identities[index : index + _ADAPT_BATCH]
        blocks_before = _blocks_read()
        walks.extend(walk_checkpoint(fs, root_path, identity, want_distcp) for identity in batch)
        index += len(batch)
        if index < count and _blocks_read() - blocks_before > len(batch):
            rest = identities[index:]
            with ThreadPoolExecutor(_WALK_THREADS, thread_name_prefix="ckptd-walk") as pool:
                walks.extend(
                    pool.map(
                        lambda identity: walk_checkpoint(fs, root_path, identity, want_distcp), rest
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
        cls, root_path: str, identities: Sequence[Identity], want_distcp: bool
    ) -> _Helper | None:
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
            )
        except OSError:
            return None
        payload = marshal.dumps((root_path, want_distcp, list(identities)))
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
    """The helper process: read (root, want_distcp, identities) from stdin, walk them, write
    the walks to stdout (marshal)."""
    root_path, want_distcp, identities = marshal.loads(sys.stdin.buffer.read())
    walks = walk_adaptively(LocalFileSystem(), root_path, identities, want_distcp)
    sys.stdout.buffer.write(marshal.dumps([None if w is None else _to_row(w) for w in walks]))
    sys.stdout.buffer.flush()


def walk_checkpoint(
    fs: FileSystem,
    root_path: str,
    members: Sequence[tuple[str, int, bool]],
    want_distcp: bool = False,
) -> WalkResult | None:
    """Given a checkpoint's root entries, walk them (never following a symlink) and return what
    was found, or None when the checkpoint vanished before it could be looked at."""
    tally = _Tally()
    fingerprint: list[int] = []
    present = 0
    scandir = scandir_of(fs)
    for member, _, _ in members:
        path = f"{root_path}/{member}"
        status = _lstat_member(fs, path, member, tally)
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
        folders: list[str] = []
        if not _walk_top(scandir, path, member, tally, folders, want_distcp):
            present -= 1  # the whole folder went away after the lstat
        if folders:
            _walk_below(scandir, root_path, folders, tally)
        if status.st_mtime_ns > tally.undated:
            tally.newest = max(tally.newest, status.st_mtime_ns)
        marker = next((m for m in FINGERPRINT_MARKERS if m in tally.marker_stats), None)
        if marker is not None:
            fingerprint += tally.marker_stats[marker]
    if present <= 0:
        return None
    return tally.result(tuple(fingerprint))


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


def _lstat_member(fs: FileSystem, path: str, member: str, tally: _Tally) -> os.stat_result | None:
    """Given a checkpoint's root entry, return its lstat, or None (and the error noted) when
    it vanished or cannot be read."""
    try:
        return fs.lstat(path)
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
    scandir: Callable[[str], Any],
    path: str,
    member: str,
    tally: _Tally,
    folders: list[str],
    want_distcp: bool,
) -> bool:
    """Given a checkpoint folder, count its top-level entries, note its markers and add its
    sub-folders to `folders`; return False when the folder itself vanished."""
    size, newest, count, error = tally.size, tally.newest, tally.entries, tally.error
    markers, marker_stats, linked = tally.markers, tally.marker_stats, tally.linked
    marker_names = MARKER_NAMES
    present = True
    try:
        with closing(scandir(path)) as entries:
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
                    folders.append(entry.path)
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


def _walk_below(
    scandir: Callable[[str], Any], root_path: str, folders: list[str], tally: _Tally
) -> None:
    """Given the sub-folders of a checkpoint folder, count everything below them."""
    size, newest, count, error = tally.size, tally.newest, tally.entries, tally.error
    linked = tally.linked
    while folders:
        directory = folders.pop()
        try:
            with closing(scandir(directory)) as entries:
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
                        folders.append(entry.path)
                    elif status.st_nlink > 1:
                        _count_link(linked, status)
                    else:
                        size += status.st_size
        except FileNotFoundError:
            error = error or "changed while scanning: a folder vanished"
        except OSError as failure:
            error = f"unreadable: {directory[len(root_path) + 1 :]}: {failure.strerror}"
    tally.size, tally.newest, tally.entries, tally.error = size, newest, count, error


def _count_link(linked: dict[tuple[int, int], list[int]], status: os.stat_result) -> None:
    key = (status.st_dev, status.st_ino)
    seen = linked.get(key)
    if seen is None:
        linked[key] = [status.st_size, status.st_nlink, 1]
    else:
        seen[2] += 1
