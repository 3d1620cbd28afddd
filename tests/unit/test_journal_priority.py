"""Lines to the journal carry the sd-daemon priority prefix; lines elsewhere are unchanged."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.logs import configure_logging, get_logger, is_journal_stream, journal_priority


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    configure_logging("info", "console", stream=io.StringIO())


def journal_stream_of(handle: io.TextIOWrapper) -> str:
    status = os.fstat(handle.fileno())
    return f"{status.st_dev}:{status.st_ino}"


def log_every_level() -> None:
    log = get_logger("ckptd.test")
    log.debug("scan_done", root="/data/run")
    log.info("prune_done", root="/data/run", deleted=2)
    log.warning("prune_deferred", root="/data/run")
    log.error("prune_failed", root="/data/run")
    log.critical("disk_full", root="/data/run")
    logging.getLogger("apscheduler.scheduler").warning("Run time of job was missed by %d s", 7)


def test_priorities_are_the_syslog_levels() -> None:
    assert journal_priority(logging.DEBUG) == 7
    assert journal_priority(logging.INFO) == 6
    assert journal_priority(logging.WARNING) == 4
    assert journal_priority(logging.ERROR) == 3
    assert journal_priority(logging.CRITICAL) == 2


def test_journal_lines_are_prefixed_and_otherwise_the_same_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "journal", "w+", encoding="utf-8") as journal:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(journal))
        assert is_journal_stream(journal)
        configure_logging("debug", "auto", stream=journal)
        log_every_level()
        journal.flush()
        lines = (tmp_path / "journal").read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<4>"]
    records = [json.loads(line[3:]) for line in lines]
    assert [record["level"] for record in records] == [
        "debug",
        "info",
        "warning",
        "error",
        "critical",
        "warning",
    ]
    assert records[1]["event"] == "prune_done" and records[1]["deleted"] == 2
    assert records[5]["logger"] == "apscheduler.scheduler"


def test_the_same_json_without_a_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "other", "w+", encoding="utf-8") as journal:
        # Inherited from a service, but this stream is a file of its own: no prefix.
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")
        assert not is_journal_stream(journal)
        configure_logging("debug", "json", stream=journal)
        log_every_level()
        journal.flush()
        lines = (tmp_path / "other").read_text().splitlines()
    assert [json.loads(line)["level"] for line in lines][:3] == ["debug", "info", "warning"]


def test_a_stream_without_a_file_is_no_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    stream = io.StringIO()
    assert not is_journal_stream(stream)
    configure_logging("info", "json", stream=stream)
    get_logger("ckptd.test").error("prune_failed")
    assert stream.getvalue().startswith("{")


def test_console_format_to_the_journal_prefixes_every_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "journal", "w+", encoding="utf-8") as journal:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(journal))
        configure_logging("info", "console", stream=journal)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            get_logger("ckptd.test").exception("job_failed")
        journal.flush()
        lines = (tmp_path / "journal").read_text().splitlines()
    assert len(lines) > 1  # the traceback
    assert all(line.startswith("<3>") for line in lines)
