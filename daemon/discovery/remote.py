"""Discovery of a root on object storage: the local scan, run unchanged over one listing.

Discovery reads a root only through a `FileSystem`, by path (scandir, lstat, stat, read_bytes,
readlink). `ListingFileSystem` is one built from a single recursive listing of the root's
prefix (1 request per 1,000 objects): folders are the key prefixes, files the objects, their
sizes and times from the listing. The few small files discovery reads (markers such as
`trainer_state.json`, trackers such as `latest` or `checkpoint`, metrics sidecars) are fetched
with one ranged GET each when read. So layouts, trackers, series, steps, sizes and completeness
come out exactly as for the same tree on a local disk, from the same code.

What differs on object storage, applied after the scan:
- no process information exists there: a checkpoint is complete only by its layout's marker
  object, and only once nothing was written under it for `settle_seconds` (counted from the
  newest object's LastModified: objects of one save may be uploaded in any order);
- a multipart upload in progress under a checkpoint's prefix means it is being written;
- ckptd's own prefixes (`.ckptd-journal/`, `.ckptd-trash/`, `.ckptd-lease*`) are not listed;
- no symlinks, hard links, holds files or size cache: each scan lists once (the daemon's
  poller keeps the listing between polls, see `daemon/storage/listing.py`).

The scan sees the root at a virtual absolute path (`/.ckptd-remote/<bucket>/<prefix>`, never
touched on the local disk); the result names the root by its URL (`s3://bucket/prefix`).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat as stat_module
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from daemon.config import RootConfig
from daemon.discovery.scan import ScanResult, scan
from daemon.fsio import READ_LIMIT, At, Dir, DirEntryLike, OnError
from daemon.storage import open_store
from daemon.storage.base import ObjectInfo, ObjectStore, Upload
from daemon.storage.journal import OWN_PREFIX, list_deferred
from daemon.storage.url import StorageUrl
from policies.model import Checkpoint

# Where the scan believes the root is; nothing is ever read or written there.
VIRTUAL_TOP = "/.ckptd-remote"
_DIR_MODE = stat_module.S_IFDIR | 0o755
_FILE_MODE = stat_module.S_IFREG | 0o644
_DEVICE = 0x5EED  # one made-up device for every object of a listing
BEING_WRITTEN = "being written: multipart upload in progress"


def virtual_root(url: StorageUrl) -> str:
    """Given a root's URL, return the absolute path the scan sees it at."""
    return f"{VIRTUAL_TOP}/{url.bucket}/{url.prefix}".rstrip("/")


def _stat(mode: int, inode: int, size: int, mtime: float) -> os.stat_result:
    nanoseconds = int(mtime * 1e9)
    # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime) then the float times and
    # the nanosecond times the walker reads.
    seconds = int(mtime)
    fields = (mode, inode, _DEVICE, 1, 0, 0, size, seconds, seconds, seconds)
    return os.stat_result((*fields, mtime, mtime, mtime, nanoseconds, nanoseconds, nanoseconds))


@dataclass(frozen=True, slots=True)
class _Node:
    """One file (an object) or folder (a key prefix) of the listing, with its stat."""

    key: str  # the object's key; "" for a folder
    status: os.stat_result

    @property
    def is_dir(self) -> bool:
        return self.key == ""


class _Entry:
    """A directory entry of the listing (what `os.DirEntry` gives discovery)."""

    __slots__ = ("_node", "name", "path")

    def __init__(self, name: str, path: str, node: _Node) -> None:
        self.name = name
        self.path = path
        self._node = node

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._node.is_dir

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return not self._node.is_dir

    def is_symlink(self) -> bool:
        return False

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        return self._node.status

    def inode(self) -> int:
        return int(self._node.status.st_ino)


def _read_only(path: str) -> OSError:
    return OSError(errno.EROFS, "a listing of object storage is read-only", path)


def _top_name(relative: str) -> str:
    """Given a key relative to the root, return the root entry it lies in (or is)."""
    return relative.split("/", 1)[0]


