"""kill -9 a prune at random moments: every checkpoint is whole under its name or gone.

Each trial builds a root of 30 small checkpoints (24 folders of a few files, and 6 TensorFlow-style
checkpoints of three files directly in the root), starts a real prune in a subprocess with trash
grace 0, waits until it starts deleting, sleeps a random part of a measured full run, and sends
SIGKILL. Then:

- every folder checkpoint is either intact under its own name (every file, same content) or
  absent from the root — straight after the kill, before any repair;
- after the start-up recovery of the next run (`trash.recover`), the same holds for the
  multi-file checkpoints too (a half-moved one is rolled back from its journal);
- the next prune run completes cleanly, leaves exactly the planned survivors and an empty trash.

`bench/bench_crash.py` runs the same trial many more times.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon.pruning import trash

REPOSITORY = str(Path(__file__).resolve().parents[2])
FOLDERS = 24
TENSORFLOW = 6
KEEP = 3
TRIALS = 50

# The prune run under test: plan every checkpoint but the newest KEEP of each kind for deletion,
# finish a crashed trash the way `prune_root` does, then delete through `deleter.apply`.
CHILD = r"""
import os, sys, time
from daemon.pruning import deleter
from daemon.pruning import trash
from policies.model import Checkpoint, Decision, Plan

root = sys.argv[1]
keep = int(sys.argv[2])
trash.recover(root)
trash.purge(root, now=time.time(), grace=0.0)
names = os.listdir(root)
folders = sorted((int(n.split("-")[1]), n) for n in names if n.startswith("checkpoint-"))
tensorflow = sorted(
    int(n[5:-6]) for n in names if n.startswith("ckpt-") and n.endswith(".index")
)
decisions = []
for index, (step, name) in enumerate(folders):
    keep_it = index >= len(folders) - keep
    decisions.append(Decision(Checkpoint(name=name, step=step), keep_it, ("r",)))
for index, step in enumerate(tensorflow):
    members = tuple(sorted(n for n in names if n.startswith(f"ckpt-{step}.")))
    checkpoint = Checkpoint(name=f"ckpt-{step}", step=step, entries=members, series="tf")
    decisions.append(Decision(checkpoint, index >= len(tensorflow) - keep, ("r",)))
