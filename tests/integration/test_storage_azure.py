"""The Azure Blob Storage object store against a real emulator (Azurite) on 127.0.0.1: the same
ObjectStore contract as tests/integration/test_storage_s3.py."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from daemon.config import validate_text
from daemon.errors import ConfigError
from daemon.storage import open_store
from daemon.storage.azure import LIST_PAGE, MAX_AZURE_BATCH, AzureStore
from daemon.storage.url import StorageUrlError
from tests.azurite import ACCOUNT_KEY, AzureContainer

# The emulator fixtures (imported under their own names, so pytest finds them here).
from tests.azurite import az_container as az_container
from tests.azurite import azurite_url as azurite_url


def fill(container: AzureContainer, keys: Iterable[str], body: bytes = b"x") -> None:
    """Write each key through a plain client, eight at a time."""
    client = container.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.upload_blob(key, body, overwrite=True), keys))


def store_of(container: AzureContainer, prefix: str = "", page_size: int = 0) -> AzureStore:
    _url, store = open_store(container.url(prefix), container.options)
    assert isinstance(store, AzureStore)
    if page_size:
        store.page_size = page_size
    return store


def all_keys(container: AzureContainer) -> set[str]:
    return {str(item.name) for item in container.client().list_blobs()}


# --- addresses and options -----------------------------------------------------------------


def test_unknown_storage_options_are_refused_without_showing_values() -> None:
    with pytest.raises(StorageUrlError) as caught:
        open_store("az://container/p", {"acount_key": "hunter2-do-not-print", "account_name": "a"})
    assert "acount_key" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_a_malformed_connection_string_is_refused_without_showing_it() -> None:
    secret = "AccountKey=hunter2-do-not-print"
    with pytest.raises(StorageUrlError) as caught:
        open_store("az://container/p", {"connection_string": secret})
    assert "connection_string" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_check_config_accepts_az_roots_with_adlfs_option_names() -> None:
    validate_text(
        "roots:\n  - path: az://container/run\n"
        "    storage_options: {account_name: a, account_key: k, account_url: 'http://x'}\n"
        "  - path: abfs://container@account.dfs.core.windows.net/run2\n"
    )
    with pytest.raises(ConfigError) as raised:
        validate_text("roots:\n  - path: az://container/run\n    storage_options: {key: k}\n")
    assert "az:// knows account_key" in "\n".join(raised.value.problems)


# --- the store against the emulator --------------------------------------------------------


def test_secrets_appear_in_no_repr_and_no_error(az_container: AzureContainer) -> None:
    store = store_of(az_container)
    assert ACCOUNT_KEY not in repr(store)
    assert az_container.name in repr(store)
    with pytest.raises(FileNotFoundError) as caught:
        store.read_small("no/such/key")
    assert ACCOUNT_KEY not in str(caught.value)


def test_listing_pages_past_the_page_size_at_one_level_and_in_the_tree(
    az_container: AzureContainer,
) -> None:
    # The service's page is 5,000 items; a page of 1,000 here keeps the test fast while
    # exercising the same continuation tokens.
    names = [f"checkpoint-{step}" for step in range(1, 1101)]
    fill(az_container, [f"run/{name}/trainer_state.json" for name in names] + ["run/latest"])
    store = store_of(az_container, page_size=1000)

    top = list(store.list_top("run/"))
    assert sorted(entry.name for entry in top if entry.is_prefix) == sorted(names)
    files = [entry for entry in top if not entry.is_prefix]
    assert [(entry.name, entry.size) for entry in files] == [("latest", 1)]
    assert files[0].mtime > 1.7e9
    assert store.requests["List"] == 2  # 1,101 entries: two pages of at most 1,000

    tree = list(store.list_tree("run/"))
    assert len(tree) == 1101
    assert {item.key for item in tree} == all_keys(az_container)
    assert all(item.size == 1 and item.etag for item in tree)
    assert store.requests["List"] == 4


@pytest.mark.slow
def test_listing_pages_past_5000_keys_at_the_service_page_size(
    az_container: AzureContainer,
) -> None:
    keys = [f"run/c-{index:05d}/m" for index in range(LIST_PAGE + 20)]
    fill(az_container, keys, b"")
    store = store_of(az_container)
    assert store.page_size == LIST_PAGE
    assert sum(1 for entry in store.list_top("run/") if entry.is_prefix) == LIST_PAGE + 20
    assert store.requests["List"] == 2
    assert {item.key for item in store.list_tree("run/")} == set(keys)
    assert store.requests["List"] == 4


def test_top_level_of_the_container_and_empty_prefixes(az_container: AzureContainer) -> None:
    fill(az_container, ["a/1", "b", "c/d/e"])
    store = store_of(az_container)
    assert sorted((e.name, e.is_prefix) for e in store.list_top("")) == [
        ("a", True),
        ("b", False),
        ("c", True),
    ]
    assert list(store.list_top("nothing/")) == []
    assert list(store.list_tree("nothing/")) == []


def test_directory_blobs_of_a_hierarchical_namespace_are_no_objects(
    az_container: AzureContainer,
) -> None:
    # ADLS Gen2 (abfs://) lists each directory as an empty blob with hdi_isfolder=true beside
    # the prefix of its contents; Azurite has no hierarchical namespace, so write them by hand.
    client = az_container.client()
    for folder in ("run", "run/checkpoint-1"):
        client.upload_blob(folder, b"", metadata={"hdi_isfolder": "true"})
    fill(az_container, ["run/checkpoint-1/model.bin", "run/latest"])
    store = store_of(az_container)
    assert sorted((e.name, e.is_prefix) for e in store.list_top("run/")) == [
        ("checkpoint-1", True),
        ("latest", False),
    ]
    assert [(e.name, e.is_prefix) for e in store.list_top("")] == [("run", True)]
    assert sorted(i.key for i in store.list_tree("")) == [
        "run/checkpoint-1/model.bin",
        "run/latest",
    ]


def test_batch_delete_splits_into_blob_batches_of_at_most_256(
    az_container: AzureContainer,
) -> None:
    keys = [f"p/{index:04d}" for index in range(600)]
    fill(az_container, [*keys, "keep/me"])
    store = store_of(az_container)
    sizes: list[int] = []
    original = store._container.delete_blobs

    def counted(*blobs: Any, **kwargs: Any) -> Any:
        sizes.append(len(blobs))
        return original(*blobs, **kwargs)

    store._container.delete_blobs = counted
    failures = store.delete_batch([*keys, "p/never-existed"])
    assert failures == []
    assert sizes == [MAX_AZURE_BATCH, MAX_AZURE_BATCH, 89]
    assert store.requests["Batch"] == 3
    assert all_keys(az_container) == {"keep/me"}


def test_delete_batch_returns_the_keys_the_service_refused(az_container: AzureContainer) -> None:
    fill(az_container, ["a", "b"])
    client = az_container.client()
    # A blob under an infinite lease cannot be deleted without the lease id: 412.
    client.get_blob_client("b").acquire_lease(-1)
    failures = store_of(az_container).delete_batch(["a", "b"])
    assert [f.key for f in failures] == ["b"]
    assert failures[0].code
    assert all_keys(az_container) == {"b"}


def test_conditional_create_second_writer_loses(az_container: AzureContainer) -> None:
    store = store_of(az_container)
    assert store.put_if_absent("lease", b"first") is True
    assert store.put_if_absent("lease", b"second") is False
    assert store.read_small("lease") == b"first"


def test_conditional_create_many_concurrent_writers_exactly_one_wins(
    az_container: AzureContainer,
) -> None:
    stores = [store_of(az_container) for _ in range(8)]
    for round_number in range(5):
        key = f"race-{round_number}"
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(store.put_if_absent, key, b"%d" % index)
                for index, store in enumerate(stores)
            ]
            wins = [future.result() for future in futures]
        assert wins.count(True) == 1
        assert store_of(az_container).read_small(key) == b"%d" % wins.index(True)


def test_replace_and_delete_only_if_the_etag_still_matches(az_container: AzureContainer) -> None:
    store = store_of(az_container)
    etag = store.put("k", b"one")
    assert store.replace_if_match("k", b"two", '"0x8DC0000000000000"') is False
    assert store.replace_if_match("k", b"two", etag) is True
    assert store.read_small("k") == b"two"
    assert store.delete_if_match("k", etag) is False  # the ETag changed with "two"
    found = store.read_with_etag("k")
    assert found is not None
    info = store.head("k")
    assert info is not None and info.etag == found[1] and info.size == 3
    assert store.delete_if_match("k", found[1]) is True
    assert store.head("k") is None
    assert store.replace_if_match("k", b"three", found[1]) is False  # gone


def test_read_small_reads_a_prefix_of_the_object_and_empty_objects(
    az_container: AzureContainer,
) -> None:
    store = store_of(az_container)
    store.put("big", b"0123456789")
    store.put("empty", b"")
    assert store.read_small("big", 4) == b"0123"
    assert store.read_small("big") == b"0123456789"
    assert store.read_small("empty") == b""
    assert store.read_with_etag("absent") is None
    with pytest.raises(FileNotFoundError):
        store.read_small("absent")


def test_blobs_with_only_uncommitted_blocks_are_uploads_in_progress(
    az_container: AzureContainer,
) -> None:
    client = az_container.client()
    writing = client.get_blob_client("run/ckpt-2/model.bin")
    writing.stage_block("AAAA", b"part one")
    client.get_blob_client("run/ckpt-3/model.bin").stage_block("AAAA", b"x")
    fill(az_container, ["run/ckpt-2/config.json"])
    store = store_of(az_container)
    uploads = store.multipart_uploads("run/ckpt-2/")
    assert [u.key for u in uploads] == ["run/ckpt-2/model.bin"]
    assert store.multipart_uploads("run/ckpt-1/") == []
    # The staged blob is not an object yet: the listings do not show it.
    assert [i.key for i in store.list_tree("run/ckpt-2/")] == ["run/ckpt-2/config.json"]
    writing.commit_block_list(["AAAA"])
    assert store.multipart_uploads("run/ckpt-2/") == []
    assert store.read_small("run/ckpt-2/model.bin") == b"part one"


def test_versioning_is_reported_from_soft_delete(az_container: AzureContainer) -> None:
    from azure.storage.blob import RetentionPolicy

    from tests.azurite import make_service

    store = store_of(az_container)
    assert store.versioning_enabled() is False
    service = make_service(az_container.account_url)
    service.set_service_properties(delete_retention_policy=RetentionPolicy(enabled=True, days=1))
    try:
        store._versioning.forget()  # forget the cached answer
        assert store.versioning_enabled() is True
    finally:
        service.set_service_properties(delete_retention_policy=RetentionPolicy(enabled=False))
