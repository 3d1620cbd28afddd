"""`ckptd last-good ROOT [--config FILE] [--series SERIES] [--json]`: for resume scripts.

    python train.py --resume_from_checkpoint "$(ckptd last-good /data/run)"

Prints the path of the newest complete checkpoint that is not corrupt: its integrity is
checked now if it was not before (the newest ones, down to the first that passes; see
`daemon/verification.py`), with what the daemon remembered in state_dir. Where a root holds
several series, the newest of each series' newest (by time written), or `--series`'s. Exit 1,
with a message on stderr (and `"path": null` with `--json`), when there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from daemon.commands._common import open_root_argument, verification_state_for
from daemon.errors import EXIT_FAILED, EXIT_OK
from daemon.planner import Planned, plan_root_full
from daemon.storage.url import report_key
from daemon.verification import is_marked_corrupt, newest_sound


def last_good_document(planned: Planned, series: str | None) -> dict[str, Any]:
    """Given a planning of a root, return the `last-good --json` document."""
    root = report_key(planned.scan.root)
    chosen = newest_sound(planned.scan.checkpoints, series)
    corrupt = [c.name for c in planned.scan.checkpoints if is_marked_corrupt(c)]
    document: dict[str, Any] = {"root": root, "path": None, "corrupt": corrupt}
    if chosen is not None:
        verdict = planned.assessment.verdicts.get(chosen.name)
        document.update(
            path=os.path.join(root, chosen.name),
            name=chosen.name,
            step=chosen.step,
            series=chosen.series,
            integrity=verdict.status if verdict is not None else "unchecked",
        )
    return document


def main(args: argparse.Namespace) -> int:
    """Given parsed `last-good` arguments, print the path and return the exit code."""
    config, root = open_root_argument(args.root, args.config)
    state = verification_state_for(config, args.root, args.config)
    planned = plan_root_full(config, root, now=time.time(), verification=state)
    state.save()
    document = last_good_document(planned, args.series)
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif document["path"] is not None:
        print(document["path"])
    if document["path"] is None:
        where = f" of series {args.series}" if args.series else ""
        message = f"no complete checkpoint{where} that is not corrupt in {document['root']}"
        print(f"ckptd last-good: {message}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
