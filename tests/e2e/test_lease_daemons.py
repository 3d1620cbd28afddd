"""Two `ckptd run` daemons on one shared root, each a real process standing in for a node
(`node_name` node-a and node-b, each with its own state and history): the one holding the
root's lease prunes, the other prunes nothing and says so (`prune_refused` naming the holder,
`ckptd status`); after the holder is killed -9, the other takes over only once the dead
node's lease has expired by more than the skew, and prunes; no checkpoint is deleted twice
(the histories of both). On a local folder with `shared: true`, and on an NFS export mounted
over loopback where this machine can serve NFS (skipped with the reason otherwise)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.history.log import read_records
from daemon.lease import LEASE_NAME, LeaseInfo
from tests.configs import rotation, write_config

REPOSITORY = Path(__file__).resolve().parents[2]
DURATION, SKEW = 3.0, 1.0
KEEP = 3


def node_config(
    path: Path, root: Path, state: Path, node: str, shared: bool | str, prune: object = None
) -> Path:
    """Given a node's config file, the shared root, its state folder and name, write its config:
    keep the newest KEEP, at once (no settle, no trash grace), the lease short for the test."""
    return write_config(
        path,
        [root],
        layout="hf",
        root_settings={"shared": shared, "lease": {"duration": DURATION, "skew": SKEW}},
        node_name=node,
        state_dir=state,
        history_file=state / "history.jsonl",
        log={"level": "info", "format": "json"},
        policy=rotation(KEEP),
        settle_seconds=0,
        min_keep=1,
        max_delete_fraction=1.0,
        grace="0s",
        verify={"checks": False},
        disk={"interval": "1h"},
        prune=prune,
    )


class Node:
    """One daemon: its config, its process and its history."""

    def __init__(
        self,
        name: str,
        tmp: Path,
        root: Path,
        command: list[str],
        env: dict[str, str],
        shared: bool | str,
        prune: object = None,
    ) -> None:
        self.name = name
        self.state = tmp / name
        self.config = node_config(tmp / f"{name}.yaml", root, self.state, name, shared, prune)
        self.command = command
        self.env = env
        self.log = (tmp / f"{name}.log").open("w")
        self.process = subprocess.Popen(
            [*command, "run", "--config", str(self.config)],
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

    def status(self) -> dict[str, Any]:
        done = subprocess.run(
            [*self.command, "status", "--config", str(self.config), "--json"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        document: dict[str, Any] = json.loads(done.stdout)
        return document

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        self.log.close()


def lease_of(root: Path) -> LeaseInfo | None:
    try:
        return LeaseInfo.decode((root / LEASE_NAME).read_bytes())
    except FileNotFoundError:
        return None


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def save(root: Path, step: int) -> None:
    """Write one Hugging Face checkpoint as a trainer does: folder, weights, marker last."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    # Not 0x80 first: a .bin starting so is checked as a pickle, and random bytes are no pickle.
    (folder / "model.bin").write_bytes(b"\0" + os.urandom(2047))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def survivors(root: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in root.iterdir() if p.name.startswith("checkp"))