class ListingFileSystem:
    """A read-only `FileSystem` over one recursive listing of a root on object storage.

    Paths are `virtual_root(url)` and below; reading a file fetches the object's first bytes.
    Everything that would change the tree raises EROFS: pruning a remote root goes through
    `daemon/storage/journal.py`, never through a FileSystem.
    """

    def __init__(
        self,
        store: ObjectStore,
        url: StorageUrl,
        objects: Iterable[ObjectInfo],
        hidden: frozenset[str] = frozenset(),
    ) -> None:
        self.store = store
        self.url = url
        self.root = virtual_root(url)
        self._folders: dict[str, dict[str, _Node]] = {self.root: {}}
        self._nodes: dict[str, _Node] = {self.root: _Node("", _stat(_DIR_MODE, 1, 0, 0.0))}
        # Every object the tree holds, by key (what pruning deletes is taken from here).
        self.listed: dict[str, ObjectInfo] = {}
        top = url.directory()
        for item in objects:
            relative = item.key[len(top) :]
            if not item.key.startswith(top) or not relative or relative.endswith("/"):
                continue  # a "folder" placeholder object says nothing the keys below do not
            if relative.startswith(OWN_PREFIX):
                continue  # ckptd's journal, deferred lists and lease
            if hidden and _top_name(relative) in hidden:
                continue  # in the deferred-deletion list: the trash, not the root
            self._add(relative, item)

    def _add(self, relative: str, item: ObjectInfo) -> None:
        parts = relative.split("/")
        if any(part in ("", ".", "..") for part in parts):
            return  # `a//b`, `a/../b`: no path names it; never followed out of the root
        folder = self.root
        for part in parts[:-1]:
            path = f"{folder}/{part}"
            if path not in self._folders:
                existing = self._folders[folder].get(part)
                if existing is not None and not existing.is_dir:
                    return  # an object `a` and objects `a/...`: the folder is what counts
                node = _Node("", _stat(_DIR_MODE, len(self._nodes) + 1, 0, 0.0))
                self._folders[folder][part] = node
                self._folders[path] = {}
                self._nodes[path] = node
            folder = path
        name = parts[-1]
        path = f"{folder}/{name}"
        if path in self._folders:
            return  # the folder of the same name wins (see above)
        node = _Node(item.key, _stat(_FILE_MODE, len(self._nodes) + 1, item.size, item.mtime))
        self._folders[folder][name] = node
        self._nodes[path] = node
        self.listed[item.key] = item

    # --- what discovery reads ---------------------------------------------------------------

    def _node(self, path: str) -> _Node:
        node = self._nodes.get(os.path.normpath(path))
        if node is None:
            raise FileNotFoundError(errno.ENOENT, "no such object or prefix", path)
        return node

    def scandir(self, path: str) -> Iterator[DirEntryLike]:
        folder = os.path.normpath(path)
        children = self._folders.get(folder)
        if children is None:
            self._node(folder)  # FileNotFoundError when absent
            raise NotADirectoryError(errno.ENOTDIR, "an object, not a prefix", path)
        for name, node in list(children.items()):
            yield _Entry(name, f"{folder}/{name}", node)

    def lstat(self, path: str) -> os.stat_result:
        return self._node(path).status

    def stat(self, path: str) -> os.stat_result:
        return self._node(path).status

    def read_bytes(self, path: str, limit: int = READ_LIMIT) -> bytes:
        node = self._node(path)
        if node.is_dir:
            raise IsADirectoryError(errno.EISDIR, "a prefix, not an object", path)
        return self.store.read_small(node.key, limit)

    def readlink(self, path: str) -> str:
        self._node(path)
        raise OSError(errno.EINVAL, "object storage has no symlinks", path)

    def is_folder(self, name: str) -> bool:
        """Given a root entry's name, return whether it is a prefix (not one object)."""
        node = self._nodes.get(f"{self.root}/{name}")
        return node is not None and node.is_dir

    def objects_under(self, name: str) -> list[str]:
        """Given a root entry's name, return the keys of every object it stands for."""
        path = f"{self.root}/{name}"
        node = self._nodes.get(path)
        if node is None:
            return []
        if not node.is_dir:
            return [node.key]
        keys: list[str] = []
        folders = [path]
        while folders:
            folder = folders.pop()
            for child, inner in self._folders[folder].items():
                if inner.is_dir:
                    folders.append(f"{folder}/{child}")
                else:
                    keys.append(inner.key)
        return keys

    # --- what pruning would change: never through this FileSystem ----------------------------

    def rename(self, source: str, destination: str) -> None:
        raise _read_only(source)

    def makedirs(self, path: str) -> None:
        raise _read_only(path)

    def remove_tree(self, path: str, on_error: OnError | None = None) -> None:
        raise _read_only(path)

    def unlink(self, path: str) -> None:
        raise _read_only(path)

    def fsync_dir(self, path: str) -> None:
        raise _read_only(path)

    def open_dir(self, at: At) -> int:
        raise _read_only(at.path)

    def lstat_at(self, at: At) -> os.stat_result:
        raise _read_only(at.path)

    def list_dir(self, directory: Dir) -> list[str]:
        raise _read_only(directory.path)

    def scandir_at(self, directory: Dir) -> Iterator[DirEntryLike]:
        raise _read_only(directory.path)

    def mkdir_at(self, at: At, mode: int = 0o700) -> None:
        raise _read_only(at.path)

    def rename_at(self, source: At, destination: At) -> None:
        raise _read_only(source.path)

    def remove_tree_at(self, at: At, on_error: OnError | None = None) -> None:
        raise _read_only(at.path)

    def unlink_at(self, at: At) -> None:
        raise _read_only(at.path)

    def rmdir_at(self, at: At) -> None:
        raise _read_only(at.path)

    def write_new_at(self, at: At, data: bytes, *, mode: int = 0o644, durable: bool = True) -> None:
        raise _read_only(at.path)

    def read_at(self, at: At, limit: int = READ_LIMIT) -> bytes:
        raise _read_only(at.path)

    def fsync_fd(self, descriptor: int) -> None:
        raise OSError(errno.EROFS, "a listing of object storage is read-only")


