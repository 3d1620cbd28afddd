"""Discovery over listings on a real S3-compatible server (moto): checkpoints are prefixes,
complete by their marker object and settle time; polling lists only the top level and the
members of checkpoints not yet seen complete."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from daemon.storage import open_store
from daemon.storage.listing import Poller, group
from daemon.storage.s3 import S3Store
from tests.s3server import S3Bucket, make_client

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.s3server import s3_bucket as s3_bucket
from tests.s3server import s3_endpoint as s3_endpoint

MARKERS = frozenset({"trainer_state.json"})


def put(bucket: S3Bucket, keys: list[str], body: bytes = b"abc") -> None:
    client = make_client(bucket.endpoint)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket.name, Key=key, Body=body), keys))


def checkpoint_keys(step: int, marker: bool = True) -> list[str]:
    names = ["model.safetensors", "optimizer.pt"] + (["trainer_state.json"] if marker else [])
    return [f"run/checkpoint-{step}/{name}" for name in names]


def poller_of(bucket: S3Bucket, settle: float = 0.0) -> tuple[Poller, S3Store]:
    url, store = open_store(bucket.url("run"), bucket.options)
    assert isinstance(store, S3Store)
    return Poller(store, url, MARKERS, settle_seconds=settle), store


def test_a_checkpoint_is_a_prefix_complete_by_its_marker_and_settle_time(
    s3_bucket: S3Bucket,
) -> None:
    put(s3_bucket, checkpoint_keys(1) + checkpoint_keys(2, marker=False) + ["run/latest"])
    put(s3_bucket, ["run/.ckptd-journal/x.json", "run/.ckptd-lease"])
    url, store = open_store(s3_bucket.url("run"), s3_bucket.options)
    found = group(url, store.list_tree("run/"), MARKERS)
    assert sorted(found) == ["checkpoint-1", "checkpoint-2"], "own prefixes and files left out"
    first, second = found["checkpoint-1"], found["checkpoint-2"]
    assert first.size == 9 and first.markers == ("run/checkpoint-1/trainer_state.json",)
    newest = max(item.mtime for item in first.objects)
    assert first.mtime == newest and abs(newest - time.time()) < 120
    assert first.incomplete_reason(newest + 1, settle_seconds=0) is None
    assert first.incomplete_reason(newest + 5, settle_seconds=60) == "settling: written 5 s ago"
    assert second.incomplete_reason(newest + 999, settle_seconds=0) == "no marker object"
    assert first.to_delete().markers == first.markers


def test_polling_lists_the_top_level_and_only_new_or_unfinished_checkpoints(
    s3_bucket: S3Bucket,
) -> None:
    put(s3_bucket, [key for step in range(1, 21) for key in checkpoint_keys(step)])
    put(s3_bucket, checkpoint_keys(21, marker=False))  # being written
    poller, store = poller_of(s3_bucket)

    first = poller.poll(time.time())
    assert len(first) == 21 and store.requests["ListObjectsV2"] == 1
    assert "checkpoint-21" not in poller.settled

    store.requests.clear()
    poller.poll(time.time())
    # Top level once, plus the one checkpoint still without its marker.
    assert store.requests["ListObjectsV2"] == 2

    put(s3_bucket, ["run/checkpoint-21/trainer_state.json", *checkpoint_keys(22)])
    store.requests.clear()
    after = poller.poll(time.time())
    assert store.requests["ListObjectsV2"] == 3  # top level, checkpoint-21, checkpoint-22
    assert {"checkpoint-21", "checkpoint-22"} <= poller.settled
    assert len(after["checkpoint-22"].objects) == 3

    store.requests.clear()
    poller.poll(time.time())
    assert store.requests["ListObjectsV2"] == 1, "nothing new: the top level only"

    make_client(s3_bucket.endpoint).delete_objects(
        Bucket=s3_bucket.name,
        Delete={"Objects": [{"Key": key} for key in checkpoint_keys(3)]},
    )
    assert "checkpoint-3" not in poller.poll(time.time())


def test_many_new_checkpoints_at_once_are_listed_in_one_recursive_pass(
    s3_bucket: S3Bucket,
) -> None:
    put(s3_bucket, checkpoint_keys(1))
    poller, store = poller_of(s3_bucket)
    poller.poll(time.time())
    put(s3_bucket, [key for step in range(2, 62) for key in checkpoint_keys(step)])
    store.requests.clear()
    assert len(poller.poll(time.time())) == 61
    assert store.requests["ListObjectsV2"] == 2  # top level, then one recursive listing
