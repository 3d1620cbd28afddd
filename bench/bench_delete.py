"""Deleting checkpoints through `deleter.apply` versus `rm -rf` on an identical tree, same run.

Default: 50 checkpoints of 20 files x 10 MB (10 GB per tree). Files are allocated with
`posix_fallocate` (real extents the filesystem must free, without writing 10 GB first). Each
round builds two identical trees, syncs, and times `rm -rf` on one and `deleter.apply` (the real
thing: last-moment /proc re-check per checkpoint, rename into the trash, fsyncs, removal,
history records) on the other, alternating which goes first. Prints a table; exits 1 when the
median ratio misses the target (1.1x).

    PYTHONPATH=. python bench/bench_delete.py [--checkpoints 50] [--files 20] [--size-mb 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.history.log import HistoryLog
from daemon.pruning import deleter
from policies.model import Checkpoint, Decision, Plan

TARGET = 1.1


def build_tree(
    root: Path, checkpoints: int, files: int, size: int, *, write: bool = False
) -> list[Checkpoint]:
    root.mkdir(parents=True)
    made = []
    for index in range(checkpoints):
        step = (index + 1) * 100
        folder = root / f"checkpoint-{step}"
        folder.mkdir()
        for number in range(files):
            descriptor = os.open(
                folder / f"shard-{number:05d}.bin", os.O_WRONLY | os.O_CREAT, 0o644
            )
            try:
                if write:
                    block = os.urandom(1 << 20)
                    for offset in range(0, size, len(block)):
                        os.write(descriptor, block[: min(len(block), size - offset)])
                else:
                    os.posix_fallocate(descriptor, 0, size)
            finally:
                os.close(descriptor)
        made.append(
            Checkpoint(
                name=folder.name, step=step, size_bytes=files * size, freeable_bytes=files * size
            )
        )
    return made


def time_rm(root: Path) -> float:
    targets = sorted(str(path) for path in root.iterdir())
    started = time.perf_counter()
    subprocess.run(["rm", "-rf", "--", *targets], check=True)
    return time.perf_counter() - started


def time_apply(root: Path, checkpoints: list[Checkpoint], history_path: str) -> float:
    plan = Plan(
        root=str(root),
        decisions=tuple(Decision(c, False, ("tier3:every-1000",), 3) for c in checkpoints),
    )
    with HistoryLog(history_path) as history:
        started = time.perf_counter()
        result = deleter.apply(
            plan, str(root), dry_run=False, now=time.time(), history=history, trash_grace=0.0
        )
        elapsed = time.perf_counter() - started
    if result.failed or len(result.deleted) != len(checkpoints):
        raise SystemExit(f"prune.apply did not delete everything: {result.failed}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=50)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to build the trees (default: a tmp dir)")
    parser.add_argument(
        "--write", action="store_true", help="write real bytes instead of fallocate (slow to build)"
    )
    args = parser.parse_args()
    size = int(args.size_mb * 1_000_000)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-delete-", dir=args.dir) as base:
        for round_number in range(args.rounds):
            rm_root = Path(base) / f"rm-{round_number}"
            apply_root = Path(base) / f"apply-{round_number}"
            build_tree(rm_root, args.checkpoints, args.files, size, write=args.write)
            checkpoints = build_tree(
                apply_root, args.checkpoints, args.files, size, write=args.write
            )
            os.sync()
            history_path = str(Path(base) / "history.jsonl")
            if round_number % 2 == 0:
                rm_seconds = time_rm(rm_root)
                os.sync()
                apply_seconds = time_apply(apply_root, checkpoints, history_path)
            else:
                apply_seconds = time_apply(apply_root, checkpoints, history_path)
                os.sync()
                rm_seconds = time_rm(rm_root)
            os.sync()
            rows.append((round_number + 1, rm_seconds, apply_seconds, apply_seconds / rm_seconds))
    total = args.checkpoints * args.files * size
    print(
        f"deleting {args.checkpoints} checkpoints x {args.files} files x {args.size_mb:g} MB "
        f"({total / 1e9:.1f} GB per tree, {'written' if args.write else 'fallocated'})"
    )
    print(f"{'round':>5}  {'rm -rf (s)':>10}  {'prune.apply (s)':>15}  {'ratio':>6}")
    for number, rm_seconds, apply_seconds, ratio in rows:
        print(f"{number:>5}  {rm_seconds:>10.3f}  {apply_seconds:>15.3f}  {ratio:>6.2f}")
    median_rm = statistics.median(r[1] for r in rows)
    median_apply = statistics.median(r[2] for r in rows)
    ratio = median_apply / median_rm
    verdict = "ok" if ratio <= TARGET else "MISS"
    print(
        f"{'median':>5}  {median_rm:>10.3f}  {median_apply:>15.3f}  {ratio:>6.2f}  "
        f"target <= {TARGET}x: {verdict}"
    )
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