@dataclass(frozen=True)
class RemoteScan:
    """One scan of a remote root: the result (named by URL), the listing it was made from
    (pruning deletes exactly the keys listed here) and the store it was read through."""

    result: ScanResult
    fs: ListingFileSystem
    url: StorageUrl
    store: ObjectStore


def open_root_store(root: RootConfig) -> tuple[StorageUrl, ObjectStore]:
    """Given a configured object-storage root, return its URL and a store on its bucket."""
    return open_store(root.path, root.storage_options)


def scan_remote(
    root: RootConfig,
    *,
    now: float,
    settle_seconds: float,
    want_metrics: bool = False,
    store: ObjectStore | None = None,
    url: StorageUrl | None = None,
    objects: Iterable[ObjectInfo] | None = None,
) -> RemoteScan:
    """Given an object-storage root and the time, return what is in it now, as the local scan
    would for the same tree (see the module docstring). `objects` is a listing already made
    (the daemon's poller); otherwise the root is listed once now. Raises UsageError as the
    local scan does, OSError (FileNotFoundError: no such bucket) when the store fails."""
    if store is None or url is None:
        url, store = open_root_store(root)
    listed = store.list_tree(url.directory()) if objects is None else objects
    invalid: list[str] = []
    fs = ListingFileSystem(store, url, listed, in_trash(store, url, invalid))
    local_view = root.model_copy(update={"path": fs.root})
    found = scan(
        local_view,
        now=now,
        settle_seconds=settle_seconds,
        fs=fs,
        cache=None,
        want_metrics=want_metrics,
    )
    uploads = store.multipart_uploads(url.directory())
    checkpoints = tuple(
        _remote_completeness(checkpoint, now, settle_seconds, _uploads_of(checkpoint, url, uploads))
        for checkpoint in found.checkpoints
    )
    result = dataclasses.replace(
        found,
        root=str(url),
        checkpoints=checkpoints,
        warnings=(
            *(warning.replace(fs.root, str(url)) for warning in found.warnings),
            *(f"ignored a malformed deferred-deletion list {problem}" for problem in invalid),
        ),
    )
    return RemoteScan(result=result, fs=fs, url=url, store=store)


def in_trash(
    store: ObjectStore, url: StorageUrl, invalid: list[str] | None = None
) -> frozenset[str]:
    """Given a root, return the root entries its deferred-deletion lists hold (the trash grace:
    their objects stay until it ends, but they are no longer the root's checkpoints); a list
    that is not ckptd's or reaches outside its checkpoints is named in `invalid`, not used."""
    members: set[str] = set()
    for item in list_deferred(store, url, invalid if invalid is not None else []):
        members.update(item.members)
    return frozenset(members)


def _uploads_of(checkpoint: Checkpoint, url: StorageUrl, uploads: list[Upload]) -> list[Upload]:
    """Given a checkpoint and the uploads in progress in its root, return those under it."""
    if not uploads:
        return []
    heads = [url.key(member) for member in checkpoint.members]
    return [
        upload
        for upload in uploads
        if any(upload.key == head or upload.key.startswith(f"{head}/") for head in heads)
    ]


def _remote_completeness(
    checkpoint: Checkpoint, now: float, settle_seconds: float, uploads: list[Upload]
) -> Checkpoint:
    """Given a checkpoint as the scan saw it, return it with object storage's rules applied:
    being written while a multipart upload is in progress under it, settling until its newest
    object is `settle_seconds` old."""
    if uploads:
        newest = max(checkpoint.mtime, *(upload.initiated for upload in uploads))
        return dataclasses.replace(
            checkpoint, complete=False, incomplete_reason=BEING_WRITTEN, mtime=newest
        )
    if checkpoint.complete and now - checkpoint.mtime < settle_seconds:
        age = max(0.0, now - checkpoint.mtime)
        reason = f"settling: newest object written {age:.0f} s ago"
        return dataclasses.replace(checkpoint, complete=False, incomplete_reason=reason)
    return checkpoint
