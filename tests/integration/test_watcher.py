"""The watcher on real folders: inotify and polling, new checkpoints, a root deleted and made again,
a root missing at start (and the mount it appears on), a dead observer restarted, the config file
replaced by rename, the inotify watch limit reached."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.service.watcher import (
    Watcher,
    WatchEvent,
    choose_mode,
    is_network_filesystem,
    mount_type,
)

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def events() -> queue.Queue[object]:
    return queue.Queue()


@pytest.fixture
def watcher(events: queue.Queue[object]) -> Iterator[Watcher]:
    watcher = Watcher(events)
    yield watcher
    watcher.stop()


def wait_for(
    events: queue.Queue[object], matches: Callable[[WatchEvent], bool], timeout: float = 5.0
) -> WatchEvent:
    deadline = time.monotonic() + timeout
    seen: list[object] = []
    while time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            continue
        seen.append(event)
        if isinstance(event, WatchEvent) and matches(event):
            return event
    raise AssertionError(f"no matching event within {timeout}s; saw {seen}")


def drain(events: queue.Queue[object]) -> list[WatchEvent]:
    found: list[WatchEvent] = []
    while True:
        try:
            item = events.get_nowait()
        except queue.Empty:
            return found
        assert isinstance(item, WatchEvent)
        found.append(item)


@pytest.mark.parametrize("setting", ["inotify", "poll"])
def test_new_checkpoint_and_its_marker_are_noticed(
    tmp_path: Path, events: queue.Queue[object], watcher: Watcher, setting: str
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    watcher.set_roots([(str(root), setting)])
    checkpoint = root / "checkpoint-100"
    checkpoint.mkdir()
    created = wait_for(events, lambda e: e.path == str(checkpoint) and e.kind == "created")
    assert created.root == str(root) and created.is_directory
    # Non-recursive: the marker one level down is only seen once the checkpoint is watched.
    watcher.watch_checkpoint(str(root), str(checkpoint))
    assert str(checkpoint) in watcher.watched_folders()
    (checkpoint / "trainer_state.json").write_text("{}")
    marker = wait_for(events, lambda e: e.path.endswith("trainer_state.json"))
    assert marker.root == str(root)
    watcher.forget_checkpoints(str(root))
    assert str(checkpoint) not in watcher.watched_folders()


def test_deeper_files_are_not_watched_recursively(
    tmp_path: Path, events: queue.Queue[object], watcher: Watcher
) -> None:
    root = tmp_path / "run"
    (root / "checkpoint-1").mkdir(parents=True)
    watcher.set_roots([(str(root), "inotify")])
    (root / "checkpoint-1" / "model.bin").write_bytes(b"x")
    (root / "checkpoint-2").mkdir()
    wait_for(events, lambda e: e.path.endswith("checkpoint-2"))
    assert not any(e.path.endswith("model.bin") for e in drain(events))


def test_root_deleted_and_recreated_is_watched_again(
    tmp_path: Path, events: queue.Queue[object], watcher: Watcher
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    watcher.set_roots([(str(root), "inotify")])
    shutil.rmtree(root)
    wait_for(events, lambda e: e.path == str(root) and e.kind == "deleted")
    root.mkdir()
    # Seen through the parent's watch, before any tick.
    wait_for(events, lambda e: e.path == str(root) and e.kind == "created")
    watcher.check()  # the tick notices the new inode and watches the new folder
    assert str(root) in watcher.watched_folders()
    (root / "checkpoint-5").mkdir()
    wait_for(events, lambda e: e.path == str(root / "checkpoint-5"))


def test_missing_root_is_waited_for(
    tmp_path: Path, events: queue.Queue[object], watcher: Watcher
) -> None:
    root = tmp_path / "later"
    watcher.set_roots([(str(root), "auto")])
    assert str(root) not in watcher.watched_folders()
    assert str(tmp_path) in watcher.watched_folders()
    root.mkdir()
    wait_for(events, lambda e: e.path == str(root) and e.kind == "created")
    watcher.check()
    assert str(root) in watcher.roots_present()
    (root / "checkpoint-1").mkdir()
    wait_for(events, lambda e: e.path == str(root / "checkpoint-1"))


def test_dead_observer_is_restarted(
    tmp_path: Path, events: queue.Queue[object], watcher: Watcher
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    watcher.set_roots([(str(root), "inotify")])
    observer = watcher._observers["inotify"]
    observer.stop()
    observer.join(5)
    assert not observer.is_alive()
    watcher.check()
    assert watcher._observers["inotify"] is not observer
    (root / "checkpoint-9").mkdir()
    wait_for(events, lambda e: e.path == str(root / "checkpoint-9"))


def test_config_replaced_by_rename_is_an_event(
    tmp_path: Path, events: queue.Queue[object], watcher: Watcher
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "config.yaml"
    config.write_text("roots: []\n")
    root = tmp_path / "run"
    root.mkdir()
    watcher.set_roots([(str(root), "inotify")], config_path=str(config))
    (etc / "other.txt").write_text("not the config")
    temporary = etc / ".config.yaml.swp"
    temporary.write_text("roots: []\n# edited\n")
    os.replace(temporary, config)
    event = wait_for(events, lambda e: e.root == str(config))
    assert event.dest_path == str(config) or event.path == str(config)
    assert not any(e.path.endswith("other.txt") for e in drain(events))


def test_two_roots_in_one_parent_each_get_their_own_events(
    tmp_path: Path, events: queue.Queue[object], watcher: Watcher
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    watcher.set_roots([(str(first), "inotify"), (str(second), "inotify")])
    shutil.rmtree(second)
    event = wait_for(events, lambda e: e.path == str(second) and e.kind == "deleted")
    assert event.root == str(second)
    watcher.check()
    (first / "checkpoint-1").mkdir()
    wait_for(events, lambda e: e.root == str(first) and e.path.endswith("checkpoint-1"))


def test_mount_type_detection() -> None:
    assert is_network_filesystem("nfs4")
    assert is_network_filesystem("lustre")
    assert is_network_filesystem("fuse.sshfs")
    assert is_network_filesystem("cifs")
    assert not is_network_filesystem("ext4")
    assert not is_network_filesystem("xfs")
    # The real mount table: "/" is always there, a missing path resolves to its ancestor's mount.
    assert mount_type("/") != ""
    assert mount_type("/no/such/folder/anywhere") == mount_type("/")
    assert choose_mode("/", "poll") == "poll"
    assert choose_mode("/", "inotify") == "inotify"


@pytest.mark.root
def test_tmpfs_is_inotify_and_nfs_type_would_poll(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to mount a tmpfs")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    if os.system(f"mount -t tmpfs -o size=1m tmpfs {mountpoint} 2>/dev/null") != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        assert mount_type(str(mountpoint / "run")) == "tmpfs"
        assert choose_mode(str(mountpoint / "run"), "auto") == "inotify"
    finally:
        os.system(f"umount {mountpoint}")


def test_events_after_a_move_into_the_trash_are_not_held_back(
    tmp_path: Path, watcher: Watcher, events: queue.Queue[object]
) -> None:
    """Each deletion renames a checkpoint into the (unwatched) trash: watchdog held that half a
    move for 0.5 s and every later event of the root behind it, so a trainer's next checkpoint
    folder was noticed late and its completion marker, written meanwhile, never (issue 9)."""
    root = tmp_path / "run"
    (root / "checkpoint-1").mkdir(parents=True)
    (root / ".ckptd-trash").mkdir()
    watcher.set_roots([(str(root), "inotify")])
    time.sleep(0.2)
    drain(events)
    delays = []
    for step in range(2, 7):
        os.rename(root / f"checkpoint-{step - 1}", root / ".ckptd-trash" / f"checkpoint-{step - 1}")
        (root / f"checkpoint-{step}").mkdir()
        made = time.monotonic()
        wait_for(events, lambda e, s=step: e.path == str(root / f"checkpoint-{s}"))
        delays.append(time.monotonic() - made)
    assert sorted(delays)[2] < 0.2, delays  # the median; it was 0.5 s


_WATCH_WITHOUT_INOTIFY = textwrap.dedent(
    """
    import json, os, queue, sys, time
    from daemon.logs import configure_logging
    from daemon.service.watcher import Watcher, WatchEvent
    configure_logging("info", "json")
    root = sys.argv[1]
    events = queue.Queue()
    watcher = Watcher(events)
    watcher.set_roots([(root, "inotify")])
    for _ in range(20):  # ten seconds' worth of the service's ticks
        watcher.check()
        time.sleep(0.02)
    os.mkdir(os.path.join(root, "checkpoint-1"))
    seen = False
    deadline = time.monotonic() + 8
    while not seen and time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            watcher.check()
            continue
        seen = isinstance(event, WatchEvent) and event.path.endswith("checkpoint-1")
    checkpoint = os.path.join(root, "checkpoint-1")
    watcher.watch_checkpoint(root, checkpoint)
    polled_checkpoint = checkpoint in watcher.watched_folders()
    watcher.forget_checkpoints(root)
    fallbacks = sorted(watcher._poll_fallback)
    watcher.stop()
    print(json.dumps({"seen": seen, "polled_checkpoint": polled_checkpoint,
                      "fallbacks": fallbacks}))
    """
)


def test_inotify_watch_limit_falls_back_to_polling_and_logs_once(tmp_path: Path) -> None:
    """inotify_add_watch failing with ENOSPC (a real limit of 0 watches, set in a user namespace
    of our own so the machine's limit is untouched): the root is polled, a new checkpoint is
    still noticed, and the failure is logged once, not at every tick."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is missing")
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            "echo 0 > /proc/sys/user/max_inotify_watches",
        ],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with its own inotify limit: {probe.stderr!r}")
    root = tmp_path / "run"
    root.mkdir()
    result = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            'echo 0 > /proc/sys/user/max_inotify_watches && exec "$0" -c "$1" "$2"',
            sys.executable,
            _WATCH_WITHOUT_INOTIFY,
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPOSITORY,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    log_events = [json.loads(line)["event"] for line in result.stderr.splitlines() if line]
    assert "inotify watch limit reached" in result.stderr
    assert outcome["seen"], result.stderr
    assert outcome["polled_checkpoint"], result.stderr
    # A finished checkpoint's fallback is forgotten with its watch (no growth over weeks).
    assert outcome["fallbacks"] == sorted([str(root), str(root.parent)])
    # One fallback line per folder (the root, its parent, the checkpoint), not one per tick.
    assert log_events.count("watch_fallback") == 3, log_events
    assert "watch_failed" not in log_events, log_events


def test_a_root_missing_at_start_gets_its_watch_mode_from_the_mount_it_appears_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root on an NFS mount that is not mounted yet when the daemon starts: its type was
    judged from the local folder above it (inotify). When the mount and the root appear, the
    mode must be judged again: polling, or other clients' writes are never seen."""
    import queue

    from daemon.service import watcher as watcher_module

    root = tmp_path / "mnt" / "run"
    mounted = threading.Event()

    def fake_mount_type(path: str) -> str:
        inside = os.path.realpath(path).startswith(str(tmp_path / "mnt"))
        return "nfs4" if mounted.is_set() and inside else "ext4"

    monkeypatch.setattr(watcher_module, "mount_type", fake_mount_type)
    watcher = watcher_module.Watcher(queue.Queue())
    try:
        watcher.set_roots([(str(root), "auto")])
        watcher.check()
        assert str(root) not in watcher.watched_folders()
        root.mkdir(parents=True)
        mounted.set()  # the NFS mount came up with the root on it
        watcher.check()
        assert str(root) in watcher.watched_folders()
        observer = watcher._active[str(root)][0]
        assert type(observer).__name__ == "PollingObserver", type(observer)
    finally:
        watcher.stop()
