"""`ckptd history` and `ckptd trash` through the real CLI, as subprocesses."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.history.log import HistoryLog
from daemon.pruning import trash
from tests.configs import write_config


def run(
    command: list[str], arguments: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *arguments], capture_output=True, text=True, env=env, timeout=60
    )


def write_history(path: Path) -> None:
    with HistoryLog(str(path)) as history:
        history.write(
            "delete",
            time=1_800_000_000.0,
            root="/data/run",
            checkpoint="checkpoint-1100",
            step=1100,
            bytes_freed=3_600_000_000,
            why=["tier3:every-1000: 2000 represents the bucket"],
        )
        history.write(
            "veto",
            root="/data/run",
            checkpoint="checkpoint-1200",
            reason="in-use:pid 7 (python eval.py)",
        )
        history.write(
            "prune_run", root="/data/run", deleted=1, kept=43, vetoed=1, failed=0, seconds=0.5
        )


def test_history_table_newest_last_and_json_lines(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    cli_env["XDG_STATE_HOME"] = str(tmp_path / "state")
    write_history(tmp_path / "state" / "ckptd" / "history.jsonl")
    table = run(ckptd_command, ["history"], cli_env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "checkpoint-1100" in table.stdout and "3.6 GB" in table.stdout
    assert "tier3:every-1000" in table.stdout and "in-use:pid 7" in table.stdout
    assert [index for index, line in enumerate(lines) if "prune_run" in line] == [len(lines) - 1]
    last_two = run(ckptd_command, ["history", "-n", "2", "--json"], cli_env)
    records = [json.loads(line) for line in last_two.stdout.splitlines()]
    assert [r["event"] for r in records] == ["veto", "prune_run"]


def test_history_reads_the_configs_history_file(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    history_file = tmp_path / "log" / "history.jsonl"
    write_history(history_file)
    config = write_config(tmp_path / "config.yaml", history_file=history_file)
    result = run(ckptd_command, ["history", "--config", str(config), "--json"], cli_env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3


def test_history_follow_survives_rotation(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    cli_env["XDG_STATE_HOME"] = str(tmp_path / "state")
    path = tmp_path / "state" / "ckptd" / "history.jsonl"
    history = HistoryLog(str(path))
    history.write("delete", checkpoint="ready")
    follower = subprocess.Popen(
        [*ckptd_command, "history", "--follow", "--json", "-n", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env,
    )
    try:
        assert follower.stdout is not None
        # The last record printed means the follower has the file open and sits at its end (a
        # fixed sleep raced a slow start on a loaded machine: it missed both records, hung).
        assert json.loads(follower.stdout.readline())["checkpoint"] == "ready"
        history.write("delete", checkpoint="before-rotation")
        os.rename(path, str(path) + ".1")  # logrotate, no copytruncate
        history.write("delete", checkpoint="after-rotation")
        seen = [json.loads(follower.stdout.readline())["checkpoint"] for _ in range(2)]
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        history.close()
    assert seen == ["before-rotation", "after-rotation"]


def make_trashed(root: Path, name: str, now: float) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "model.bin").write_bytes(b"m" * 500)
    trash.move_to_trash(str(root), name, [name], now=now)


def test_trash_list_restore_purge(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    cli_env["XDG_STATE_HOME"] = str(tmp_path / "state")
    root = tmp_path / "run"
    make_trashed(root, "checkpoint-100", time.time())
    make_trashed(root, "checkpoint-200", time.time())
    listed = run(ckptd_command, ["trash", "list", "--root", str(root), "--json"], cli_env)
    assert listed.returncode == 0, listed.stderr
    assert [item["name"] for item in json.loads(listed.stdout)] == [
        "checkpoint-100",
        "checkpoint-200",
    ]
    human = run(ckptd_command, ["trash", "list", "--root", str(root)], cli_env)
    assert "checkpoint-200" in human.stdout and "500 B" in human.stdout

    restored = run(
        ckptd_command, ["trash", "restore", "checkpoint-100", "--root", str(root)], cli_env
    )
    assert restored.returncode == 0, restored.stderr
    assert (root / "checkpoint-100" / "model.bin").read_bytes() == b"m" * 500
    again = run(ckptd_command, ["trash", "restore", "checkpoint-100", "--root", str(root)], cli_env)
    assert again.returncode == 2 and "no checkpoint named" in again.stderr

    # Purging cannot be undone: without a terminal to ask on it needs -y, like prune.
    unasked = run(ckptd_command, ["trash", "purge", "--root", str(root)], cli_env)
    assert unasked.returncode == 2 and "-y" in unasked.stderr
    assert [item.name for item in trash.list_trash(str(root))] == ["checkpoint-200"]
    purged = run(ckptd_command, ["trash", "purge", "-y", "--root", str(root)], cli_env)
    assert purged.returncode == 0, purged.stderr
    assert "removed 1" in purged.stdout and "500 B" in purged.stdout
    assert trash.list_trash(str(root)) == []
    assert (root / "checkpoint-100").exists()


def test_restore_refuses_a_name_that_is_taken(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    cli_env["XDG_STATE_HOME"] = str(tmp_path / "state")
    root = tmp_path / "run"
    make_trashed(root, "checkpoint-100", time.time())
    (root / "checkpoint-100").mkdir()
    result = run(
        ckptd_command, ["trash", "restore", "checkpoint-100", "--root", str(root)], cli_env
    )
    assert result.returncode == 2 and "already exists" in result.stderr


class _Lines:
    """The lines a process prints, read by a thread (a buffered pipe defeats select)."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def next(self, timeout: float = 30.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no line from `ckptd history --follow`") from None


