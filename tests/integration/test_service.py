"""`serve()` in-process on real folders: prune after a new checkpoint settles, at start-up, reload
on SIGHUP-equivalent and on an edit of the config file, a bad config keeps the old one, stop
returns 0; sd_notify checked on a real datagram listener."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.disk.pressure import DiskReport
from daemon.service.lifecycle import serve
from daemon.service.sdnotify import Notifier
from daemon.state import read_state
from policies.model import PolicySpec

SETTLE = 0.3


def write_config(path: Path, root: Path, state: Path, *, keep_last: int, extra: str = "") -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(
        f"""\
state_dir: {state}
history_file: {state}/history.jsonl
log: {{level: debug, format: json}}
defaults:
  policy: {{keep_last: {keep_last}, tier2_count: 0, tier3_interval: null}}
  settle_seconds: {SETTLE}
  min_keep: 1
  max_delete_fraction: 1.0
  trash: {{grace: 0s}}
roots:
  - path: {root}
    layout: hf
snapshots: {{enabled: false}}
disk: {{interval: 1h}}
{extra}"""
    )
    # Like an editor: write aside, rename over.
    os.replace(temporary, path)


def save_checkpoint(root: Path, step: int) -> None:
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w" * 1024)
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
    write_config(config, root, state, keep_last=3)
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
    (folder / "model.safetensors").write_bytes(b"w" * 1024)
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
    write_config(config, root, state, keep_last=2)
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
    write_config(config, root, state, keep_last=2)
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
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\nroots: []\nsnapshots: {{enabled: false}}\n"
        "disk: {interval: 1s}\n"
    )
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
    write_config(config, root, state, keep_last=3)
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
    write_config(config, root, state, keep_last=100, extra="")
    config.write_text(config.read_text().replace("disk: {interval: 1h}", "disk: {interval: 1s}"))
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
