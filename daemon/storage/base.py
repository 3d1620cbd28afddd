"""The object-store interface discovery and pruning need, and its value types.

Keys are whole object keys inside one bucket (no leading slash); a "prefix" ends with "/" when
it names a folder-like level. Every listing is paginated by the implementation (S3 returns at
most 1,000 keys a page) and yields lazily, so a caller that stops early pays for fewer pages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

# A bucket's versioning (a container's soft delete) is changed by hand, rarely: asked again at
# most this often (seconds), so a run deleting in many batches asks once.
VERSIONING_TTL = 600.0

# S3's DeleteObjects takes at most this many keys a request (GCS batches take 100; an
# implementation splits further where its service needs to).
MAX_DELETE_BATCH = 1000


class StorageError(OSError):
    """A request the object store refused or failed, with the service's code (never a secret)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class Entry(NamedTuple):
    """One item of one level of a listing: an object, or a common prefix ("folder")."""

    name: str  # relative to the listed prefix, without a trailing "/"
    is_prefix: bool
    size: int  # 0 for a prefix
    mtime: float  # LastModified, epoch seconds; 0.0 for a prefix (the listing does not say)


class ObjectInfo(NamedTuple):
    """One object: its whole key, size in bytes, LastModified (epoch seconds) and ETag."""

    key: str
    size: int
    mtime: float
    etag: str


class DeleteFailure(NamedTuple):
    """A key the store did not delete, with the service's error code and message."""

    key: str
    code: str
    message: str


class Upload(NamedTuple):
    """A multipart upload in progress (not completed, not aborted)."""

    key: str
    upload_id: str
    initiated: float


class RememberedAnswer:
    """Given a question to the store whose answer a person changes by hand, rarely (is the
    bucket versioned?): its answer, asked again at most once per `ttl` seconds."""

    def __init__(self, ask: Callable[[], bool], *, ttl: float = VERSIONING_TTL) -> None:
        self._ask = ask
        self._ttl = ttl
        self._answer: tuple[float, bool] | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        if self._answer is not None and now - self._answer[0] < self._ttl:
            return self._answer[1]
        answer = self._ask()
        self._answer = (now, answer)
        return answer

    def forget(self) -> None:
        """Ask again next time."""
        self._answer = None


class ObjectStore(Protocol):
    """The operations ckptd performs on one bucket; `S3Store` is the real one."""

    @property
    def bucket(self) -> str: ...

    def list_top(self, prefix: str) -> Iterator[Entry]:
        """Given a prefix ("" or ending in "/"), yield its direct objects and sub-prefixes."""
        ...

    def list_tree(self, prefix: str) -> Iterator[ObjectInfo]:
        """Given a prefix, yield every object whose key starts with it, at any depth."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Given a key, return its size, time and ETag, or None when there is no such object."""
        ...

    def read_small(self, key: str, limit: int = 1 << 20) -> bytes:
        """Given a key, return its first `limit` bytes; FileNotFoundError when it is absent."""
        ...

    def read_with_etag(self, key: str, limit: int = 1 << 20) -> tuple[bytes, str] | None:
        """Given a key, return its first `limit` bytes and its ETag, or None when absent."""
        ...

    def put(self, key: str, data: bytes) -> str:
        """Given a key and bytes, write the object (replacing any) and return its ETag."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Given a key and bytes, create the object only if no object has that key; return
        whether this call created it (two concurrent writers: exactly one gets True)."""
        ...

    def replace_if_match(self, key: str, data: bytes, etag: str) -> bool:
        """Given a key, bytes and the ETag last read, replace the object only if it still has
        that ETag; return whether this call replaced it."""
        ...

    def delete_if_match(self, key: str, etag: str) -> bool:
        """Given a key and the ETag last read, delete it only if unchanged; return whether this
        call deleted it (False when it changed or is gone)."""
        ...

    def delete_batch(self, keys: Sequence[str]) -> list[DeleteFailure]:
        """Given keys, delete them in requests of at most MAX_DELETE_BATCH; return the
        failures (an absent key is no failure)."""
        ...

    def multipart_uploads(self, prefix: str) -> list[Upload]:
        """Given a prefix, return the multipart uploads in progress under it."""
        ...

    def versioning_enabled(self) -> bool:
        """Return whether the bucket keeps old versions (deleting then frees no billed bytes)."""
        ...
