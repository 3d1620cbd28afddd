"""`ckptd forget-root PATH [--config FILE]`: accept that a root's folder changed on purpose.

ckptd records each root's identity (device, inode, owner) in `<state_dir>/roots.json` when it
first sees it and refuses the root when another folder is at its path (daemon/rootdir.py): a
root swapped for a symlink must never be followed. When the change was intended (an admin
re-created the folder), this forgets the old identity — and any refusal reported for it — and
the next run records the folder that is there then.
"""

from __future__ import annotations

import argparse

from daemon.commands._common import load_selected_config
from daemon.errors import EXIT_OK, UsageError
from daemon.rootdir import IdentityStore, root_key


def main(args: argparse.Namespace) -> int:
    """Given parsed `forget-root` arguments, forget the root's identity; return the exit code."""
    config = load_selected_config(args.config)
    store = IdentityStore.in_state_dir(config.state_dir)
    if store is None:
        raise UsageError(f"no state folder {config.state_dir}: nothing is recorded there")
    key = root_key(args.path)
    forgotten = store.forget(key)
    if forgotten is None:
        print(f"nothing recorded for {key} in {store.path}")
    else:
        print(f"forgot {key} ({forgotten.describe()}); the next run records the folder there now")
    return EXIT_OK
