"""Benchmark: the daily snapshot against the system tools doing the same work, in one run.

A 1 GB checkpoint of 100 files of real (random, not sparse) data is snapshotted

- in hardlink mode, against `cp -al` (target: at most 1.5x), and
- in copy mode, against `cp -r` (target: at most 1.2x),

through the whole snapshot path (`run_daily_snapshot`: plan, place, fsync every file and folder,
MANIFEST.json, rename into place). The snapshot fsyncs what it writes and `cp` does not, so each
`cp` is timed with a `sync` after it too, and the targets are checked against that equal-work
figure ("cp + sync", `sync -f` of the target filesystem, the same syncfs(2) the snapshot
makes); the plain `cp` figure is printed beside it.

Page cache: equalized, not dropped. The source is read once before the runs (warm for every
contender), and `sync` runs before each timed run so no run pays for the previous one's dirty
pages. `--cold` drops the caches before each run instead (root only).

    PYTHONPATH=. python bench/bench_snapshot.py [--size 1GB] [--files 100] [--repeat 3]

Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from daemon.config import Config, DiskConfig, RootConfig, SnapshotsConfig, parse_size
from daemon.discovery.scan import ScanResult
from daemon.history.log import NULL_HISTORY
from daemon.snapshots.daily import run_daily_snapshot
from policies.model import Checkpoint, Decision, Plan

CHECKPOINT = "checkpoint-1000"


def write_checkpoint(root: str, total: int, files: int) -> None:
    folder = os.path.join(root, CHECKPOINT)
    os.makedirs(folder)
    per_file = total // files
    block = os.urandom(1 << 20)
    for index in range(files):
        with open(os.path.join(folder, f"shard-{index:03d}.bin"), "wb") as handle:
            written = 0
            while written < per_file:
                # Each MiB differs (a counter in front), so nothing can deduplicate it.
                chunk = index.to_bytes(4, "little") + written.to_bytes(8, "little") + block[12:]
                chunk = chunk[: per_file - written]
                handle.write(chunk)
                written += len(chunk)
    with open(os.path.join(folder, "trainer_state.json"), "w") as handle:
        handle.write('{"global_step": 1000}')


def one_checkpoint(config: Config, root: RootConfig, *, now: float) -> tuple[ScanResult, Plan]:
    checkpoint = Checkpoint(name=CHECKPOINT, step=1000, layout="hf")
    return (
        ScanResult(root.path, "hf", (checkpoint,), ("default",)),
        Plan(root.path, (Decision(checkpoint, True, ("tier1",), 1),)),
    )


def settle(cold: bool, source: str) -> None:
    subprocess.run(["sync"], check=True)
    if cold:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    else:
        for name in os.listdir(source):
            with open(os.path.join(source, name), "rb") as handle:
                while handle.read(8 << 20):
                    pass


def timed(action: Callable[[], None], *, cold: bool, source: str) -> float:
    settle(cold, source)
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1GB")
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="where to write (one filesystem)")
    parser.add_argument("--cold", action="store_true", help="drop page caches before each run")
    options = parser.parse_args()
    total = parse_size(options.size)
    work = tempfile.mkdtemp(prefix="ckptd-bench-", dir=options.dir)
    root = os.path.join(work, "run")
    source = os.path.join(root, CHECKPOINT)
    counter = iter(range(10_000))
    try:
        write_checkpoint(root, total, options.files)

        def fresh() -> str:
            return os.path.join(work, f"out-{next(counter)}")

        def cp(flags: list[str], then_sync: bool) -> Callable[[], None]:
            def run() -> None:
                target = fresh()
                os.makedirs(target)
                subprocess.run(["cp", *flags, source, target], check=True)
                if then_sync:
                    # syncfs of the target's filesystem only, as the snapshot does.
                    subprocess.run(["sync", "-f", target], check=True)

            return run

        def ckptd(
            method: str, hash_shared: bool = False, hash_copies: bool = True
        ) -> Callable[[], None]:
            def run() -> None:
                config = Config(
                    timezone="UTC",
                    roots=[RootConfig(path=root)],
                    snapshots=SnapshotsConfig(dir=fresh(), method=method),  # type: ignore[arg-type]
                    disk=DiskConfig(critical_percent=100),
                )
                report = run_daily_snapshot(
                    config,
                    now=datetime.now(UTC),
                    history=NULL_HISTORY,
                    plan=one_checkpoint,
                    hash_shared=hash_shared,
                    hash_copies=hash_copies,
                )
                if report.status != "done":
                    raise SystemExit(f"snapshot {method} failed: {report.reason}")

            return run

        contenders: dict[str, Callable[[], None]] = {
            "cp -al": cp(["-al"], False),
            "cp -al + sync": cp(["-al"], True),
            "ckptd hardlink": ckptd("hardlink"),
            "ckptd hardlink, hashing links": ckptd("hardlink", hash_shared=True),
            "cp -r": cp(["-r"], False),
            "cp -r + sync": cp(["-r"], True),
            "ckptd copy": ckptd("copy"),
            "ckptd copy, no checksums": ckptd("copy", hash_copies=False),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(options.repeat):
            # Interleaved, so drift on a shared machine hits every contender alike.
            for name, action in contenders.items():
                times[name].append(timed(action, cold=options.cold, source=source))
                for leftover in os.listdir(work):
                    if leftover.startswith("out-"):
                        shutil.rmtree(os.path.join(work, leftover))
        median = {name: statistics.median(values) for name, values in times.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    targets = [
        ("ckptd hardlink", "cp -al + sync", 1.5),
        ("ckptd copy", "cp -r + sync", 1.2),
    ]
    table = Table(
        title=f"snapshot of {options.size} in {options.files} files, median of "
        f"{options.repeat}, page cache {'dropped' if options.cold else 'warm, synced'}"
    )
    for column in ("run", "seconds", "vs", "ratio", "target", "ok"):
        table.add_column(column, justify="left" if column in ("run", "vs") else "right")
    misses = 0
    for name in contenders:
        row = [name, f"{median[name]:.3f}", "", "", "", ""]
        for mine, baseline, target in targets:
            if name == mine:
                ratio = median[mine] / median[baseline]
                ok = ratio <= target
                misses += not ok
                row[2:] = [baseline, f"{ratio:.2f}x", f"<= {target}x", "yes" if ok else "MISS"]
        table.add_row(*row)
    informative = [
        ("ckptd hardlink", "cp -al"),
        ("ckptd hardlink, hashing links", "cp -al + sync"),
        ("ckptd copy", "cp -r"),
        ("ckptd copy, no checksums", "cp -r + sync"),
    ]
    for mine, baseline in informative:
        table.add_row(
            f"  ({mine})", "", baseline, f"{median[mine] / median[baseline]:.2f}x", "", "info"
        )
    Console(width=120).print(table)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
