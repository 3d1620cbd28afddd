"""`ckptd plan [ROOT] [--config FILE] [--json] [--all]`: what would be kept and deleted, and why.

Per root: which policy applies and where it comes from, the cadence, the warnings (among them a
prune that `max_delete_fraction` would refuse), the timeline with each checkpoint's age, the
entries a `protect:` glob keeps beside the checkpoints, and the totals. On a standby node (a
shared root whose lease another node holds) a line says that node applies the plan, not this
one (`--json`: `standby`, null elsewhere); the lease is only looked at, never taken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from daemon.commands._common import protected_entries, select, warn_missing
from daemon.config import Config, RootConfig
from daemon.planner import plan_root
from daemon.pruning import leasing
from daemon.pruning.pipeline import safety_settings
from daemon.render import make_console, plan_to_json, print_plan
from daemon.safety import guard
from daemon.safety.facts import Facts
from policies.model import Plan


def refusal_warning(config: Config, root: RootConfig, plan: Plan, *, now: float) -> str | None:
    """Given a root and its plan, return why `ckptd prune` would refuse it for a limit only a
    person can lift (`max_delete_fraction`), else None. Processes are not looked at: the
    trainer holding the newest checkpoint is a refusal that clears by itself."""
    safety = safety_settings(config, root)
    try:
        guard.guard(plan, Facts(root_path=os.path.realpath(root.path), now=now), safety)
    except guard.RootRefused as refused:
        if not refused.transient:
            return f"ckptd prune would refuse this root: {refused.reason}"
    return None


def main(args: argparse.Namespace) -> int:
    """Given parsed `plan` arguments, print the plan of each root and return the exit code."""
    selection = select(args.root, args.config)
    now = time.time()
    documents = []
    console = make_console()
    for index, root in enumerate(selection.roots):
        scan, plan = plan_root(selection.config, root, now=now)
        protected = protected_entries(root, plan)
        warning = refusal_warning(selection.config, root, plan, now=now)
        standby = leasing.standby(selection.config, root)
        if args.json:
            document = plan_to_json(plan, protected=protected, policy=selection.policy_line(root))
            document["warnings"] += [warning] if warning else []
            document["standby"] = standby.to_json() if standby is not None else None
            documents.append(document)
            continue
        if index:
            console.print()
        selection.print_policy(console, root)
        print_plan(
            console,
            plan,
            layout=scan.layout,
            unfold=args.all,
            now=now,
            protected=protected,
            warnings=[warning] if warning else [],
        )
        if standby is not None:
            console.print(standby.line(time.time()), markup=False)
    if args.json:
        # One root: the documented object; several: a list of them.
        output = documents[0] if len(documents) == 1 else documents
        json.dump(output, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return warn_missing("plan", selection.missing)
