"""Benchmark discovery against `du -s` on the same tree, in the same run.

    python bench/bench_scan.py [--checkpoints 10000] [--files 20] [--repeat 5] [--drop-caches]

Builds N checkpoint folders of F small files (plus trainer_state.json) in a temporary folder
on the real disk (under /work or /var/tmp, never tmpfs), then measures:

- cold scan: `discovery.scan` with a fresh, empty size cache (every checkpoint walked) against
  `du -s` on the same tree. Target: at most 1.5x du. Both run with the page cache warm (the
  tree was just written and each tool runs once before timing), unless `--drop-caches` (root
  only): then `echo 3 > /proc/sys/vm/drop_caches` runs before *each* timed run of both tools.
- rescan after one new checkpoint: a scan with the cache filled by the previous scan, after one
  more checkpoint folder was written. Target: under 20 ms.
- saving and loading the persisted cache (no target; for the README).

The best of `--repeat` runs is compared (the machine is shared; the minimum is the least noisy
estimate of each tool's own cost). Prints a table; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.config import RootConfig
from daemon.discovery import scan
from daemon.sizecache import SizeCache
from tests.layouts_fixtures import many_folders

COLD_RATIO_TARGET = 1.5
RESCAN_TARGET_SECONDS = 0.020


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3\n")


def _time_du(root: Path, drop: bool) -> float:
    if drop:
        _drop_caches()
    started = time.perf_counter()
    subprocess.run(["du", "-s", str(root)], check=True, capture_output=True)
    return time.perf_counter() - started


def _time_cold_scan(root: Path, drop: bool, expected: int) -> float:
    if drop:
        _drop_caches()
    config = RootConfig(path=str(root), layout="auto")
    started = time.perf_counter()
    result = scan(config, now=time.time(), settle_seconds=60, cache=SizeCache())
    elapsed = time.perf_counter() - started
    assert len(result.checkpoints) == expected, (len(result.checkpoints), expected)
    assert result.walked == expected
    return elapsed


def _default_parent() -> str:
    for candidate in ("/work", "/var/tmp"):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return candidate
    return tempfile.gettempdir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="drop the page cache before each timed run (root)",
    )
    parser.add_argument("--parent", default=_default_parent(), help="where to build the tree")
    arguments = parser.parse_args()
    if arguments.drop_caches and os.geteuid() != 0:
        parser.error("--drop-caches needs root")
    if shutil.which("du") is None:
        parser.error("du is not installed")

    workspace = Path(tempfile.mkdtemp(prefix="ckptd-bench-scan-", dir=arguments.parent))
    try:
        root = workspace / "run"
        started = time.perf_counter()
        many_folders(root, arguments.checkpoints, files=arguments.files)
        built = time.perf_counter() - started
        count = arguments.checkpoints
        fs_type = subprocess.run(
            ["stat", "-f", "-c", "%T", str(root)], capture_output=True, text=True
        ).stdout.strip()
        cache_mode = "dropped before each timed run" if arguments.drop_caches else "warm"
        print(
            f"tree: {count} checkpoints x {arguments.files} files in {root} ({fs_type}), "
            f"built in {built:.1f} s; page cache: {cache_mode}"
        )

        # One untimed run of each, so "warm" means warm for both.
        _time_du(root, False)
        _time_cold_scan(root, False, count)
        du_times, scan_times = [], []
        for _ in range(arguments.repeat):
            du_times.append(_time_du(root, arguments.drop_caches))
            scan_times.append(_time_cold_scan(root, arguments.drop_caches, count))

        cache = SizeCache(str(workspace / "size-cache.json"))
        config = RootConfig(path=str(root), layout="auto")
        scan(config, now=time.time(), settle_seconds=60, cache=cache)
        rescan_times = []
        for index in range(arguments.repeat):
            many_folders(root, 1, files=arguments.files, start=count + 1 + index)
            started = time.perf_counter()
            result = scan(config, now=time.time(), settle_seconds=60, cache=cache)
            rescan_times.append(time.perf_counter() - started)
            assert result.walked == 1, result.walked
            assert len(result.checkpoints) == count + 1 + index
        started = time.perf_counter()
        cache.save()
        save_time = time.perf_counter() - started
        started = time.perf_counter()
        reloaded = SizeCache(str(workspace / "size-cache.json"))
        load_time = time.perf_counter() - started
        started = time.perf_counter()
        result = scan(config, now=time.time(), settle_seconds=60, cache=reloaded)
        after_restart = time.perf_counter() - started
        assert result.walked == 0, result.walked
    finally:
        shutil.rmtree(workspace, ignore_errors=True)

    du_best, scan_best, rescan_best = min(du_times), min(scan_times), min(rescan_times)
    ratio = scan_best / du_best
    rows = [
        (f"du -s (best of {arguments.repeat})", du_best, "", ""),
        ("cold scan, empty cache", scan_best, f"{ratio:.2f}x du", f"<= {COLD_RATIO_TARGET}x du"),
        (
            "rescan after 1 new checkpoint",
            rescan_best,
            "",
            f"< {RESCAN_TARGET_SECONDS * 1000:.0f} ms",
        ),
        ("scan after restart (loaded cache)", after_restart, "", ""),
        ("cache save (JSON)", save_time, "", ""),
        ("cache load (JSON)", load_time, "", ""),
    ]
    print(f"{'measurement':<36} {'time':>10} {'ratio':>10}  target")
    for label, seconds, ratio_text, target in rows:
        print(f"{label:<36} {seconds * 1000:>8.1f}ms {ratio_text:>10}  {target}")
    print(
        "all runs (ms): du "
        + " ".join(f"{t * 1000:.0f}" for t in du_times)
        + " | scan "
        + " ".join(f"{t * 1000:.0f}" for t in scan_times)
        + " | rescan "
        + " ".join(f"{t * 1000:.1f}" for t in rescan_times)
    )
    missed = []
    if ratio > COLD_RATIO_TARGET:
        missed.append(f"cold scan {ratio:.2f}x du > {COLD_RATIO_TARGET}x")
    if rescan_best >= RESCAN_TARGET_SECONDS:
        missed.append(
            f"rescan {rescan_best * 1000:.1f} ms >= {RESCAN_TARGET_SECONDS * 1000:.0f} ms"
        )
    for line in missed:
        print(f"TARGET MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
