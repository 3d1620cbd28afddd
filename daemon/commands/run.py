"""`ckptd run --config FILE`: the daemon. Parses nothing itself; signals only set events."""

from __future__ import annotations

import argparse
import signal
import threading

from daemon.commands._common import config_path
from daemon.service.lifecycle import serve


def main(args: argparse.Namespace) -> int:
    """Given parsed arguments, run the daemon until SIGTERM/SIGINT; return its exit code."""
    stop = threading.Event()
    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda _number, _frame: stop.set())
    signal.signal(signal.SIGINT, lambda _number, _frame: stop.set())
    signal.signal(signal.SIGHUP, lambda _number, _frame: reload.set())
    return serve(config_path(args.config), stop=stop, reload=reload)
