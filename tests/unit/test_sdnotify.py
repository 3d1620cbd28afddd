"""sd_notify against a real AF_UNIX datagram listener, as systemd has one."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.service.sdnotify import Notifier, monotonic_usec


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2.0)
    yield server, path
    server.close()


def receive(server: socket.socket) -> list[str]:
    return server.recv(4096).decode("utf-8").split("\n")


def test_no_socket_is_a_quiet_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog_interval is None


def test_ready_status_watchdog_stopping_arrive(listener: tuple[socket.socket, str]) -> None:
    server, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("watching 2 roots")
    assert receive(server) == ["READY=1", "STATUS=watching 2 roots"]
    assert notifier.watchdog()
    assert receive(server) == ["WATCHDOG=1"]
    assert notifier.status("line one\nline two")
    assert receive(server) == ["STATUS=line one line two"]
    assert notifier.stopping()
    assert receive(server) == ["STOPPING=1"]
    notifier.close()


def test_reloading_carries_the_monotonic_clock(listener: tuple[socket.socket, str]) -> None:
    server, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    before = monotonic_usec()
    notifier.reloading()
    lines = receive(server)
    after = monotonic_usec()
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    # Same clock as CLOCK_MONOTONIC in seconds.
    assert abs(int(value) / 1e6 - time.monotonic()) < 5
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"ckptd-test-{uuid.uuid4().hex}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2.0)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert receive(server) == ["READY=1"]
        notifier.close()
    finally:
        server.close()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "60000000"})
    assert notifier.watchdog_interval == 30.0
    other_pid = Notifier({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other_pid.watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "junk"}).watchdog_interval is None


def test_a_vanished_listener_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.watchdog() is False
    notifier.close()