def test_follow_rows_line_up_with_the_header(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    cli_env["XDG_STATE_HOME"] = str(tmp_path / "state")
    cli_env["COLUMNS"] = "200"
    path = tmp_path / "state" / "ckptd" / "history.jsonl"
    history = HistoryLog(str(path))
    history.write("veto", root="/r", checkpoint="ck-1", reason="in-use:pid 7 (python eval.py)")
    follower = subprocess.Popen(
        [*ckptd_command, "history", "--follow"], stdout=subprocess.PIPE, text=True, env=cli_env
    )
    try:
        assert follower.stdout is not None
        printed = _Lines(follower.stdout)
        header, first = printed.next(), printed.next()
        history.write(
            "delete",
            root="/data/training/current_model",
            checkpoint="checkpoint-12900",
            bytes_freed=0,
            bytes_in_trash=3_600_000_000,
            why=["tier3: not the newest in (12000, 13000]; 13000 represents it"],
        )
        history.write("prune_refused", root="/data/training/current_model", reason="settling")
        later = [printed.next() for _ in range(2)]
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        history.close()
    printed.thread.join(timeout=10)
    assert header.split() == ["time", "event", "root", "checkpoint", "freed", "why"]
    rows = [first, *later]
    assert [row.split()[3] for row in rows] == ["veto", "delete", "prune_refused"]
    for row in rows:  # each column starts where its header does (the time has 3 words)
        assert row[header.index("event") :].split()[0] in ("veto", "delete", "prune_refused")
        assert row[header.index("root") - 1] == " " and row[header.index("root")] == "/"
    assert later[0][header.index("checkpoint") :].startswith("checkpoint-12900")
    freed_end = header.index("freed") + len("freed")
    assert later[0][:freed_end].endswith("3.6 GB to trash")
    assert later[0][freed_end:].strip().startswith("tier3: not the newest")


@pytest.mark.parametrize(
    ("zone", "shown"),
    [(None, "2027-01-15 09:00:00 CET"), ("America/New_York", "2027-01-15 03:00:00 EST")],
)
def test_history_times_say_their_zone(
    zone: str | None,
    shown: str,
    tmp_path: Path,
    ckptd_command: list[str],
    cli_env: dict[str, str],
) -> None:
    cli_env["TZ"] = "Europe/Berlin"  # the machine's zone, unless the config names one
    history_file = tmp_path / "history.jsonl"
    write_history(history_file)  # the first record at 2027-01-15 08:00:00 UTC
    config = write_config(
        tmp_path / "config.yaml", timezone=zone, history_file=history_file, state_dir=None
    )
    result = run(ckptd_command, ["history", "--config", str(config)], cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith(shown + " ")
