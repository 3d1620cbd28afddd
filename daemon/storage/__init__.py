"""Checkpoint roots on object storage (`s3://`, `gs://`, `az://`) behind one interface.

`url` parses a root's address and names the package a scheme needs; `base` is the interface and
its value types; `s3` implements it over botocore, `gcs` over google-cloud-storage, `azure`
over azure-storage-blob; `journal`
makes deletion crash-safe without a rename (deletion journal, deferred-deletion list for the
trash grace).
"""

from __future__ import annotations

from collections.abc import Mapping

from daemon.storage.base import ObjectStore
from daemon.storage.url import (
    MissingBackendError,
    StorageUrl,
    StorageUrlError,
    parse,
    require_backend,
)


def open_store(
    path: str, storage_options: Mapping[str, object] | None = None
) -> tuple[StorageUrl, ObjectStore]:
    """Given a root's `scheme://bucket/prefix` and its storage_options, return the parsed URL
    and a store on its bucket; raise StorageUrlError (MissingBackendError: what to install)."""
    url = parse(path)
    require_backend(url)
    if url.scheme == "s3":
        from daemon.storage.s3 import open_s3

        return url, open_s3(url, storage_options)
    if url.scheme == "az":
        from daemon.storage.azure import open_azure

        return url, open_azure(url, storage_options)
    if url.scheme == "gs":
        from daemon.storage.gcs import open_gcs

        return url, open_gcs(url, storage_options)
    raise StorageUrlError(
        f"{url.scheme}:// roots: the {url.scheme} backend of the object-store interface is not"
        " written (s3://, gs:// and az:// are)"
    )


__all__ = ["MissingBackendError", "ObjectStore", "StorageUrl", "StorageUrlError", "open_store"]
