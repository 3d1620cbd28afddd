"""The attacker corpus of issue 10, each race run for minutes: trials and outside changes.

A real unprivileged user is created (and removed at the end); she owns a root and its parent
and attacks ckptd (this process, root) through them, trial after trial, as in tests/hostile/
(tests/hostile/attacks.py holds the attacks): a symlinked trash, a `.lock` symlink in a trash of
hers, her trash item swapped during a purge, the trash swapped during crash recovery, a `.keep`
symlink raced into a restore, the root swapped for a symlink to another user's run, and
checkpoints swapped for symlinks while a prune moves and removes them. After every trial the
checksums of a sentinel tree outside the root are compared. Goal: 0 outside changes.
`refused` counts ckptd's runs in the trials that refused (or failed on a path vanishing under
them, which the daemon logs and retries): the attacker stopped them, and nothing changed.

    sudo PYTHONPATH=. .venv/bin/python bench/bench_attacks.py [--seconds 600] [--only root-swap]

Exit status 1 when any trial changed anything outside the root; 2 when it cannot run (not root).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.hostile.attacks import (
    ATTACKS,
    RACES,
    arena_for,
    attacker_unavailable,
    create_attacker,
    remove_attacker,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=600.0, help="how long each race runs (default 600)"
    )
    parser.add_argument("--only", nargs="*", choices=sorted(ATTACKS), help="only these attacks")
    parser.add_argument("--dir", default=None, help="where to build the arenas (default: /tmp)")
    args = parser.parse_args()
    reason = attacker_unavailable()
    if reason is not None:
        print(f"bench_attacks: {reason}", file=sys.stderr)
        return 2
    attacker = create_attacker()
    changed = 0
    print(f"attacker: {attacker.name} (uid {attacker.uid}); races run {args.seconds:g} s each")
    print(f"{'attack':16} {'seconds':>8} {'trials':>7} {'refused':>8} {'outside-changes':>16}")
    try:
        for name in args.only or list(ATTACKS):
            seconds = args.seconds if name in RACES else min(args.seconds, 10.0)
            with arena_for(attacker, Path(args.dir) if args.dir else None) as arena:
                started = time.monotonic()
                outcome = ATTACKS[name](arena, seconds)
                took = time.monotonic() - started
            changed += outcome.outside_changes
            print(
                f"{name:16} {took:8.1f} {outcome.trials:7d} {outcome.refused:8d} "
                f"{outcome.outside_changes:16d}",
                flush=True,
            )
            for change in outcome.changes[:5]:
                print(f"    {change}")
    finally:
        remove_attacker(attacker)
    print("goal: 0 outside changes: " + ("ok" if changed == 0 else f"MISSED ({changed})"))
    return 0 if changed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
