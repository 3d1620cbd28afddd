"""Reading the files of one checkpoint as hostile input: the only way `daemon.integrity` reads.

Every path inside a training root belongs to someone who may race ckptd. So:

- everything is opened relative to directory descriptors, each component with `O_NOFOLLOW`:
  a symlink anywhere inside a checkpoint is listed (it is part of the signature) but never
  followed, and nothing outside the root is ever opened;
- files are opened with `O_NONBLOCK` and must be regular files (`fstat` after `open`): a FIFO
  named `model.safetensors` neither hangs the check nor passes it;
- reads are bounded: headers and indexes are read up to a cap per kind of file, never a whole
  payload (the deep check streams payloads in fixed chunks, stoppable, reporting progress);
- a file whose size or mtime differs from the walk that started the check, or that ends before
  its own size, was changed while being checked: the check says "unknown", never "corrupt".

`CheckpointFiles` walks a checkpoint once (its entries are the signature) and opens its files;
`Findings` collects what the format modules find.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_module
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from daemon.integrity.result import Signature, SignatureEntry

# A walk stops listing past this many entries (the check is then "unknown").
MAX_ENTRIES = 500_000
# The deep check reads payloads in chunks of this size (one buffer, reused).
CHUNK_BYTES = 8 << 20

_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_DAMAGE_ERRNOS = frozenset({errno.EIO, errno.EBADMSG, errno.EUCLEAN, errno.ENODATA})


class Damaged(Exception):
    """The file is damaged: a problem that makes the checkpoint corrupt."""


class Unreadable(Exception):
    """ckptd cannot read the file (permissions, a symlink it will not follow): unknown."""


class Deferred(Exception):
    """The cheap check leaves the file to the deep check (too large to read cheaply)."""


class Changed(Exception):
    """The file changed or vanished while it was checked: unknown, never cached."""


class Stopped(Exception):
    """A stop was requested (the daemon shuts down, a newer job takes over)."""


@dataclass(slots=True)
class Findings:
    """What a check found so far; the format modules add to it."""

    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    checked: dict[str, None] = field(default_factory=dict)
    changed: bool = False
    stopped: bool = False
    bytes_read: int = 0

    def problem(self, path: str, message: str) -> None:
        """Given a file and what is wrong with it, record a problem (once)."""
        line = f"{path}: {message}"
        if line not in self.problems:
            self.problems.append(line)

    def skip(self, path: str, message: str) -> None:
        """Given a file and why it could not be checked, record it (once)."""
        line = f"{path}: {message}"
        if line not in self.skipped:
            self.skipped.append(line)

    def mark_checked(self, path: str) -> None:
        self.checked[path] = None

    def record_failure(self, path: str, failure: Exception) -> None:
        """Given an exception raised while checking `path`, file it where it belongs."""
        if isinstance(failure, Damaged):
            self.problem(path, str(failure))
        elif isinstance(failure, Changed):
            self.changed = True
            self.skip(path, f"changed while checking ({failure})")
        elif isinstance(failure, Stopped):
            self.stopped = True
        elif isinstance(failure, Deferred):
            self.deferred.append(f"{path}: {failure}")
        else:
            self.skip(path, str(failure))


@dataclass(frozen=True, slots=True)
class DeepOptions:
    """How a deep pass behaves: `stop` ends it between chunks; `progress` is told the number of
    bytes just verified after each chunk."""

    stop: threading.Event | None = None
    progress: Callable[[int], None] | None = None

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped("stop requested")


def _classify(path: str, failure: OSError) -> Exception:
    """Given an OSError from opening or reading `path`, return the exception it means."""
    if failure.errno == errno.ENOENT:
        return Changed(f"{path} vanished")
    if failure.errno in (errno.ELOOP, errno.EMLINK):
        return Unreadable("is a symbolic link; not followed")
    if failure.errno == errno.ENOTDIR:
        return Changed(f"a folder above {path} is no longer a folder")
    if failure.errno in _DAMAGE_ERRNOS:
        return Damaged(f"read error: {failure.strerror}")
    return Unreadable(f"cannot be read: {failure.strerror}")


class FileHandle:
    """Given an open regular file of a checkpoint: bounded reads at offsets."""

    def __init__(self, descriptor: int, path: str, size: int) -> None:
        self.descriptor = descriptor
        self.path = path
        self.size = size

    def read_at(self, offset: int, length: int) -> bytes:
        """Given an offset and a length inside the file's size, return exactly those bytes.

        Raises Damaged when the range lies past the file's end, Changed when the file ends
        early (it shrank since it was opened)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Damaged(
                f"needs bytes {offset}..{offset + length} but the file has {self.size} bytes"
            )
        parts: list[bytes] = []
        done = 0
        while done < length:
            try:
                piece = os.pread(self.descriptor, length - done, offset + done)
            except OSError as failure:
                raise _classify(self.path, failure) from failure
            if not piece:
                raise Changed(f"{self.path} ended at {offset + done} of {self.size} bytes")
            parts.append(piece)
            done += len(piece)
        return b"".join(parts)

    def stream(
        self, offset: int, length: int, options: DeepOptions, findings: Findings
    ) -> Iterator[memoryview]:
        """Given a range of the file, yield it in chunks (one reused buffer: use each chunk
        before asking for the next); checks `options.stop` and reports progress per chunk."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Damaged(
                f"needs bytes {offset}..{offset + length} but the file has {self.size} bytes"
            )
        buffer = bytearray(min(CHUNK_BYTES, max(length, 1)))
        view = memoryview(buffer)
        position = offset
        end = offset + length
        while position < end:
            options.check_stop()
            want = min(len(buffer), end - position)
            try:
                got = os.preadv(self.descriptor, [view[:want]], position)
            except OSError as failure:
                raise _classify(self.path, failure) from failure
            if got <= 0:
                raise Changed(f"{self.path} ended at {position} of {self.size} bytes")
            findings.bytes_read += got
            yield view[:got]
            # Read once and done with: leave the page cache to the trainer and its data.
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.descriptor, position, got, os.POSIX_FADV_DONTNEED)
            position += got
            if options.progress is not None:
                options.progress(got)


class CheckpointFiles:
    """Given a root's directory descriptor and one checkpoint in it: its entries, and a way to
    open them safely.

    A folder checkpoint (`checkpoint-500/`) is walked recursively and its paths are relative to
    the folder. A checkpoint made of root entries (a `.pt` file; TensorFlow's `ckpt-5.index` +
    `ckpt-5.data-*`) has those entries as its paths, relative to the root.
    """

    def __init__(self, root_descriptor: int, folder: str | None, members: tuple[str, ...]) -> None:
        self.root_descriptor = root_descriptor
        self.folder = folder
        self.members = members
        self.entries: dict[str, SignatureEntry] = {}
        self.truncated = False

    # --- walking ------------------------------------------------------------------------------

    @contextmanager
    def _base(self) -> Iterator[int]:
        if self.folder is None:
            yield self.root_descriptor
            return
        try:
            descriptor = os.open(self.folder, _OPEN_DIR, dir_fd=self.root_descriptor)
        except OSError as failure:
            raise _classify(self.folder, failure) from failure
        try:
            yield descriptor
        finally:
            os.close(descriptor)

    def walk(self) -> Signature:
        """Walk the checkpoint (never following a symlink) and return its signature."""
        self.entries = {}
        self.truncated = False
        with self._base() as base:
            if self.folder is None:
                for name in self.members:
                    self._add_member(base, name)
            else:
                self._walk_folder(base, "")
        return Signature(tuple(sorted(self.entries.values())))

    def _add_member(self, base: int, name: str) -> None:
        try:
            status = os.lstat(name, dir_fd=base)
        except FileNotFoundError:
            return
        self._record(name, status)

    def _record(self, path: str, status: os.stat_result) -> str:
        mode = status.st_mode
        if stat_module.S_ISREG(mode):
            kind = "file"
        elif stat_module.S_ISDIR(mode):
            kind = "dir"
        elif stat_module.S_ISLNK(mode):
            kind = "symlink"
        else:
            kind = "other"
        self.entries[path] = SignatureEntry(path, kind, status.st_size, status.st_mtime_ns)
        return kind

    def _walk_folder(self, base: int, prefix: str) -> None:
        pending: list[tuple[str, int]] = [(prefix, base)]
        opened: list[int] = []
        try:
            while pending:
                relative, descriptor = pending.pop()
                for name, status in self._list(descriptor, relative):
                    if len(self.entries) >= MAX_ENTRIES:
                        self.truncated = True
                        return
                    path = f"{relative}{name}"
                    if self._record(path, status) != "dir":
                        continue
                    try:
                        child = os.open(name, _OPEN_DIR, dir_fd=descriptor)
                    except OSError:
                        continue  # replaced or unreadable: it stays a "dir" entry
                    opened.append(child)
                    pending.append((f"{path}/", child))
        finally:
            for descriptor in opened:
                os.close(descriptor)

    @staticmethod
    def _list(descriptor: int, relative: str) -> list[tuple[str, os.stat_result]]:
        found: list[tuple[str, os.stat_result]] = []
        try:
            with os.scandir(descriptor) as listing:
                for entry in listing:
                    try:
                        found.append((entry.name, entry.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue
        except OSError as failure:
            raise _classify(relative or ".", failure) from failure
        return found

    # --- looking up -----------------------------------------------------------------------------

    def files(self) -> list[str]:
        """Return the paths of the regular files, sorted."""
        return sorted(path for path, entry in self.entries.items() if entry.kind == "file")

    def kind(self, path: str) -> str | None:
        """Given a path, return its kind from the walk, or None when it was not there."""
        entry = self.entries.get(path)
        return entry.kind if entry is not None else None

    def size(self, path: str) -> int:
        return self.entries[path].size

    # --- opening ------------------------------------------------------------------------------

    @contextmanager
    def open(self, path: str) -> Iterator[FileHandle]:
        """Given a path from the walk, open it as a regular file (never through a symlink).

        Raises Damaged (not a regular file), Unreadable (permissions, a symlink) or Changed (it
        vanished, or its size or mtime differ from the walk's)."""
        expected = self.entries.get(path)
        with self._base() as base:
            parent = base
            opened: list[int] = []
            try:
                *folders, name = path.split("/")
                for folder in folders:
                    try:
                        parent = os.open(folder, _OPEN_DIR, dir_fd=parent)
                    except OSError as failure:
                        raise _classify(path, failure) from failure
                    opened.append(parent)
                try:
                    descriptor = os.open(name, _OPEN_FILE, dir_fd=parent)
                except OSError as failure:
                    raise _classify(path, failure) from failure
                try:
                    status = os.fstat(descriptor)
                    if not stat_module.S_ISREG(status.st_mode):
                        raise Damaged("not a regular file")
                    if expected is not None and (
                        status.st_size != expected.size or status.st_mtime_ns != expected.mtime_ns
                    ):
                        raise Changed(f"{path} was rewritten")
                    yield FileHandle(descriptor, path, status.st_size)
                finally:
                    os.close(descriptor)
            finally:
                for descriptor in opened:
                    os.close(descriptor)


def open_root(root: int | str | os.PathLike[str]) -> tuple[int, bool]:
    """Given a root as an open directory descriptor or a path, return (descriptor, owned): an
    owned descriptor was opened here and is the caller's to close. The root itself is the
    configured, trusted path: it may be reached through a symlink; nothing below it is."""
    if isinstance(root, int):
        return root, False
    return os.open(os.fspath(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), True


class _Checking:
    """The context manager of `Context.checking` (a class, so its `__exit__` says `bool`: type
    checkers then know the body's exceptions may be swallowed)."""

    def __init__(self, findings: Findings, path: str) -> None:
        self.findings = findings
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, failure: BaseException | None, _: object
    ) -> bool:
        if failure is None:
            self.findings.mark_checked(self.path)
            return False
        if isinstance(failure, (Damaged, Unreadable, Changed, Deferred)):
            self.findings.record_failure(self.path, failure)
            return True
        if isinstance(failure, Stopped):
            self.findings.stopped = True
        return False


@dataclass(slots=True)
class Context:
    """Given one check in progress: the checkpoint's files, what was found, and how deep."""

    files: CheckpointFiles
    findings: Findings
    deep: bool = False
    options: DeepOptions = field(default_factory=DeepOptions)

    def checking(self, path: str) -> _Checking:
        """Return a context manager that runs its body as the check of `path`: a Damaged,
        Unreadable, Changed or Deferred raised inside is recorded against it; otherwise it
        counts as checked. Stopped goes on up."""
        return _Checking(self.findings, path)
