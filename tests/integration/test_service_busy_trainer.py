"""Issue 9, point 3: a trainer that saves often is pruned while it runs.

The daemon (`serve()`) on real folders, with real trainer processes writing and holding real
files, and real inotify events:
- a trainer saving every 0.3 s is pruned while it runs (before: nothing until it stopped);
- the root waits while the trainer holds the newest checkpoint, and is pruned as soon as the
  trainer closes the file, not at the next backoff or save;
- a save that is merely settling does not stop older checkpoints from being pruned, and once it
  has settled it counts without any further event;
- a checkpoint's completion marker landing after a prune that ran while it was in flight is
  seen (before: its watch had been dropped, and nothing happened until the next checkpoint).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.history.log import read_records
from daemon.service.lifecycle import serve
from tests.configs import rotation, write_config
from tests.layouts_fixtures import age, hf_checkpoint, well_formed_bytes

REPOSITORY = Path(__file__).resolve().parents[2]
# The trainers write well-formed files (tests/layouts_fixtures.py): ckptd keeps corrupt ones.
IMPORT_FIXTURES = f"import sys; sys.path.insert(0, {str(REPOSITORY)!r})\n"

FAST_TRAINER = (
    IMPORT_FIXTURES
    + r"""
import json, os, sys, time
from tests.configs import rotation, write_config
from tests.layouts_fixtures import well_formed_bytes
root, count, every = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
vanished, saved = [], []
for step in range(1, count + 1):
    started = time.monotonic()
    folder = os.path.join(root, f"checkpoint-{step}")
    os.mkdir(folder)
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(json.dumps({"global_step": step}).encode() if name[0] == "t" else
                         well_formed_bytes(name, 4096, random=True))
        if not os.path.isdir(folder):
            vanished.append(f"checkpoint-{step}/{name}")
    saved.append(step)
    time.sleep(max(0.0, every - (time.monotonic() - started)))
print(json.dumps({"saved": saved, "vanished": vanished}), flush=True)
"""
)

# A trainer driven line by line: "open PATH" keeps a file open for writing, "close" closes it,
# "write PATH" writes a whole file; each answers "ok" once done.
STEPPED_TRAINER = (
    IMPORT_FIXTURES
    + r"""
import os, sys
from tests.configs import rotation, write_config
from tests.layouts_fixtures import well_formed_bytes
handle = None
for line in sys.stdin:
    command, _, path = line.strip().partition(" ")
    if command == "open":
        handle = open(path, "ab")
        handle.write(well_formed_bytes(os.path.basename(path), 4096))
        handle.flush()
    elif command == "close":
        handle.close()
    elif command == "write":
        with open(path, "wb") as written:
            written.write(well_formed_bytes(os.path.basename(path), 64))
    print("ok", flush=True)
"""
)


class Trainer:
    """A trainer process that does one thing at a time, when told."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", STEPPED_TRAINER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def do(self, command: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "ok"

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(5)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def names(root: Path, prefix: str = "checkpoint-") -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.name.startswith(prefix))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., None]]:
    """Start `serve()` on a root, keeping its newest `keep_last` once `settle` seconds are quiet;
    stopped (exit 0 checked) at the end."""
    stop, reload = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    result: dict[str, int] = {}

    def start(root: Path, *, keep_last: int, settle: float, layout: str) -> None:
        config = write_config(
            tmp_path / "config.yaml",
            [root],
            history_file=tmp_path / "history.jsonl",
            log={"level": "info", "format": "json"},
            policy=rotation(keep_last),
            settle_seconds=settle,
            min_keep=1,
            max_delete_fraction=1.0,
            grace="0s",
            layout=layout,
            disk={"interval": "1h"},
        )
        thread = threading.Thread(
            target=lambda: result.setdefault(
                "code",
                serve(str(config), stop=stop, reload=reload, tick=0.05, configure_logs=False),
            ),
            name="test-serve-busy",
        )
        thread.start()
        threads.append(thread)
        assert wait_until(lambda: (tmp_path / "state" / "state.json").exists(), 10)

    yield start
    stop.set()
    for thread in threads:
        thread.join(15)
    if threads:
        assert result.get("code") == 0


