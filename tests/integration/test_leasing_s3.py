"""The object lease through the leasing module, over the moto S3 server the tests start: two
processes (nodes `node-a` and `node-b`) ask `leasing.check` before every prune of one
`s3://` root, as `prune_root` does. One acts, the other is refused (recorded once, naming the
holder); after the holder is killed -9, the other acts only once the dead node's lease has
expired by more than the skew."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.history.log import read_records
from tests.s3server import REPOSITORY, S3Bucket, make_client

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.s3server import s3_bucket as s3_bucket
from tests.s3server import s3_endpoint as s3_endpoint

DURATION, SKEW = 3.0, 1.0

NODE = textwrap.dedent(
    f"""
    import json, os, sys, time
    from daemon.history.log import HistoryLog
    from daemon.pruning import leasing
    from daemon.storage import open_store
    from tests.configs import make_config

    where, options, node, log_path, history_path = sys.argv[1:6]
    url, store = open_store(where, json.loads(options))
    lease = dict(duration={DURATION}, skew={SKEW})
    config = make_config([dict(path=where, lease=lease)], node_name=node)
    root = config.roots[0]
    history = HistoryLog(history_path)

    def log(event, **fields):
        with open(log_path, "a") as handle:
            handle.write(json.dumps(dict(event=event, node=node, t=time.time(), **fields)) + "\\n")

    deadline = time.time() + 40
    while time.time() < deadline:
        check = leasing.check(config, root, dry_run=False, history=history, store=store)
        if check.refusal is None:
            lease = leasing.LEASES.held(leasing.lease_key(root))
            log("act", expires=lease.expires)
        else:
            log("refused", reason=check.refusal.reason)
        time.sleep(0.1)
    """
)


def start(bucket: S3Bucket, node: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            NODE,
            bucket.url("run"),
            json.dumps(bucket.options),
            node,
            str(tmp_path / "log.jsonl"),
            str(tmp_path / f"{node}.jsonl"),
        ],
        env=dict(os.environ, PYTHONPATH=str(REPOSITORY)),
    )


def events(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_two_processes_contend_for_an_object_lease_through_the_leasing_module(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    first = start(s3_bucket, "node-a", tmp_path)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: any(e["event"] == "act" for e in events(tmp_path)), 30, "A acting")
        second = start(s3_bucket, "node-b", tmp_path)
        wait_for(
            lambda: (
                sum(e["event"] == "refused" and e["node"] == "node-b" for e in events(tmp_path))
                >= 5
            ),
            30,
            "B refused",
        )
        first.send_signal(signal.SIGKILL)
        first.wait()
        wait_for(
            lambda: any(e["event"] == "act" and e["node"] == "node-b" for e in events(tmp_path)),
            30,
            "B taking over",
        )
    finally:
        for process in (first, second):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
    log = events(tmp_path)
    by_a = [e for e in log if e["event"] == "act" and e["node"] == "node-a"]
    by_b = [e for e in log if e["event"] == "act" and e["node"] == "node-b"]
    refused_b = [e for e in log if e["event"] == "refused" and e["node"] == "node-b"]
    assert by_a and by_b
    assert all("node-a" in e["reason"] for e in refused_b)
    # B acted only once A's last lease had expired by more than the skew.
    last_expiry = max(float(e["expires"]) for e in by_a)
    assert min(float(e["t"]) for e in by_b) > last_expiry + SKEW
    assert max(float(e["t"]) for e in by_a) < min(float(e["t"]) for e in by_b)
    # B's history says once who held the lease; A was never refused.
    records = read_records(str(tmp_path / "node-b.jsonl"))
    assert [r["event"] for r in records] == ["prune_refused"]
    assert records[0]["holder_host"] == "node-a" and records[0]["holder_pid"] == first.pid
    assert records[0]["root"] == s3_bucket.url("run")
    assert not (tmp_path / "node-a.jsonl").exists() or not read_records(
        str(tmp_path / "node-a.jsonl")
    )
    # The lease object names B now.
    body = make_client(s3_bucket.endpoint).get_object(
        Bucket=s3_bucket.name, Key="run/.ckptd-lease"
    )["Body"]
    assert json.loads(body.read())["host"] == "node-b"
