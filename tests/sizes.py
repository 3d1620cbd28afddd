"""What removing files gives back, measured independently of ckptd: allocated blocks.

ckptd reports freed bytes as the blocks the filesystem gets back (`st_blocks`, issue 10), not
the files' lengths; tests compute the same from `lstat` of what they made, before deleting.
"""

from __future__ import annotations

import os
from pathlib import Path


def blocks(*paths: str | Path) -> int:
    """Given files, return the bytes allocated to them."""
    return sum(os.lstat(path).st_blocks * 512 for path in paths)


def tree_blocks(*paths: str | Path) -> int:
    """Given files and folders, return the bytes allocated to every file among and below them
    (folders are not counted, as ckptd does not count them; no hard links expected)."""
    total = 0
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            for folder, _folders, files in os.walk(path):
                total += blocks(*(os.path.join(folder, name) for name in files))
        else:
            total += blocks(path)
    return total
