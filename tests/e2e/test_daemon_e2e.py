"""End to end: `ckptd run` as a subprocess, a real NOTIFY_SOCKET, a separate trainer process.

The trainer writes 100 Hugging-Face-style checkpoints (folder first, files one by one,
trainer_state.json last) and after every file checks that its folder is still there. The daemon
starts on a keep-everything policy; after 20 checkpoints a broken config arrives by SIGHUP (the
daemon must go on with the old one and say so), then a valid edit of the file (no signal)
switches to a small tiered policy. Because nothing was deleted before the switch and the policy
does not depend on how often it runs, the survivors at the end must equal the policy's one-shot
answer for all 100 steps. SIGTERM ends it with STOPPING=1 and exit 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.service.sdnotify import Notifier
from policies import plan
from policies.model import Checkpoint, PolicySpec
from tests.configs import write_config

CHECKPOINTS = 100
STEP = 10
SWITCH_AFTER = 20
SETTLE = 0.8
FINAL_POLICY = PolicySpec(keep_last=5, tier2_count=4, tier3_interval=100)

REPOSITORY = Path(__file__).resolve().parents[2]

# The files are well-formed (tests/layouts_fixtures.py): ckptd keeps a corrupt checkpoint.
TRAINER = (
    f"import sys; sys.path.insert(0, {str(REPOSITORY)!r})\n"
    + r"""
import json, os, sys, time
from tests.layouts_fixtures import well_formed_bytes
root, total, step, switch_after, go_file, pause = sys.argv[1:7]
total, step, switch_after, pause = int(total), int(step), int(switch_after), float(pause)
vanished = []
saved = []
for index in range(1, total + 1):
    if index == switch_after + 1:
        print("WAITING", flush=True)
        while not os.path.exists(go_file):
            time.sleep(0.05)
    folder = os.path.join(root, f"checkpoint-{index * step}")
    os.mkdir(folder)
    files = ["config.json", "model.safetensors", "optimizer.pt", "scheduler.pt",
             "trainer_state.json"]
    for name in files:
        time.sleep(0.05)  # the files of one save arrive over ~0.25 s
        content = json.dumps({"global_step": index * step}) if name == "trainer_state.json" \
            else well_formed_bytes(name, 2048, random=True)
        mode = "w" if isinstance(content, str) else "wb"
        with open(os.path.join(folder, name), mode) as handle:
            handle.write(content)
        if not os.path.isdir(folder):
            vanished.append((folder, name))
    saved.append(index * step)
    time.sleep(0.1)
    if index % 20 == 0:
        time.sleep(pause)  # evaluation: the only quiet time the safety check allows pruning in
