"""`ckptd release ROOT NAME --by HOLDER`: remove that holder's hold on a checkpoint.

Other holders' holds on it stay. Exit 0 when the hold was removed; exit 1, with a message, when
that holder had no hold on it (already released, or expired and removed by a prune: a script
that does not mind writes `ckptd release ... || true`); exit 2 for a name or holder that
cannot be one.
"""

from __future__ import annotations

import argparse
import sys

from daemon.commands._common import open_root_argument, refuse_remote
from daemon.errors import EXIT_FAILED, EXIT_OK
from daemon.holds import release_hold


def main(args: argparse.Namespace) -> int:
    """Given parsed `release` arguments, remove the hold and return the exit code."""
    _config, root = open_root_argument(args.root, args.config)
    refuse_remote("release", root)
    if release_hold(root.path, args.name, args.by):
        print(f"released {args.name} (was held by {args.by})")
        return EXIT_OK
    print(f"ckptd release: {args.by} holds nothing on {args.name}", file=sys.stderr)
    return EXIT_FAILED
