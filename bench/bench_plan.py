"""Benchmark: plan 1,000,000 synthetic checkpoints in under 3 s (issue 2, DESIGN.md).

    python bench/bench_plan.py [--count N] [--repeat R] [--target SECONDS]

Only `policies.plan()` is timed; the input is built beforehand. Each case runs R times and the
best wall-clock time counts (the machine is shared; the best run is the one least disturbed),
with the CPU time of that run beside it. For scale, the same run times GNU `sort -n` on the same
step numbers: planning is O(n log n) like sorting, and the ratio shows what the policy costs on
top of the sort any plan needs. Prints a table; exits 1 if any case misses the target.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from policies import PRESETS, Checkpoint, KeepBest, PolicySpec, plan


@dataclass
class Case:
    name: str
    checkpoints: list[Checkpoint]
    specs: dict[str, PolicySpec]


@dataclass
class Measurement:
    name: str
    count: int
    wall_seconds: float
    cpu_seconds: float
    kept: int


def regular_series(count: int, every: int, series: str = "default") -> list[Checkpoint]:
    """Given a count and a cadence, return Hugging Face-style checkpoints at every, 2·every, …"""
    return [
        Checkpoint(name=f"checkpoint-{index * every}", step=index * every, series=series)
        for index in range(1, count + 1)
    ]


def restarted_run(count: int, every: int = 100) -> list[Checkpoint]:
    """Given a count, return a run saving every `every` steps a minute apart (real mtimes), 1,000
    of whose saves come from a restart halfway through: the write order is walked and the
    abandoned half planned as a branch (issue 9)."""
    old = count - 1000
    checkpoints = [
        Checkpoint(name=f"checkpoint-{i * every}", step=i * every, mtime=1e9 + i * 60.0)
        for i in range(1, old + 1)
    ]
    resumed = old // 2 * every
    checkpoints += [
        Checkpoint(
            name=f"restarted-{resumed + i * every}",
            step=resumed + i * every,
            mtime=1e9 + (old + i) * 60.0,
        )
        for i in range(1, 1001)
    ]
    return checkpoints


def mixed_root(count: int) -> list[Checkpoint]:
    """Given a count, return a realistic mix: four series, a few pins, trackers, metrics and
    incomplete checkpoints, in directory-listing (random) order."""
    per_series = count // 4
    checkpoints: list[Checkpoint] = []
    for number, every in enumerate((100, 250, 30, 1000)):
        for index in range(1, per_series + 1):
            step = index * every
            checkpoints.append(
                Checkpoint(
                    name=f"s{number}-{step}",
                    step=step,
                    series=f"series-{number}",
                    complete=index % 5000 != 0,
                    pinned_by=(".keep",) if index % 20000 == 0 else (),
                    tracked_by=("latest",) if index == per_series else (),
                    metrics={"eval_loss": (index * 7919) % 1000 / 1000} if index % 10 == 0 else {},
                )
            )
    random.Random(2).shuffle(checkpoints)
    return checkpoints


def build_cases(count: int) -> list[Case]:
    balanced = {"default": PRESETS["balanced"]}
    in_order = regular_series(count, 100)
    shuffled = list(in_order)
    random.Random(1).shuffle(shuffled)
    with_best = replace_keep_best(PRESETS["conservative"])
    return [
        Case("every 100, in step order, balanced", in_order, balanced),
        Case("every 100, shuffled (listing order), balanced", shuffled, balanced),
        Case("every 1000 (one per tier-3 bucket), balanced", regular_series(count, 1000), balanced),
        Case(
            "4 series, shuffled, pins/trackers/incomplete/best",
            mixed_root(count),
            {f"series-{n}": with_best for n in range(4)},
        ),
        Case(
            "every 100, real mtimes, restarted halfway (a branch)", restarted_run(count), balanced
        ),
    ]


def replace_keep_best(spec: PolicySpec) -> PolicySpec:
    return PolicySpec(
        keep_last=spec.keep_last,
        tier2_count=spec.tier2_count,
        tier3_interval=spec.tier3_interval,
        keep_best=KeepBest(5, "eval_loss", "min"),
    )


def measure(case: Case, repeat: int) -> Measurement:
    best_wall, best_cpu, kept = float("inf"), 0.0, 0
    for _ in range(repeat):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        result = plan(case.checkpoints, case.specs, root="/bench")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        kept = sum(1 for decision in result.decisions if decision.keep)
        del result
        if wall < best_wall:
            best_wall, best_cpu = wall, cpu
    return Measurement(case.name, len(case.checkpoints), best_wall, best_cpu, kept)


def time_system_sort(checkpoints: list[Checkpoint], repeat: int) -> float | None:
    """Given checkpoints, return the best wall time of `sort -n` over their steps, or None."""
    sort = shutil.which("sort")
    if sort is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".steps", delete=False) as handle:
        handle.write("\n".join(str(checkpoint.step) for checkpoint in checkpoints))
        handle.write("\n")
        path = handle.name
    try:
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            subprocess.run([sort, "-n", path], stdout=subprocess.DEVNULL, check=True)
            best = min(best, time.perf_counter() - started)
        return best
    finally:
        Path(path).unlink()


def timed(label: str, build: Callable[[], list[Case]], console: Console) -> list[Case]:
    started = time.perf_counter()
    cases = build()
    console.print(f"{label} in {time.perf_counter() - started:.1f} s (not timed below)")
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="checkpoints (1,000,000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case, best counts (3)")
    parser.add_argument("--target", type=float, default=3.0, help="seconds per plan (3.0)")
    args = parser.parse_args()
    # Wide enough for the table even when the output is piped into a log.
    console = Console(highlight=False, width=max(140, shutil.get_terminal_size().columns))

    cases = timed(
        f"built {args.count:,} checkpoints for each of 5 cases",
        lambda: build_cases(args.count),
        console,
    )
    measurements = [measure(case, args.repeat) for case in cases]
    sort_seconds = time_system_sort(cases[1].checkpoints, args.repeat)

    table = Table(title=f"policies.plan(): {args.count:,} checkpoints, best of {args.repeat}")
    for column in (
        "case",
        "n",
        "kept",
        "wall s",
        "cpu s",
        "target s",
        "of target",
        "vs sort -n",
        "",
    ):
        table.add_column(column, justify="left" if column == "case" else "right")
    failed = False
    for result in measurements:
        passed = result.wall_seconds < args.target
        failed |= not passed
        table.add_row(
            result.name,
            f"{result.count:,}",
            f"{result.kept:,}",
            f"{result.wall_seconds:.2f}",
            f"{result.cpu_seconds:.2f}",
            f"{args.target:.1f}",
            f"{result.wall_seconds / args.target:.0%}",
            f"{result.wall_seconds / sort_seconds:.1f}x" if sort_seconds else "-",
            "pass" if passed else "FAIL",
        )
    if sort_seconds is not None:
        table.add_row(
            "system tool: sort -n of the shuffled steps",
            f"{args.count:,}",
            "",
            f"{sort_seconds:.2f}",
            "",
            "",
            "",
            "1.0x",
            "",
        )
    console.print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
