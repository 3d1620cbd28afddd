"""Issue 9, point 2 (the daemon's side): a crashed save goes to the trash once abandoned.

A Hugging Face run crashed mid-save: `checkpoint-400/` has weights but no trainer_state.json.
transformers' `get_last_checkpoint` picks the highest step folder, complete or not, so resuming
would fail on it. Once nothing was written in it for `abandoned_after` and no process holds it,
the daemon moves it to the trash (`abandoned-save`), without waiting for another event; a save
a process still holds stays. `ckptd plan` and `ckptd status` show it, with its size, before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.history.log import read_records
from daemon.pruning import trash
from daemon.service.lifecycle import serve
from tests.configs import rotation, write_config
from tests.layouts_fixtures import age, hf_checkpoint

# The daemon of these tests besides `abandoned_after` (tests/configs.py writes it): it keeps the
# newest ten, so only an abandoned save is ever trashed.
DAEMON: dict[str, Any] = {
    "log": {"level": "info", "format": "json"},
    "policy": rotation(10),
    "settle_seconds": 0.5,
    "min_keep": 1,
    "grace": "1h",
    "layout": "hf",
    "disk": {"interval": "1h"},
}


def crashed_save(root: Path, step: int, *, quiet_for: float) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w" * 300_000)
    return age(folder, quiet_for)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def names(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.name.startswith("checkpoint-"))


def test_plan_and_status_show_a_crashed_save_with_its_size_and_when_it_counts_as_abandoned(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    for step in (100, 200, 300):
        hf_checkpoint(root, step)
    crashed_save(root, 400, quiet_for=7200)  # crashed two hours ago
    crashed_save(root, 500, quiet_for=600)  # ten minutes ago
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        history_file=tmp_path / "history.jsonl",
        abandoned_after="1h",
        **DAEMON,
    )

    def cli(*arguments: str) -> dict[str, object]:
        result = subprocess.run(
            [*ckptd_command, *arguments, "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            env=cli_env,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        document: dict[str, object] = json.loads(result.stdout)
        return document

    status = cli("status")["roots"][0]  # type: ignore[index]
    saves = {save["name"]: save for save in status["incomplete_saves"]}
    assert saves["checkpoint-400"]["bytes"] == 300_000
    assert saves["checkpoint-400"]["abandoned"] is True
    assert saves["checkpoint-500"]["abandoned"] is False
    # Ten minutes quiet of an hour: abandoned in about fifty minutes.
    abandoned_at = datetime.fromisoformat(saves["checkpoint-500"]["abandoned_at"]).timestamp()
    assert abs(abandoned_at - (time.time() + 3000)) < 120
    plan = cli("plan", str(root))
    decisions = {d["name"]: d for d in plan["checkpoints"]}  # type: ignore[attr-defined]
    assert decisions["checkpoint-400"]["bytes"] == 300_000
    assert decisions["checkpoint-400"]["action"] == "delete"
    assert decisions["checkpoint-400"]["reasons"] == ["abandoned-save"]
    assert decisions["checkpoint-500"]["action"] == "keep"


def test_the_daemon_trashes_a_save_once_abandoned_and_keeps_one_a_process_holds(
    tmp_path: Path,
) -> None:
    root = tmp_path / "run"
    for step in (100, 200, 300):
        hf_checkpoint(root, step)
    crashed = crashed_save(root, 400, quiet_for=1.0)  # abandoned 1 s after the daemon starts
    # Below the newest complete one (a process holding anything above it would be taken for
    # the trainer mid-save, and the whole root would wait).
    held = crashed_save(root, 250, quiet_for=7200)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; f = open(sys.argv[1], 'rb'); print('ok', flush=True); sys.stdin.read()",
            str(held / "model.safetensors"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        history_file=tmp_path / "history.jsonl",
        abandoned_after="2s",
        **DAEMON,
    )
    stop, reload = threading.Event(), threading.Event()
    result: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "code",
            serve(str(config), stop=stop, reload=reload, tick=0.05, configure_logs=False),
        ),
        name="test-serve-abandoned",
    )
    started = time.monotonic()
    thread.start()
    try:
        assert wait_until(lambda: (tmp_path / "state" / "state.json").exists(), 10)
        assert "checkpoint-400" in names(root)  # not abandoned yet at the start-up prune
        assert wait_until(lambda: "checkpoint-400" not in names(root), 6), names(root)
        assert time.monotonic() - started >= 0.9
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(15)
        holder.communicate("", timeout=5)
    assert result.get("code") == 0
    # The newest folder is the newest complete checkpoint again: a resume starts there.
    assert names(root) == ["checkpoint-100", "checkpoint-200", "checkpoint-250", "checkpoint-300"]
    assert "checkpoint-400" in [item.name for item in trash.list_trash(str(root))]
    records = read_records(str(tmp_path / "history.jsonl"))
    deletes = [r for r in records if r["event"] == "delete"]
    assert [(r["checkpoint"], r["why"]) for r in deletes] == [
        ("checkpoint-400", ["abandoned-save"])
    ]
    vetoes = [r for r in records if r["event"] == "veto" and r["checkpoint"] == "checkpoint-250"]
    assert vetoes and f"in-use:pid {holder.pid}" in str(vetoes[0]["reason"])
    assert not crashed.exists() and held.is_dir()
