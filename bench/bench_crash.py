"""kill -9 a real prune at many random moments; check nothing is ever half there.

The same trial as tests/integration/test_crash_safety.py (30 checkpoints: 24 folders and 6
three-file TensorFlow checkpoints, trash grace 0), run many more times. Prints a table of
outcomes; exits 1 on any checkpoint found half there, changed, or a next run that fails.

    PYTHONPATH=. python bench/bench_crash.py [--trials 300] [--seed N]

With `--slim`, the trial of tests/integration/test_slim_crash.py instead: a slimming run of 24
Hugging Face checkpoints (seven resume-state files each) killed at random; after the recovery
every checkpoint must be whole, or slimmed with its record.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "tests" / "integration"))

import test_crash_safety as trial  # noqa: E402
import test_slim_crash as slim_trial  # noqa: E402

from daemon.pruning import trash  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--slim", action="store_true", help="kill slimming runs instead")
    args = parser.parse_args()
    generator = random.Random(args.seed)
    if args.slim:
        return slims(args.trials, generator)
    steps = [step * 100 for step in range(1, trial.FOLDERS + 1)]
    counts = {"before": 0, "moving": 0, "removing": 0, "after": 0}
    rolled_back = 0
    unfinished = 0  # an item made (its journal written), nothing moved in yet: removed
    violations: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-crash-") as base:
        duration = trial.measure(Path(base))
        for number in range(args.trials):
            root = Path(base) / f"trial-{number}"
            trial.build_root(root)
            process = trial.start(root)
            time.sleep(generator.uniform(0, duration * 1.1))
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            states = {step: trial.folder_state(root, step) for step in steps}
            bad = {s: v for s, v in states.items() if v not in ("intact", "absent")}
            if bad:
                violations.append(f"trial {number}: folders {bad}")
            counts[trial.moment(root)] += 1
            notes = trash.recover(str(root))
            rolled_back += sum("rolled back" in note for note in notes)
            unfinished += sum("unfinished" in note for note in notes)
            tensorflow = {
                s: trial.tensorflow_state(root, s) for s in range(1, trial.TENSORFLOW + 1)
            }
            bad_tf = {s: v for s, v in tensorflow.items() if v not in ("intact", "absent")}
            if bad_tf:
                violations.append(f"trial {number}: tensorflow {bad_tf}")
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    trial.finish(root)
            except BaseException as error:
                violations.append(f"trial {number}: the next run failed: {error!r}")
                continue
            if trash.list_trash(str(root)) or any(
                trial.folder_state(root, s) != "intact" for s in steps[-trial.KEEP :]
            ):
                violations.append(f"trial {number}: the next run left the trash or survivors wrong")
            os.system(f"rm -rf '{root}'")
    seconds = time.monotonic() - started
    print(f"kill -9 during a prune of 30 checkpoints: {args.trials} trials in {seconds:.1f} s")
    print(f"  full run measured at {duration * 1000:.1f} ms")
    print(f"{'killed while':<26}{'trials':>8}")
    for label, count in counts.items():
        print(f"{label:<26}{count:>8}")
    print(f"{'half-moved, rolled back':<26}{rolled_back:>8}")
    print(f"{'journalled, none moved':<26}{unfinished:>8}")
    print(f"{'violations':<26}{len(violations):>8}")
    for violation in violations[:20]:
        print("  " + violation)
    return 1 if violations else 0


def slims(trials: int, generator: random.Random) -> int:
    """Given a trial count, kill that many slimming runs; print the outcomes, return 1 on any
    checkpoint left neither whole nor slimmed with its record."""
    outcome = {"whole": 0, "slimmed": 0}
    interrupted = 0
    violations: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-slim-crash-") as base:
        duration = slim_trial.measure(Path(base))
        for number in range(trials):
            root = Path(base) / f"trial-{number}"
            try:
                states, halfway = slim_trial.trial(root, generator.uniform(0, duration * 1.1))
            except AssertionError:
                violations.append(f"trial {number}: weights touched")
                continue
            interrupted += halfway
            for step, found in states.items():
                if found in outcome:
                    outcome[found] += 1
                else:
                    violations.append(f"trial {number}: checkpoint-{step} {found}")
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    slim_trial.finish(root)
            except BaseException as error:
                violations.append(f"trial {number}: the next run failed: {error!r}")
            os.system(f"rm -rf '{root}'")
    seconds = time.monotonic() - started
    print(f"kill -9 during slimming of 21 checkpoints: {trials} trials in {seconds:.1f} s")
    print(f"  full run measured at {duration * 1000:.1f} ms")
    print(f"{'checkpoints whole':<34}{outcome['whole']:>8}")
    print(f"{'checkpoints slimmed':<34}{outcome['slimmed']:>8}")
    print(f"{'killed mid-slim, rolled back':<34}{interrupted:>8}")
    print(f"{'violations':<34}{len(violations):>8}")
    for violation in violations[:20]:
        print("  " + violation)
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
