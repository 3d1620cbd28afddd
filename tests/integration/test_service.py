"""`serve()` in-process on real folders: prune after a new checkpoint settles, at start-up, reload
on SIGHUP-equivalent and on an edit of the config file, a bad config keeps the old one, stop
returns 0; sd_notify checked on a real datagram listener. Resources running out: a long snapshot
copy delays neither READY=1 nor stopping, a wedged worker stops the watchdog pings, a log file
appended in the root does not postpone pruning, a refusal is not retried on a timer."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.discovery.sizecache import CACHE_FILE_NAME
from daemon.disk.pressure import DiskReport
from daemon.fsio import TRASH_DIRECTORY
from daemon.pruning import pipeline
from daemon.service import lifecycle
from daemon.service.lifecycle import serve
from daemon.service.sdnotify import Notifier
from daemon.snapshots import copying
from daemon.state import read_state
from policies.model import PolicySpec
from tests.configs import rotation, write_config
from tests.layouts_fixtures import write_file

SETTLE = 0.3


# What every daemon of these tests runs with, besides its policy (tests/configs.py writes it).
DAEMON: dict[str, Any] = {
    "log": {"level": "debug", "format": "json"},
    "settle_seconds": SETTLE,
    "min_keep": 1,
    "max_delete_fraction": 1.0,
    "grace": "0s",
    "layout": "hf",
    "disk": {"interval": "1h"},
}


def save_checkpoint(root: Path, step: int) -> None:
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    write_file(folder / "model.safetensors", 1024)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    # Settled at once, yet written after the checkpoints saved before it: an mtime older than
    # theirs would say a restart wrote it (policies/lineage.py).
    old = time.time() - 2 * SETTLE
    for item in (*folder.iterdir(), folder):
        os.utime(item, (old, old))


def steps_in(root: Path) -> list[int]:
    return sorted(
        int(entry.name.split("-")[1])
        for entry in root.iterdir()
        if entry.name.startswith("checkpoint-")
    )


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _serve_in_thread(
    config: Path, stop: threading.Event, reload: threading.Event, **options: Any
) -> tuple[threading.Thread, dict[str, object]]:
    """Given a config and the events, start serve() in a thread (options: serve's keywords);
    return the thread and the dict its exit code lands in."""
    keywords: dict[str, Any] = {"tick": 0.05, "stop_timeout": 10, "configure_logs": False}
    keywords.update(options)
    result: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: result.update(code=serve(str(config), stop=stop, reload=reload, **keywords)),
        name="test-serve",
    )
    thread.start()
    return thread, result


class Listener:
    def __init__(self, path: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(path)
        self.socket.settimeout(0.1)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="test-notify-listener")
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except TimeoutError:
                continue

    def lines(self) -> list[str]:
        return [line for message in list(self.messages) for line in message.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


@pytest.fixture
def daemon_setup(tmp_path: Path) -> Iterator[dict[str, object]]:
    root = tmp_path / "run"
    root.mkdir()
    state = tmp_path / "state"
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    listener = Listener(str(tmp_path / "notify.sock"))
    stop, reload = threading.Event(), threading.Event()
    result: dict[str, object] = {
        "root": root,
        "state": state,
        "config": config,
        "listener": listener,
        "stop": stop,
        "reload": reload,
    }

    def start() -> threading.Thread:
        notifier = Notifier(
            {"NOTIFY_SOCKET": listener.socket.getsockname(), "WATCHDOG_USEC": "400000"}
        )

        def run() -> None:
            result["exit"] = serve(
                str(config),
                stop=stop,
                reload=reload,
                notifier=notifier,
                tick=0.05,
                stop_timeout=10,
                configure_logs=False,
            )

        thread = threading.Thread(target=run, name="test-serve")
        thread.start()
        result["thread"] = thread
        return thread

    result["start"] = start
    yield result
    stop.set()
    thread = result.get("thread")
    if isinstance(thread, threading.Thread):
        thread.join(15)
    listener.close()


def test_daemon_prunes_at_startup_after_new_checkpoints_and_reloads(
    daemon_setup: dict[str, object],
) -> None:
    root: Path = daemon_setup["root"]  # type: ignore[assignment]
    state: Path = daemon_setup["state"]  # type: ignore[assignment]
    config: Path = daemon_setup["config"]  # type: ignore[assignment]
    listener: Listener = daemon_setup["listener"]  # type: ignore[assignment]
    stop: threading.Event = daemon_setup["stop"]  # type: ignore[assignment]
    reload: threading.Event = daemon_setup["reload"]  # type: ignore[assignment]
    for step in range(1, 9):
        save_checkpoint(root, step * 10)
    write_config(config, [root], state_dir=state, policy=rotation(3), **DAEMON)
    thread: threading.Thread = daemon_setup["start"]()  # type: ignore[operator]

    # Start-up prune, then READY.
    assert wait_until(lambda: "READY=1" in listener.lines())
    assert steps_in(root) == [60, 70, 80]
    assert wait_until(lambda: "WATCHDOG=1" in listener.lines(), 3)
    saved = read_state(str(state))
    assert saved["pid"] == os.getpid() and "prune" in saved["next"]

    # A new checkpoint: pruned once it has settled.
    folder = root / "checkpoint-90"
    folder.mkdir()
    write_file(folder / "model.safetensors", 1024)
    time.sleep(SETTLE / 2)
    assert steps_in(root) == [60, 70, 80, 90]  # nothing while it is being written
    (folder / "trainer_state.json").write_text("{}")
    assert wait_until(lambda: steps_in(root) == [70, 80, 90], 5 + SETTLE)
    # state.json is written once prune_root has returned, a moment after the rename.
    assert wait_until(lambda: read_state(str(state))["last_prune"]["deleted"] == 1, 5)

    # A broken config on SIGHUP: logged, the old one stays in force.
    config.write_text("defaults: {settle_seconds: soon}\nroots: 7\n")
    reload.set()
    assert wait_until(lambda: any("config error" in line for line in listener.lines()))
    assert "RELOADING=1" in listener.lines()
    save_checkpoint(root, 100)
    assert wait_until(lambda: steps_in(root) == [80, 90, 100], 5)

    # A valid edit, no signal: the file watch reloads it and the new policy applies at once.
    write_config(config, [root], state_dir=state, policy=rotation(2), **DAEMON)
    assert wait_until(lambda: steps_in(root) == [90, 100], 5)
    assert thread.is_alive()

    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    assert daemon_setup["exit"] == 0
    assert "STOPPING=1" in listener.lines()
    history = [json.loads(line) for line in (state / "history.jsonl").read_text().splitlines()]
    assert sum(1 for record in history if record["event"] == "delete") == 8


def test_invalid_config_at_start_is_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("roots:\n  - path: /x\n    layout: nonsense\n")
    code = serve(
        str(config), stop=threading.Event(), reload=threading.Event(), configure_logs=False
    )
    assert code == 2


def test_missing_root_is_waited_for_then_pruned(daemon_setup: dict[str, object]) -> None:
    root: Path = daemon_setup["root"]  # type: ignore[assignment]
    state: Path = daemon_setup["state"]  # type: ignore[assignment]
    config: Path = daemon_setup["config"]  # type: ignore[assignment]
    listener: Listener = daemon_setup["listener"]  # type: ignore[assignment]
    root.rmdir()
    write_config(config, [root], state_dir=state, policy=rotation(2), **DAEMON)
    daemon_setup["start"]()  # type: ignore[operator]
    assert wait_until(lambda: "READY=1" in listener.lines())
    staging = root.parent / "staging"
    staging.mkdir()
    for step in (1, 2, 3, 4):
        save_checkpoint(staging, step)
    os.rename(staging, root)  # the root appears, full of checkpoints
    assert wait_until(lambda: steps_in(root) == [3, 4], 5)


def test_a_failing_job_is_logged_with_its_traceback_and_the_daemon_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk job raises on its first run: logged with the traceback; the next run happens."""
    import io

    from daemon.logs import configure_logging

    calls: list[float] = []

    def check_disks(config: object, *, now: float, history: object, prune: object) -> DiskReport:
        calls.append(now)
        if len(calls) == 1:
            raise OSError("statvfs failed on purpose")
        return DiskReport(now, ())

    monkeypatch.setattr("daemon.service.worker.check_disks", check_disks)
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    config = tmp_path / "config.yaml"
    write_config(config, disk={"interval": "1s"})
    stop, reload = threading.Event(), threading.Event()
    result: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "exit",
            serve(str(config), stop=stop, reload=reload, tick=0.05, configure_logs=False),
        ),
        name="test-serve-jobs",
    )
    thread.start()
    try:
        assert wait_until(lambda: len(calls) >= 2, 10), calls
    finally:
        stop.set()
        thread.join(15)
    assert result["exit"] == 0
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    failures = [record for record in records if record["event"] == "job_failed"]
    assert failures and failures[0]["job"] == "disk"
    assert "statvfs failed on purpose" in failures[0]["traceback"]
    assert "in check_disks" in failures[0]["traceback"]  # the frames, down to the failing one
    state = read_state(str(tmp_path / "state"))
    assert "last_disk_check" in state and "disk" in state["next"]


