"""`ckptd plan [ROOT] [--config FILE] [--json]`: what would be kept and deleted, and why."""

from __future__ import annotations

import argparse
import json
import sys
import time

from daemon.commands._common import select_roots
from daemon.planner import plan_root
from daemon.render import make_console, plan_to_json, print_plan


def main(args: argparse.Namespace) -> int:
    """Given parsed `plan` arguments, print the plan of each root and return the exit code."""
    config, roots = select_roots(args.root, args.config)
    now = time.time()
    documents = []
    console = make_console()
    for index, root in enumerate(roots):
        scan, plan = plan_root(config, root, now=now)
        if args.json:
            documents.append(plan_to_json(plan))
            continue
        if index:
            console.print()
        print_plan(console, plan, layout=scan.layout, unfold=args.all)
    if args.json:
        # One root: the documented object; several: a list of them.
        output = documents[0] if len(documents) == 1 else documents
        json.dump(output, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0
