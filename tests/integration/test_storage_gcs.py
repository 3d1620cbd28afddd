"""The object-store contract on Google Cloud Storage: `GCSStore` against fake-gcs-server on
127.0.0.1 (see tests/gcsserver.py for why that emulator and what it lacks)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from daemon.config import validate_text
from daemon.errors import ConfigError
from daemon.storage import StorageUrlError, open_store
from daemon.storage.gcs import GCS_BATCH, GCSStore
from tests.gcsserver import GCSBucket, batch_emulator, make_client

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.gcsserver import gcs_bucket as gcs_bucket
from tests.gcsserver import gcs_endpoint as gcs_endpoint

SECRET = "sEcReT-gcs-0123456789-do-not-print"


def store_of(bucket: GCSBucket) -> GCSStore:
    url, store = open_store(bucket.url(), bucket.options)
    assert url.scheme == "gs" and isinstance(store, GCSStore)
    return store


def fill(bucket: GCSBucket, keys: list[str], data: bytes = b"x") -> None:
    """Upload the keys concurrently (the emulator is fast; the client is not)."""
    target = make_client(bucket.endpoint).bucket(bucket.name)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: target.blob(key).upload_from_string(data), keys))


def all_keys(bucket: GCSBucket) -> set[str]:
    return {blob.name for blob in make_client(bucket.endpoint).list_blobs(bucket.name)}


def test_check_config_knows_the_gcs_options_and_never_shows_a_value() -> None:
    # check-config accepts gs:// with gcsfs's option names and refuses others, unshown.
    validate_text("roots:\n  - path: gs://bucket/run\n    storage_options: {project: p}\n")
    with pytest.raises(ConfigError) as refused:
        validate_text(
            f"roots:\n  - path: gs://bucket/run\n    storage_options: {{key: {SECRET}}}\n"
        )
    text = "\n".join(refused.value.problems)
    assert "key" in text and "gs:// knows" in text and SECRET not in text


def test_gcs_urls_open_a_gcs_store_and_unknown_options_are_refused_unshown() -> None:
    # Opening the store needs the gs:// backend installed (`ckptd[gcs]`).
    pytest.importorskip("gcsfs", reason="gcsfs is not installed (pip install -e '.[gcs]')")
    with pytest.raises(StorageUrlError) as caught:
        open_store("gcs://bucket/p", {"secret": SECRET, "project": "x"})
    assert "secret" in str(caught.value) and SECRET not in str(caught.value)


def test_listing_pages_at_one_level_and_in_the_tree(
    gcs_bucket: GCSBucket, monkeypatch: Any
) -> None:
    # Pages of 10 so modest counts cross several pages (the real page is 1,000 items).
    monkeypatch.setattr("daemon.storage.gcs.PAGE_SIZE", 10)
    top = [f"run/step-{index:03d}/model.bin" for index in range(25)]
    loose = [f"run/file-{index:02d}" for index in range(12)]
    fill(gcs_bucket, [*top, *loose, "other/x"])
    store = store_of(gcs_bucket)
    level = list(store.list_top("run/"))
    assert sorted(e.name for e in level if e.is_prefix) == [f"step-{i:03d}" for i in range(25)]
    files = [e for e in level if not e.is_prefix]
    assert sorted(e.name for e in files) == [f"file-{i:02d}" for i in range(12)]
    assert all(e.size == 1 and e.mtime > 0 for e in files)
    # 12 objects at 10 a page (fake-gcs-server pages the objects, and repeats all 25 prefixes
    # on every page; GCS pages both together: 4 pages there).
    assert store.requests["objects.list"] >= 2
    store.requests.clear()
    tree = list(store.list_tree("run/"))
    assert sorted(info.key for info in tree) == sorted([*top, *loose])
    assert all(info.etag.isdigit() for info in tree)
    assert store.requests["objects.list"] == 4  # 37 objects, 10 a page


def test_batch_delete_splits_into_calls_of_at_most_100(gcs_bucket: GCSBucket) -> None:
    keys = [f"p/{index:04d}" for index in range(250)]
    fill(gcs_bucket, [*keys, "keep/me"])
    store = store_of(gcs_bucket)
    failures = store.delete_batch([*keys, "p/never-existed"])
    assert failures == []
    assert GCS_BATCH == 100
    assert store.requests["batch"] == 3  # 100 + 100 + 51
    assert all_keys(gcs_bucket) == {"keep/me"}


def test_batch_delete_sends_real_batches_of_at_most_100_calls() -> None:
    # fake-gcs-server has no batch endpoint: the multipart batch protocol runs against
    # gcp-storage-emulator, which has one.
    with batch_emulator("batched") as endpoint:
        store = store_of(GCSBucket(endpoint=endpoint, name="batched"))
        keys = [f"p/{index:04d}" for index in range(250)]
        for key in [*keys, "keep/me"]:
            store.put(key, b"x")
        assert store.delete_batch([*keys, "p/never-existed"]) == []
        assert store.requests["batch"] == 3  # 100 + 100 + 51 calls
        assert store.requests["objects.delete"] == 0, "no fallback to one request a key"
        assert [info.key for info in store.list_tree("")] == ["keep/me"]


def test_conditional_create_second_writer_loses(gcs_bucket: GCSBucket) -> None:
    store = store_of(gcs_bucket)
    assert store.put_if_absent("lease", b"first") is True
    assert store.put_if_absent("lease", b"second") is False
    assert store.read_small("lease") == b"first"


def test_conditional_create_many_concurrent_writers_exactly_one_wins(
    gcs_bucket: GCSBucket,
) -> None:
    stores = [store_of(gcs_bucket) for _ in range(8)]
    for round_number in range(5):
        key = f"race-{round_number}"
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(store.put_if_absent, key, b"%d" % index)
                for index, store in enumerate(stores)
            ]
            wins = [future.result() for future in futures]
        assert wins.count(True) == 1
        assert store_of(gcs_bucket).read_small(key) == b"%d" % wins.index(True)


def test_replace_only_if_the_generation_still_matches(gcs_bucket: GCSBucket) -> None:
    store = store_of(gcs_bucket)
    first = store.put("obj", b"one")
    found = store.read_with_etag("obj")
    assert found == (b"one", first)
    assert store.replace_if_match("obj", b"two", first) is True
    assert store.replace_if_match("obj", b"three", first) is False, "stale generation"
    assert store.replace_if_match("obj", b"three", '"an-s3-etag"') is False
    assert store.read_small("obj") == b"two"
    assert store.replace_if_match("absent", b"x", first) is False


def test_delete_only_if_the_generation_is_given_and_the_object_exists(
    gcs_bucket: GCSBucket,
) -> None:
    store = store_of(gcs_bucket)
    generation = store.put("obj", b"one")
    assert store.delete_if_match("obj", "not-a-generation") is False
    assert store.head("obj") is not None
    assert store.delete_if_match("obj", generation) is True
    assert store.head("obj") is None
    assert store.delete_if_match("obj", generation) is False, "already gone"


@pytest.mark.xfail(
    strict=True,
    reason="fake-gcs-server ignores ifGenerationMatch on DELETE (real GCS answers 412)",
)
def test_delete_refused_when_the_object_changed(gcs_bucket: GCSBucket) -> None:
    store = store_of(gcs_bucket)
    stale = store.put("obj", b"one")
    store.put("obj", b"two")
    assert store.delete_if_match("obj", stale) is False
    assert store.read_small("obj") == b"two"


def test_read_small_reads_a_prefix_and_empty_objects(gcs_bucket: GCSBucket) -> None:
    store = store_of(gcs_bucket)
    store.put("big", b"0123456789")
    store.put("empty", b"")
    assert store.read_small("big", limit=4) == b"0123"
    assert store.read_small("empty") == b""
    info = store.head("big")
    assert info is not None and info.size == 10 and info.mtime > 0
    with pytest.raises(FileNotFoundError):
        store.read_small("absent")
    assert store.read_with_etag("absent") is None
    assert store.head("absent") is None


def test_resumable_uploads_are_not_listable(gcs_bucket: GCSBucket) -> None:
    store = store_of(gcs_bucket)
    assert store.multipart_uploads("") == []


def test_versioning_is_reported(gcs_bucket: GCSBucket, gcs_endpoint: str) -> None:
    assert store_of(gcs_bucket).versioning_enabled() is False
    bucket = make_client(gcs_endpoint).bucket(f"{gcs_bucket.name}-v")
    bucket.versioning_enabled = True
    bucket.create()
    versioned = GCSBucket(endpoint=gcs_endpoint, name=bucket.name)
    store = store_of(versioned)
    assert store.versioning_enabled() is True
    assert store.versioning_enabled() is True
    assert store.requests["buckets.get"] == 1, "asked once, then remembered"


def test_one_lease_on_a_gcs_root_two_holders_compete_exactly_one_wins(
    gcs_bucket: GCSBucket,
) -> None:
    from daemon.lease import ObjectLease
    from daemon.storage.url import parse

    url = parse(gcs_bucket.url("run"))
    first = ObjectLease(store_of(gcs_bucket), url, duration=60, skew=10, host="node-a")
    second = ObjectLease(store_of(gcs_bucket), url, duration=60, skew=10, host="node-b")
    assert first.acquire(1000.0) is True
    assert second.acquire(1000.0) is False
    holder = second.holder()
    assert holder is not None and holder.host == "node-a"
    assert first.renew(1030.0) is True
    # Expired (past the duration and the skew): the other node takes it over.
    assert second.acquire(1030.0 + 60 + 11) is True
    assert first.renew(1030.0 + 60 + 12) is False
