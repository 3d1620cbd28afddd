"""`ObjectStore` on Azure Blob Storage (`az://container/prefix`), through `azure-storage-blob`.

The `azure` extra installs adlfs, the fsspec package training code writes `az://` with; ckptd
uses the SDK it brings (azure-storage-blob) directly rather than adlfs's async filesystem,
because every call here is one request whose outcome matters on its own, and adlfs exposes
none of the parts ckptd needs:

- conditional writes: create only if absent (`If-None-Match: *`, the lease) and replace or
  delete only if unchanged (`If-Match: <etag>`); a lost race is a 409/412 answer, not an error;
- batch delete with a per-key status: Azure's Blob Batch takes at most 256 sub-requests a
  request, so `delete_batch` splits into chunks of `MAX_AZURE_BATCH`;
- listing one level by delimiter ("/") and the whole tree, paginated by the service (at most
  5,000 items a page, `LIST_PAGE`) and consumed lazily;
- uploads in progress: Azure has no multipart uploads; a block blob being written in blocks
  (Put Block, then Put Block List) exists only as uncommitted blocks until it is committed.
  `multipart_uploads` reports the blobs that have uncommitted blocks and no committed content
  (listed with `include=uncommittedblobs` but absent from the committed listing). A blob that
  is being *overwritten* in blocks keeps its committed content meanwhile and is not reported
  (finding it would cost one Get Block List request per blob);
- versioning: blob versioning is an account setting of the management plane (ARM), which a
  storage key or SAS cannot read. What the data plane shows is used instead: soft delete
  (`DeleteRetentionPolicy` in the blob service properties: deleted blobs stay billed for the
  retention days) and version ids on the container's blobs (a blob carries `x-ms-version-id`
  only when the account versions blobs). Either means deleting frees no billed bytes at once;
  when the service properties cannot be read, the answer is True (claim no bytes freed).

Credentials come from `storage_options` in adlfs's names (`account_name`, `account_key`,
`connection_string`, `sas_token`, `anon`, and `account_url` for another endpoint such as the
Azurite emulator), else from the AZURE_STORAGE_* environment variables adlfs reads, else from
azure-identity's DefaultAzureCredential (managed identity, Azure CLI login). No secret is ever
put in a message, a repr or a log line.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from daemon.storage.base import (
    DeleteFailure,
    Entry,
    ObjectInfo,
    RememberedAnswer,
    StorageError,
    Upload,
)
from daemon.storage.url import StorageUrl, StorageUrlError, require_backend

# storage_options keys understood here (adlfs's names, so one dict serves ckptd and the
# training code alike).
KNOWN_OPTIONS = frozenset(
    {"account_name", "account_key", "connection_string", "sas_token", "account_url", "anon"}
)
# The environment variables adlfs falls back on, by option.
_ENVIRONMENT = {
    "account_name": "AZURE_STORAGE_ACCOUNT_NAME",
    "account_key": "AZURE_STORAGE_ACCOUNT_KEY",
    "connection_string": "AZURE_STORAGE_CONNECTION_STRING",
    "sas_token": "AZURE_STORAGE_SAS_TOKEN",
}
# A Blob Batch request takes at most 256 sub-requests.
MAX_AZURE_BATCH = 256
# List Blobs returns at most 5,000 items a page.
LIST_PAGE = 5000
# How long the answer to "does deleting free billed bytes?" is trusted (seconds).
# The answers to a conditional write that lost: the blob exists (409) or changed (412).
_LOST_STATUS = frozenset({409, 412})


def _epoch(value: object) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0


def _translate(error: Exception, what: str) -> OSError:
    """Given an azure-core error, return the OSError to raise. Only the service's error code
    and HTTP status go in the message: the SDK's own text can carry the request URL."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
    )

    status = getattr(error, "status_code", None)
    # error_code is a StorageErrorCode (a str enum) or the header's text.
    named = getattr(error, "error_code", None)
    code = str(getattr(named, "value", named) or "") or (str(status) if status else "")
    message = f"{what}: {code or type(error).__name__}"
    if isinstance(error, ResourceNotFoundError) or status == 404:
        return FileNotFoundError(message)
    if isinstance(error, ClientAuthenticationError) or status == 403:
        return PermissionError(message)
    if isinstance(error, HttpResponseError):
        return StorageError(message, code)
    return StorageError(f"{message} (no answer from the service)", code)


