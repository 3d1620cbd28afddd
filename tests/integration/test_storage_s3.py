"""The S3 object store against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from daemon.storage import open_store
from daemon.storage.base import MAX_DELETE_BATCH
from daemon.storage.s3 import S3Store
from daemon.storage.url import MissingBackendError, StorageUrlError, parse, require_backend
from tests.s3server import TEST_SECRET, S3Bucket, make_client

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.s3server import s3_bucket as s3_bucket
from tests.s3server import s3_endpoint as s3_endpoint


def fill(bucket: S3Bucket, keys: Iterable[str], body: bytes = b"x") -> None:
    """Write each key through a plain client, eight at a time (the server is threaded)."""
    client = make_client(bucket.endpoint)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket.name, Key=key, Body=body), keys))


def store_of(bucket: S3Bucket, prefix: str = "") -> S3Store:
    _url, store = open_store(bucket.url(prefix), bucket.options)
    assert isinstance(store, S3Store)
    return store


def all_keys(bucket: S3Bucket) -> set[str]:
    client = make_client(bucket.endpoint)
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name):
        keys.update(item["Key"] for item in page.get("Contents", ()))
    return keys


# --- addresses -----------------------------------------------------------------------------


def test_urls_parse_the_way_fsspec_writes_them() -> None:
    url = parse("s3://my-bucket/runs/run1/")
    assert (url.scheme, url.bucket, url.prefix) == ("s3", "my-bucket", "runs/run1")
    assert (
        url.key("checkpoint-5", "trainer_state.json") == "runs/run1/checkpoint-5/trainer_state.json"
    )
    assert url.directory() == "runs/run1/"
    assert str(url) == "s3://my-bucket/runs/run1"
    assert parse("s3a://b12/x").scheme == "s3"
    assert parse("gcs://bucket/p").scheme == "gs"
    assert parse("abfs://container@account.dfs.core.windows.net/p") == parse("az://container/p")
    assert parse("s3://bucket").prefix == ""


@pytest.mark.parametrize(
    "bad",
    [
        "/local/path",
        "ftp://bucket/x",
        "s3://Bad_Bucket/x",
        "s3://bucket/a//b",
        "s3://bucket/a/../b",
    ],
)
def test_bad_urls_are_refused_with_the_reason(bad: str) -> None:
    with pytest.raises(StorageUrlError):
        parse(bad)


def test_a_missing_fsspec_package_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes `import` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    monkeypatch.setitem(sys.modules, "botocore", None)
    with pytest.raises(MissingBackendError, match=r"pip install 'ckptd\[gcs\]'"):
        require_backend(parse("gs://bucket/prefix"))
    with pytest.raises(MissingBackendError, match=r"s3fs.*pip install 'ckptd\[s3\]'"):
        open_store("s3://bucket/prefix", {})


def test_unknown_storage_options_are_refused_without_showing_values() -> None:
    with pytest.raises(StorageUrlError) as caught:
        open_store("s3://bucket/p", {"secret_key": "hunter2-do-not-print", "key": "k"})
    assert "secret_key" in str(caught.value)
    assert "hunter2" not in str(caught.value)


# --- the store against the server --------------------------------------------------------


def test_secrets_appear_in_no_repr_and_no_error(s3_bucket: S3Bucket) -> None:
    store = store_of(s3_bucket)
    assert TEST_SECRET not in repr(store)
    with pytest.raises(FileNotFoundError) as caught:
        store.read_small("no/such/key")
    assert TEST_SECRET not in str(caught.value)


def test_listing_pages_past_1000_keys_at_one_level_and_in_the_tree(s3_bucket: S3Bucket) -> None:
    names = [f"checkpoint-{step}" for step in range(1, 1101)]
    fill(s3_bucket, [f"run/{name}/trainer_state.json" for name in names] + ["run/latest"])
    store = store_of(s3_bucket)

    top = list(store.list_top("run/"))
    assert sorted(entry.name for entry in top if entry.is_prefix) == sorted(names)
    files = [entry for entry in top if not entry.is_prefix]
    assert [(entry.name, entry.size) for entry in files] == [("latest", 1)]
    assert files[0].mtime > 1.7e9
    # 1,101 entries need two pages of at most 1,000.
    assert store.requests["ListObjectsV2"] == 2

    tree = list(store.list_tree("run/"))
    assert len(tree) == 1101
    assert {item.key for item in tree} == all_keys(s3_bucket)
    assert all(item.size == 1 and item.etag for item in tree)
    assert store.requests["ListObjectsV2"] == 4


@pytest.mark.slow
def test_batch_delete_of_more_than_1000_keys_uses_requests_of_at_most_1000(
    s3_bucket: S3Bucket,
) -> None:
    keys = [f"p/{index:05d}" for index in range(2100)]
    fill(s3_bucket, [*keys, "keep/me"])
    store = store_of(s3_bucket)
    sizes: list[int] = []
    store._client.meta.events.register(
        "before-parameter-build.s3.DeleteObjects",
        lambda params, **_: sizes.append(len(params["Delete"]["Objects"])),
    )
    failures = store.delete_batch([*keys, "p/never-existed"])
    assert failures == []
    assert sizes == [MAX_DELETE_BATCH, MAX_DELETE_BATCH, 101]
    assert all_keys(s3_bucket) == {"keep/me"}


def test_delete_batch_returns_the_keys_the_server_refused(s3_bucket: S3Bucket) -> None:
    fill(s3_bucket, ["a", "b"])
    store = store_of(s3_bucket)

    # Answer the DeleteObjects request as S3 does when one key is denied.
    def deny_b(parsed: dict[str, Any], **_: Any) -> None:
        parsed["Errors"] = [{"Key": "b", "Code": "AccessDenied", "Message": "Access Denied"}]

    store._client.meta.events.register("after-call.s3.DeleteObjects", deny_b)
    failures = store.delete_batch(["a", "b"])
    assert [(f.key, f.code) for f in failures] == [("b", "AccessDenied")]


def test_conditional_create_second_writer_loses(s3_bucket: S3Bucket) -> None:
    store = store_of(s3_bucket)
    assert store.put_if_absent("lease", b"first") is True
    assert store.put_if_absent("lease", b"second") is False
    assert store.read_small("lease") == b"first"


def test_conditional_create_many_concurrent_writers_exactly_one_wins(s3_bucket: S3Bucket) -> None:
    stores = [store_of(s3_bucket) for _ in range(8)]
    for round_number in range(5):
        key = f"race-{round_number}"
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(store.put_if_absent, key, b"%d" % index)
                for index, store in enumerate(stores)
            ]
            wins = [future.result() for future in futures]
        assert wins.count(True) == 1
        assert store_of(s3_bucket).read_small(key) == b"%d" % wins.index(True)


def test_replace_and_delete_only_if_the_etag_still_matches(s3_bucket: S3Bucket) -> None:
    store = store_of(s3_bucket)
    etag = store.put("k", b"one")
    assert store.replace_if_match("k", b"two", '"0123456789abcdef0123456789abcdef"') is False
    assert store.replace_if_match("k", b"two", etag) is True
    assert store.read_small("k") == b"two"
    assert store.delete_if_match("k", etag) is False  # the ETag changed with "two"
    found = store.read_with_etag("k")
    assert found is not None
    assert store.delete_if_match("k", found[1]) is True
    assert store.head("k") is None
    assert store.replace_if_match("k", b"three", found[1]) is False  # gone


def test_read_small_reads_a_prefix_of_the_object_and_empty_objects(s3_bucket: S3Bucket) -> None:
    store = store_of(s3_bucket)
    store.put("big", b"0123456789")
    store.put("empty", b"")
    assert store.read_small("big", 4) == b"0123"
    assert store.read_small("big") == b"0123456789"
    assert store.read_small("empty") == b""
    with pytest.raises(FileNotFoundError):
        store.read_small("absent")


def test_multipart_uploads_in_progress_under_a_prefix_are_seen(s3_bucket: S3Bucket) -> None:
    client = make_client(s3_bucket.endpoint)
    started = client.create_multipart_upload(Bucket=s3_bucket.name, Key="run/ckpt-2/model.bin")
    client.create_multipart_upload(Bucket=s3_bucket.name, Key="run/ckpt-3/model.bin")
    store = store_of(s3_bucket)
    uploads = store.multipart_uploads("run/ckpt-2/")
    assert [(u.key, u.upload_id) for u in uploads] == [
        ("run/ckpt-2/model.bin", started["UploadId"])
    ]
    assert store.multipart_uploads("run/ckpt-1/") == []
    client.abort_multipart_upload(
        Bucket=s3_bucket.name, Key="run/ckpt-2/model.bin", UploadId=started["UploadId"]
    )
    assert store.multipart_uploads("run/ckpt-2/") == []


def test_versioning_is_reported(s3_bucket: S3Bucket) -> None:
    store = store_of(s3_bucket)
    assert store.versioning_enabled() is False
    make_client(s3_bucket.endpoint).put_bucket_versioning(
        Bucket=s3_bucket.name, VersioningConfiguration={"Status": "Enabled"}
    )
    assert store_of(s3_bucket).versioning_enabled() is True
    # Asked once per VERSIONING_TTL: a run deleting in many batches asks once.
    assert store.versioning_enabled() is False
    assert store.requests["GetBucketVersioning"] == 1
