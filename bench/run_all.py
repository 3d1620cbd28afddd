"""Run every benchmark in bench/ one after the other and print one summary table.

    PYTHONPATH=. python bench/run_all.py [--quick] [--only NAME ...]

Each benchmark measures ckptd against the system tool that does the same work, in the same run,
and exits non-zero when it misses its target; this prints each one's own table as it goes, then
a summary of which targets held. `--quick` passes smaller sizes where a benchmark has them (for a
smoke run; the README's figures come from the full run). Exits 1 if any benchmark missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, full arguments, quick arguments, what it is measured against)
BENCHMARKS: dict[str, tuple[str, list[str], list[str], str]] = {
    "plan": ("bench_plan.py", [], ["--count", "200000"], "target 3 s; sort -n for scale"),
    "scan": ("bench_scan.py", [], ["--checkpoints", "1000", "--warm-only"], "du -s"),
    "delete": ("bench_delete.py", [], ["--checkpoints", "10"], "rm -rf"),
    "crash": ("bench_crash.py", ["--trials", "200"], ["--trials", "20"], "invariant check"),
    "crash-slim": (
        "bench_crash.py",
        ["--slim", "--trials", "200"],
        ["--slim", "--trials", "20"],
        "invariant check",
    ),
    "slim": ("bench_slim.py", [], [], "bytes kept, with and without slim"),
    "verify": ("bench_verify.py", [], ["--repeat", "2"], "unzip -t"),
    "s3": ("bench_s3.py", [], ["--checkpoints", "1000", "--repeat", "2"], "plain S3 list, delete"),
    "snapshot": ("bench_snapshot.py", [], ["--size", "200MB"], "cp -al, cp -r"),
    "fast-trainer": (
        "bench_fast_trainer.py",
        [],
        ["--hf-steps", "20", "--sim-saves", "20"],
        "peak <= survivors + 2 (HF Trainer, simulated)",
    ),
    "daemon": (
        "bench_daemon.py",
        [],
        ["--idle-seconds", "10", "--checkpoints", "200"],
        "RSS, CPU, latency targets",
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), default=None)
    args = parser.parse_args()
    environment = dict(os.environ)
    environment["PYTHONPATH"] = str(HERE.parent) + os.pathsep + environment.get("PYTHONPATH", "")
    results: list[tuple[str, int, float, str]] = []
    for name, (script, full, quick, baseline) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        if not (HERE / script).exists():
            results.append((name, -1, 0.0, baseline))
            continue
        print(f"\n=== {name}: {script} {' '.join(quick if args.quick else full)}", flush=True)
        started = time.monotonic()
        completed = subprocess.run(
            [sys.executable, str(HERE / script), *(quick if args.quick else full)],
            env=environment,
            check=False,
        )
        results.append((name, completed.returncode, time.monotonic() - started, baseline))
    print("\nbenchmark  result  seconds  measured against")
    for name, code, seconds, baseline in results:
        verdict = "missing" if code < 0 else ("met" if code == 0 else "MISSED")
        print(f"{name:<10} {verdict:<7} {seconds:7.1f}  {baseline}")
    return 0 if all(code == 0 for _, code, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