@pytest.mark.timeout(30)
def test_a_trainer_saving_every_0_3_s_is_pruned_while_it_runs(
    tmp_path: Path, daemon: Callable[..., None]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    daemon(root, keep_last=3, settle=1.0, layout="hf")
    trainer = subprocess.Popen(
        [sys.executable, "-c", FAST_TRAINER, str(root), "20", "0.3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    peak = 0
    while trainer.poll() is None:
        peak = max(peak, len(names(root)))
        time.sleep(0.02)
    output, _ = trainer.communicate()
    report = json.loads(output)
    assert report["vanished"] == [] and len(report["saved"]) == 20
    # 3 kept + what a 1 s settle leaves incomplete at a 0.3 s cadence (about 4) + 1 in flight.
    # Before: the root was refused while anything above the newest complete one settled, and
    # all 20 were on disk when the trainer stopped.
    assert peak <= 9, peak
    deletes = [r for r in read_records(str(tmp_path / "history.jsonl")) if r["event"] == "delete"]
    assert len(deletes) >= 8, len(deletes)
    assert wait_until(lambda: names(root) == [f"checkpoint-{s}" for s in (18, 19, 20)], 5)


@pytest.mark.timeout(30)
def test_the_root_waits_while_the_trainer_holds_the_newest_and_is_pruned_when_it_closes(
    tmp_path: Path, daemon: Callable[..., None]
) -> None:
    root = tmp_path / "run"
    for step in range(1, 7):
        hf_checkpoint(root, step)
    saving = root / "checkpoint-7"
    saving.mkdir()
    trainer = Trainer()
    try:
        trainer.do(f"open {saving / 'model.safetensors'}")
        # settle 30 s: a refusal was retried with a backoff growing to 30 s.
        daemon(root, keep_last=3, settle=30, layout="hf")
        history = tmp_path / "history.jsonl"
        assert wait_until(
            lambda: any(r["event"] == "prune_refused" for r in read_records(str(history))), 10
        )
        time.sleep(4.0)  # the trainer keeps writing: the whole root waits
        assert len(names(root)) == 7
        trainer.do("close")
        closed = time.monotonic()
        assert wait_until(lambda: len(names(root)) == 4, 5), names(root)
        assert time.monotonic() - closed < 2.0  # the close event, not the backoff (at ~7.5 s)
    finally:
        trainer.stop()
    assert names(root) == [f"checkpoint-{step}" for step in (4, 5, 6, 7)]


@pytest.mark.timeout(30)
def test_a_settling_save_does_not_stop_older_ones_being_pruned_and_counts_once_settled(
    tmp_path: Path, daemon: Callable[..., None]
) -> None:
    """Plain PyTorch files have no completion marker: settle time decides. model_6 was just
    written when the daemon starts: it is kept while it settles, but the older ones go at once
    (before: the whole root was refused until model_6 had settled); once it has settled it
    counts, without any further event."""
    root = tmp_path / "run"
    root.mkdir()
    for step in range(1, 6):
        (root / f"model_{step}.pt").write_bytes(well_formed_bytes("model.pt", 64))
        age(root / f"model_{step}.pt")
    trainer = Trainer()
    try:
        trainer.do(f"write {root / 'model_6.pt'}")
        written = time.monotonic()
        daemon(root, keep_last=2, settle=4.0, layout="pt")
        settling = ["model_4.pt", "model_5.pt", "model_6.pt"]
        assert wait_until(lambda: names(root, "model_") == settling, 3.0), names(root, "model_")
        assert time.monotonic() - written < 3.5  # model_6 was still settling
        assert wait_until(lambda: names(root, "model_") == ["model_5.pt", "model_6.pt"], 6.0)
        assert time.monotonic() - written >= 4.0  # not before it had settled
    finally:
        trainer.stop()
    records = read_records(str(tmp_path / "history.jsonl"))
    assert [r for r in records if r["event"] == "prune_refused"] == []


@pytest.mark.timeout(30)
def test_a_completion_marker_landing_after_a_prune_during_the_save_is_seen(
    tmp_path: Path, daemon: Callable[..., None]
) -> None:
    root = tmp_path / "run"
    for step in range(1, 5):
        hf_checkpoint(root, step)
    daemon(root, keep_last=2, settle=0.3, layout="hf")
    assert wait_until(lambda: names(root) == ["checkpoint-3", "checkpoint-4"], 5)
    saving = root / "checkpoint-5"
    saving.mkdir()
    trainer = Trainer()
    try:
        trainer.do(f"open {saving / 'model.safetensors'}")
        trainer.do("close")
        # A slow save: the weights are written, the rest takes a while. Prunes run meanwhile
        # (here the one the weights' events trigger), with checkpoint-5 in flight.
        time.sleep(2.0)
        assert names(root) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
        trainer.do(f"write {saving / 'trainer_state.json'}")
        landed = time.monotonic()
        assert wait_until(lambda: names(root) == ["checkpoint-4", "checkpoint-5"], 5)
        assert time.monotonic() - landed < 3.0
    finally:
        trainer.stop()