print(json.dumps({"saved": saved, "vanished": vanished}), flush=True)
sys.exit(1 if vanished else 0)
"""
)


# The daemon's settings besides its policy (tests/configs.py writes them).
DAEMON: dict[str, Any] = {
    "log": {"level": "info", "format": "json"},
    "settle_seconds": SETTLE,
    "min_keep": 3,
    "max_delete_fraction": 0.9,
    "grace": "0s",
    "layout": "hf",
    "disk": {"interval": "1h"},
}


class Listener:
    """A stand-in for systemd's notify socket: records every datagram."""

    def __init__(self, path: str) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(path)
        self.socket.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="e2e-notify-listener")
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append((time.monotonic(), self.socket.recv(4096).decode()))
            except TimeoutError:
                continue

    def lines(self) -> list[str]:
        return [line for _, message in list(self.messages) for line in message.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def history(state: Path) -> list[dict[str, object]]:
    path = state / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_prune_trigger(state: Path) -> object:
    from daemon.state import read_state

    last = read_state(str(state)).get("last_prune")
    return last.get("trigger") if isinstance(last, dict) else None


def survivors(root: Path) -> list[int]:
    return sorted(
        int(entry.name.split("-")[1])
        for entry in root.iterdir()
        if entry.name.startswith("checkpoint-")
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_daemon_end_to_end(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root, state = tmp_path / "run", tmp_path / "state"
    root.mkdir()
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    keep_everything = {"keep_last": 100000, "tier2_count": 0}
    write_config(config, [root], state_dir=state, policy=keep_everything, **DAEMON)
    listener = Listener(str(tmp_path / "notify.sock"))
    environment = dict(cli_env)
    environment["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    environment["WATCHDOG_USEC"] = "500000"
    # The daemon runs in tmp_path: a relative PYTHONPATH ("." from the test command) must not
    # lose the checkout when ckptd is not installed.
    repository = str(Path(__file__).resolve().parents[2])
    environment["PYTHONPATH"] = os.pathsep.join(
        [repository, *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    )
    daemon_log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [*ckptd_command, "run", "--config", str(config)],
        env=environment,
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    trainer: subprocess.Popen[str] | None = None
    try:
        assert wait_until(lambda: "READY=1" in listener.lines(), 20), "no READY=1"
        assert wait_until(lambda: listener.lines().count("WATCHDOG=1") >= 2, 5), "no WATCHDOG=1"

        go_file = tmp_path / "go"
        trainer_script = tmp_path / "trainer.py"
        trainer_script.write_text(TRAINER)
        trainer = subprocess.Popen(
            [
                sys.executable,
                str(trainer_script),
                str(root),
                str(CHECKPOINTS),
                str(STEP),
                str(SWITCH_AFTER),
                str(go_file),
                str(SETTLE * 2),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        assert trainer.stdout is not None
        assert trainer.stdout.readline().strip() == "WAITING"
        # The daemon has pruned (its state says so); nothing was deleted, and a run that does
        # nothing writes no history row.
        assert wait_until(lambda: last_prune_trigger(state) is not None, 15)
        assert survivors(root) == [STEP * index for index in range(1, SWITCH_AFTER + 1)]
        assert not any(r["event"] == "prune_run" for r in history(state))

        # A broken config by SIGHUP: logged with file and line, the old config stays in force.
        good_text = config.read_text()
        config.write_text(good_text.replace("settle_seconds: 0.8", "settle_seconds: soon"))
        daemon.send_signal(signal.SIGHUP)
        assert wait_until(
            lambda: any(line.startswith("STATUS=config error") for line in listener.lines()), 10
        ), listener.lines()[-5:]
        assert "RELOADING=1" in listener.lines()
        assert daemon.poll() is None
        log_text = (tmp_path / "daemon.log").read_text()
        assert "config_invalid" in log_text
        assert re.search(re.escape(str(config)) + r":\d+", log_text), "no file:line in the log"
        # Restore the good file (an edit: reloads, same policy), then a valid edit of the policy.
        config.write_text(good_text)
        assert wait_until(lambda: "config_reloaded" in (tmp_path / "daemon.log").read_text(), 10)
        runs_before = sum(1 for r in history(state) if r["event"] == "prune_run")
        new_policy = {"keep_last": 5, "tier2_count": 4, "tier3_interval": 100}
        # Written aside and renamed over, as editors save: no signal sent.
        write_config(config, [root], state_dir=state, policy=new_policy, **DAEMON)
        old_pid = daemon.pid
        assert wait_until(
            lambda: any(
                r["event"] == "prune_run" and r.get("deleted", 0)
                for r in history(state)[runs_before:]
            ),
            15,
        ), "the new policy did not prune"
        assert daemon.poll() is None and daemon.pid == old_pid

        go_file.write_text("go")
        output, _ = trainer.communicate(timeout=120)
        report = json.loads(output.strip().splitlines()[-1])
        assert report["vanished"] == [], f"checkpoints vanished while being written: {report}"
        assert trainer.returncode == 0
        saved = report["saved"]
        assert len(saved) == CHECKPOINTS

        expected_plan = plan(
            [Checkpoint(name=f"checkpoint-{s}", step=s, layout="hf") for s in saved],
            {"default": FINAL_POLICY},
            root=str(root),
        )
        expected = sorted(d.checkpoint.step for d in expected_plan.kept)
        assert wait_until(lambda: survivors(root) == expected, 20), (survivors(root), expected)
        deletes = [r for r in history(state) if r["event"] == "delete"]
        assert len(deletes) == CHECKPOINTS - len(expected)

        # The CLI's own plan of the final tree deletes nothing more: it is the policy's answer.
        plan_result = subprocess.run(
            [*ckptd_command, "plan", str(root), "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            env=environment,
            timeout=60,
            check=False,
        )
        assert plan_result.returncode == 0, plan_result.stderr
        assert json.loads(plan_result.stdout)["summary"]["delete"] == 0

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert "STOPPING=1" in listener.lines()
    finally:
        for process in (trainer, daemon):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        daemon_log.close()
        listener.close()


def test_notifier_matches_what_systemd_sets() -> None:
    """The e2e relies on WATCHDOG_USEC=500000 meaning a ping every 0.25 s."""
    notifier = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "500000"})
    assert notifier.watchdog_interval == 0.25
