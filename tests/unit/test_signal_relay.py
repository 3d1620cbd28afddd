"""Signals reach the daemon's events through a pipe and a thread, never from the handler."""

from __future__ import annotations

import os
import signal
import threading
import time

from daemon.commands.run import SignalRelay


def test_signals_set_the_events_from_the_relay_thread() -> None:
    stop, reload = threading.Event(), threading.Event()
    before = signal.getsignal(signal.SIGHUP)
    with SignalRelay(stop, reload):
        os.kill(os.getpid(), signal.SIGHUP)
        assert reload.wait(5.0) and not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5.0)
    assert signal.getsignal(signal.SIGHUP) is before  # handlers and wakeup fd are given back


def test_a_storm_of_signals_while_the_main_thread_waits_on_the_event_never_wedges_it() -> None:
    """The main thread sits in `stop.wait()` (holding the event's lock at moments) while
    signals arrive; setting the event from the handler there could deadlock it."""
    stop, reload = threading.Event(), threading.Event()
    pid = os.getpid()

    def storm() -> None:
        for _ in range(300):
            os.kill(pid, signal.SIGHUP)
        os.kill(pid, signal.SIGTERM)

    with SignalRelay(stop, reload):
        sender = threading.Thread(target=storm)
        started = time.monotonic()
        sender.start()
        while not stop.wait(0.0001):
            reload.clear()
            assert time.monotonic() - started < 10.0
        sender.join()
    assert stop.is_set()