def _option(options: Mapping[str, object], name: str) -> str:
    value = options.get(name)
    if value is None:
        value = os.environ.get(_ENVIRONMENT.get(name, ""), "")
    return str(value) if value else ""


def service_settings(options: Mapping[str, object]) -> dict[str, Any]:
    """Given storage_options, return how to reach the account: `connection_string`, or
    `account_url` and `credential`; raise StorageUrlError naming (never showing) what is
    unknown or missing."""
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        known = ", ".join(sorted(KNOWN_OPTIONS))
        raise StorageUrlError(f"unknown storage_options for az: {', '.join(unknown)} ({known})")
    connection_string = _option(options, "connection_string")
    if connection_string:
        return {"connection_string": connection_string}
    account_name = _option(options, "account_name")
    account_url = _option(options, "account_url")
    if not account_url:
        if not account_name:
            raise StorageUrlError(
                "az:// roots need storage_options.account_name (or account_url, or"
                " connection_string, or the AZURE_STORAGE_ACCOUNT_NAME environment variable)"
            )
        account_url = f"https://{account_name}.blob.core.windows.net"
    return {"account_url": account_url, "credential": _credential(options, account_name)}


def _credential(options: Mapping[str, object], account_name: str) -> Any:
    key = _option(options, "account_key")
    if key:
        if not account_name:
            raise StorageUrlError("storage_options.account_key needs account_name too")
        return {"account_name": account_name, "account_key": key}
    sas = _option(options, "sas_token")
    if sas:
        return sas.lstrip("?")
    if options.get("anon"):
        return None
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        return None
    return DefaultAzureCredential()


def _is_folder(item: Any) -> bool:
    """Given a listed blob, return whether it is a directory of a hierarchical-namespace
    account (ADLS Gen2, `abfs://`): an empty blob with metadata `hdi_isfolder=true`, listed
    beside the prefix of its contents. It is no object of a checkpoint: listing it would show
    a file and a folder of one name."""
    metadata = getattr(item, "metadata", None) or {}
    return str(metadata.get("hdi_isfolder", "")).lower() == "true"


def open_azure(url: StorageUrl, options: Mapping[str, object] | None = None) -> AzureStore:
    """Given an az:// URL and its storage_options, return a store on its container."""
    require_backend(url)
    from azure.storage.blob import BlobServiceClient

    settings = service_settings(options or {})
    requests: collections.Counter[str] = collections.Counter()
    hooks: dict[str, Any] = {
        "raw_request_hook": lambda request: requests.update([_kind(request)]),
        "retry_total": 5,
        "connection_timeout": 10,
    }
    try:
        if "connection_string" in settings:
            service = BlobServiceClient.from_connection_string(
                settings["connection_string"], **hooks
            )
        else:
            service = BlobServiceClient(settings["account_url"], settings["credential"], **hooks)
    except ValueError:
        # The SDK's message may quote the malformed value: a secret, so it is not shown.
        raise StorageUrlError(
            "storage_options for az: a malformed connection_string or account_url (value not shown)"
        ) from None
    return AzureStore(service, url.bucket, requests=requests)


def _kind(request: Any) -> str:
    """Given a pipeline request, return its kind for the request counts ("List", "Put"...)."""
    http = getattr(request, "http_request", request)
    query = urlsplit(str(getattr(http, "url", ""))).query
    if "comp=list" in query:
        return "List"
    if "comp=batch" in query:
        return "Batch"
    return str(getattr(http, "method", "?")).title()


