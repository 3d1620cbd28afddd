"""The daemon's `config_reloaded` log line says what changed (not only that something did)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.logs import configure_logging
from tests.configs import rotation, write_config
from tests.integration.test_service import (
    DAEMON,
    Listener,
    daemon_setup,  # noqa: F401 - the fixture
    save_checkpoint,
    wait_until,
)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    yield stream
    configure_logging("info", "console", stream=io.StringIO())


def test_config_reloaded_names_each_change(
    daemon_setup: dict[str, object],  # noqa: F811 - the fixture
    log_stream: io.StringIO,
) -> None:
    root: Path = daemon_setup["root"]  # type: ignore[assignment]
    state: Path = daemon_setup["state"]  # type: ignore[assignment]
    config: Path = daemon_setup["config"]  # type: ignore[assignment]
    listener: Listener = daemon_setup["listener"]  # type: ignore[assignment]
    stop: threading.Event = daemon_setup["stop"]  # type: ignore[assignment]
    for step in range(1, 5):
        save_checkpoint(root, step * 10)
    write_config(config, [root], state_dir=state, policy=rotation(3), **DAEMON)
    thread: threading.Thread = daemon_setup["start"]()  # type: ignore[operator]
    assert wait_until(lambda: "READY=1" in listener.lines())

    def reloaded() -> list[dict[str, object]]:
        records = [json.loads(line) for line in log_stream.getvalue().splitlines()]
        return [record for record in records if record.get("event") == "config_reloaded"]

    write_config(config, [root], state_dir=state, policy=rotation(2), **DAEMON)
    assert wait_until(lambda: bool(reloaded()), 10)
    assert reloaded()[0]["changed"] == ["defaults.policy.keep_last: 3 -> 2"]
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
