"""One pruner per shared root, through `prune_root` (daemon/pruning/leasing.py): the prune of
a shared root takes the root's lease first, and refuses (recorded once per holder, naming its
host, PID and expiry) while another live holder has it; a dry run takes nothing; a holder
whose lease is taken over stops deleting. Also the config keys, `shared: auto` by mount type,
and `ckptd status` showing the holder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import Config, ConfigError, LeaseConfig, RootConfig, validate_text
from daemon.disk.mounts import is_shared_filesystem
from daemon.history.log import HistoryLog, read_records
from daemon.lease import LEASE_NAME, PosixLease
from daemon.pruning import leasing, pipeline
from daemon.pruning.leasing import LEASES, WhileHeld
from tests.configs import make_config, rotation, write_config

REPOSITORY = Path(__file__).resolve().parents[2]
DURATION, SKEW = 3.0, 1.0


def make_root(root: Path, count: int = 6) -> None:
    for step in range(1, count + 1):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.bin").write_bytes(b"m" * 100)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        old = time.time() - 7200
        os.utime(folder / "model.bin", (old, old))
        os.utime(folder / "trainer_state.json", (old, old))


def shared_config(
    tmp_path: Path, root: Path, shared: bool | str = True, grace: float = 0
) -> Config:
    return make_config(
        [root],
        layout="hf",
        root_settings={"shared": shared, "lease": {"duration": DURATION, "skew": SKEW}},
        state_dir=tmp_path / "state",
        node_name="node-test",
        policy=rotation(2),
        min_keep=1,
        max_delete_fraction=1.0,
        grace=grace,
        settle_seconds=0,
        verify={"checks": False},
    )


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))


@pytest.fixture(autouse=True)
def fresh_leases() -> Iterator[None]:
    """Each test starts with no lease in this process, and gives back what it took."""
    yield
    LEASES.release_all()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    make_root(folder)
    return folder


def other_node(root: Path) -> PosixLease:
    """The lease as another node takes it (another host name, another token)."""
    lease = PosixLease(str(root), DURATION, SKEW, host="node-other")
    assert lease.acquire(time.time())
    return lease


# --- config -------------------------------------------------------------------------------


def test_the_config_reads_shared_lease_and_node_name() -> None:
    config, _ = validate_text(
        "node_name: gpu-07\nsnapshots: {enabled: false}\n"
        "defaults:\n  shared: auto\n  lease: {duration: 10m, skew: 1m}\n"
        "roots:\n  - path: /data/a\n    shared: true\n  - path: /data/b\n    shared: false\n"
        "    lease: {duration: 2m, skew: 10s}\n"
    )
    assert config.node_name == "gpu-07"
    assert config.defaults.lease == LeaseConfig(duration=600, skew=60)
    assert [root.shared for root in config.roots] == [True, False]
    assert leasing.lease_settings(config, config.roots[0]) == LeaseConfig(duration=600, skew=60)
    assert leasing.lease_settings(config, config.roots[1]) == LeaseConfig(duration=120, skew=10)
    assert leasing.node_name(config) == "gpu-07"


@pytest.mark.parametrize(
    "text",
    [
        "defaults:\n  lease: {duration: 1m, skew: 30s}\n",  # the skew margins eat the lease
        "defaults:\n  shared: yes\n",
        "roots:\n  - path: /data/a\n    shared: maybe\n",
        "defaults:\n  lease: {duration: 0}\n",
    ],
)
def test_bad_lease_settings_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        validate_text(text)


def test_shared_auto_asks_the_mount_type(tmp_path: Path) -> None:
    for fstype in ("nfs", "nfs4", "lustre", "gpfs", "wekafs", "cephfs", "beegfs", "glusterfs"):
        assert is_shared_filesystem(fstype), fstype
    for fstype in ("fuse.sshfs", "fuse.gcsfuse", "fuse.juicefs", "fuse.ceph-fuse"):
        assert is_shared_filesystem(fstype), fstype
    for fstype in ("ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "fuse.lxcfs", "9p"):
        assert not is_shared_filesystem(fstype), fstype
    folder = tmp_path / "root"
    folder.mkdir()
    # This test's tmp folder is on a local filesystem: auto means not shared.
    assert not leasing.is_shared(
        shared_config(tmp_path, folder, "auto"), RootConfig(path=str(folder))
    )
    assert leasing.is_shared(
        shared_config(tmp_path, folder, True), shared_config(tmp_path, folder, True).roots[0]
    )
    remote = RootConfig(path="s3://bucket/run")
    assert leasing.is_shared(shared_config(tmp_path, folder, False), remote)


# --- prune_root ---------------------------------------------------------------------------


def test_a_shared_root_is_pruned_under_its_lease(tmp_path: Path, root: Path) -> None:
    config = shared_config(tmp_path, root)
    report = pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert report.refused is None
    assert names(root) == ["checkpoint-5", "checkpoint-6"]
    written = PosixLease(str(root), DURATION, SKEW).written()
    assert written is not None and written.host == "node-test" and written.pid == os.getpid()
    assert written.expires > time.time()
    assert LEASE_NAME in os.listdir(root)


def test_another_holder_refuses_the_prune_recorded_once_with_who_and_until_when(
    tmp_path: Path, root: Path
) -> None:
    config = shared_config(tmp_path, root)
    holder = other_node(root)
    history = HistoryLog(str(tmp_path / "history.jsonl"))
    for _ in range(3):
        report = pipeline.prune_root(
            config, config.roots[0], now=time.time(), dry_run=False, history=history
        )
        assert report.refused is not None and "node-other" in report.refused
        assert not report.refusal_transient
        assert report.deleted == ()
    assert len(names(root)) == 6  # nothing deleted: the other node prunes here
    records = [r for r in read_records(str(tmp_path / "history.jsonl"))]
    assert [r["event"] for r in records] == ["prune_refused"]  # once per holder, not per try
    record = records[0]
    assert record["holder_host"] == "node-other"
    assert record["holder_pid"] == os.getpid()
    assert record["lease_expires"].startswith(time.strftime("%Y-", time.gmtime()))
    assert record["root"] == os.path.realpath(root)
    # The holder goes away cleanly: the next prune takes the lease and prunes.
    holder.release()
    report = pipeline.prune_root(
        config, config.roots[0], now=time.time(), dry_run=False, history=history
    )
    assert report.refused is None and names(root) == ["checkpoint-5", "checkpoint-6"]


def test_an_expired_lease_is_taken_over_only_after_expiry_and_skew(
    tmp_path: Path, root: Path
) -> None:
    config = shared_config(tmp_path, root)
    other_node(root)  # taken, then never renewed (the node died)
    deadline = time.time() + DURATION + SKEW
    while time.time() < deadline - 0.3:
        report = pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False)
        assert report.refused is not None and len(names(root)) == 6
        time.sleep(0.2)
    time.sleep(max(0.0, deadline - time.time()) + 0.1)
    report = pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert report.refused is None and names(root) == ["checkpoint-5", "checkpoint-6"]


def test_a_dry_run_takes_no_lease_and_records_no_refusal(tmp_path: Path, root: Path) -> None:
    config = shared_config(tmp_path, root)
    history_path = tmp_path / "history.jsonl"
    report = pipeline.prune_root(
        config,
        config.roots[0],
        now=time.time(),
        dry_run=True,
        history=HistoryLog(str(history_path)),
    )
    assert report.refused is None and len(report.applied.would_delete) == 4
    assert LEASE_NAME not in os.listdir(root)  # looking takes nothing
    other_node(root)
    report = pipeline.prune_root(
        config,
        config.roots[0],
        now=time.time(),
        dry_run=True,
        history=HistoryLog(str(history_path)),
    )
    assert report.refused is not None and "node-other" in report.refused
    events = [r["event"] for r in read_records(str(history_path))]
    assert "prune_refused" not in events and "delete" not in events


def test_a_root_not_shared_takes_no_lease(tmp_path: Path, root: Path) -> None:
    config = shared_config(tmp_path, root, shared=False)
    other_node(root)  # a stray lease file says nothing about a root that is not shared
    report = pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert report.refused is None and names(root) == ["checkpoint-5", "checkpoint-6"]


def test_a_holder_whose_lease_was_taken_over_stops_deleting(tmp_path: Path, root: Path) -> None:
    config = shared_config(tmp_path, root)
    check = leasing.check(
        config, config.roots[0], dry_run=False, history=HistoryLog(str(tmp_path / "h"))
    )
    assert check.refusal is None
    stop = check.guard(None)
    assert isinstance(stop, WhileHeld) and not stop.is_set()
    # This node stalls (no renewal: a hung mount, a paused VM) beyond expiry + skew; another
    # node takes the lease over.
    time.sleep(DURATION + SKEW + 0.2)
    later = PosixLease(str(root), DURATION, SKEW, host="node-other")
    assert later.acquire(time.time())
    # The renewal the guard tries finds the lease gone: the prune must stop.
    assert stop.is_set()


def test_the_lease_job_renews_takes_over_and_releases(tmp_path: Path, root: Path) -> None:
    config = shared_config(tmp_path, root)
    holder = other_node(root)
    assert LEASES.maintain(config) == []  # held elsewhere: nothing taken
    holder.release()
    assert LEASES.maintain(config) == [str(root)]  # free now: taken, its root to be pruned
    first = PosixLease(str(root), DURATION, SKEW).written()
    time.sleep(0.05)
    assert LEASES.maintain(config) == []  # renewed, not newly taken
    second = PosixLease(str(root), DURATION, SKEW).written()
    assert first is not None and second is not None and second.expires > first.expires
    assert second.token == first.token
    LEASES.release_all()
    assert PosixLease(str(root), DURATION, SKEW).holder() is None


# --- status -------------------------------------------------------------------------------


def status_config(tmp_path: Path, root: Path) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        [root],
        layout="hf",
        root_settings={"shared": True, "lease": {"duration": DURATION, "skew": SKEW}},
        node_name="node-test",
    )


def status(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "status", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        env=dict(os.environ, COLUMNS="200"),
        timeout=60,
    )


def test_status_shows_the_lease_holder_and_that_it_is_not_this_daemon(
    tmp_path: Path, root: Path
) -> None:
    config = status_config(tmp_path, root)
    before = json.loads(status(config, "--json").stdout)["roots"][0]["lease"]
    assert before == {"shared": True, "node": "node-test", "holder": None, "ours": False}
    holder = other_node(root)
    lease = json.loads(status(config, "--json").stdout)["roots"][0]["lease"]
    assert lease["holder"] == {"host": "node-other", "pid": os.getpid()}
    assert lease["ours"] is False and lease["expired"] is False
    assert lease["expires"] == time.strftime(
        "%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(int(holder.expires))
    )
    table = status(config).stdout
    assert f"node-other pid {os.getpid()} holds it until" in table
    assert "this one (node-test) not" in table


def test_the_disk_check_empties_no_trash_of_a_root_another_node_holds(
    tmp_path: Path, root: Path
) -> None:
    from daemon.disk.pressure import _empty_trash_of
    from daemon.history.log import NULL_HISTORY
    from daemon.pruning import trash

    graced = shared_config(tmp_path, root, grace=3600)
    report = pipeline.prune_root(graced, graced.roots[0], now=time.time(), dry_run=False)
    assert report.refused is None and len(report.applied.trashed) == 4
    LEASES.release_all()
    other_node(root)
    with pytest.raises(leasing.LeaseHeldElsewhere, match="node-other"):
        _empty_trash_of(graced, graced.roots[0], now=time.time(), history=NULL_HISTORY)
    assert len(trash.list_trash(os.path.realpath(root))) == 4  # the holder's to purge


def take_and_die(root: Path, host: str) -> None:
    """A process of node `host` takes the lease and dies without giving it back (kill -9)."""
    script = (
        "import os, sys, time\n"
        "from daemon.lease import PosixLease\n"
        f"lease = PosixLease(sys.argv[1], {DURATION * 10}, {SKEW}, host=sys.argv[2])\n"
        "assert lease.acquire(time.time())\n"
        "os._exit(0)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(root), host],
        check=True,
        env=dict(os.environ, PYTHONPATH=str(REPOSITORY)),
        timeout=60,
    )


def test_a_dead_process_of_this_node_leaves_no_lease_to_wait_for(
    tmp_path: Path, root: Path
) -> None:
    """`ckptd prune` killed -9 on this node, then run again: its lease (valid for another
    half minute) names a process of this very node that is gone, so it is taken at once."""
    config = shared_config(tmp_path, root)
    take_and_die(root, "node-test")
    report = pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert report.refused is None and names(root) == ["checkpoint-5", "checkpoint-6"]


def test_a_dead_process_of_another_node_is_waited_for(tmp_path: Path, root: Path) -> None:
    """The same lease from another node: its PID means nothing here, so it must expire."""
    config = shared_config(tmp_path, root)
    take_and_die(root, "node-other")
    report = pipeline.prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert report.refused is not None and "node-other" in report.refused
    assert len(names(root)) == 6


def test_the_lease_job_runs_every_third_of_a_duration_only_with_a_shared_root(
    tmp_path: Path, root: Path
) -> None:
    from daemon.service.scheduler import build_triggers

    triggers = build_triggers(shared_config(tmp_path, root, shared=True))
    assert triggers["lease"].interval.total_seconds() == DURATION / 3
    assert "lease" not in build_triggers(shared_config(tmp_path, root, shared=False))
