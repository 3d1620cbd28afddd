"""Addresses of object-storage roots, the way the ML ecosystem writes them (fsspec URLs).

`s3://bucket/prefix/run1`, `gs://bucket/prefix`, `az://container/prefix` (also the aliases
fsspec accepts: `s3a://`, `gcs://`, `abfs://`, `abfss://`). A path without `scheme://` is a
local path and never reaches this module's parser.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from daemon.errors import CkptdError

# Canonical scheme of each alias fsspec accepts.
_CANONICAL = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "abfs": "az",
    "abfss": "az",
}


def _has_botocore() -> bool:
    try:
        import botocore  # noqa: F401
    except ImportError:
        return False
    return True


def _has_gcsfs() -> bool:
    try:
        import gcsfs  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def _has_adlfs() -> bool:
    try:
        import adlfs  # type: ignore[import-not-found, import-untyped, unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Backend:
    """What a scheme needs installed: a check that it is, the package and the pip extra."""

    installed: Callable[[], bool]
    package: str
    extra: str


# s3 is served by botocore directly (conditional writes, DeleteObjects with per-key errors,
# synchronous); the others go through their fsspec package.
BACKENDS = {
    "s3": Backend(installed=_has_botocore, package="s3fs", extra="s3"),
    "gs": Backend(installed=_has_gcsfs, package="gcsfs", extra="gcs"),
    "az": Backend(installed=_has_adlfs, package="adlfs", extra="azure"),
}

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")
# S3's bucket rules (also valid GCS names); Azure containers are a subset.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")


class StorageUrlError(CkptdError):
    """An object-storage address that cannot be used, with the reason."""


class MissingBackendError(StorageUrlError):
    """The scheme is known but its package is not installed."""


@dataclass(frozen=True)
class StorageUrl:
    """A root on object storage: scheme, bucket (or container) and key prefix without slashes
    at either end ("" for the bucket's top level)."""

    scheme: str
    bucket: str
    prefix: str

    def key(self, *parts: str) -> str:
        """Given names below the root, return the object key (no leading slash)."""
        return "/".join(part for part in (self.prefix, *parts) if part)

    def directory(self) -> str:
        """Return the key prefix that everything below the root starts with ("" or "p/")."""
        return f"{self.prefix}/" if self.prefix else ""

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")


def is_remote(path: str) -> bool:
    """Given a configured root path, return whether it names object storage (`scheme://`)."""
    return _URL.match(path) is not None


def report_key(path: str) -> str:
    """Given a configured root path, return the name its prune reports and the daemon's state
    use: the real path of a local root, the normalised URL of an object-storage root."""
    if is_remote(path):
        try:
            return str(parse(path))
        except StorageUrlError:
            return path
    return os.path.realpath(path)


def parse(path: str) -> StorageUrl:
    """Given `scheme://bucket/prefix`, return its parts; raise StorageUrlError saying why not."""
    match = _URL.match(path.strip())
    if match is None:
        raise StorageUrlError(f"{path!r} is not an object-storage URL (scheme://bucket/prefix)")
    written = match.group("scheme").lower()
    scheme = _CANONICAL.get(written)
    if scheme is None:
        known = ", ".join(f"{name}://" for name in sorted(_CANONICAL))
        raise StorageUrlError(f"{path!r}: unknown scheme {written}:// (known: {known})")
    rest = match.group("rest")
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket:
        # abfs://container@account.dfs.core.windows.net/…: the account goes in storage_options.
        bucket = bucket.split("@", 1)[0]
    if not _BUCKET.match(bucket):
        raise StorageUrlError(f"{path!r}: {bucket!r} is not a valid bucket or container name")
    prefix = prefix.strip("/")
    segments = prefix.split("/") if prefix else []
    for segment in segments:
        if segment in ("", ".", ".."):
            raise StorageUrlError(
                f"{path!r}: the prefix has an empty, '.' or '..' segment; write it plainly"
            )
    return StorageUrl(scheme=scheme, bucket=bucket, prefix=prefix)


def require_backend(url: StorageUrl) -> Backend:
    """Given a parsed URL, return its backend; raise MissingBackendError naming the install."""
    backend = BACKENDS[url.scheme]
    if not backend.installed():
        raise MissingBackendError(
            f"{url.scheme}:// roots need the {backend.package} package, which is not installed:"
            f" pip install 'ckptd[{backend.extra}]'"
        )
    return backend
