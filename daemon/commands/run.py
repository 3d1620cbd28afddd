"""`ckptd run --config FILE`: the daemon. Parses nothing itself; signals only set events."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from types import FrameType, TracebackType

from daemon.commands._common import config_path
from daemon.service.lifecycle import serve

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP,)


def _noted(_number: int, _frame: FrameType | None) -> None:
    """The Python-level handler does nothing: the wakeup pipe already carries the signal."""


class SignalRelay:
    """Given the stop and reload events, set them from a thread when the signals arrive.

    Why not `stop.set()` in the handler itself: a Python handler runs on the main thread between
    two bytecodes, possibly while that thread is inside `stop.wait()` holding the event's lock,
    and `Event.set()` then waits for that lock forever (seen under systemd: a SIGTERM ignored
    until the stop timeout killed the daemon). Instead the C-level handler writes the signal
    number into a pipe (`signal.set_wakeup_fd`), and one thread reads it and sets the events.
    """

    def __init__(self, stop: threading.Event, reload: threading.Event) -> None:
        self.stop = stop
        self.reload = reload
        self._read, self._write = os.pipe()
        self._previous_fd = -1
        self._previous: dict[int, object] = {}
        self._thread = threading.Thread(target=self._relay, name="ckptd-signals", daemon=True)

    def __enter__(self) -> SignalRelay:
        os.set_blocking(self._write, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for number in (*STOP_SIGNALS, *RELOAD_SIGNALS):
            self._previous[number] = signal.signal(number, _noted)
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        os.close(self._write)  # the relay reads end-of-file and returns
        self._thread.join()
        os.close(self._read)

    def _relay(self) -> None:
        while data := os.read(self._read, 64):
            for number in data:
                if number in STOP_SIGNALS:
                    self.stop.set()
                elif number in RELOAD_SIGNALS:
                    self.reload.set()


def main(args: argparse.Namespace) -> int:
    """Given parsed arguments, run the daemon until SIGTERM/SIGINT; return its exit code."""
    stop = threading.Event()
    reload = threading.Event()
    with SignalRelay(stop, reload):
        return serve(config_path(args.config), stop=stop, reload=reload)