def test_sigterm_during_a_prune_finishes_the_deletion_and_exits_0(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    """`ckptd run` pruning many-file checkpoints gets SIGTERM: exit 0 soon, and every
    checkpoint is either whole under its name or gone (never half-deleted)."""
    import signal
    import subprocess

    root, state = tmp_path / "run", tmp_path / "state"
    root.mkdir()
    files_per_checkpoint = 400
    for step in range(1, 11):
        folder = root / f"checkpoint-{step * 10}"
        folder.mkdir()
        for index in range(files_per_checkpoint - 1):
            (folder / f"shard-{index}.bin").write_bytes(b"x")
        (folder / "trainer_state.json").write_text("{}")
        old = time.time() - 3600
        for item in (*folder.iterdir(), folder):
            os.utime(item, (old, old))
    config = tmp_path / "config.yaml"
    write_config(config, [root], state_dir=state, policy=rotation(3), **DAEMON)
    environment = dict(cli_env)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), environment.get("PYTHONPATH", "")]
    )
    daemon = subprocess.Popen(
        [*ckptd_command, "run", "--config", str(config)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        trash = root / ".ckptd-trash"
        assert wait_until(lambda: trash.exists() or len(steps_in(root)) < 10, 20)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    for step in steps_in(root):
        folder = root / f"checkpoint-{step}"
        assert len(list(folder.iterdir())) == files_per_checkpoint, f"{folder} is half-deleted"
    assert steps_in(root)[-3:] == [80, 90, 100]


def test_disk_check_prunes_through_the_daemon_with_prune_roots_signature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """daemon.disk.check_disks gets a `prune` callable with prune_root's own signature; calling
    it on the worker deletes through the safety path."""
    root, state = tmp_path / "run", tmp_path / "state"
    root.mkdir()
    for step in range(1, 7):
        save_checkpoint(root, step)
    reports: list[object] = []

    def check_disks(config: object, *, now: float, history: object, prune: object) -> DiskReport:
        if not reports:
            root_config = config.roots[0]  # type: ignore[attr-defined]
            reports.append(
                prune(  # type: ignore[operator]
                    config,
                    root_config,
                    now=now,
                    dry_run=False,
                    history=history,
                    policy_override=PolicySpec(keep_last=2, tier2_count=0, tier3_interval=None),
                )
            )
        return DiskReport(now, (), status_line="disk 12% used")

    monkeypatch.setattr("daemon.service.worker.check_disks", check_disks)
    config = tmp_path / "config.yaml"
    write_config(
        config,
        [root],
        state_dir=state,
        policy=rotation(100),
        **{**DAEMON, "disk": {"interval": "1s"}},
    )
    stop, reload = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=lambda: serve(
            str(config), stop=stop, reload=reload, tick=0.05, configure_logs=False
        ),
        name="test-serve-disk",
    )
    thread.start()
    try:
        assert wait_until(lambda: bool(reports), 10)
    finally:
        stop.set()
        thread.join(15)
    assert list(reports[0].deleted) == [f"checkpoint-{step}" for step in (1, 2, 3, 4)]  # type: ignore[attr-defined]
    assert steps_in(root) == [5, 6]


def big_old_checkpoint(root: Path) -> Path:
    """Given a root, save an hour-old checkpoint-100 of 40 copy chunks (twenty seconds to copy
    through `slow_copies`) and return its folder."""
    folder = root / "checkpoint-100"
    folder.mkdir(parents=True)
    write_file(folder / "model.safetensors", 40 * copying.CHUNK)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 100}))
    old = time.time() - 3600
    for item in (*folder.iterdir(), folder):
        os.utime(item, (old, old))
    return folder


