"""`ckptd hold ROOT NAME (--until TIME | --for DURATION) --by HOLDER [--reason TEXT] [--force]`.

Writes `<ROOT>/.ckptd-holds/<NAME>/<HOLDER>.json` (the format is in `daemon/holds.py`: other
tools may write the same file by hand): the checkpoint is kept until then, shown in `ckptd
plan` as `held:<HOLDER> until <time>`. Placing the same holder's hold again replaces it (to
extend or shorten it). A time without an offset is in the config's `timezone` (else the
machine's). Exit 2, nothing written, when NAME is not a checkpoint of ROOT (as a scan finds
it), the time is not in the future, or it is more than a year ahead without `--force`.
"""

from __future__ import annotations

import argparse
import os
import time

from daemon.clock import zone_for
from daemon.commands._common import open_root_argument, refuse_remote
from daemon.config import settings_for
from daemon.discovery.scan import scan
from daemon.holds import check_holder, check_name, expiry, place_hold


def main(args: argparse.Namespace) -> int:
    """Given parsed `hold` arguments, place the hold and return the exit code."""
    config, root = open_root_argument(args.root, args.config)
    refuse_remote("hold", root)
    check_name(args.name)
    check_holder(args.by)
    now = time.time()
    zone = zone_for(config)
    until, given = expiry(until=args.until, duration=args.duration, now=now, tz=zone)
    found = scan(root, now=now, settle_seconds=settings_for(config, root).settle_seconds)
    hold = place_hold(
        root.path,
        args.name,
        args.by,
        until,
        args.reason,
        now=now,
        force=args.force,
        known_names={checkpoint.name for checkpoint in found.checkpoints},
        given=given,
    )
    shown = hold.until.astimezone(zone).isoformat(timespec="minutes")
    print(f"held {os.path.join(found.root, hold.checkpoint)} for {hold.holder} until {shown}")
    return 0
