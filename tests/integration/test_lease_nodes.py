"""Two daemons on one root, each a real process standing in for a node: the one holding the
lease prunes, the other prunes nothing until the holder dies and its lease expires; nothing
is deleted twice. On a local folder, on S3 (moto on 127.0.0.1), and on an NFS export over
loopback where this machine's kernel can serve and mount NFS."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.s3server import REPOSITORY, S3Bucket, make_client

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.s3server import s3_bucket as s3_bucket
from tests.s3server import s3_endpoint as s3_endpoint

CHECKPOINTS = 24
DURATION, SKEW = 3.0, 1.0

# A minimal pruner: holds the lease, deletes the oldest checkpoint, again, until none is left.
# Every event goes to a shared log (O_APPEND lines) with the node's pid and time.
NODE = textwrap.dedent(
    f"""
    import json, os, shutil, sys, time
    kind, where, options, log_path = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    from daemon.lease import ObjectLease, PosixLease
    if kind == "posix":
        lease = PosixLease(where, duration={DURATION}, skew={SKEW})
    else:
        from daemon.storage import open_store
        from daemon.storage.journal import CheckpointObjects, delete_checkpoints, finish_pending
        url, store = open_store(where, options)
        lease = ObjectLease(store, url, duration={DURATION}, skew={SKEW})

    def log(event, **fields):
        line = json.dumps(dict(event=event, pid=os.getpid(), t=time.time(), **fields))
        with open(log_path, "a") as handle:
            handle.write(line + "\\n")

    def remaining():
        if kind == "posix":
            names = [n for n in os.listdir(where) if n.startswith("checkpoint-")]
        else:
            names = [e.name for e in store.list_top(url.directory()) if e.is_prefix
                     and e.name.startswith("checkpoint-")]
        return sorted(names, key=lambda name: int(name.split("-")[1]))

    def delete(name):
        if kind == "posix":
            try:
                os.rename(os.path.join(where, name), os.path.join(where, f".trash-{{name}}"))
            except FileNotFoundError:
                log("missing", name=name)
                return
            shutil.rmtree(os.path.join(where, f".trash-{{name}}"))
            return
        prefix = f"{{url.directory()}}{{name}}/"
        objects = tuple(store.list_tree(prefix))
        markers = tuple(o.key for o in objects if o.key.endswith("/trainer_state.json"))
        if not markers:
            log("missing", name=name)
            return
        delete_checkpoints(store, url, [CheckpointObjects(name, markers, objects, prefix)],
                           keep_going=lambda: lease.valid(time.time()))

    deadline = time.time() + 60
    while time.time() < deadline:
        now = time.time()
        if lease.held and lease.renewal_due(now):
            lease.renew(now)
        elif not lease.held and lease.acquire(now):
            log("acquired", expires=lease.expires)
            if kind != "posix":
                finish_pending(store, url)  # what a crashed holder left
        names = remaining()
        if not names:
            log("empty")
            break
        if lease.valid(time.time()):
            log("delete", name=names[0], expires=lease.expires)
            delete(names[0])
            time.sleep(0.1)  # a slow pruner, so that the test can kill it midway
        else:
            time.sleep(0.05)  # not the holder: prune nothing, look again soon
    """
)


def start_node(
    kind: str, where: str, options: dict[str, object], log: Path
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", NODE, kind, where, json.dumps(options), str(log)],
        env=dict(os.environ, PYTHONPATH=str(REPOSITORY)),
    )


def events(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def wait_for(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def make_posix_root(root: Path) -> None:
    for step in range(1, CHECKPOINTS + 1):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"m" * 100)


def make_s3_root(bucket: S3Bucket) -> None:
    client = make_client(bucket.endpoint)
    keys = [
        f"run/checkpoint-{step}/{name}"
        for step in range(1, CHECKPOINTS + 1)
        for name in ("trainer_state.json", "model.safetensors")
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket.name, Key=key, Body=b"x"), keys))


def run_two_nodes(kind: str, where: str, options: dict[str, object], log: Path) -> None:
    """Start node A, then node B; kill A (kill -9) after it deleted 8; B finishes the root."""
    first = start_node(kind, where, options, log)
    try:
        wait_for(lambda: any(e["event"] == "acquired" for e in events(log)), 30)
        second = start_node(kind, where, options, log)
        try:
            wait_for(lambda: sum(e["event"] == "delete" for e in events(log)) >= 8, 30)
            first.send_signal(signal.SIGKILL)
            first.wait()
            assert second.wait(timeout=60) == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                second.kill()
            second.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
        first.wait()
    check_log(events(log), first.pid, second.pid)


def check_log(log: list[dict[str, object]], first: int, second: int) -> None:
    assert not [e for e in log if e["event"] == "missing"], "a checkpoint was deleted twice"
    acquired = [e for e in log if e["event"] == "acquired"]
    assert [e["pid"] for e in acquired] == [first, second], "exactly one hand-over"
    by_first = [e for e in log if e["event"] == "delete" and e["pid"] == first]
    by_second = [e for e in log if e["event"] == "delete" and e["pid"] == second]
    assert len(by_first) >= 8 and by_second, "both nodes pruned, one after the other"
    # B acted only once A's last lease had expired by more than the skew margin.
    last_expiry = max(float(e["expires"]) for e in by_first)  # type: ignore[arg-type]
    assert float(acquired[1]["t"]) > last_expiry + SKEW  # type: ignore[arg-type]
    assert min(float(e["t"]) for e in by_second) > last_expiry + SKEW  # type: ignore[arg-type]
    assert max(float(e["t"]) for e in by_first) < min(float(e["t"]) for e in by_second)  # type: ignore[arg-type]


@pytest.mark.slow
def test_two_nodes_on_a_local_folder_one_prunes_then_hands_over(tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_posix_root(root)
    run_two_nodes("posix", str(root), {}, tmp_path / "log.jsonl")
    assert not [p for p in root.iterdir() if p.name.startswith("checkpoint-")]


@pytest.mark.slow
def test_two_nodes_on_s3_one_prunes_then_hands_over(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    make_s3_root(s3_bucket)
    run_two_nodes("s3", s3_bucket.url("run"), s3_bucket.options, tmp_path / "log.jsonl")
    client = make_client(s3_bucket.endpoint)
    left = client.list_objects_v2(Bucket=s3_bucket.name, Prefix="run/checkpoint-")
    assert left.get("KeyCount", 0) == 0
    journals = client.list_objects_v2(Bucket=s3_bucket.name, Prefix="run/.ckptd-journal/")
    assert journals.get("KeyCount", 0) == 0, "a killed holder's journal is finished by the next"


# --- NFS over loopback --------------------------------------------------------------------


def _nfs_unavailable() -> str | None:
    """Return why this machine cannot serve and mount NFS over loopback, or None."""
    if os.geteuid() != 0:
        return "needs root to export and mount NFS"
    filesystems = Path("/proc/filesystems").read_text()
    if "nfsd" not in filesystems or "\tnfs\n" not in filesystems + "\n":
        return (
            "this kernel has no NFS server or client (nfsd/nfs absent from /proc/filesystems);"
            " the NFS lease test needs a kernel with them and nfs-kernel-server installed"
        )
    missing = [
        tool
        for tool in ("exportfs", "rpc.nfsd", "rpc.mountd", "mount.nfs")
        if shutil.which(tool) is None
    ]
    if missing:
        return f"apt-get install nfs-kernel-server (missing: {', '.join(missing)})"
    return None


@pytest.fixture
def nfs_mount(tmp_path: Path) -> Iterator[Path]:
    """A tmp folder exported to 127.0.0.1 and mounted back over NFSv3 at another path."""
    reason = _nfs_unavailable()
    if reason:
        pytest.skip(reason)
    export, mount = tmp_path / "export", tmp_path / "mnt"
    export.mkdir()
    mount.mkdir()
    option = f"127.0.0.1:{export}"
    steps = [
        ["rpcbind"],
        ["rpc.nfsd", "2"],
        ["rpc.mountd"],
        ["exportfs", "-o", "rw,sync,no_root_squash,no_subtree_check", option],
        ["mount", "-t", "nfs", "-o", "vers=3,nolock", option, str(mount)],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=60)
        if done.returncode != 0 and step[0] not in ("rpcbind",):
            subprocess.run(["exportfs", "-u", option], capture_output=True)
            pytest.skip(f"NFS over loopback could not be set up: {' '.join(step)}: {done.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-f", str(mount)], capture_output=True)
        subprocess.run(["exportfs", "-u", option], capture_output=True)


@pytest.mark.slow
@pytest.mark.root
def test_two_nodes_on_an_nfs_mount_one_prunes_then_hands_over(
    tmp_path: Path, nfs_mount: Path
) -> None:
    root = nfs_mount / "root"
    make_posix_root(root)
    run_two_nodes("posix", str(root), {}, tmp_path / "log.jsonl")
    assert not [p for p in root.iterdir() if p.name.startswith("checkpoint-")]
