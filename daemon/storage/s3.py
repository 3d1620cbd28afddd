"""`ObjectStore` on S3 and S3-compatible servers, through botocore's synchronous client.

botocore rather than s3fs's async layer: every call here is one request whose outcome matters
on its own (a conditional write lost, a key DeleteObjects refused), the daemon's worker is one
thread, and s3fs brings botocore anyway (the `s3` extra). Credentials come from
`storage_options` in s3fs's spelling (`key`, `secret`, `token`, `profile`, `anon`,
`endpoint_url`, `client_kwargs`, `config_kwargs`) or else from botocore's usual chain
(AWS_* environment variables, ~/.aws profiles, instance metadata). No secret is ever put in a
message, a repr or a log line.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from daemon.storage.base import (
    MAX_DELETE_BATCH,
    DeleteFailure,
    Entry,
    ObjectInfo,
    RememberedAnswer,
    StorageError,
    Upload,
)
from daemon.storage.url import StorageUrl, StorageUrlError, require_backend

# storage_options keys understood here (s3fs's names, so one dict serves ckptd and the
# training code alike).
KNOWN_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "profile",
        "anon",
        "endpoint_url",
        "region_name",
        "client_kwargs",
        "config_kwargs",
    }
)

# The codes S3 answers a lost conditional write with: 412, and 409 while another conditional
# write to the same key is in flight (AWS asks to retry; the other writer wins meanwhile).
_LOST = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
# How long the answer to "is the bucket versioned?" is trusted (seconds).
_ABSENT = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})
_DENIED = frozenset(
    {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
)


def _code(error: Any) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or str(
        response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def _translate(error: Exception, what: str) -> OSError:
    """Given a botocore error, return the OSError to raise (the message names no secret)."""
    code = _code(error)
    message = f"{what}: {code or type(error).__name__}"
    if code in _ABSENT:
        return FileNotFoundError(message)
    if code in _DENIED:
        return PermissionError(message)
    return StorageError(f"{message} ({error})", code)


def _epoch(value: object) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0


def client_settings(options: Mapping[str, object]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Given storage_options, return (client keyword arguments, botocore Config arguments);
    raise StorageUrlError naming (never showing) an unknown or malformed option."""
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        known = ", ".join(sorted(KNOWN_OPTIONS))
        raise StorageUrlError(f"unknown storage_options for s3: {', '.join(unknown)} ({known})")
    client_kwargs = dict(_mapping(options, "client_kwargs"))
    config_kwargs: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": 5},
        "connect_timeout": 10,
        "read_timeout": 60,
        "max_pool_connections": 10,
    }
    config_kwargs.update(_mapping(options, "config_kwargs"))
    renames = {
        "key": "aws_access_key_id",
        "secret": "aws_secret_access_key",
        "token": "aws_session_token",
        "endpoint_url": "endpoint_url",
        "region_name": "region_name",
    }
    for option, argument in renames.items():
        value = options.get(option)
        if value is not None:
            client_kwargs[argument] = str(value)
    return client_kwargs, config_kwargs


def _mapping(options: Mapping[str, object], name: str) -> Mapping[str, Any]:
    value = options.get(name) or {}
    if not isinstance(value, Mapping):
        raise StorageUrlError(f"storage_options.{name} must be a mapping")
    return value


def open_s3(url: StorageUrl, options: Mapping[str, object] | None = None) -> S3Store:
    """Given an s3:// URL and its storage_options, return a store on its bucket."""
    require_backend(url)
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    options = options or {}
    client_kwargs, config_kwargs = client_settings(options)
    if options.get("anon"):
        config_kwargs["signature_version"] = UNSIGNED
    profile = options.get("profile")
    session = botocore.session.Session(profile=str(profile) if profile else None)
    if "region_name" not in client_kwargs and session.get_config_variable("region") is None:
        # A custom endpoint (MinIO, moto, Ceph) ignores the region but botocore wants one.
        client_kwargs["region_name"] = "us-east-1"
    client = session.create_client("s3", config=Config(**config_kwargs), **client_kwargs)
    return S3Store(client, url.bucket, endpoint=str(client_kwargs.get("endpoint_url", "")))


