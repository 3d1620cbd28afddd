"""Issue 9, point 5: a half-written config is never applied.

`ckptd run` as a subprocess over 19 old checkpoints; a separate writer process rewrites the
config from `keep_last: 20`-like text to `keep_last: 12`, pausing mid-write. The prefix it
leaves on disk (`...keep_last: 1`) parses, and applying it would delete 18 checkpoints; only
the finished text (12 survivors) may ever be applied. A SIGHUP reloads at once (when nobody is
writing the file).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.service import reload as reload_module
from daemon.service.lifecycle import serve

CHECKPOINTS = 19
FINAL_KEEP = 12
# The writer stops after "keep_last: 1": a prefix that parses, and would keep 1 checkpoint.
PREFIX_CUT = len("    keep_last: 1")

WRITER = r"""
import os, sys
path, mode, source, cut = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(source) as handle:
    text = handle.read()
if mode == "new":
    os.unlink(path)
handle = open(path, "w")
handle.write(text[:cut])
handle.flush()
print("prefix", flush=True)
if mode == "two-step":
    handle.close()
sys.stdin.readline()
if mode == "two-step":
    handle = open(path, "a")
handle.write(text[cut:])
handle.close()
print("closed", flush=True)
"""


def config_text(root: Path, state: Path, keep_last: int) -> str:
    # The policy comes last, block style: any prefix ending in "keep_last: <digits>" parses.
    return f"""\
state_dir: {state}
history_file: {state}/history.jsonl
log: {{level: info, format: json}}
roots:
  - path: {root}
    layout: hf
snapshots: {{enabled: false}}
disk: {{interval: 1h}}
defaults:
  settle_seconds: 0.3
  min_keep: 1
  max_delete_fraction: 1.0
  trash: {{grace: 0s}}
  policy:
    tier2_count: 0
    tier3_interval: null
    keep_last: {keep_last}
"""


def make_checkpoints(root: Path) -> None:
    past = time.time() - 3600
    for step in range(1, CHECKPOINTS + 1):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w" * 64)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for path in (*folder.iterdir(), folder):
            os.utime(path, (past, past))


def count(root: Path) -> int:
    return sum(1 for entry in root.iterdir() if entry.name.startswith("checkpoint-"))


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def log_events(path: Path) -> list[str]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line).get("event", ""))
        except ValueError:
            continue
    return events


@pytest.fixture
def running_daemon(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> Iterator[dict[str, object]]:
    root, state = tmp_path / "run", tmp_path / "state"
    make_checkpoints(root)
    config = tmp_path / "config.yaml"
    config.write_text(config_text(root, state, keep_last=20))
    log_path = tmp_path / "daemon.log"
    environment = dict(cli_env)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), environment.get("PYTHONPATH", "")]
    )
    with log_path.open("w") as log_file:
        daemon = subprocess.Popen(
            [*ckptd_command, "run", "--config", str(config)],
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        assert wait_until(lambda: "ready" in log_events(log_path), 15), log_path.read_text()
        assert count(root) == CHECKPOINTS
        yield {"root": root, "state": state, "config": config, "log": log_path, "pid": daemon.pid}
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def rewrite_with_a_pause(
    setup: dict[str, object], mode: str, during_pause: Callable[[], None] = lambda: None
) -> None:
    """Given the running daemon, have a writer process rewrite its config to keep_last 12,
    stopping 1.5 s after the prefix `...keep_last: 1` (held open, or closed in "two-step")."""
    config: Path = setup["config"]  # type: ignore[assignment]
    root: Path = setup["root"]  # type: ignore[assignment]
    state: Path = setup["state"]  # type: ignore[assignment]
    final = config_text(root, state, keep_last=FINAL_KEEP)
    cut = final.index("    keep_last:") + PREFIX_CUT
    source = config.with_suffix(".final")
    source.write_text(final)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(config), mode, str(source), str(cut)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    try:
        assert writer.stdout.readline().strip() == "prefix"
        assert config.read_text().endswith("keep_last: 1")
        during_pause()
        time.sleep(1.5)  # the old daemon applied any change 0.3 s after its last event
        assert count(root) == CHECKPOINTS, "a half-written config was applied"
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "closed"
    finally:
        writer.stdin.close()
        writer.wait(5)
    assert config.read_text() == final


@pytest.mark.timeout(30)
def test_a_config_written_as_a_new_file_is_applied_only_once_closed(
    running_daemon: dict[str, object],
) -> None:
    root: Path = running_daemon["root"]  # type: ignore[assignment]
    rewrite_with_a_pause(running_daemon, "new")
    assert wait_until(lambda: count(root) == FINAL_KEEP, 8), count(root)
    time.sleep(0.5)
    assert count(root) == FINAL_KEEP


@pytest.mark.timeout(30)
def test_a_sighup_during_an_in_place_write_waits_for_the_writer_to_close_the_file(
    running_daemon: dict[str, object],
) -> None:
    root: Path = running_daemon["root"]  # type: ignore[assignment]
    pid: int = running_daemon["pid"]  # type: ignore[assignment]
    rewrite_with_a_pause(running_daemon, "in-place", lambda: os.kill(pid, signal.SIGHUP))
    assert wait_until(lambda: count(root) == FINAL_KEEP, 8), count(root)
    log_path: Path = running_daemon["log"]  # type: ignore[assignment]
    assert "config_being_written" in log_events(log_path)


@pytest.mark.timeout(30)
def test_a_config_closed_and_rewritten_within_the_settle_is_applied_only_when_settled(
    running_daemon: dict[str, object],
) -> None:
    """Closed after the prefix, then appended to 1.5 s later (`echo ... > f; ...; echo >> f`):
    the prefix was closed but did not stay unchanged for the settle period."""
    root: Path = running_daemon["root"]  # type: ignore[assignment]
    rewrite_with_a_pause(running_daemon, "two-step")
    assert wait_until(lambda: count(root) == FINAL_KEEP, 8), count(root)


def test_sighup_reloads_at_once_without_waiting_for_the_settle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nobody writing the file, SIGHUP (the reload event `ckptd run` sets on it) reloads
    at once: here the file-event settle is 30 s, and the new policy applies within 3 s."""
    monkeypatch.setattr(reload_module, "CONFIG_SETTLE_SECONDS", 30.0)
    root, state = tmp_path / "run", tmp_path / "state"
    make_checkpoints(root)
    config = tmp_path / "config.yaml"
    config.write_text(config_text(root, state, keep_last=20))
    stop, reload = threading.Event(), threading.Event()
    result: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "code",
            serve(str(config), stop=stop, reload=reload, tick=0.05, configure_logs=False),
        ),
        name="test-serve-sighup",
    )
    thread.start()
    try:
        assert wait_until(lambda: (state / "state.json").exists(), 10)
        time.sleep(0.5)
        config.write_text(config_text(root, state, keep_last=FINAL_KEEP))
        reload.set()
        assert wait_until(lambda: count(root) == FINAL_KEEP, 3), count(root)
    finally:
        stop.set()
        thread.join(15)
    assert result.get("code") == 0
