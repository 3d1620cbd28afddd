"""Adversarial checks of the long-running daemon: resources running out, reloads, stopping."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]

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


def test_stop_during_a_long_snapshot_copy_exits_0_within_the_stop_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the start-up snapshot copies one big file on a slow device (each 8 MiB
    chunk takes 0.5 s): the copy is abandoned at the next chunk, nothing is left under a date
    name, and serve() returns 0 well within the stop timeout."""
    from daemon.fsio import TRASH_DIRECTORY
    from daemon.service.lifecycle import serve
    from daemon.snapshots import copying

    root, state, snapshots = tmp_path / "run", tmp_path / "state", tmp_path / "snapshots"
    folder = root / "checkpoint-100"
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.truncate(40 * copying.CHUNK)  # twenty seconds to copy at this speed
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 100}))
    old = time.time() - 3600
    for item in (*folder.iterdir(), folder):
        os.utime(item, (old, old))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""\
state_dir: {state}
history_file: {state}/history.jsonl
defaults:
  policy: {{keep_last: 5, tier2_count: 0, tier3_interval: null}}
  settle_seconds: 0.3
  min_keep: 1
roots:
  - path: {root}
    layout: hf
snapshots: {{enabled: true, at: "00:00", dir: {snapshots}, method: copy, keep: 3}}
disk: {{interval: 1h}}
"""
    )
    chunks: list[int] = []
    real_copy_range = copying._copy_range

    def slow_copy_range(source: int, destination: int, count: int) -> int:
        chunks.append(count)
        time.sleep(0.5)
        return real_copy_range(source, destination, count)

    monkeypatch.setattr(copying, "_copy_range", slow_copy_range)
    stop, reload = threading.Event(), threading.Event()
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            code=serve(
                str(config),
                stop=stop,
                reload=reload,
                tick=0.05,
                stop_timeout=3,
                configure_logs=False,
            )
        ),
        name="test-serve",
    )
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while len(chunks) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(chunks) >= 2, "the snapshot copy never started"
        stop.set()
        asked = time.monotonic()
        thread.join(10)
        took = time.monotonic() - asked
    finally:
        stop.set()
        thread.join(30)
    assert result.get("code") == 0, result
    assert took < 3, f"serve() took {took:.1f} s to stop"
    # The abandoned temporary folder went to the trash; nothing under a date or .tmp- name.
    assert [entry.name for entry in snapshots.iterdir()] in ([], [TRASH_DIRECTORY])
    assert (folder / "model.safetensors").stat().st_size == 40 * copying.CHUNK


def _serve_in_thread(config: Path, stop: threading.Event, reload: threading.Event) -> Any:
    from daemon.service.lifecycle import serve

    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            code=serve(
                str(config),
                stop=stop,
                reload=reload,
                tick=0.05,
                stop_timeout=10,
                configure_logs=False,
            )
        ),
        name="test-serve",
    )
    thread.start()
    return thread, result


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_reload_to_another_state_dir_moves_the_size_cache_there(tmp_path: Path) -> None:
    """A reload that changes `state_dir`: state.json and the size cache are both kept in the
    new folder from then on (the cache was still written to the old one)."""
    from daemon.discovery.sizecache import CACHE_FILE_NAME

    root = tmp_path / "run"
    for step in (1, 2):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w" * 1024)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        old = time.time() - 3600
        for item in (*folder.iterdir(), folder):
            os.utime(item, (old, old))
    config = tmp_path / "config.yaml"

    def write(state: Path) -> None:
        text = f"""\
state_dir: {state}
history_file: {tmp_path}/history.jsonl
defaults:
  policy: {{keep_last: 5, tier2_count: 0, tier3_interval: null}}
  settle_seconds: 0.3
  min_keep: 1
roots:
  - path: {root}
    layout: hf
