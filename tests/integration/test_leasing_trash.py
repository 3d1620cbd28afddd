"""The lease of a shared root around a change outside `prune_root` (daemon/pruning/leasing.py,
`taken`, as `ckptd trash purge` and `restore` use it): refused with the holder named (exit 3)
when another node holds it, given back after the change when it took it, kept when this
process is the daemon; and a purge under a lease that is lost starts no further removal."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.errors import EXIT_REFUSED
from daemon.lease import PosixLease
from daemon.pruning import leasing, pipeline, trash
from daemon.pruning.leasing import LEASES
from tests.integration.test_leasing import DURATION, SKEW, make_root, shared_config


@pytest.fixture(autouse=True)
def fresh_leases() -> Iterator[None]:
    yield
    LEASES.keep = False
    LEASES.release_all()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    make_root(folder)
    return folder


def test_taken_refuses_naming_the_holder_and_takes_nothing(tmp_path: Path, root: Path) -> None:
    config = shared_config(tmp_path, root)
    other = PosixLease(str(root), DURATION, SKEW, host="node-other")
    assert other.acquire(time.time())
    with (
        pytest.raises(leasing.LeaseHeldElsewhere, match="node-other") as raised,
        leasing.taken(config, config.roots[0]),
    ):
        raise AssertionError("ran under a lease another node holds")
    assert raised.value.exit_code == EXIT_REFUSED
    assert raised.value.holder is not None and raised.value.holder.host == "node-other"
    holder = PosixLease(str(root)).holder()
    assert holder is not None and holder.token == other.token


def test_taken_gives_back_the_lease_it_took_and_keeps_a_daemons(tmp_path: Path, root: Path) -> None:
    config = shared_config(tmp_path, root)
    with leasing.taken(config, config.roots[0]) as lease:
        assert lease.refusal is None and lease.valid is not None
        holder = PosixLease(str(root)).holder()
        assert holder is not None and holder.host == "node-test" and holder.pid == os.getpid()
    assert PosixLease(str(root)).holder() is None
    # A lease this process held before (the daemon's, between prunes) stays held.
    LEASES.keep = True
    assert LEASES.maintain(config) == [str(root)]
    with leasing.taken(config, config.roots[0]):
        pass
    assert PosixLease(str(root)).holder() is not None


def test_a_purge_stops_before_its_next_removal_once_stopped(tmp_path: Path, root: Path) -> None:
    graced = shared_config(tmp_path, root, grace=3600)
    report = pipeline.prune_root(graced, graced.roots[0], now=time.time(), dry_run=False)
    assert report.refused is None and len(report.applied.trashed) == 4
    stop = threading.Event()
    stop.set()
    result = trash.purge(str(root), now=time.time(), grace=0.0, everything=True, stop=stop)
    assert result.removed == () and len(trash.list_trash(str(root))) == 4
    result = trash.purge(str(root), now=time.time(), grace=0.0, everything=True)
    assert len(result.removed) == 4 and trash.list_trash(str(root)) == []


def test_the_standby_line_says_until_when_or_that_the_lease_expired_within_the_skew() -> None:
    standby = leasing.Standby(host="node-a", pid=42, expires=1_800_000_000.0)
    assert standby.line(1_799_999_990.0) == (
        "this node is standby: node-a (pid 42) holds the lease until 2027-01-15T08:00:00+00:00;"
        " it prunes this root, this node applies nothing here"
    )
    assert "(expired at 2027-01-15T08:00:00+00:00; taken over once past the skew)" in (
        standby.line(1_800_000_001.0)
    )
    assert standby.to_json() == {
        "holder": {"host": "node-a", "pid": 42},
        "expires": "2027-01-15T08:00:00+00:00",
    }