class S3Store:
    """One bucket through a botocore S3 client; counts the API requests it makes."""

    def __init__(self, client: Any, bucket: str, endpoint: str = "") -> None:
        self._client = client
        self._bucket = bucket
        self._endpoint = endpoint
        # Requests per operation: the benchmark and the listing-cost tests read this.
        self.requests: collections.Counter[str] = collections.Counter()
        self._versioning = RememberedAnswer(self._ask_versioning)
        client.meta.events.register("before-call.s3", self._count)

    def _count(self, model: Any = None, **_: Any) -> None:
        self.requests[getattr(model, "name", "?")] += 1

    def __repr__(self) -> str:
        where = f" at {self._endpoint}" if self._endpoint else ""
        return f"S3Store(s3://{self._bucket}{where})"

    @property
    def bucket(self) -> str:
        return self._bucket

    def _call(self, operation: str, what: str, **arguments: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, operation)(Bucket=self._bucket, **arguments)
        except (ClientError, BotoCoreError) as error:
            raise _translate(error, f"{operation} s3://{self._bucket}/{what}") from None

    def _pages(self, prefix: str, delimiter: str) -> Iterator[dict[str, Any]]:
        arguments: dict[str, Any] = {"Prefix": prefix, "MaxKeys": 1000}
        if delimiter:
            arguments["Delimiter"] = delimiter
        while True:
            page: dict[str, Any] = self._call("list_objects_v2", prefix, **arguments)
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            arguments["ContinuationToken"] = token

    def list_top(self, prefix: str) -> Iterator[Entry]:
        for page in self._pages(prefix, "/"):
            for common in page.get("CommonPrefixes", ()):
                name = str(common["Prefix"])[len(prefix) :].rstrip("/")
                if name:
                    yield Entry(name, True, 0, 0.0)
            for item in page.get("Contents", ()):
                name = str(item["Key"])[len(prefix) :]
                if name:
                    yield Entry(name, False, int(item["Size"]), _epoch(item["LastModified"]))

    def list_tree(self, prefix: str) -> Iterator[ObjectInfo]:
        for page in self._pages(prefix, ""):
            for item in page.get("Contents", ()):
                yield ObjectInfo(
                    str(item["Key"]),
                    int(item["Size"]),
                    _epoch(item["LastModified"]),
                    str(item.get("ETag", "")),
                )

    def head(self, key: str) -> ObjectInfo | None:
        try:
            answer = self._call("head_object", key, Key=key)
        except FileNotFoundError:
            return None
        return ObjectInfo(
            key, int(answer["ContentLength"]), _epoch(answer["LastModified"]), answer["ETag"]
        )

    def read_with_etag(self, key: str, limit: int = 1 << 20) -> tuple[bytes, str] | None:
        if limit <= 0:
            info = self.head(key)
            return None if info is None else (b"", info.etag)
        try:
            answer = self._call("get_object", key, Key=key, Range=f"bytes=0-{limit - 1}")
        except FileNotFoundError:
            return None
        except StorageError as error:
            if error.code != "InvalidRange":
                raise
            # An empty object has no byte 0: S3 answers 416 to any range.
            info = self.head(key)
            return None if info is None else (b"", info.etag)
        with answer["Body"] as body:
            return bytes(body.read(limit)), str(answer["ETag"])

    def read_small(self, key: str, limit: int = 1 << 20) -> bytes:
        found = self.read_with_etag(key, limit)
        if found is None:
            raise FileNotFoundError(f"s3://{self._bucket}/{key}")
        return found[0]

    def put(self, key: str, data: bytes) -> str:
        return str(self._call("put_object", key, Key=key, Body=data)["ETag"])

    def _conditional(self, operation: str, key: str, **arguments: Any) -> bool:
        try:
            self._call(operation, key, Key=key, **arguments)
        except FileNotFoundError:
            return False
        except StorageError as error:
            if error.code in _LOST:
                return False
            raise
        return True

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._conditional("put_object", key, Body=data, IfNoneMatch="*")

    def replace_if_match(self, key: str, data: bytes, etag: str) -> bool:
        return self._conditional("put_object", key, Body=data, IfMatch=etag)

    def delete_if_match(self, key: str, etag: str) -> bool:
        return self._conditional("delete_object", key, IfMatch=etag)

    def delete_batch(self, keys: Sequence[str]) -> list[DeleteFailure]:
        failures: list[DeleteFailure] = []
        for start in range(0, len(keys), MAX_DELETE_BATCH):
            chunk = keys[start : start + MAX_DELETE_BATCH]
            objects = [{"Key": key} for key in chunk]
            try:
                answer = self._call(
                    "delete_objects",
                    f"{chunk[0]} (+{len(chunk) - 1})",
                    Delete={"Objects": objects, "Quiet": True},
                )
            except OSError as error:
                code = getattr(error, "code", "") or type(error).__name__
                failures.extend(DeleteFailure(key, code, str(error)) for key in chunk)
                continue
            failures.extend(
                DeleteFailure(
                    str(item.get("Key", "")),
                    str(item.get("Code", "")),
                    str(item.get("Message", "")),
                )
                for item in answer.get("Errors", ())
            )
        return failures

    def multipart_uploads(self, prefix: str) -> list[Upload]:
        uploads: list[Upload] = []
        arguments: dict[str, Any] = {"Prefix": prefix}
        while True:
            page = self._call("list_multipart_uploads", prefix, **arguments)
            uploads.extend(
                Upload(str(item["Key"]), str(item["UploadId"]), _epoch(item.get("Initiated")))
                for item in page.get("Uploads", ())
            )
            if not page.get("IsTruncated"):
                return uploads
            arguments["KeyMarker"] = page.get("NextKeyMarker", "")
            arguments["UploadIdMarker"] = page.get("NextUploadIdMarker", "")

    def versioning_enabled(self) -> bool:
        return self._versioning()

    def _ask_versioning(self) -> bool:
        try:
            answer = self._call("get_bucket_versioning", "?versioning")
        except PermissionError:
            # Not allowed to ask: count no bytes as freed rather than claim what we cannot know.
            return True
        # "Suspended" still keeps the versions written while it was enabled.
        return answer.get("Status") in ("Enabled", "Suspended")
