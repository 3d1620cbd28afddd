"""Holds on real folders: the file format, several holders, validation, expiry, hostile paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from daemon import holds
from daemon.errors import EXIT_USAGE
from daemon.holds import HOLDS_DIRECTORY, HoldError

NOW = datetime(2026, 12, 5, 6, 0, tzinfo=UTC)
CET = timezone(timedelta(hours=1))
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    for step in (100, 200, 300):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (run / "ckpt-3.index").write_bytes(b"x")
    (run / "ckpt-3.data-00000-of-00001").write_bytes(b"x")
    return run


def hold_file(root: Path, name: str, holder: str) -> Path:
    return root / HOLDS_DIRECTORY / name / f"{holder}.json"


def test_a_placed_hold_is_one_json_file_and_reads_back_active(root: Path) -> None:
    until = datetime(2026, 12, 24, 0, 0, tzinfo=CET)
    hold = holds.place_hold(
        root, "checkpoint-200", "eval-sweep", until, "eval v3", now=NOW, given="2026-12-24T00:00"
    )
    path = hold_file(root, "checkpoint-200", "eval-sweep")
    document = json.loads(path.read_text())
    assert document["until"] == "2026-12-24T00:00:00+01:00"
    assert document["reason"] == "eval v3" and document["holder"] == "eval-sweep"
    assert document["given"] == "2026-12-24T00:00"
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval-sweep.json"]  # no temp left
    found = holds.read_holds(root, now=NOW)
    assert found.active == (hold,) and found.expired == () and found.malformed == ()
    assert found.held() == {"checkpoint-200"}
    assert found.reasons(CET) == {
        "checkpoint-200": ("held:eval-sweep until 2026-12-24T00:00+01:00",)
    }


def test_several_holders_hold_one_checkpoint_and_release_their_own(root: Path) -> None:
    until = NOW + timedelta(days=3)
    holds.place_hold(root, "checkpoint-100", "alice", until, now=NOW)
    holds.place_hold(root, "checkpoint-100", "eval-sweep", until + timedelta(days=1), now=NOW)
    held = holds.read_holds(root, now=NOW)
    assert [hold.holder for hold in held.of("checkpoint-100")] == ["alice", "eval-sweep"]
    assert holds.release_hold(root, "checkpoint-100", "alice") is True
    assert holds.release_hold(root, "checkpoint-100", "alice") is False  # nothing left to release
    remaining = holds.read_holds(root, now=NOW)
    assert [hold.holder for hold in remaining.active] == ["eval-sweep"]
    assert holds.release_hold(root, "checkpoint-100", "eval-sweep") is True
    assert not (root / HOLDS_DIRECTORY / "checkpoint-100").exists()  # the empty folder goes
    assert holds.read_holds(root, now=NOW).held() == frozenset()


def test_placing_again_replaces_the_holders_own_hold(root: Path) -> None:
    holds.place_hold(root, "checkpoint-300", "alice", NOW + timedelta(hours=1), now=NOW)
    holds.place_hold(root, "checkpoint-300", "alice", NOW + timedelta(days=9), "longer", now=NOW)
    (hold,) = holds.read_holds(root, now=NOW).active
    assert hold.until == NOW + timedelta(days=9) and hold.reason == "longer"


def test_a_hold_on_a_name_that_does_not_exist_is_a_usage_error(root: Path) -> None:
    until = NOW + timedelta(days=1)
    with pytest.raises(HoldError, match="no checkpoint named 'checkpoint-400'") as raised:
        holds.place_hold(root, "checkpoint-400", "alice", until, now=NOW)
    assert raised.value.exit_code == EXIT_USAGE
    assert not (root / HOLDS_DIRECTORY).exists()  # nothing written
    # A TensorFlow checkpoint is named by its prefix.
    holds.place_hold(root, "ckpt-3", "alice", until, now=NOW)
    # With the names a scan found, only those count.
    with pytest.raises(HoldError):
        holds.place_hold(root, "checkpoint-100", "bob", until, now=NOW, known_names={"ckpt-3"})
    for bad_name in ("", "..", ".ckptd-holds", "a/b", "../run"):
        with pytest.raises(HoldError):
            holds.place_hold(root, bad_name, "alice", until, now=NOW)
    os.symlink("checkpoint-100", root / "latest-link")
    with pytest.raises(HoldError, match="no checkpoint"):
        holds.place_hold(root, "latest-link", "alice", until, now=NOW)


def test_expiry_must_be_ahead_and_within_a_year_unless_forced(root: Path) -> None:
    with pytest.raises(HoldError, match="not in the future"):
        holds.place_hold(root, "checkpoint-100", "a", NOW - timedelta(seconds=1), now=NOW)
    with pytest.raises(HoldError, match="not in the future"):
        holds.place_hold(root, "checkpoint-100", "a", NOW, now=NOW)
    far = NOW + timedelta(days=365, minutes=1)
    with pytest.raises(HoldError, match="more than a year ahead: add --force"):
        holds.place_hold(root, "checkpoint-100", "a", far, now=NOW)
    holds.place_hold(root, "checkpoint-100", "a", NOW + timedelta(days=365), now=NOW)
    holds.place_hold(root, "checkpoint-100", "b", far, now=NOW, force=True)
    assert len(holds.read_holds(root, now=NOW).active) == 2
    for bad_holder in ("", "-x", "a b", "x" * 65, "a/b", ".hidden", "x.json"):
        with pytest.raises(HoldError, match="holder"):
            holds.place_hold(root, "checkpoint-100", bad_holder, far, now=NOW, force=True)


def test_expiry_in_the_holders_words() -> None:
    assert holds.expiry(until=None, duration="6h", now=NOW) == (NOW + timedelta(hours=6), "6h")
    assert holds.parse_duration("1d12h") == timedelta(hours=36)
    assert holds.parse_duration("90m") == timedelta(minutes=90)
    assert holds.parse_duration("1.5h") == timedelta(minutes=90)
    assert holds.parse_duration("2w") == timedelta(days=14)
    for bad in ("", "6", "h", "6 hours", "0h", "6h tomorrow", "-1h", "6y"):
        with pytest.raises(HoldError):
            holds.parse_duration(bad)
    naive, words = holds.expiry(until="2026-12-24T00:00", duration=None, now=NOW, tz=CET)
    assert naive == datetime(2026, 12, 24, tzinfo=CET) and words == "2026-12-24T00:00"
    assert holds.parse_time("2026-12-24", CET) == datetime(2026, 12, 24, tzinfo=CET)
    assert holds.parse_time("2026-12-24T00:00Z", CET) == datetime(2026, 12, 24, tzinfo=UTC)
    with pytest.raises(HoldError):
        holds.expiry(until="2026-12-24", duration="6h", now=NOW)
    with pytest.raises(HoldError):
        holds.expiry(until=None, duration=None, now=NOW)
    with pytest.raises(HoldError):
        holds.parse_time("christmas")


def test_a_hold_written_by_hand_as_documented_is_read(root: Path) -> None:
    # The recipe of the module docstring, run by a shell as a person would.
    script = textwrap.dedent(
        f"""
        d={root}/.ckptd-holds/checkpoint-300 && mkdir -p "$d"
        printf '{{"until": "2026-12-24T00:00", "reason": "eval"}}\\n' > "$d/.eval.json.tmp"
        mv "$d/.eval.json.tmp" "$d/eval.json"
        """
    )
    subprocess.run(["sh", "-c", script], check=True)
    (hold,) = holds.read_holds(root, now=NOW, tz=CET).active
    assert (hold.checkpoint, hold.holder, hold.reason) == ("checkpoint-300", "eval", "eval")
    assert hold.until == datetime(2026, 12, 24, tzinfo=CET)  # no offset: the daemon's zone
    assert holds.release_hold(root, "checkpoint-300", "eval")


def test_malformed_hold_files_are_reported_and_still_hold(root: Path) -> None:
    folder = root / HOLDS_DIRECTORY / "checkpoint-100"
    folder.mkdir(parents=True)
    (folder / "typo.json").write_text('{"until": "2026-12-24T00:00",')
    (folder / "nountil.json").write_text('{"reason": "forgot"}')
    (folder / "liar.json").write_text('{"until": "2027-01-01T00:00Z", "holder": "bob"}')
    os.mkfifo(folder / "pipe.json")
    outside = root.parent / "outside.json"
    outside.write_text('{"until": "2030-01-01T00:00Z"}')
    os.symlink(outside, folder / "link.json")
    (folder / "notes.txt").write_text("not a hold")
    (root / HOLDS_DIRECTORY / "checkpoint-200.json").write_text('{"until": "2030-01-01T00:00Z"}')
    found = holds.read_holds(root, now=NOW)  # a FIFO must not hang this (pytest timeout)
    assert found.active == ()
    problems = {bad.path.rsplit("/", 1)[-1]: bad.problem for bad in found.malformed}
    assert "not valid JSON" in problems["typo.json"]
    assert 'no "until"' in problems["nountil.json"]
    assert "says holder 'bob'" in problems["liar.json"]
    assert problems["pipe.json"] == "not a regular file"
    assert "symbolic link" in problems["link.json"]
    assert "not a <holder>.json" in problems["notes.txt"]
    assert "not a folder" in problems["checkpoint-200.json"]
    assert found.held() == {"checkpoint-100"}  # unreadable holds still keep their checkpoint
    reasons = found.reasons()["checkpoint-100"]
    assert any(reason.startswith("held:typo (unreadable hold:") for reason in reasons)
    # Expiry never removes what it cannot read.
    assert holds.expire_holds(root, now=NOW + timedelta(days=3650)).removed == ()
    assert (folder / "typo.json").exists() and outside.exists()


def test_expired_holds_are_removed_by_expire_and_returned_for_the_history(root: Path) -> None:
    holds.place_hold(root, "checkpoint-100", "short", NOW + timedelta(hours=1), "x", now=NOW)
    holds.place_hold(root, "checkpoint-100", "long", NOW + timedelta(days=2), now=NOW)
    holds.place_hold(root, "checkpoint-200", "short", NOW + timedelta(hours=2), now=NOW)
    later = NOW + timedelta(hours=3)
    found = holds.read_holds(root, now=later)
    assert [(h.checkpoint, h.holder) for h in found.expired] == [
        ("checkpoint-100", "short"),
        ("checkpoint-200", "short"),
    ]
    assert found.held() == {"checkpoint-100"}
    result = holds.expire_holds(root, now=later.timestamp())  # a float `now` works too
    assert [(h.checkpoint, h.holder) for h in result.removed] == [
        ("checkpoint-100", "short"),
        ("checkpoint-200", "short"),
    ]
    assert result.removed[0].to_record() == {
        "checkpoint": "checkpoint-100",
        "holder": "short",
        "until": (NOW + timedelta(hours=1)).isoformat(),
        "reason": "x",
    }
    assert not hold_file(root, "checkpoint-100", "short").exists()
    assert hold_file(root, "checkpoint-100", "long").exists()
    assert not (root / HOLDS_DIRECTORY / "checkpoint-200").exists()
    assert holds.expire_holds(root, now=later).removed == ()


def test_a_hold_renewed_while_expiring_is_put_back(root: Path) -> None:
    holds.place_hold(root, "checkpoint-100", "alice", NOW + timedelta(hours=1), now=NOW)
    later = NOW + timedelta(hours=2)
    folder_path = root / HOLDS_DIRECTORY / "checkpoint-100"
    folder = os.open(folder_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen = holds._read_file(folder, "checkpoint-100", "alice", "alice.json", None)
        assert seen.hold is not None and seen.hold.expired(later)
        # alice renews between expire's read and its rename
        holds.place_hold(root, "checkpoint-100", "alice", later + timedelta(days=1), now=later)
        taken = holds._take_if_still_expired(folder, "alice.json", seen, later, None)
    finally:
        os.close(folder)
    assert taken is None
    (hold,) = holds.read_holds(root, now=later).active
    assert hold.until == later + timedelta(days=1)
    assert sorted(p.name for p in folder_path.iterdir()) == ["alice.json"]


def test_symlinked_holds_folders_are_never_followed(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, root / HOLDS_DIRECTORY)
    with pytest.raises(HoldError, match="not a folder"):
        holds.place_hold(root, "checkpoint-100", "alice", NOW + timedelta(days=1), now=NOW)
    assert list(elsewhere.iterdir()) == []
    (bad,) = holds.read_holds(root, now=NOW).malformed
    assert bad.checkpoint is None and "not a folder" in bad.problem
    assert holds.expire_holds(root, now=NOW).removed == ()
    os.unlink(root / HOLDS_DIRECTORY)
    (root / HOLDS_DIRECTORY).mkdir()
    os.symlink(elsewhere, root / HOLDS_DIRECTORY / "checkpoint-100")
    with pytest.raises(HoldError, match="not a folder"):
        holds.place_hold(root, "checkpoint-100", "alice", NOW + timedelta(days=1), now=NOW)
    assert list(elsewhere.iterdir()) == []
    assert holds.release_hold(root, "checkpoint-200", "alice") is False


def test_concurrent_holders_and_a_releaser_lose_no_hold(root: Path) -> None:
    # Six processes place their own hold on one checkpoint while a seventh keeps placing and
    # releasing its own (its release removes the folder whenever it is momentarily empty).
    code = textwrap.dedent(
        """
        import sys
        from datetime import UTC, datetime, timedelta
        from daemon import holds
        root, holder, churn = sys.argv[1], sys.argv[2], sys.argv[3] == "churn"
        now = datetime.now(UTC)
        for _ in range(60 if churn else 1):
            holds.place_hold(root, "checkpoint-100", holder, now + timedelta(days=1), now=now)
            if churn:
                holds.release_hold(root, "checkpoint-100", holder)
        """
    )
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(root), "churner", "churn"], env=environment
        )
    ]
    processes += [
        subprocess.Popen([sys.executable, "-c", code, str(root), f"h{n}", "once"], env=environment)
        for n in range(6)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0
    found = holds.read_holds(root, now=datetime.now(UTC))
    assert sorted(hold.holder for hold in found.active) == [f"h{n}" for n in range(6)]
    assert found.malformed == ()
    leftovers = [p.name for p in (root / HOLDS_DIRECTORY / "checkpoint-100").iterdir()]
    assert all(not name.startswith(".") for name in leftovers)


def test_a_hold_is_never_written_into_a_folder_a_release_just_removed(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race the retry exists for, made certain: the checkpoint's folder (empty after another
    # holder's release) is removed between place_hold opening it and writing the file in.
    original = holds._write_atomically
    calls = []

    def removed_meanwhile(folder: int, *args: object) -> None:
        calls.append(folder)
        if len(calls) == 1:
            os.rmdir(root / HOLDS_DIRECTORY / "checkpoint-100")
        original(folder, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(holds, "_write_atomically", removed_meanwhile)
    holds.place_hold(root, "checkpoint-100", "alice", NOW + timedelta(days=1), now=NOW)
    assert len(calls) == 2  # written again into the new folder
    assert hold_file(root, "checkpoint-100", "alice").exists()
    assert [hold.holder for hold in holds.read_holds(root, now=NOW).active] == ["alice"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_as_root_new_hold_files_belong_to_the_roots_owner(root: Path) -> None:
    os.chown(root, 4321, 4321)
    holds.place_hold(root, "checkpoint-100", "alice", NOW + timedelta(days=1), now=NOW)
    folder = root / HOLDS_DIRECTORY / "checkpoint-100"
    for path in (root / HOLDS_DIRECTORY, folder, folder / "alice.json"):
        status = path.stat()
        assert (status.st_uid, status.st_gid) == (4321, 4321), path
