"""`ObjectStore` on Google Cloud Storage, through the `google-cloud-storage` client (JSON API).

The synchronous client rather than gcsfs's async layer, for the reason s3.py gives for botocore:
every call is one request whose outcome matters on its own. gcsfs (the `gcs` extra, the package
the training code uses) brings google-cloud-storage and google-auth anyway.

How the protocol maps onto GCS:
- the protocol's "ETag" is the object's *generation* (a decimal string): `put_if_absent` is an
  upload with `ifGenerationMatch=0`, `replace_if_match` and `delete_if_match` send
  `ifGenerationMatch=<generation>` (412 when the object changed);
- listings are paginated (1,000 items a page) with `pageToken`, a level with `delimiter="/"`;
- `delete_batch` sends JSON-API batches of at most 100 calls (GCS's limit), and falls back to
  one DELETE per key where the server does not speak the batch protocol (emulators);
- `multipart_uploads` returns []: GCS resumable uploads cannot be listed (an object appears
  only when its upload completes), so an upload in progress is invisible here; the marker
  object and the settle time are what protect a checkpoint being written;
- `versioning_enabled` reads the bucket's `versioning.enabled`. GCS *soft delete* (on by default
  for new buckets, 7 days) also keeps deleted bytes billed for its retention: it is counted as
  "bytes still billed" the same way (a bucket with a soft-delete retention reports True).

storage_options use gcsfs's names: `project`, `token` (None or "google_default": Application
Default Credentials; "anon"; "cloud": the metadata server; a path to a service-account or
authorized-user JSON file; or that JSON as a mapping) and `endpoint_url` (an emulator; without a
token it is then reached anonymously). No value is ever put in a message, a repr or a log line.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from daemon.storage.base import (
    DeleteFailure,
    Entry,
    ObjectInfo,
    RememberedAnswer,
    StorageError,
    Upload,
)
from daemon.storage.url import StorageUrl, StorageUrlError, require_backend

KNOWN_OPTIONS = frozenset({"project", "token", "endpoint_url"})
# A JSON-API batch request carries at most 100 calls.
GCS_BATCH = 100
PAGE_SIZE = 1000
# (connect, read) seconds for every request.
_TIMEOUT = (10, 60)
_SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]


def _epoch(value: object) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0


def _credentials(options: Mapping[str, object]) -> Any:
    """Given storage_options, return google-auth credentials, or None for the default chain."""
    token = options.get("token")
    if token is None and options.get("endpoint_url"):
        token = "anon"
    if token is None or token == "google_default":
        return None
    if token == "anon":
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()  # type: ignore[no-untyped-call, unused-ignore]
    if token == "cloud":
        from google.auth import compute_engine

        return compute_engine.Credentials()  # type: ignore[no-untyped-call, unused-ignore]
    import google.auth

    try:
        if isinstance(token, Mapping):
            found = google.auth.load_credentials_from_dict(  # type: ignore[no-untyped-call, unused-ignore]
                dict(token), scopes=_SCOPES
            )
        elif isinstance(token, str):
            found = google.auth.load_credentials_from_file(  # type: ignore[no-untyped-call, unused-ignore]
                token, scopes=_SCOPES
            )
        else:
            raise StorageUrlError("storage_options.token must be a string or a mapping")
    except (OSError, ValueError, google.auth.exceptions.GoogleAuthError) as error:
        # The message names the kind of failure, never the token's content.
        raise StorageUrlError(f"storage_options.token: unusable ({type(error).__name__})") from None
    return found[0]


def open_gcs(url: StorageUrl, options: Mapping[str, object] | None = None) -> GCSStore:
    """Given a gs:// URL and its storage_options, return a store on its bucket."""
    require_backend(url)
    from google.cloud import storage

    options = options or {}
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        known = ", ".join(sorted(KNOWN_OPTIONS))
        raise StorageUrlError(f"unknown storage_options for gs: {', '.join(unknown)} ({known})")
    credentials = _credentials(options)
    project = options.get("project")
    endpoint = str(options.get("endpoint_url") or "")
    arguments: dict[str, Any] = {"credentials": credentials}
    if endpoint:
        arguments["client_options"] = {"api_endpoint": endpoint}
    if project is not None:
        arguments["project"] = str(project)
    elif credentials is not None and not getattr(credentials, "project_id", None):
        # Bucket-level calls need no project; the client only refuses to guess one.
        arguments["project"] = "<none>"
    client = storage.Client(**arguments)
    return GCSStore(client, url.bucket, endpoint=endpoint)


