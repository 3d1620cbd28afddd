"""Journalled, marker-first deletion on object storage, and the deferred list (trash grace),
against a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from daemon.storage import open_store
from daemon.storage.base import DeleteFailure
from daemon.storage.journal import (
    CheckpointObjects,
    JournalError,
    defer,
    delete_checkpoints,
    finish_pending,
    journal_key,
    list_deferred,
    pending_journals,
    purge_due,
    restore,
)
from daemon.storage.s3 import S3Store
from daemon.storage.url import StorageUrl
from tests.s3server import REPOSITORY, S3Bucket, make_client

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.s3server import s3_bucket as s3_bucket
from tests.s3server import s3_endpoint as s3_endpoint

MARKER = "trainer_state.json"
FILES = (MARKER, "model.safetensors", "optimizer.pt")


def write_checkpoints(bucket: S3Bucket, steps: range, prefix: str = "run") -> None:
    """Write Hugging Face-style checkpoints: three objects each, sizes 10, 100 and 20."""
    client = make_client(bucket.endpoint)
    bodies = {MARKER: b"{}" * 5, "model.safetensors": b"m" * 100, "optimizer.pt": b"o" * 20}
    keys = [
        (f"{prefix}/checkpoint-{step}/{name}", bodies[name]) for step in steps for name in FILES
    ]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(lambda kv: client.put_object(Bucket=bucket.name, Key=kv[0], Body=kv[1]), keys)
        )


def opened(bucket: S3Bucket, prefix: str = "run") -> tuple[StorageUrl, S3Store]:
    url, store = open_store(bucket.url(prefix), bucket.options)
    assert isinstance(store, S3Store)
    return url, store


def objects_of(store: S3Store, url: StorageUrl, name: str) -> CheckpointObjects:
    prefix = f"{url.directory()}{name}/"
    objects = tuple(store.list_tree(prefix))
    markers = tuple(item.key for item in objects if item.key.endswith("/" + MARKER))
    return CheckpointObjects(name=name, markers=markers, objects=objects, prefix=prefix)


def keys_in(bucket: S3Bucket) -> set[str]:
    client = make_client(bucket.endpoint)
    found: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name):
        found.update(item["Key"] for item in page.get("Contents", ()))
    return found


def checkpoints_left(bucket: S3Bucket) -> dict[str, set[str]]:
    """Return each checkpoint name still present with the file names it still has."""
    left: dict[str, set[str]] = {}
    for key in keys_in(bucket):
        parts = key.split("/")
        if len(parts) == 3 and parts[1].startswith("checkpoint-"):
            left.setdefault(parts[1], set()).add(parts[2])
    return left


def assert_marker_first(bucket: S3Bucket) -> None:
    """No checkpoint has its marker while missing any other object."""
    for name, files in checkpoints_left(bucket).items():
        if MARKER in files:
            assert files == set(FILES), f"{name} has its marker but lost {set(FILES) - files}"


def record_requests(store: S3Store) -> list[tuple[str, list[str]]]:
    """Record each write request (operation, keys) the store sends, in order."""
    calls: list[tuple[str, list[str]]] = []

    def seen(params: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name == "DeleteObjects":
            calls.append((model.name, [item["Key"] for item in params["Delete"]["Objects"]]))
        elif model.name in ("PutObject", "DeleteObject"):
            calls.append((model.name, [params["Key"]]))

    store._client.meta.events.register("before-parameter-build.s3", seen)
    return calls


def test_journal_first_then_every_marker_then_the_rest_in_batches(s3_bucket: S3Bucket) -> None:
    write_checkpoints(s3_bucket, range(1, 8))
    url, store = opened(s3_bucket)
    doomed = [objects_of(store, url, f"checkpoint-{step}") for step in (1, 2, 3, 4, 5)]
    calls = record_requests(store)

    run = delete_checkpoints(store, url, doomed, batch_size=4)

    journal = journal_key(url, run.run_id)
    assert calls[0] == ("PutObject", [journal])
    markers = [f"run/checkpoint-{step}/{MARKER}" for step in (1, 2, 3, 4, 5)]
    # Markers: 5 keys in batches of 4, before any other object.
    assert calls[1:3] == [("DeleteObjects", markers[:4]), ("DeleteObjects", markers[4:])]
    rest = [key for _op, keys in calls[3:-1] for key in keys]
    assert sorted(rest) == sorted(
        f"run/checkpoint-{step}/{name}" for step in (1, 2, 3, 4, 5) for name in FILES[1:]
    )
    assert all(len(keys) <= 4 for _op, keys in calls[1:-1])
    assert calls[-1] == ("DeleteObjects", [journal])

    assert sorted(checkpoints_left(s3_bucket)) == ["checkpoint-6", "checkpoint-7"]
    assert run.journal_removed and not run.stopped and not run.versioned
    assert [o.bytes_freed for o in run.outcomes] == [130] * 5
    assert all(o.complete and o.deleted == 3 for o in run.outcomes)
    assert pending_journals(store, url) == []


def test_a_marker_the_server_refuses_keeps_that_checkpoint_whole(s3_bucket: S3Bucket) -> None:
    write_checkpoints(s3_bucket, range(1, 4))
    url, store = opened(s3_bucket)
    doomed = [objects_of(store, url, f"checkpoint-{step}") for step in (1, 2)]
    refused = f"run/checkpoint-2/{MARKER}"

    real_delete = store.delete_batch

    def refuse_one(keys: Sequence[str]) -> list[DeleteFailure]:
        # The server refuses the marker of checkpoint-2, as S3 answers per key.
        failures = real_delete([key for key in keys if key != refused])
        return failures + [
            DeleteFailure(refused, "AccessDenied", "denied") for k in keys if k == refused
        ]

    store.delete_batch = refuse_one  # type: ignore[method-assign]
    run = delete_checkpoints(store, url, doomed)

    left = checkpoints_left(s3_bucket)
    assert left["checkpoint-2"] == set(FILES), "a refused marker must keep its checkpoint whole"
    assert "checkpoint-1" not in left
    outcome = {o.name: o for o in run.outcomes}
    assert outcome["checkpoint-1"].complete and outcome["checkpoint-1"].bytes_freed == 130
    assert not outcome["checkpoint-2"].complete
    assert outcome["checkpoint-2"].deleted == 0 and outcome["checkpoint-2"].bytes_freed == 0
    assert not run.journal_removed and pending_journals(store, url) != []

    # The next run, allowed again, finishes what the journal lists.
    _url, fresh = opened(s3_bucket)
    [finished] = finish_pending(fresh, url)
    assert finished.journal_removed
    assert sorted(checkpoints_left(s3_bucket)) == ["checkpoint-3"]


CHILD = textwrap.dedent(
    """
    import json, sys
    from daemon.storage import open_store
    from daemon.storage.journal import CheckpointObjects, delete_checkpoints
    url, store = open_store(sys.argv[1], json.loads(sys.argv[2]))
    doomed = []
    for step in range(1, 31):
        prefix = f"{url.directory()}checkpoint-{step}/"
        objects = tuple(store.list_tree(prefix))
        markers = tuple(o.key for o in objects if o.key.endswith("/trainer_state.json"))
        doomed.append(CheckpointObjects(f"checkpoint-{step}", markers, objects, prefix))
    requests = 0
    def keep_going():
        global requests
        requests += 1
        print(requests, flush=True)
        sys.stdin.readline()  # the test lets each request go, and kills us at its chosen one
        return True
    parallel = int(sys.argv[3])
    delete_checkpoints(store, url, doomed, batch_size=4, keep_going=keep_going, parallel=parallel)
    print("done", flush=True)
    """
)


@pytest.mark.parametrize(("kill_at", "parallel"), [(3, 1), (10, 1), (21, 1), (5, 4), (12, 4)])
def test_kill_9_mid_delete_then_finish_pending_completes_it(
    s3_bucket: S3Bucket, kill_at: int, parallel: int
) -> None:
    # 30 checkpoints, batches of 4: requests 1-8 delete markers, 9-23 the other 60 objects.
    write_checkpoints(s3_bucket, range(1, 36))
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            s3_bucket.url("run"),
            json.dumps(s3_bucket.options),
            str(parallel),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPOSITORY)),
    )
    assert child.stdin is not None and child.stdout is not None
    for expected in range(1, kill_at + 1):
        assert child.stdout.readline().strip() == str(expected)
        if expected < kill_at:
            child.stdin.write("\n")
            child.stdin.flush()
    # The child waits before sending request `kill_at`: every earlier one was answered.
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdin.close()
    child.stdout.close()

    assert_marker_first(s3_bucket)
    if parallel == 1:
        assert_sequential_progress(s3_bucket, kill_at)
    url, store = opened(s3_bucket)
    assert len(pending_journals(store, url)) == 1

    runs = finish_pending(store, url)

    assert [run.journal_removed for run in runs] == [True]
    assert sorted(checkpoints_left(s3_bucket)) == [f"checkpoint-{s}" for s in range(31, 36)]
    assert all(files == set(FILES) for files in checkpoints_left(s3_bucket).values())
    assert pending_journals(store, url) == []


def assert_sequential_progress(s3_bucket: S3Bucket, kill_at: int) -> None:
    """Requests 1..kill_at-1 were answered: 8 marker batches come first, then the rest."""
    done = kill_at - 1
    left = checkpoints_left(s3_bucket)
    doomed = [f"checkpoint-{step}" for step in range(1, 31)]
    without_marker = [name for name in doomed if MARKER not in left.get(name, set())]
    assert len(without_marker) == min(4 * done, 30)
    others_left = sum(len(left.get(name, set()) - {MARKER}) for name in doomed)
    assert others_left == 60 - 4 * max(0, done - 8)


def test_a_journal_reaching_outside_its_checkpoint_is_refused_and_kept(
    s3_bucket: S3Bucket,
) -> None:
    write_checkpoints(s3_bucket, range(1, 3))
    url, store = opened(s3_bucket)
    planted = {
        "version": 1,
        "run_id": "planted",
        "checkpoints": [
            {
                "name": "checkpoint-1",
                "prefix": True,
                "markers": ["../checkpoint-2/trainer_state.json"],
                "objects": [["../checkpoint-2/trainer_state.json", 10]],
            }
        ],
    }
    store.put(journal_key(url, "planted"), json.dumps(planted).encode())
    with pytest.raises(JournalError, match="not inside checkpoint"):
        finish_pending(store, url)
    assert checkpoints_left(s3_bucket)["checkpoint-2"] == set(FILES)
    assert pending_journals(store, url) == ["run/.ckptd-journal/planted.json"]
    with pytest.raises(JournalError):
        delete_checkpoints(store, url, [CheckpointObjects("..", (), (), None)])
    outside = objects_of(store, url, "checkpoint-2")
    stray = CheckpointObjects("checkpoint-1", outside.markers, outside.objects, "run/checkpoint-1/")
    with pytest.raises(JournalError):
        delete_checkpoints(store, url, [stray])
    assert checkpoints_left(s3_bucket)["checkpoint-2"] == set(FILES), "refused before deleting"


def test_lease_lost_mid_run_stops_and_the_journal_finishes_it(s3_bucket: S3Bucket) -> None:
    write_checkpoints(s3_bucket, range(1, 6))
    url, store = opened(s3_bucket)
    doomed = [objects_of(store, url, f"checkpoint-{step}") for step in range(1, 6)]
    answers = iter([True])  # one request allowed, then the lease is gone
    run = delete_checkpoints(
        store, url, doomed, batch_size=3, keep_going=lambda: next(answers, False)
    )
    assert run.stopped and not run.journal_removed
    assert_marker_first(s3_bucket)
    left = checkpoints_left(s3_bucket)
    assert sorted(n for n in left if MARKER not in left[n]) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    finish_pending(store, url)
    assert checkpoints_left(s3_bucket) == {}


def test_versioned_bucket_counts_no_bytes_freed_and_says_why(s3_bucket: S3Bucket) -> None:
    make_client(s3_bucket.endpoint).put_bucket_versioning(
        Bucket=s3_bucket.name, VersioningConfiguration={"Status": "Enabled"}
    )
    write_checkpoints(s3_bucket, range(1, 3))
    url, store = opened(s3_bucket)
    run = delete_checkpoints(store, url, [objects_of(store, url, "checkpoint-1")])
    assert run.versioned and "billed" in run.note
    [outcome] = run.outcomes
    assert outcome.complete and outcome.bytes_listed == 130 and outcome.bytes_freed == 0


def test_deferred_deletion_waits_for_its_due_time_and_restore_cancels(
    s3_bucket: S3Bucket,
) -> None:
    write_checkpoints(s3_bucket, range(1, 5))
    url, store = opened(s3_bucket)
    now = 1_800_000_000.0
    doomed = [objects_of(store, url, f"checkpoint-{step}") for step in (1, 2, 3)]
    defer(store, url, doomed, due=now + 3600)

    assert [(i.name, i.due, i.size) for i in list_deferred(store, url)] == [
        ("checkpoint-1", now + 3600, 130),
        ("checkpoint-2", now + 3600, 130),
        ("checkpoint-3", now + 3600, 130),
    ]
    assert len(checkpoints_left(s3_bucket)) == 4, "deferring deletes nothing"
    assert restore(store, url, "checkpoint-2") is True
    assert restore(store, url, "checkpoint-2") is False
    assert restore(store, url, "checkpoint-9") is False
    assert purge_due(store, url, now + 3599) == []
    assert len(checkpoints_left(s3_bucket)) == 4

    [run] = purge_due(store, url, now + 3600)
    assert sorted(o.name for o in run.outcomes) == ["checkpoint-1", "checkpoint-3"]
    assert sorted(checkpoints_left(s3_bucket)) == ["checkpoint-2", "checkpoint-4"]
    assert list_deferred(store, url) == []
    assert pending_journals(store, url) == []


def test_restore_racing_the_purge_wins_or_finds_the_deletion_begun(s3_bucket: S3Bucket) -> None:
    write_checkpoints(s3_bucket, range(1, 4))
    url, store = opened(s3_bucket)
    defer(store, url, [objects_of(store, url, f"checkpoint-{s}") for s in (1, 2)], due=0.0)
    real = store.delete_if_match
    raced: list[bool] = []

    def restore_first(key: str, etag: str) -> bool:
        # A `trash restore` lands between the purge's read of the list and its commit.
        if not raced:
            raced.append(restore(store, url, "checkpoint-2"))
        return real(key, etag)

    store.delete_if_match = restore_first  # type: ignore[method-assign]
    assert purge_due(store, url, 10.0) == []
    assert raced == [True]
    assert len(checkpoints_left(s3_bucket)) == 3, "the purge must not delete from a stale list"
    assert pending_journals(store, url) == []

    [run] = purge_due(store, url, 10.0)
    assert [o.name for o in run.outcomes] == ["checkpoint-1"]
    assert sorted(checkpoints_left(s3_bucket)) == ["checkpoint-2", "checkpoint-3"]
    assert restore(store, url, "checkpoint-1") is False