def slow_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make every copy chunk take 0.5 s (a slow device); return the list each chunk is added to."""
    chunks: list[int] = []
    real_copy_range = copying._copy_range

    def slow_copy_range(source: int, destination: int, count: int) -> int:
        chunks.append(count)
        time.sleep(0.5)
        return real_copy_range(source, destination, count)

    monkeypatch.setattr(copying, "_copy_range", slow_copy_range)
    return chunks


def test_stop_during_a_long_snapshot_copy_exits_0_within_the_stop_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the start-up snapshot copies one big file on a slow device (each 8 MiB
    chunk takes 0.5 s): the copy is abandoned at the next chunk, nothing is left under a date
    name, and serve() returns 0 well within the stop timeout."""

    root, state, snapshots = tmp_path / "run", tmp_path / "state", tmp_path / "snapshots"
    folder = big_old_checkpoint(root)
    config = tmp_path / "config.yaml"
    write_config(
        config,
        [root],
        state_dir=state,
        policy=rotation(5),
        settle_seconds=0.3,
        min_keep=1,
        layout="hf",
        snapshots={"enabled": True, "at": "00:00", "dir": snapshots, "method": "copy", "keep": 3},
        disk={"interval": "1h"},
    )
    chunks = slow_copies(monkeypatch)
    stop, reload = threading.Event(), threading.Event()
    thread, result = _serve_in_thread(config, stop, reload, stop_timeout=3)
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