snapshots: {{enabled: false}}
disk: {{interval: 1h}}
"""
        (tmp_path / "config.tmp").write_text(text)
        os.replace(tmp_path / "config.tmp", config)

    first, second = tmp_path / "state-a", tmp_path / "state-b"
    write(first)
    stop, reload = threading.Event(), threading.Event()
    thread, result = _serve_in_thread(config, stop, reload)
    try:
        assert _wait(lambda: "last_prune" in _state(first))
        write(second)
        reload.set()
        assert _wait(lambda: "last_prune" in _state(second))
    finally:
        stop.set()
        thread.join(15)
    assert result.get("code") == 0
    assert (second / CACHE_FILE_NAME).is_file(), sorted(p.name for p in second.iterdir())


def _state(state_dir: Path) -> dict[str, Any]:
    from daemon.state import read_state

    return dict(read_state(str(state_dir)))


def test_a_wedged_worker_stops_the_watchdog_pings_and_they_resume_when_it_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker hangs inside a prune (a hung mount, a deadlock) while its thread stays alive:
    WATCHDOG=1 must stop so systemd restarts the daemon (the main thread kept pinging, and the
    daemon never pruned again, silently); when the worker moves again, so do the pings."""
    import socket

    from daemon.pruning import pipeline
    from daemon.service import lifecycle
    from daemon.service.lifecycle import serve
    from daemon.service.sdnotify import Notifier

    monkeypatch.setattr(lifecycle, "WORKER_STUCK_SECONDS", 1.0, raising=False)
    entered, release = threading.Event(), threading.Event()
    real_prune_root = pipeline.prune_root

    def hanging_prune_root(*arguments: Any, **keywords: Any) -> Any:
        entered.set()
        release.wait(20)
        return real_prune_root(*arguments, **keywords)

    monkeypatch.setattr(pipeline, "prune_root", hanging_prune_root)
    root = tmp_path / "run"
    root.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""\
state_dir: {tmp_path}/state
history_file: {tmp_path}/history.jsonl
roots:
  - path: {root}
    layout: hf
snapshots: {{enabled: false}}
disk: {{interval: 1h}}
"""
    )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(0.05)
    pings: list[float] = []
    listening = threading.Event()

    def receive() -> None:
        while not listening.is_set():
            try:
                message = listener.recv(4096).decode()
            except TimeoutError:
                continue
            if "WATCHDOG=1" in message.split("\n"):
                pings.append(time.monotonic())

    receiver = threading.Thread(target=receive, name="test-notify-listener")
    receiver.start()
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"})
    stop, reload = threading.Event(), threading.Event()
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            code=serve(
                str(config),
                stop=stop,
                reload=reload,
                notifier=notifier,
                tick=0.05,
                stop_timeout=10,
                configure_logs=False,
            )
        ),
        name="test-serve",
    )
    thread.start()
    try:
        assert entered.wait(10), "the start-up prune never ran"
        time.sleep(1.5)  # past WORKER_STUCK_SECONDS: the pings have stopped by now
        wedged_since = time.monotonic()
        time.sleep(1.0)
        assert [at for at in pings if at > wedged_since] == [], "pinged for a wedged worker"
        release.set()
        assert _wait(lambda: any(at > wedged_since + 1.0 for at in pings), 5), "no pings again"
    finally:
        release.set()
        stop.set()
        thread.join(15)
        listening.set()
        receiver.join()
        listener.close()
    assert result.get("code") == 0


def test_ready_is_sent_after_the_startup_prune_not_after_a_long_startup_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started after `snapshots.at` with today's snapshot missing, the daemon takes it at
    start-up; copying one big file on a slow device takes longer than systemd's start timeout
    (90 s by default). READY=1 must not wait for it (systemd would kill the daemon as failed to
    start, restart it, and it would start the same copy again, forever)."""
    import socket

    from daemon.service.lifecycle import serve
    from daemon.service.sdnotify import Notifier
    from daemon.snapshots import copying

    root, state, snapshots = tmp_path / "run", tmp_path / "state", tmp_path / "snapshots"
    folder = root / "checkpoint-100"
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.truncate(40 * copying.CHUNK)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 100}))
    old = time.time() - 3600
    for item in (*folder.iterdir(), folder):
        os.utime(item, (old, old))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""\
state_dir: {state}
history_file: {state}/history.jsonl
roots:
  - path: {root}
    layout: hf