def run_two_daemons(
    tmp_path: Path, root: Path, command: list[str], env: dict[str, str], shared: bool | str = True
) -> None:
    environment = dict(env)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    )
    first = Node("node-a", tmp_path, root, command, environment, shared)
    second: Node | None = None
    try:
        wait_for(lambda: (lease := lease_of(root)) and lease.host == "node-a", 30, "A's lease")
        second = Node("node-b", tmp_path, root, command, environment, shared)
        b = second
        # B is up (its state file names its pid) and has looked at the root at start-up.
        wait_for(lambda: (b.state / "state.json").exists(), 30, "B's start")
        step = 0
        for _ in range(10):
            step += 1
            save(root, step)
            time.sleep(0.3)
        a = first
        wait_for(lambda: len(a.deleted()) == step - KEEP, 20, "A's deletions in its history")
        assert survivors(root) == list(range(step - KEEP + 1, step + 1))
        assert second.deleted() == [], "the node without the lease deleted something"
        refused = [r for r in second.history() if r["event"] == "prune_refused"]
        assert refused, "B never said why it prunes nothing"
        assert {r["holder_host"] for r in refused} == {"node-a"}
        assert {r["holder_pid"] for r in refused} == {first.process.pid}
        assert len(refused) == 1, "recorded once per holder, not at every checkpoint"

        # Standing by is no warning in B's log, and no trouble for `ckptd check`: not a
        # refused root, not a stale one.
        logged = [
            json.loads(line)
            for line in (tmp_path / "node-b.log").read_text().splitlines()
            if line.startswith("{")
        ]
        standing_by = [e for e in logged if e.get("event") == "prune_refused"]
        assert standing_by and {e["level"] for e in standing_by} == {"info"}
        state = json.loads((second.state / "state.json").read_text())
        assert os.path.realpath(root) not in (state.get("refused") or {})
        assert os.path.realpath(root) in state["prune_success"]

        seen_by_b = second.status()["roots"][0]["lease"]
        assert seen_by_b["holder"] == {"host": "node-a", "pid": first.process.pid}
        assert seen_by_b["ours"] is False and seen_by_b["node"] == "node-b"
        assert first.status()["roots"][0]["lease"]["ours"] is True

        # Idle, A keeps renewing (its lease job, every third of the duration): longer than a
        # lease lasts, and B still takes nothing over.
        before = lease_of(root)
        time.sleep(DURATION + SKEW + 0.5)
        renewed = lease_of(root)
        assert before is not None and renewed is not None
        assert renewed.token == before.token and renewed.expires > before.expires + DURATION
        assert renewed.expires > time.time() + SKEW
        assert second.deleted() == []

        # Node A dies without a word; its last lease stays written until it expires.
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        killed_at = time.time()
        last = lease_of(root)
        assert last is not None and last.host == "node-a"
        deleted_by_a = first.deleted()
        for _ in range(3):
            step += 1
            save(root, step)
            time.sleep(0.2)
        # Before A's lease expired (+ skew) B must not have touched anything.
        if time.time() < last.expires + SKEW - 0.2:
            assert second.deleted() == []
        wait_for(lambda: len(b.deleted()) == 3, 30, "B's deletions in its history")
        assert survivors(root) == list(range(step - KEEP + 1, step + 1))
        taken = lease_of(root)
        assert taken is not None and taken.host == "node-b"
        assert taken.acquired > last.expires + SKEW, "taken over before the lease had expired"
        assert taken.acquired > killed_at
        b_deletes = [r for r in second.history() if r["event"] == "delete"]
        assert b_deletes and min(_epoch(r["time"]) for r in b_deletes) > last.expires + SKEW
        # Nothing deleted twice, nothing lost: A's deletions, then B's, and the newest kept.
        deleted_by_b = second.deleted()
        assert not set(deleted_by_a) & set(deleted_by_b)
        everything = {f"checkpoint-{n}" for n in range(1, step + 1)}
        kept = {f"checkpoint-{n}" for n in survivors(root)}
        assert sorted(deleted_by_a + deleted_by_b) == sorted(everything - kept)
        assert second.status()["roots"][0]["lease"]["ours"] is True

        # A clean stop releases the lease: another node need not wait for it to expire.
        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(timeout=30) == 0
        released = lease_of(root)
        assert released is not None and released.host == "node-b" and released.expires == 0
    finally:
        first.stop()
        if second is not None:
            second.stop()


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


