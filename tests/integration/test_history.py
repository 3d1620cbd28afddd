"""The history log: whole lines from concurrent writers, UTC times, reopening after rotation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

from daemon.history.log import HistoryLog, default_history_path, read_records

REPOSITORY = str(Path(__file__).resolve().parents[2])


def test_records_are_json_lines_with_utc_iso_times(tmp_path: Path) -> None:
    path = tmp_path / "state" / "history.jsonl"  # the folder is created on first write
    with HistoryLog(str(path)) as history:
        history.write("delete", root="/r", checkpoint="checkpoint-100", bytes_freed=5)
        history.write("prune_run", time=0.0, deleted=1)
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["event"] == "delete" and first["checkpoint"] == "checkpoint-100"
    assert datetime.fromisoformat(first["time"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert second["time"] == "1970-01-01T00:00:00.000+00:00"


def test_a_rotated_or_removed_file_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history = HistoryLog(str(path))
    history.write("a")
    os.rename(path, tmp_path / "history.jsonl.1")  # logrotate without copytruncate
    history.write("b")
    os.unlink(path)
    history.write("c")
    history.close()
    assert [r["event"] for r in read_records(str(tmp_path / "history.jsonl.1"))] == ["a"]
    assert [r["event"] for r in read_records(str(path))] == ["c"]


def test_threads_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    history = HistoryLog(str(path))
    padding = "p" * 5000  # far beyond any stdio buffer boundary

    def writer(number: int) -> None:
        for index in range(200):
            history.write("delete", writer=number, index=index, padding=padding)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 800
    assert {(r["writer"], r["index"]) for r in map(json.loads, lines)} == {
        (n, i) for n in range(4) for i in range(200)
    }


WRITER = """
import sys
from daemon.history.log import HistoryLog
history = HistoryLog(sys.argv[1])
for index in range(300):
    history.write("delete", writer=int(sys.argv[2]), index=index, padding="q" * 3000)
"""


def test_processes_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    environment = {**os.environ, "PYTHONPATH": REPOSITORY}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n)], env=environment)
        for n in range(3)
    ]
    for process in writers:
        assert process.wait(timeout=60) == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 900
    assert len({(r["writer"], r["index"]) for r in records}) == 900


def test_default_path_follows_xdg_state_home() -> None:
    assert default_history_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}) == "/s/ckptd/history.jsonl"
    assert default_history_path({"HOME": "/h"}) == "/h/.local/state/ckptd/history.jsonl"
