"""`ckptd plan [ROOT] [--config FILE] [--json]`: what would be kept and deleted, and why."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from daemon.config import Config, RootConfig, default_config_for_root, load_config
from daemon.errors import UsageError
from daemon.planner import plan_root
from daemon.render import make_console, plan_to_json, print_plan


def select_roots(
    root_argument: str | None, config_argument: str | None
) -> tuple[Config, list[RootConfig]]:
    """Given the ROOT and --config arguments, return the config and the roots to act on.

    A ROOT without --config gets the built-in defaults (the balanced preset). A ROOT with --config
    must be one of its roots, or it gets the config's defaults. Neither: every configured root of
    the default config file.
    """
    from daemon.cli import resolve_config_path

    if root_argument is not None:
        root_path = os.path.abspath(root_argument)
        if not os.path.exists(root_path):
            raise UsageError(f"{root_argument}: no such folder")
        if not os.path.isdir(root_path):
            raise UsageError(f"{root_argument}: not a folder")
        if config_argument is None:
            config = default_config_for_root(root_path)
            return config, list(config.roots)
        config = load_config(config_argument)
        for root in config.roots:
            if os.path.realpath(root.path) == os.path.realpath(root_path):
                return config, [root]
        return config, [RootConfig(path=root_path)]
    config_path = resolve_config_path(config_argument)
    if config_argument is None and not os.path.exists(config_path):
        raise UsageError(f"give a ROOT folder or --config FILE (no config at {config_path})")
    config = load_config(config_path)
    if not config.roots:
        raise UsageError(f"{config_path}: no roots configured")
    return config, list(config.roots)


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