def test_reload_to_another_state_dir_moves_the_size_cache_there(tmp_path: Path) -> None:
    """A reload that changes `state_dir`: state.json and the size cache are both kept in the
    new folder from then on (the cache was still written to the old one)."""
    root = tmp_path / "run"
    for step in (1, 2):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        write_file(folder / "model.safetensors", 1024)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        old = time.time() - 3600
        for item in (*folder.iterdir(), folder):
            os.utime(item, (old, old))
    config = tmp_path / "config.yaml"

    def write(state: Path) -> None:
        write_config(
            config,
            [root],
            state_dir=state,
            history_file=tmp_path / "history.jsonl",
            policy=rotation(5),
            settle_seconds=0.3,
            min_keep=1,
            layout="hf",
            disk={"interval": "1h"},
        )

    first, second = tmp_path / "state-a", tmp_path / "state-b"
    write(first)
    stop, reload = threading.Event(), threading.Event()
    thread, result = _serve_in_thread(config, stop, reload)
    try:
        assert wait_until(lambda: "last_prune" in _state(first))
        write(second)
        reload.set()
        assert wait_until(lambda: "last_prune" in _state(second))
    finally:
        stop.set()
        thread.join(15)
    assert result.get("code") == 0
    assert (second / CACHE_FILE_NAME).is_file(), sorted(p.name for p in second.iterdir())


