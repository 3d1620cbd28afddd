"""What object storage adds to discovery and pruning of a root, against moto on 127.0.0.1:
multipart uploads in progress, settle time from the newest object, ckptd's own prefixes,
versioned buckets, and the daemon's bounded listing cost per poll."""

from __future__ import annotations

import time

from daemon.config import RootConfig
from daemon.discovery.remote import BEING_WRITTEN, scan_remote
from daemon.history.log import NULL_HISTORY
from daemon.pruning.pipeline import prune_root
from daemon.service.remote_poll import RemotePolls
from tests.configs import make_config, rotation
from tests.s3server import S3Bucket, make_client

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.s3server import s3_bucket as s3_bucket
from tests.s3server import s3_endpoint as s3_endpoint


def save(bucket: S3Bucket, step: int, *, marker: bool = True, prefix: str = "run") -> None:
    client = make_client(bucket.endpoint)
    names = ["model.safetensors", "optimizer.pt"] + (["trainer_state.json"] if marker else [])
    for name in names:
        body = b"{}" if name.endswith(".json") else b"x" * 100
        client.put_object(Bucket=bucket.name, Key=f"{prefix}/checkpoint-{step}/{name}", Body=body)


def root_of(bucket: S3Bucket) -> RootConfig:
    return RootConfig(path=bucket.url("run"), storage_options=bucket.options)


def by_name(bucket: S3Bucket, *, now: float, settle: float = 0.0) -> dict[str, tuple[bool, str]]:
    scanned = scan_remote(root_of(bucket), now=now, settle_seconds=settle)
    return {c.name: (c.complete, c.incomplete_reason or "") for c in scanned.result.checkpoints}


def test_a_multipart_upload_in_progress_means_the_checkpoint_is_being_written(
    s3_bucket: S3Bucket,
) -> None:
    for step in (1, 2):
        save(s3_bucket, step)
    client = make_client(s3_bucket.endpoint)
    client.create_multipart_upload(Bucket=s3_bucket.name, Key="run/checkpoint-2/big.bin")
    found = by_name(s3_bucket, now=time.time() + 10)
    assert found["checkpoint-1"] == (True, "")
    assert found["checkpoint-2"] == (False, BEING_WRITTEN)


def test_settle_time_counts_from_the_newest_object(s3_bucket: S3Bucket) -> None:
    save(s3_bucket, 1)
    save(s3_bucket, 2, marker=False)
    now = time.time()
    young = by_name(s3_bucket, now=now, settle=60)
    assert young["checkpoint-1"][0] is False
    assert young["checkpoint-1"][1].startswith("settling")
    assert young["checkpoint-2"] == (False, "no trainer_state.json")
    settled = by_name(s3_bucket, now=now + 120, settle=60)
    assert settled["checkpoint-1"] == (True, "")


def test_ckptds_own_prefixes_are_not_checkpoints(s3_bucket: S3Bucket) -> None:
    save(s3_bucket, 1)
    client = make_client(s3_bucket.endpoint)
    for key in ("run/.ckptd-journal/x.json", "run/.ckptd-trash/deferred-x.json"):
        client.put_object(Bucket=s3_bucket.name, Key=key, Body=b"{}")
    assert set(by_name(s3_bucket, now=time.time() + 10)) == {"checkpoint-1"}


def test_a_versioned_bucket_frees_no_billed_bytes_and_the_prune_says_so(
    s3_bucket: S3Bucket,
) -> None:
    client = make_client(s3_bucket.endpoint)
    client.put_bucket_versioning(
        Bucket=s3_bucket.name, VersioningConfiguration={"Status": "Enabled"}
    )
    for step in (1, 2, 3):
        save(s3_bucket, step)
    config = make_config(
        settle_seconds=0, min_keep=1, grace=0, policy=rotation(1), verify={"checks": False}
    )
    report = prune_root(
        config, root_of(s3_bucket), now=time.time() + 10, dry_run=False, history=NULL_HISTORY
    )
    assert sorted(report.deleted) == ["checkpoint-1", "checkpoint-2"]
    assert report.bytes_freed == 0
    assert any("billed" in note for note in report.notes)


def test_a_poll_lists_the_top_level_and_only_new_checkpoints(s3_bucket: S3Bucket) -> None:
    for step in range(1, 31):
        save(s3_bucket, step)
    polls = RemotePolls()
    root = root_of(s3_bucket)
    now = time.time() + 10
    assert polls.poll(root, now=now, settle_seconds=0) is True  # the first: a full listing
    first = polls.requests(root.path)
    assert polls.poll(root, now=now, settle_seconds=0) is False  # nothing new
    assert polls.requests(root.path) - first == 1  # the top level, one page
    save(s3_bucket, 31)
    assert polls.poll(root, now=now + 1, settle_seconds=0) is True
    assert polls.requests(root.path) - first == 1 + 2  # top level + the new checkpoint's members