@pytest.mark.slow
def test_two_daemons_on_a_shared_local_folder(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    run_two_daemons(tmp_path, root, ckptd_command, cli_env)


# --- NFS over loopback --------------------------------------------------------------------


def nfs_unavailable() -> str | None:
    """Return exactly why this machine cannot serve and mount NFS over loopback, or None."""
    if os.geteuid() != 0:
        return "exporting and mounting NFS needs root"
    filesystems = Path("/proc/filesystems").read_text().split()
    if "nfsd" not in filesystems or "nfs" not in filesystems:
        modprobe = shutil.which("modprobe")
        modules = Path("/lib/modules") / os.uname().release
        if modprobe is None or not modules.is_dir():
            return (
                f"kernel {os.uname().release} has no NFS server/client (nfsd and nfs are not in"
                f" /proc/filesystems) and cannot load them: "
                f"{'no modprobe' if modprobe is None else 'modprobe present'},"
                f" {modules} {'missing' if not modules.is_dir() else 'present'}"
                " (a container without kernel modules)"
            )
        for module in ("nfsd", "nfs"):
            done = subprocess.run([modprobe, module], capture_output=True, text=True)
            if done.returncode != 0:
                return f"modprobe {module} failed: {done.stderr.strip()}"
    missing = [
        t for t in ("exportfs", "rpc.nfsd", "rpc.mountd", "mount.nfs") if not shutil.which(t)
    ]
    if missing:
        return (
            f"nfs-kernel-server is not installed (apt-get install nfs-kernel-server): no {missing}"
        )
    return None


@pytest.fixture
def nfs_root(tmp_path: Path) -> Iterator[Path]:
    """A tmp folder exported to 127.0.0.1 and mounted back over NFSv3 (no `shared:` needed
    there: auto sees nfs)."""
    reason = nfs_unavailable()
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
        ["mount", "-t", "nfs", "-o", "vers=3,nolock,actimeo=0", option, str(mount)],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=60)
        if done.returncode != 0 and step[0] != "rpcbind":
            subprocess.run(["exportfs", "-u", option], capture_output=True)
            pytest.skip(f"NFS over loopback could not be set up: {' '.join(step)}: {done.stderr}")
    try:
        (mount / "root").mkdir()
        yield mount / "root"
    finally:
        subprocess.run(["umount", "-f", str(mount)], capture_output=True)
        subprocess.run(["exportfs", "-u", option], capture_output=True)


@pytest.mark.slow
@pytest.mark.root
def test_two_daemons_on_an_nfs_mount(
    tmp_path: Path, nfs_root: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    run_two_daemons(tmp_path, nfs_root, ckptd_command, cli_env, shared="auto")


@pytest.mark.slow
def test_ckptd_prune_on_the_holders_machine_prunes_under_its_daemons_lease(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    """`ckptd prune -y` beside this node's daemon does not fight it for the lease (the root
    lock keeps the two apart); from another node's name it is refused (exit 3), naming the
    holder."""
    root = tmp_path / "root"
    root.mkdir()
    environment = dict(cli_env)
    environment["PYTHONPATH"] = str(REPOSITORY)
    manual = {"on_new_checkpoint": False}  # only `ckptd prune` deletes the new saves
    node = Node("node-a", tmp_path, root, ckptd_command, environment, True, manual)
    try:
        wait_for(lambda: (lease := lease_of(root)) and lease.host == "node-a", 30, "the lease")
        held = lease_of(root)
        assert held is not None and held.pid == node.process.pid
        for step in range(1, 7):
            save(root, step)
        other = node_config(
            tmp_path / "other.yaml", root, tmp_path / "other", "node-b", True, manual
        )
        prune = [*ckptd_command, "prune", "-y", "--config"]
        refused = subprocess.run(
            [*prune, str(other)], capture_output=True, text=True, env=environment, timeout=60
        )
        assert refused.returncode == 3, refused.stderr
        assert f"node-a pid {node.process.pid}" in refused.stderr + refused.stdout
        assert survivors(root) == [1, 2, 3, 4, 5, 6]
        done = subprocess.run(
            [*prune, str(node.config)], capture_output=True, text=True, env=environment, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert survivors(root) == [4, 5, 6]
        after = lease_of(root)
        assert after is not None and after.token == held.token  # still the daemon's lease
    finally:
        node.stop()
