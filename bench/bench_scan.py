"""Benchmark discovery against `du -s` on the same tree, in the same run.

    python bench/bench_scan.py [--checkpoints 10000] [--files 20] [--repeat 5] [--warm-only]

Builds N checkpoint folders of F small files (F-1 shards plus trainer_state.json) in a
temporary folder on the real disk (under /work or /var/tmp, never tmpfs), then measures:

- cold scan: `discovery.scan` with a fresh, empty size cache (every checkpoint walked)
  against `du -s` on the same tree, twice:
  * page cache dropped (root only; `echo 3 > /proc/sys/vm/drop_caches` before *each* timed
    run of *both* tools): the real cold start of a daemon after a reboot. Target: <= 1.5x du.
  * page cache warm (each tool runs once untimed first): the same target.
- rescan after one new checkpoint: a scan with the cache filled by the previous scan, after
  one more checkpoint folder was written. Target: under 20 ms.
- a scan after a restart (cache saved to JSON and loaded), and the save and load themselves.

The best of `--repeat` runs of each is compared (the machine may be shared; the minimum is
the least noisy estimate of each tool's own cost). Prints a table; exits 1 when a target is
missed.
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
from daemon.discovery.scan import scan
from daemon.discovery.sizecache import SizeCache
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


def _best_pair(root: Path, repeat: int, drop: bool, count: int) -> tuple[list[float], list[float]]:
    du_times, scan_times = [], []
    for _ in range(repeat):
        du_times.append(_time_du(root, drop))
        scan_times.append(_time_cold_scan(root, drop, count))
    return du_times, scan_times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--warm-only", action="store_true", help="do not drop the page cache (needs root)"
    )
    parser.add_argument("--parent", default=_default_parent(), help="where to build the tree")
    arguments = parser.parse_args()
    if shutil.which("du") is None:
        parser.error("du is not installed")
    can_drop = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    drop = can_drop and not arguments.warm_only

    workspace = Path(tempfile.mkdtemp(prefix="ckptd-bench-scan-", dir=arguments.parent))
    count = arguments.checkpoints
    try:
        root = workspace / "run"
        started = time.perf_counter()
        many_folders(root, count, files=arguments.files)
        built = time.perf_counter() - started
        fs_type = subprocess.run(
            ["stat", "-f", "-c", "%T", str(root)], capture_output=True, text=True, check=False
        ).stdout.strip()
        print(
            f"tree: {count} checkpoints x {arguments.files} files in {root} ({fs_type}), "
            f"built in {built:.1f} s; {os.cpu_count()} CPUs; "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        # One untimed run of each, so "warm" means warm for both.
        _time_du(root, False)
        _time_cold_scan(root, False, count)
        warm_du, warm_scan = _best_pair(root, arguments.repeat, False, count)
        cold_du, cold_scan = _best_pair(root, arguments.repeat, True, count) if drop else ([], [])

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

    warm_ratio = min(warm_scan) / min(warm_du)
    rows: list[tuple[str, float, str, str]] = []
    if drop:
        cold_ratio = min(cold_scan) / min(cold_du)
        rows += [
            ("du -s, page cache dropped", min(cold_du), "", ""),
            ("scan, empty cache, page cache dropped", min(cold_scan), f"{cold_ratio:.2f}x du",
             f"<= {COLD_RATIO_TARGET}x du"),
        ]  # fmt: skip
    rows += [
        ("du -s, page cache warm", min(warm_du), "", ""),
        ("scan, empty cache, page cache warm", min(warm_scan), f"{warm_ratio:.2f}x du",
         f"<= {COLD_RATIO_TARGET}x du"),
        ("rescan after 1 new checkpoint", min(rescan_times), "",
         f"< {RESCAN_TARGET_SECONDS * 1000:.0f} ms"),
        ("scan after restart (cache loaded)", after_restart, "", ""),
        ("size cache save (JSON)", save_time, "", ""),
        ("size cache load (JSON)", load_time, "", ""),
    ]  # fmt: skip
    print(f"best of {arguments.repeat} runs each")
    print(f"{'measurement':<40} {'time':>10} {'ratio':>9}  target")
    for label, seconds, ratio_text, target in rows:
        print(f"{label:<40} {seconds * 1000:>8.1f}ms {ratio_text:>9}  {target}")

    def runs(times: list[float]) -> str:
        return " ".join(f"{t * 1000:.0f}" for t in times)

    print(
        f"all runs (ms): warm du {runs(warm_du)} | warm scan {runs(warm_scan)}"
        + (f" | cold du {runs(cold_du)} | cold scan {runs(cold_scan)}" if drop else "")
        + " | rescan "
        + " ".join(f"{t * 1000:.1f}" for t in rescan_times)
    )
    missed = []
    if drop and min(cold_scan) / min(cold_du) > COLD_RATIO_TARGET:
        missed.append(
            f"scan, page cache dropped: {min(cold_scan) / min(cold_du):.2f}x du"
            f" > {COLD_RATIO_TARGET}x"
        )
    if warm_ratio > COLD_RATIO_TARGET:
        missed.append(f"scan, page cache warm: {warm_ratio:.2f}x du > {COLD_RATIO_TARGET}x")
    if min(rescan_times) >= RESCAN_TARGET_SECONDS:
        missed.append(f"rescan {min(rescan_times) * 1000:.1f} ms >= 20 ms")
    for line in missed:
        print(f"TARGET MISSED: {line}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