class GCSStore:
    """One bucket through a google-cloud-storage client; counts the API requests it makes."""

    def __init__(self, client: Any, bucket: str, endpoint: str = "") -> None:
        self._client = client
        self._bucket_name = bucket
        self._bucket = client.bucket(bucket)
        self._endpoint = endpoint
        # Requests per operation (JSON-API method names), as S3Store counts its own.
        self.requests: collections.Counter[str] = collections.Counter()
        self._versioning = RememberedAnswer(self._ask_versioning)

    def __repr__(self) -> str:
        where = f" at {self._endpoint}" if self._endpoint else ""
        return f"GCSStore(gs://{self._bucket_name}{where})"

    @property
    def bucket(self) -> str:
        return self._bucket_name

    def _fail(self, error: Exception, operation: str, what: str) -> OSError:
        """Given a google-api-core error, return the OSError to raise (naming no secret)."""
        from google.api_core import exceptions

        code = str(getattr(error, "code", "") or type(error).__name__)
        message = f"{operation} gs://{self._bucket_name}/{what}: {code}"
        if isinstance(error, exceptions.NotFound):
            return FileNotFoundError(message)
        if isinstance(error, exceptions.Forbidden | exceptions.Unauthorized):
            return PermissionError(message)
        return StorageError(f"{message} ({getattr(error, 'message', '')})", code)

    def _pages(self, prefix: str, delimiter: str) -> Iterator[Any]:
        from google.api_core import exceptions

        listing = self._client.list_blobs(
            self._bucket_name,
            prefix=prefix or None,
            delimiter=delimiter or None,
            page_size=PAGE_SIZE,
            timeout=_TIMEOUT,
        )
        pages = listing.pages
        while True:
            try:
                page = next(pages)
            except StopIteration:
                # Known without a request: the last page carried no nextPageToken.
                return
            except exceptions.GoogleAPIError as error:
                raise self._fail(error, "objects.list", prefix) from None
            self.requests["objects.list"] += 1
            yield page

    def list_top(self, prefix: str) -> Iterator[Entry]:
        # GCS pages prefixes along with items; some servers repeat a prefix on later pages.
        seen: set[str] = set()
        for page in self._pages(prefix, "/"):
            for common in sorted(set(page.prefixes) - seen):
                seen.add(common)
                name = str(common)[len(prefix) :].rstrip("/")
                if name:
                    yield Entry(name, True, 0, 0.0)
            for blob in page:
                name = str(blob.name)[len(prefix) :]
                if name:
                    yield Entry(name, False, int(blob.size or 0), _epoch(blob.updated))

    def list_tree(self, prefix: str) -> Iterator[ObjectInfo]:
        for page in self._pages(prefix, ""):
            for blob in page:
                yield ObjectInfo(
                    str(blob.name), int(blob.size or 0), _epoch(blob.updated), str(blob.generation)
                )

    def head(self, key: str) -> ObjectInfo | None:
        from google.api_core import exceptions

        self.requests["objects.get"] += 1
        try:
            blob = self._bucket.get_blob(key, timeout=_TIMEOUT)
        except exceptions.GoogleAPIError as error:
            raise self._fail(error, "objects.get", key) from None
        if blob is None:
            return None
        return ObjectInfo(key, int(blob.size or 0), _epoch(blob.updated), str(blob.generation))

    def read_with_etag(self, key: str, limit: int = 1 << 20) -> tuple[bytes, str] | None:
        from google.api_core import exceptions

        # Metadata first, then the bytes of exactly that generation: the pair is consistent.
        # A writer replacing the object in between makes the download fail 412: read again.
        for _attempt in range(5):
            info = self.head(key)
            if info is None:
                return None
            if limit <= 0 or info.size == 0:
                # An empty object has no byte 0: GCS answers 416 to any range.
                return b"", info.etag
            self.requests["objects.get(media)"] += 1
            try:
                data = self._bucket.blob(key).download_as_bytes(
                    start=0,
                    end=limit - 1,
                    if_generation_match=int(info.etag),
                    timeout=_TIMEOUT,
                )
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                continue
            except exceptions.GoogleAPIError as error:
                raise self._fail(error, "objects.get", key) from None
            return bytes(data[:limit]), info.etag
        raise StorageError(f"objects.get gs://{self._bucket_name}/{key}: kept changing", "412")

    def read_small(self, key: str, limit: int = 1 << 20) -> bytes:
        found = self.read_with_etag(key, limit)
        if found is None:
            raise FileNotFoundError(f"gs://{self._bucket_name}/{key}")
        return found[0]

    def _upload(self, key: str, data: bytes, generation: int | None) -> str | None:
        """Given a key, bytes and a precondition (None: none), upload; return the new
        generation, or None when the precondition failed."""
        from google.api_core import exceptions

        blob = self._bucket.blob(key)
        # The client retries a conditional upload after a transient error; if the first try
        # had landed, the retry answers 412 and the caller hears "lost" for a write it won. That
        # errs the safe way: a lease's holder believes it holds nothing, so nobody prunes.
        self.requests["objects.insert"] += 1
        try:
            blob.upload_from_string(data, if_generation_match=generation, timeout=_TIMEOUT)
        except exceptions.PreconditionFailed:
            return None
        except exceptions.GoogleAPIError as error:
            raise self._fail(error, "objects.insert", key) from None
        return str(blob.generation)

    def put(self, key: str, data: bytes) -> str:
        return self._upload(key, data, None) or ""

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._upload(key, data, 0) is not None

    def replace_if_match(self, key: str, data: bytes, etag: str) -> bool:
        generation = _generation(etag)
        return generation is not None and self._upload(key, data, generation) is not None

    def delete_if_match(self, key: str, etag: str) -> bool:
        from google.api_core import exceptions

        generation = _generation(etag)
        if generation is None:
            return False
        self.requests["objects.delete"] += 1
        try:
            self._bucket.blob(key).delete(if_generation_match=generation, timeout=_TIMEOUT)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            return False
        except exceptions.GoogleAPIError as error:
            raise self._fail(error, "objects.delete", key) from None
        return True

    def delete_batch(self, keys: Sequence[str]) -> list[DeleteFailure]:
        failures: list[DeleteFailure] = []
        for start in range(0, len(keys), GCS_BATCH):
            failures.extend(self._delete_chunk(keys[start : start + GCS_BATCH]))
        return failures

    def _delete_chunk(self, chunk: Sequence[str]) -> list[DeleteFailure]:
        """Given at most GCS_BATCH keys, delete them in one batch request; return failures."""
        from google.api_core import exceptions

        self.requests["batch"] += 1
        batch = self._client.batch(raise_exception=False)
        try:
            with batch:
                for key in chunk:
                    self._bucket.blob(key).delete(timeout=_TIMEOUT)
        except ValueError:
            # The server answered the batch with something not multipart (an emulator without
            # the batch endpoint): delete one key a request instead.
            return self._delete_each(chunk)
        except exceptions.GoogleAPIError as error:
            failed = self._fail(error, "batch", f"{chunk[0]} (+{len(chunk) - 1})")
            code = getattr(failed, "code", "") or type(failed).__name__
            return [DeleteFailure(key, code, str(failed)) for key in chunk]
        answers = list(getattr(batch, "_responses", ()))
        return [
            DeleteFailure(key, str(answer.status_code), str(answer.reason or ""))
            for key, answer in zip(chunk, answers, strict=False)
            # An absent key (404) is no failure: it is gone, which is what was asked.
            if answer.status_code >= 300 and answer.status_code != 404
        ]

    def _delete_each(self, chunk: Sequence[str]) -> list[DeleteFailure]:
        from google.api_core import exceptions

        failures: list[DeleteFailure] = []
        for key in chunk:
            self.requests["objects.delete"] += 1
            try:
                self._bucket.blob(key).delete(timeout=_TIMEOUT)
            except exceptions.NotFound:
                continue
            except exceptions.GoogleAPIError as error:
                failed = self._fail(error, "objects.delete", key)
                failures.append(DeleteFailure(key, getattr(failed, "code", ""), str(failed)))
        return failures

    def multipart_uploads(self, prefix: str) -> list[Upload]:
        # GCS has no API that lists resumable uploads in progress (see the module's docstring).
        return []

    def versioning_enabled(self) -> bool:
        return self._versioning()

    def _ask_versioning(self) -> bool:
        from google.api_core import exceptions

        self.requests["buckets.get"] += 1
        try:
            self._bucket.reload(timeout=_TIMEOUT)
        except (exceptions.Forbidden, exceptions.Unauthorized):
            # Not allowed to ask: count no bytes as freed rather than claim what we cannot know.
            return True
        except exceptions.GoogleAPIError as error:
            raise self._fail(error, "buckets.get", "") from None
        policy = self._bucket.soft_delete_policy
        soft_delete = int(getattr(policy, "retention_duration_seconds", 0) or 0) > 0
        return bool(self._bucket.versioning_enabled) or soft_delete


def _generation(etag: str) -> int | None:
    """Given the protocol's ETag (a GCS generation), return it as a number (None if it is not
    one: an ETag from elsewhere matches nothing)."""
    try:
        value = int(etag)
    except ValueError:
        return None
    return value if value > 0 else None
