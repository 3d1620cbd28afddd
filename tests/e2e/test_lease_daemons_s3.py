"""Two `ckptd run` daemons (`node_name` node-a and node-b) polling one `s3://` root on the moto
server the tests start: the holder of the root's lease object prunes, the other prunes nothing
and records once who holds it; after the holder is killed -9, the other takes over only once
the dead node's lease has expired by more than the skew; nothing is deleted twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from daemon.history.log import read_records
from daemon.lease import LEASE_NAME, LeaseInfo
from tests.configs import rotation, write_config
from tests.e2e.test_lease_daemons import REPOSITORY, wait_for
from tests.s3server import S3Bucket, make_client

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.s3server import s3_bucket as s3_bucket
from tests.s3server import s3_endpoint as s3_endpoint

DURATION, SKEW = 3.0, 1.0
KEEP = 3


def node_config(path: Path, bucket: S3Bucket, state: Path, node: str) -> Path:
    """Given a node's config file, the bucket, its state folder and name, write its config:
    the `s3://` root polled every half second, keep the newest KEEP, the lease short."""
    root = {
        "path": bucket.url("run"),
        "layout": "hf",
        "poll_interval": "0.5s",
        "storage_options": bucket.options,
        "lease": {"duration": DURATION, "skew": SKEW},
    }
    return write_config(
        path,
        [root],
        node_name=node,
        state_dir=state,
        history_file=state / "history.jsonl",
        log={"level": "info", "format": "json"},
        policy=rotation(KEEP, cadence=1),
        settle_seconds=0,
        min_keep=1,
        max_delete_fraction=1.0,
        grace="0s",
        verify={"checks": False},
        disk={"interval": "1h"},
    )


class Node:
    def __init__(
        self, name: str, tmp: Path, bucket: S3Bucket, command: list[str], env: dict[str, str]
    ) -> None:
        self.state = tmp / name
        config = node_config(tmp / f"{name}.yaml", bucket, self.state, name)
        self.log = (tmp / f"{name}.log").open("w")
        self.process = subprocess.Popen(
            [*command, "run", "--config", str(config)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )

    def history(self) -> list[dict[str, Any]]:
        path = self.state / "history.jsonl"
        return read_records(str(path)) if path.exists() else []

    def deleted(self) -> list[str]:
        return [r["checkpoint"] for r in self.history() if r["event"] == "delete"]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        self.log.close()


@pytest.mark.slow
def test_two_daemons_on_one_s3_root_one_prunes_then_hands_over(
    tmp_path: Path, s3_bucket: S3Bucket, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    client = make_client(s3_bucket.endpoint)

    def save(step: int) -> None:
        for name, body in (("model.bin", b"m" * 100), ("trainer_state.json", b"{}")):
            key = f"run/checkpoint-{step}/{name}"
            client.put_object(Bucket=s3_bucket.name, Key=key, Body=body)

    def lease() -> LeaseInfo | None:
        with contextlib.suppress(client.exceptions.NoSuchKey):
            body = client.get_object(Bucket=s3_bucket.name, Key=f"run/{LEASE_NAME}")["Body"]
            return LeaseInfo.decode(body.read())
        return None

    def survivors() -> list[int]:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=s3_bucket.name, Prefix="run/checkpoint-"
        )
        keys = {str(item["Key"]) for page in pages for item in page.get("Contents", ())}
        return sorted({int(key.split("/")[1].split("-")[1]) for key in keys})

    environment = dict(cli_env)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    )
    save(1)
    first = Node("node-a", tmp_path, s3_bucket, ckptd_command, environment)
    second: Node | None = None
    try:
        wait_for(lambda: (held := lease()) and held.host == "node-a", 30, "A's lease")
        second = Node("node-b", tmp_path, s3_bucket, ckptd_command, environment)
        b = second
        wait_for(lambda: (b.state / "state.json").exists(), 30, "B's start")
        for step in range(2, 9):
            save(step)
        a = first
        wait_for(lambda: len(a.deleted()) == 8 - KEEP, 30, "A's deletions")
        assert survivors() == [6, 7, 8]
        assert second.deleted() == []
        refused = [r for r in second.history() if r["event"] == "prune_refused"]
        assert len(refused) == 1 and refused[0]["holder_host"] == "node-a"
        assert refused[0]["holder_pid"] == first.process.pid

        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        last = lease()
        assert last is not None and last.host == "node-a"
        for step in range(9, 12):
            save(step)
        wait_for(lambda: len(b.deleted()) == 3, 40, "B's deletions")
        assert survivors() == [9, 10, 11]
        taken = lease()
        assert taken is not None and taken.host == "node-b"
        assert taken.acquired > last.expires + SKEW
        from datetime import datetime

        first_b = min(
            datetime.fromisoformat(r["time"]).timestamp()
            for r in second.history()
            if r["event"] == "delete"
        )
        assert first_b > last.expires + SKEW
        deleted = first.deleted() + second.deleted()
        assert sorted(deleted) == sorted(f"checkpoint-{n}" for n in range(1, 9))  # each once
        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(timeout=30) == 0
        released = lease()
        assert released is not None and released.expires == 0
        assert json.loads((second.state / "state.json").read_text())["pid"] == second.process.pid
    finally:
        first.stop()
        if second is not None:
            second.stop()
