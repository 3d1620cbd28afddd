"""`ckptd demo`: a simulated trainer and the daemon, live, in a temporary folder."""

from __future__ import annotations

import argparse

from daemon.demo import run_demo


def main(args: argparse.Namespace) -> int:
    """Given parsed arguments, run the demo and return its exit code."""
    return run_demo(float(args.seconds), keep=bool(args.keep))