class AzureStore:
    """One container through a BlobServiceClient; counts the API requests it makes."""

    def __init__(
        self,
        service: Any,
        container: str,
        page_size: int = LIST_PAGE,
        requests: collections.Counter[str] | None = None,
    ) -> None:
        self._service = service
        self._container = service.get_container_client(container)
        self._name = container
        self.page_size = page_size
        # Requests by kind ("List", "Put", "Batch", ...), counted by the client's request
        # hook: the tests read this.
        self.requests: collections.Counter[str] = (
            requests if requests is not None else collections.Counter()
        )
        self._versioning = RememberedAnswer(self._ask_versioning)

    def __repr__(self) -> str:
        # The account URL without its query (a SAS token would be there).
        parts = urlsplit(str(getattr(self._service, "url", "")))
        where = f" at {parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else ""
        return f"AzureStore(az://{self._name}{where})"

    @property
    def bucket(self) -> str:
        return self._name

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        from azure.core.exceptions import AzureError

        try:
            return function(*args, **kwargs)
        except AzureError as error:
            raise _translate(error, f"az://{self._name}/{what}") from None

    def _pages(self, what: str, items: Any) -> Iterator[Any]:
        """Given an ItemPaged, yield its items page by page, translating the SDK's errors."""
        pages = self._call(what, items.by_page)
        while True:
            page = self._call(what, next, pages, None)
            if page is None:
                return
            yield from self._call(what, list, page)

    def list_top(self, prefix: str) -> Iterator[Entry]:
        from azure.storage.blob import BlobPrefix

        items = self._container.walk_blobs(
            name_starts_with=prefix or None,
            include=["metadata"],
            delimiter="/",
            results_per_page=self.page_size,
        )
        for item in self._pages(prefix, items):
            name = str(item.name)[len(prefix) :]
            if isinstance(item, BlobPrefix):
                if name.rstrip("/"):
                    yield Entry(name.rstrip("/"), True, 0, 0.0)
            elif name and not _is_folder(item):
                yield Entry(name, False, int(item.size), _epoch(item.last_modified))

    def list_tree(self, prefix: str) -> Iterator[ObjectInfo]:
        items = self._container.list_blobs(
            name_starts_with=prefix or None, include=["metadata"], results_per_page=self.page_size
        )
        for item in self._pages(prefix, items):
            if not _is_folder(item):
                yield ObjectInfo(
                    str(item.name), int(item.size), _epoch(item.last_modified), str(item.etag)
                )

    def head(self, key: str) -> ObjectInfo | None:
        blob = self._container.get_blob_client(key)
        try:
            answer = self._call(key, blob.get_blob_properties)
        except FileNotFoundError:
            return None
        return ObjectInfo(key, int(answer.size), _epoch(answer.last_modified), str(answer.etag))

    def read_with_etag(self, key: str, limit: int = 1 << 20) -> tuple[bytes, str] | None:
        if limit <= 0:
            info = self.head(key)
            return None if info is None else (b"", info.etag)
        blob = self._container.get_blob_client(key)
        try:
            download = self._call(key, blob.download_blob, offset=0, length=limit)
            data = self._call(key, download.readall)
        except FileNotFoundError:
            return None
        except StorageError as error:
            if error.code != "InvalidRange":
                raise
            # An empty blob has no byte 0: Azure answers 416 to any range.
            info = self.head(key)
            return None if info is None else (b"", info.etag)
        return bytes(data[:limit]), str(download.properties.etag)

    def read_small(self, key: str, limit: int = 1 << 20) -> bytes:
        found = self.read_with_etag(key, limit)
        if found is None:
            raise FileNotFoundError(f"az://{self._name}/{key}")
        return found[0]

    def _upload(self, key: str, data: bytes, **conditions: Any) -> str:
        blob = self._container.get_blob_client(key)
        answer = self._call(key, blob.upload_blob, data, overwrite=True, **conditions)
        return str(answer["etag"])

    def put(self, key: str, data: bytes) -> str:
        return self._upload(key, data)

    def _conditional(self, key: str, action: Any) -> bool:
        from azure.core.exceptions import HttpResponseError

        try:
            action()
        except HttpResponseError as error:
            if error.status_code in _LOST_STATUS or error.status_code == 404:
                return False
            raise _translate(error, f"az://{self._name}/{key}") from None
        return True

    def put_if_absent(self, key: str, data: bytes) -> bool:

        blob = self._container.get_blob_client(key)
        return self._conditional(
            key,
            # overwrite=False is the SDK's spelling of `If-None-Match: *`.
            lambda: blob.upload_blob(data, overwrite=False),
        )

    def replace_if_match(self, key: str, data: bytes, etag: str) -> bool:
        from azure.core import MatchConditions

        blob = self._container.get_blob_client(key)
        return self._conditional(
            key,
            lambda: blob.upload_blob(
                data, overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified
            ),
        )

    def delete_if_match(self, key: str, etag: str) -> bool:
        from azure.core import MatchConditions

        blob = self._container.get_blob_client(key)
        return self._conditional(
            key,
            lambda: blob.delete_blob(
                delete_snapshots="include",
                etag=etag,
                match_condition=MatchConditions.IfNotModified,
            ),
        )

    def delete_batch(self, keys: Sequence[str]) -> list[DeleteFailure]:
        failures: list[DeleteFailure] = []
        for start in range(0, len(keys), MAX_AZURE_BATCH):
            chunk = list(keys[start : start + MAX_AZURE_BATCH])
            failures.extend(self._delete_chunk(chunk))
        return failures

    def _delete_chunk(self, chunk: list[str]) -> list[DeleteFailure]:
        """Given at most 256 keys, delete them in one Blob Batch; return the failures."""
        try:
            answers = self._call(
                f"{chunk[0]} (+{len(chunk) - 1})",
                lambda: list(
                    self._container.delete_blobs(
                        *chunk, delete_snapshots="include", raise_on_any_failure=False
                    )
                ),
            )
        except OSError as error:
            code = getattr(error, "code", "") or type(error).__name__
            return [DeleteFailure(key, code, str(error)) for key in chunk]
        failures: list[DeleteFailure] = []
        # The sub-responses come in the order of the sub-requests.
        for key, answer in zip(chunk, answers, strict=False):
            status = int(getattr(answer, "status_code", 0))
            if status < 300 or status == 404:  # an absent blob is no failure
                continue
            code = str(answer.headers.get("x-ms-error-code", "") or status)
            failures.append(DeleteFailure(key, code, getattr(answer, "reason", "") or code))
        return failures

    def multipart_uploads(self, prefix: str) -> list[Upload]:
        committed = {info.key for info in self.list_tree(prefix)}
        items = self._container.list_blobs(
            name_starts_with=prefix or None,
            include=["uncommittedblobs"],
            results_per_page=self.page_size,
        )
        return [
            Upload(str(item.name), "", _epoch(item.creation_time or item.last_modified))
            for item in self._pages(prefix, items)
            if str(item.name) not in committed
        ]

    def versioning_enabled(self) -> bool:
        return self._versioning()

    def _ask_versioning(self) -> bool:
        try:
            properties = self._call("?restype=service", self._service.get_service_properties)
        except OSError:
            # Not allowed to ask (a container SAS): count no bytes as freed rather than claim
            # what we cannot know.
            return True
        retention = properties.get("delete_retention_policy")
        if retention is not None and retention.enabled:
            return True
        items = self._container.list_blobs(include=["versions"], results_per_page=1)
        first: Any = next(iter(self._call("?include=versions", items.by_page)), [])
        return any(getattr(item, "version_id", None) for item in self._call("", list, first))
