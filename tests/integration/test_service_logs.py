"""Logging: ckptd's own events and the libraries' stdlib records come out in one format."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator

import pytest

from daemon.disk.pressure import DiskReport
from daemon.logs import configure_logging, get_logger
from daemon.snapshots.verify import VerifyResult


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    configure_logging("info", "console", stream=io.StringIO())


def test_json_lines_for_ours_and_apscheduler_with_utc_times() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    get_logger("ckptd.test").info("prune_done", root="/data/run", deleted=2)
    logging.getLogger("apscheduler.scheduler").warning("Run time of job was missed by %d s", 7)
    logging.getLogger("watchdog.observers").warning("inotify watch limit reached")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("ckptd.test").exception("job_failed", job="disk")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [record["event"] for record in records] == [
        "prune_done",
        "Run time of job was missed by 7 s",
        "inotify watch limit reached",
        "job_failed",
    ]
    assert records[0]["deleted"] == 2 and records[0]["level"] == "info"
    assert records[1]["logger"] == "apscheduler.scheduler" and records[1]["level"] == "warning"
    for record in records:
        # UTC ISO 8601, written as the history and the state file write times.
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["timestamp"])
    assert "RuntimeError" in json.dumps(records[3]["exception"])


def test_console_is_key_value_and_level_filters() -> None:
    stream = io.StringIO()
    configure_logging("warning", "console", stream=stream)
    get_logger("ckptd.test").info("hidden", x=1)
    get_logger("ckptd.test").warning("root_missing", root="/data/run")
    logging.getLogger("apscheduler.scheduler").info("chatter hidden below warning")
    text = stream.getvalue()
    assert "hidden" not in text
    assert "root_missing" in text and "root=/data/run" in text
    assert not text.lstrip().startswith("{")


def test_reconfiguring_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first)
    configure_logging("info", "json", stream=second)
    get_logger("ckptd.test").info("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1


def test_reports_are_logged_as_their_fields_never_as_python_reprs() -> None:
    report = VerifyResult(path="/snap/2026-12-05", missing=("a/b.bin",), checked=3)
    disk = DiskReport(time=1.0, filesystems=(), status_line="disk ok")
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    get_logger("ckptd.test").info("snapshot_job", report=report, result=disk, roots=("/a", "/b"))
    (record,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert record["report"]["missing"] == ["a/b.bin"] and record["report"]["ok"] is False
    assert record["result"]["status_line"] == "disk ok"
    assert record["roots"] == ["/a", "/b"]
    assert "VerifyResult(" not in stream.getvalue() and "DiskReport(" not in stream.getvalue()
    console = io.StringIO()
    configure_logging("info", "console", stream=console)
    get_logger("ckptd.test").info("snapshot_job", report=report, roots=("/a", "/b"), ok=None)
    text = console.getvalue()
    assert "VerifyResult(" not in text and "('/a'" not in text and "None" not in text
    assert "roots=/a,/b" in text and "ok=null" in text and '"missing":["a/b.bin"]' in text


@pytest.fixture
def machine_in_berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_terminal_shows_local_time_with_the_zone_named(machine_in_berlin: None) -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)
    get_logger("ckptd.test").info("ready")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d CES?T ", stream.getvalue())