snapshots: {{enabled: true, at: "00:00", dir: {snapshots}, method: copy, keep: 3}}
disk: {{interval: 1h}}
"""
    )
    chunks: list[int] = []
    real_copy_range = copying._copy_range

    def slow_copy_range(source: int, destination: int, count: int) -> int:
        chunks.append(count)
        time.sleep(0.5)
        return real_copy_range(source, destination, count)

    monkeypatch.setattr(copying, "_copy_range", slow_copy_range)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(0.05)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    stop, reload = threading.Event(), threading.Event()
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(
            code=serve(
                str(config),
                stop=stop,
                reload=reload,
                notifier=notifier,
                tick=0.05,
                stop_timeout=10,
                configure_logs=False,
            )
        ),
        name="test-serve",
    )
    thread.start()
    ready_while_copying = False
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not ready_while_copying:
            try:
                message = listener.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in message.split("\n"):
                ready_while_copying = len(chunks) < 40
                break
    finally:
        stop.set()
        thread.join(15)
        listener.close()
    assert chunks, "the start-up snapshot never started copying"
    assert ready_while_copying, f"no READY=1 while the start-up copy ran ({len(chunks)} chunks)"
    assert result.get("code") == 0


def test_a_log_file_appended_in_the_root_does_not_postpone_pruning_forever(
    tmp_path: Path,
) -> None:
    """A trainer appending to a log file in the root every 0.1 s (LLaMA-Factory's
    trainer_log.jsonl lives in output_dir): each close is an event, so the root is never quiet
    for settle_seconds; new checkpoints must still be pruned, not only at the weekly run."""
    root = tmp_path / "run"
    root.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""\
state_dir: {tmp_path}/state
history_file: {tmp_path}/history.jsonl
defaults:
  policy: {{keep_last: 2, tier2_count: 0, tier3_interval: null}}
  settle_seconds: 0.3
  min_keep: 1
  max_delete_fraction: 1.0
  trash: {{grace: 0s}}
roots:
  - path: {root}
    layout: hf
snapshots: {{enabled: false}}
disk: {{interval: 1h}}
"""
    )
    stop, reload = threading.Event(), threading.Event()
    logging_done = threading.Event()

    def append_log() -> None:
        while not logging_done.wait(0.1):
            with open(root / "trainer_log.jsonl", "a") as handle:
                handle.write('{"loss": 1.0}\n')

    def steps() -> list[str]:
        return sorted(entry.name for entry in root.iterdir() if entry.name.startswith("check"))

    thread, result = _serve_in_thread(config, stop, reload)
    logger = threading.Thread(target=append_log, name="test-trainer-log")
    logger.start()
    try:
        time.sleep(1.0)  # started, the start-up prune found nothing
        for step in (1, 2, 3, 4):
            folder = root / f"checkpoint-{step}"
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"w" * 1024)
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        pruned = _wait(lambda: steps() == ["checkpoint-3", "checkpoint-4"], 8)
    finally:
        logging_done.set()
        logger.join()
        stop.set()
        thread.join(15)
    assert pruned, steps()
    assert result.get("code") == 0


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


def test_a_refusal_only_a_person_can_clear_is_not_retried_every_settle_period(
    tmp_path: Path,
) -> None:
    """`max_delete_fraction` refuses the root: retrying every settle period would write a
    prune_refused record every minute, day and night, and change nothing. It is retried at the
    next trigger (a new checkpoint, the schedule, a disk check), not on a timer."""
    root = tmp_path / "run"
    root.mkdir()
    past = time.time() - 3600
    for step in range(1, 11):
        folder = root / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"w" * 64)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for path in (*folder.iterdir(), folder):
            os.utime(path, (past, past))
    history = tmp_path / "history.jsonl"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""\
state_dir: {tmp_path}/state
history_file: {history}
defaults:
  policy: {{keep_last: 1, cadence: 1, tier2_count: 0, tier3_interval: null}}
  settle_seconds: 0.2
  min_keep: 1
  max_delete_fraction: 0.5
  trash: {{grace: 0s}}
roots:
  - path: {root}
    layout: hf
snapshots: {{enabled: false}}
disk: {{interval: 1h}}
"""
    )

    def refusals() -> list[dict[str, Any]]:
        if not history.exists():
            return []
        records = [json.loads(line) for line in history.read_text().splitlines()]
        return [record for record in records if record["event"] == "prune_refused"]

    stop, reload = threading.Event(), threading.Event()
    thread, result = _serve_in_thread(config, stop, reload)
    try:
        assert _wait(lambda: len(refusals()) >= 1, 10), "the start-up prune was not refused"
        time.sleep(3.0)  # fifteen settle periods
        count = len(refusals())
    finally:
        stop.set()
        thread.join(15)
    assert count == 1, refusals()
    assert "max_delete_fraction" in refusals()[0]["reason"]
    assert len(list(root.iterdir())) >= 10  # nothing deleted
    assert result.get("code") == 0
