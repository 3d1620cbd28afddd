"""sd_notify without a dependency: a few datagrams over the socket systemd names in NOTIFY_SOCKET.

Under `Type=notify` systemd waits for `READY=1`, kills the service when `WATCHDOG=1` stops
arriving for `WatchdogSec`, shows `STATUS=` in `systemctl status`, and expects `RELOADING=1` with
`MONOTONIC_USEC=` then `READY=1` around a reload. Outside systemd (no NOTIFY_SOCKET) every call is
a no-op, so the daemon runs the same in a terminal.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping


def monotonic_usec() -> int:
    """Given nothing, return CLOCK_MONOTONIC in microseconds (what systemd compares against)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Given the environment, send sd_notify messages to systemd (or nothing when not under it)."""

    def __init__(self, environment: Mapping[str, str] | None = None) -> None:
        environment = os.environ if environment is None else environment
        address = environment.get("NOTIFY_SOCKET", "")
        # "@name" is Linux's abstract namespace: the leading byte is NUL on the wire.
        self.address: str | None = ("\0" + address[1:]) if address.startswith("@") else address
        if not address:
            self.address = None
        self.watchdog_interval: float | None = self._watchdog_interval(environment)
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _watchdog_interval(environment: Mapping[str, str]) -> float | None:
        """Given the environment, return seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC."""
        try:
            microseconds = int(environment.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if microseconds <= 0:
            return None
        # WATCHDOG_PID names the process systemd expects the pings from; another one ignores them.
        watchdog_pid = environment.get("WATCHDOG_PID")
        if watchdog_pid and watchdog_pid != str(os.getpid()):
            return None
        return microseconds / 1_000_000 / 2

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Given `KEY=value` lines, send them as one datagram; return whether it was sent.

        Failures are swallowed: losing a status line must never take the daemon down.
        """
        if self.address is None:
            return False
        message = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.setblocking(False)
                self._socket.sendto(message, self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