plan = Plan(root=root, decisions=tuple(decisions))
print("go", flush=True)
started = time.perf_counter()
result = deleter.apply(plan, root, dry_run=False, now=time.time(), trash_grace=0.0)
assert not result.failed and not result.vetoed, (result.failed, result.vetoed)
print(f"done {time.perf_counter() - started:.6f}", flush=True)
"""


def content(name: str, index: int) -> bytes:
    return f"{name}/{index}".encode() * 200


def folder_files(step: int) -> dict[str, bytes]:
    name = f"checkpoint-{step}"
    return {
        "model.safetensors": content(name, 0),
        "optimizer.pt": content(name, 1),
        "trainer_state.json": content(name, 2),
        "rng/state.pth": content(name, 3),
    }


def tensorflow_files(step: int) -> dict[str, bytes]:
    return {
        f"ckpt-{step}.index": content(f"ckpt-{step}", 0),
        f"ckpt-{step}.data-00000-of-00002": content(f"ckpt-{step}", 1),
        f"ckpt-{step}.data-00001-of-00002": content(f"ckpt-{step}", 2),
    }


def build_root(root: Path) -> None:
    root.mkdir()
    for step in range(1, FOLDERS + 1):
        for relative, data in folder_files(step * 100).items():
            path = root / f"checkpoint-{step * 100}" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for step in range(1, TENSORFLOW + 1):
        for name, data in tensorflow_files(step).items():
            (root / name).write_bytes(data)


def folder_state(root: Path, step: int) -> str:
    """Given a folder checkpoint, return "intact", "absent" or what is wrong with it."""
    folder = root / f"checkpoint-{step}"
    if not folder.exists():
        return "absent"
    expected = folder_files(step)
    found = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
    if set(found) != set(expected):
        return f"half there: {sorted(found)}"
    if any(found[relative].read_bytes() != data for relative, data in expected.items()):
        return "changed content"
    return "intact"


def tensorflow_state(root: Path, step: int) -> str:
    expected = tensorflow_files(step)
    present = {name for name in expected if (root / name).exists()}
    if not present:
        return "absent"
    if present != set(expected):
        return f"half there: {sorted(present)}"
    if any((root / name).read_bytes() != data for name, data in expected.items()):
        return "changed content"
    return "intact"


def moment(root: Path) -> str:
    """Given a root just after a kill, return where the run was.

    "before" (nothing moved), "moving" (some checkpoints to delete still in the root, some
    gone), "removing" (all gone from the root, the trash not empty yet) or "after".
    """
    deletable = [root / f"checkpoint-{step * 100}" for step in range(1, FOLDERS - KEEP + 1)]
    deletable += [root / f"ckpt-{step}.index" for step in range(1, TENSORFLOW - KEEP + 1)]
    absent = sum(not path.exists() for path in deletable)
    folder = root / trash.TRASH_DIRECTORY
    in_trash = folder.exists() and any(folder.iterdir())
    if absent == 0 and not in_trash:
        return "before"
    if absent < len(deletable):
        return "moving"
    return "removing" if in_trash else "after"


def measure(base: Path, runs: int = 3) -> float:
    """Given a folder, return the median time of a whole prune run (after start-up)."""
    durations = []
    for number in range(runs):
        build_root(base / f"measure-{number}")
        process = start(base / f"measure-{number}")
        assert process.stdout is not None
        durations.append(float(process.stdout.readline().split()[1]))
        assert process.wait(timeout=60) == 0
    return sorted(durations)[len(durations) // 2]


def start(root: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(KEEP)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": REPOSITORY},
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "go"
    return process


def finish(root: Path) -> None:
    """Run the next prune to completion: the same code, in this process (a subprocess per trial
    would double the test's time and prove nothing more)."""
    saved = sys.argv
    sys.argv = ["prune", str(root), str(KEEP)]
    try:
        exec(compile(CHILD, "<prune run>", "exec"), {"__name__": "prune_run"})
    finally:
        sys.argv = saved


def test_kill_nine_at_random_moments_never_leaves_half_a_checkpoint(tmp_path: Path) -> None:
    generator = random.Random(int(os.environ.get("CKPTD_CRASH_SEED", "0")) or None)
    # Measure whole runs to spread the kills over the time one takes.
    duration = measure(tmp_path)
    interrupted = 0
    for trial in range(TRIALS):
        root = tmp_path / f"trial-{trial}"
        build_root(root)
        process = start(root)
        time.sleep(generator.uniform(0, duration * 1.1))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        steps = [step * 100 for step in range(1, FOLDERS + 1)]
        states = {step: folder_state(root, step) for step in steps}
        broken = {
            step: state for step, state in states.items() if state not in ("intact", "absent")
        }
        assert not broken, f"trial {trial}: {broken}"
        interrupted += moment(root) in ("moving", "removing")
        trash.recover(str(root))
        tensorflow = {step: tensorflow_state(root, step) for step in range(1, TENSORFLOW + 1)}
        broken_tf = {
            s: state for s, state in tensorflow.items() if state not in ("intact", "absent")
        }
        assert not broken_tf, f"trial {trial}: {broken_tf}"
        # The newest KEEP of each kind are never touched.
        assert all(states[step] == "intact" for step in steps[-KEEP:])
        assert all(
            tensorflow[step] == "intact" for step in range(TENSORFLOW - KEEP + 1, TENSORFLOW + 1)
        )

        finish(root)
        assert sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-")) == sorted(
            f"checkpoint-{step}" for step in steps[-KEEP:]
        )
        assert all(folder_state(root, step) == "intact" for step in steps[-KEEP:])
        assert all(tensorflow_state(root, s) == "absent" for s in range(1, TENSORFLOW - KEEP + 1))
        assert trash.list_trash(str(root)) == []
        assert list((root / trash.TRASH_DIRECTORY).iterdir()) == []
    # The kills must land mid-run, not only before or after it, or the test proves nothing.
    assert interrupted >= TRIALS // 4, f"only {interrupted} of {TRIALS} kills landed mid-run"
