"""One pruner per root: the POSIX lease file between real processes, on a local folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.lease import LEASE_NAME, LeaseError, LeaseInfo, PosixLease
from tests.s3server import REPOSITORY

T0 = 1_800_000_000.0

# A contender: reads "<kind> <root or url> <now>" lines, answers whether acquire() won.
CONTENDER = textwrap.dedent(
    """
    import json, sys
    from daemon.lease import ObjectLease, PosixLease
    options = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    for line in sys.stdin:
        kind, where, now = line.split()
        if kind == "posix":
            lease = PosixLease(where, duration=60, skew=10)
        else:
            from daemon.storage import open_store
            url, store = open_store(where, options)
            lease = ObjectLease(store, url, duration=60, skew=10)
        print(json.dumps([lease.acquire(float(now)), lease.token]), flush=True)
    """
)


class Contenders:
    """Several long-lived processes, each a would-be pruner; asked all at once per round."""

    def __init__(self, count: int, options: dict[str, object] | None = None) -> None:
        environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-c", CONTENDER, json.dumps(options or {})],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=environment,
            )
            for _ in range(count)
        ]

    def race(self, kind: str, where: str, now: float) -> list[tuple[bool, str]]:
        """Send every process the same request before reading any answer."""
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(f"{kind} {where} {now}\n")
            process.stdin.flush()
        answers = []
        for process in self.processes:
            assert process.stdout is not None
            won, token = json.loads(process.stdout.readline())
            answers.append((bool(won), str(token)))
        return answers

    def close(self) -> None:
        for process in self.processes:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.close()
            process.wait(timeout=30)
            process.stdout.close()


@pytest.fixture
def contenders() -> Iterator[Contenders]:
    group = Contenders(4)
    try:
        yield group
    finally:
        group.close()


def held_by(root: Path) -> LeaseInfo | None:
    return LeaseInfo.decode((root / LEASE_NAME).read_bytes())


def test_four_processes_race_for_a_new_lease_and_exactly_one_wins(
    tmp_path: Path, contenders: Contenders
) -> None:
    for round_number in range(15):
        root = tmp_path / f"root{round_number}"
        root.mkdir()
        answers = contenders.race("posix", str(root), T0)
        winners = [token for won, token in answers if won]
        assert len(winners) == 1, answers
        holder = held_by(root)
        assert holder is not None and holder.token == winners[0]
        # Nothing but the lease is left behind (temporary files and claims are cleaned up).
        assert sorted(p.name for p in root.iterdir()) == [LEASE_NAME]


def test_four_processes_race_to_take_over_an_expired_lease_and_exactly_one_wins(
    tmp_path: Path, contenders: Contenders
) -> None:
    for round_number in range(15):
        root = tmp_path / f"root{round_number}"
        root.mkdir()
        assert PosixLease(str(root), duration=60, skew=10).acquire(T0)
        # Long after its expiry (T0 + 60 + 10): everybody tries to take it over at once.
        answers = contenders.race("posix", str(root), T0 + 1000)
        winners = [token for won, token in answers if won]
        assert len(winners) == 1, answers
        holder = held_by(root)
        assert holder is not None and holder.token == winners[0]
        assert holder.expires == T0 + 1060


def test_a_live_lease_is_not_taken_and_an_expired_one_is_handed_over(tmp_path: Path) -> None:
    first = PosixLease(str(tmp_path), duration=60, skew=10, host="node-a")
    second = PosixLease(str(tmp_path), duration=60, skew=10, host="node-b")
    assert first.acquire(T0)
    assert first.valid(T0 + 49) and not first.valid(T0 + 50), "the holder stops skew early"
    assert not second.acquire(T0 + 1)
    assert not second.acquire(T0 + 69), "within the skew margin after expiry: still held"
    holder = second.holder()
    assert holder is not None
    assert (holder.host, holder.pid, holder.expires) == ("node-a", os.getpid(), T0 + 60)

    assert second.acquire(T0 + 71)
    assert second.valid(T0 + 72)
    assert not first.renew(T0 + 72), "the old holder learns it lost the lease"
    assert not first.held and not first.valid(T0 + 72)
    assert not first.acquire(T0 + 72)
    holder = first.holder()
    assert holder is not None and holder.host == "node-b"


def test_renewal_keeps_the_lease_past_its_first_expiry(tmp_path: Path) -> None:
    holder = PosixLease(str(tmp_path), duration=60, skew=10)
    other = PosixLease(str(tmp_path), duration=60, skew=10)
    assert holder.acquire(T0)
    assert not holder.renewal_due(T0 + 19) and holder.renewal_due(T0 + 20)
    assert holder.renew(T0 + 20)
    # Without the renewal, T0 + 75 would be past expiry plus skew (T0 + 70).
    assert not other.acquire(T0 + 75)
    assert holder.valid(T0 + 69)
    assert holder.renew(T0 + 75)
    assert not other.acquire(T0 + 140)
    assert other.acquire(T0 + 146)


def test_release_lets_another_daemon_take_it_at_once(tmp_path: Path) -> None:
    first = PosixLease(str(tmp_path), duration=60, skew=10)
    assert first.acquire(T0)
    first.release()
    assert not first.held and first.holder() is None
    assert PosixLease(str(tmp_path), duration=60, skew=10).acquire(T0 + 1)


def test_a_half_written_lease_counts_from_its_mtime(tmp_path: Path) -> None:
    # A daemon that crashed while writing by hand, or a foreign file: unreadable content.
    (tmp_path / LEASE_NAME).write_bytes(b"")
    now = (tmp_path / LEASE_NAME).stat().st_mtime
    lease = PosixLease(str(tmp_path), duration=60, skew=10)
    assert not lease.acquire(now + 5)
    assert lease.acquire(now + 71)


def test_a_claim_left_by_a_crashed_daemon_is_swept_once_old(tmp_path: Path) -> None:
    lease = PosixLease(str(tmp_path), duration=60, skew=10)
    assert lease.acquire(T0)
    # Crash between winning the claim on the current state and renaming: the claim stays.
    import hashlib

    state = lease._read()
    assert state is not None
    digest = hashlib.sha256(state.version.encode()).hexdigest()[:32]
    claim = tmp_path / f"{LEASE_NAME}.claim-{digest}"
    claim.write_text("crashed")
    assert not lease.renew(T0 + 1), "the claim blocks the transition out of this state"
    os.utime(claim, (0, 0))  # ...until it is older than any live transition
    assert not lease.acquire(T0 + 2)  # this attempt sweeps it
    assert not claim.exists()
    assert lease.acquire(T0 + 3)


@pytest.mark.parametrize("kind", ["symlink", "folder"])
def test_something_else_in_the_lease_place_is_refused(tmp_path: Path, kind: str) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"planted": True}))
    root = tmp_path / "root"
    root.mkdir()
    if kind == "symlink":
        (root / LEASE_NAME).symlink_to(elsewhere)
    else:
        (root / LEASE_NAME).mkdir()
    with pytest.raises(LeaseError, match="refusing"):
        PosixLease(str(root)).acquire(T0)
    assert json.loads(elsewhere.read_text()) == {"planted": True}


def test_duration_must_exceed_twice_the_skew(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="twice the skew"):
        PosixLease(str(tmp_path), duration=20, skew=10)