def _state(state_dir: Path) -> dict[str, Any]:
    return dict(read_state(str(state_dir)))


def test_a_wedged_worker_stops_the_watchdog_pings_and_they_resume_when_it_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker hangs inside a prune (a hung mount, a deadlock) while its thread stays alive:
    WATCHDOG=1 must stop so systemd restarts the daemon (the main thread kept pinging, and the
    daemon never pruned again, silently); when the worker moves again, so do the pings."""

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
    write_config(
        config,
        [root],
        state_dir=tmp_path / "state",
        history_file=tmp_path / "history.jsonl",
        layout="hf",
        disk={"interval": "1h"},
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
    thread, result = _serve_in_thread(config, stop, reload, notifier=notifier)
    try:
        assert entered.wait(10), "the start-up prune never ran"
        time.sleep(1.5)  # past WORKER_STUCK_SECONDS: the pings have stopped by now
        wedged_since = time.monotonic()
        time.sleep(1.0)
        assert [at for at in pings if at > wedged_since] == [], "pinged for a wedged worker"
        release.set()
        assert wait_until(lambda: any(at > wedged_since + 1.0 for at in pings), 5), "no pings again"
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

    root, state, snapshots = tmp_path / "run", tmp_path / "state", tmp_path / "snapshots"
    big_old_checkpoint(root)
    config = tmp_path / "config.yaml"
    write_config(
        config,
        [root],
        state_dir=state,
        layout="hf",
        snapshots={"enabled": True, "at": "00:00", "dir": snapshots, "method": "copy", "keep": 3},
        disk={"interval": "1h"},
    )
    chunks = slow_copies(monkeypatch)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(0.05)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    stop, reload = threading.Event(), threading.Event()
    thread, result = _serve_in_thread(config, stop, reload, notifier=notifier)
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
        # READY=1 may come before the copy's first chunk (it must not wait for the copy): give
        # the copy a moment to show it started before stopping.
        while time.monotonic() < deadline and not chunks:
            time.sleep(0.05)
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
    write_config(
        config,
        [root],
        state_dir=tmp_path / "state",
        history_file=tmp_path / "history.jsonl",
        policy=rotation(2),
        settle_seconds=0.3,
        min_keep=1,
        max_delete_fraction=1.0,
        grace="0s",
        layout="hf",
        disk={"interval": "1h"},
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
            write_file(folder / "model.safetensors", 1024)
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        pruned = wait_until(lambda: steps() == ["checkpoint-3", "checkpoint-4"], 8)
    finally:
        logging_done.set()
        logger.join()
        stop.set()
        thread.join(15)
    assert pruned, steps()
    assert result.get("code") == 0


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
        write_file(folder / "model.safetensors", 64)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for path in (*folder.iterdir(), folder):
            os.utime(path, (past, past))
    history = tmp_path / "history.jsonl"
    config = tmp_path / "config.yaml"
    write_config(
        config,
        [root],
        state_dir=tmp_path / "state",
        history_file=history,
        policy=rotation(1, cadence=1),
        settle_seconds=0.2,
        min_keep=1,
        max_delete_fraction=0.5,
        grace="0s",
        layout="hf",
        disk={"interval": "1h"},
    )

    def refusals() -> list[dict[str, Any]]:
        if not history.exists():
            return []
        records = [json.loads(line) for line in history.read_text().splitlines()]
        return [record for record in records if record["event"] == "prune_refused"]

    stop, reload = threading.Event(), threading.Event()
    thread, result = _serve_in_thread(config, stop, reload)
    try:
        assert wait_until(lambda: len(refusals()) >= 1, 10), "the start-up prune was not refused"
        time.sleep(3.0)  # fifteen settle periods
        count = len(refusals())
    finally:
        stop.set()
        thread.join(15)
    assert count == 1, refusals()
    assert "max_delete_fraction" in refusals()[0]["reason"]
    assert len(list(root.iterdir())) >= 10  # nothing deleted
    assert result.get("code") == 0
