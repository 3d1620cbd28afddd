"""Benchmark a trainer that saves every few tenths of a second, with the default settle_seconds.

    PYTHONPATH=. .venv/bin/python bench/bench_fast_trainer.py [--hf-steps 60] [--sim-saves 60]

`ckptd run` (this Python, a temporary config: default `settle_seconds` (60 s), keep_last 5,
tier2_count 0, tier3_interval null, trash grace 0) runs beside
  (a) a real Hugging Face Trainer (a tiny GPT-2, `/work/fw-venv/bin/python`, or --hf-python)
      saving every step, ~0.4 s apart; skipped with the reason when that Python is missing;
  (b) a simulated trainer writing Hugging-Face-style checkpoints (weights, optimizer, scheduler,
      RNG state, trainer_state.json last) every 0.5 s, as daemon/demo.py's trainer does.
The number of checkpoints on disk is sampled every 50 ms while the trainer runs.

Targets (issue 9, point 3), each an exit 1 on a miss: the peak during training is at most the
policy's survivors + 2; the survivors at the end are the policy's one-shot plan of every save;
no checkpoint the trainer was writing vanished (each trainer checks its folder after every file
and after its save; the HF Trainer would also crash); the trainer exits 0. Printed: the peak and
the lag from a save's completion (trainer_state.json written, as the trainer reports it) to the
end of the prune that deleted the checkpoint it pushed out (`prune_run` in the history).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from policies import plan  # noqa: E402
from policies.model import Checkpoint, PolicySpec  # noqa: E402

KEEP_LAST = 5
POLICY = PolicySpec(keep_last=KEEP_LAST, tier2_count=0, tier3_interval=None)
SAMPLE_SECONDS = 0.05
HF_PYTHON = "/work/fw-venv/bin/python"

HF_TRAINER = r"""
import json, os, sys, time
import torch
from torch.utils.data import Dataset
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                          TrainingArguments)

root, steps, pace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(1)  # a tiny model: one core computes it (a GPU run leaves the CPU free)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256,
                                   n_positions=64))


class Tokens(Dataset):
    def __len__(self):
        return 100_000

    def __getitem__(self, index):
        ids = torch.randint(0, 256, (32,))
        return {"input_ids": ids, "labels": ids}


class Pace(TrainerCallback):
    # The step's compute: one step (and its save) begins every `pace` seconds.
    def __init__(self):
        self.next = time.monotonic()

    def on_step_begin(self, args, state, control, **kwargs):
        time.sleep(max(0.0, self.next - time.monotonic()))
        self.next = time.monotonic() + pace

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(root, f"checkpoint-{state.global_step}")
        whole = os.path.isfile(os.path.join(folder, "trainer_state.json"))
        print(json.dumps({"step": state.global_step, "time": time.time(), "whole": whole}),
              flush=True)


arguments = TrainingArguments(
    output_dir=root, max_steps=steps, save_strategy="steps", save_steps=1,
    per_device_train_batch_size=4, logging_strategy="no", report_to=[], use_cpu=True,
    dataloader_num_workers=0, disable_tqdm=True, save_total_limit=None,
)
Trainer(model=model, args=arguments, train_dataset=Tokens(), callbacks=[Pace()]).train()
"""

SIM_TRAINER = r"""
import json, os, sys, time
root, saves, pace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
files = [("config.json", 600), ("model.safetensors", 256 * 1024), ("optimizer.pt", 512 * 1024),
         ("scheduler.pt", 1024), ("rng_state.pth", 14 * 1024), ("trainer_state.json", 0)]
next_save = time.monotonic()
for index in range(1, saves + 1):
    time.sleep(max(0.0, next_save - time.monotonic()))
    next_save = time.monotonic() + pace
    step = index * 10
    folder = os.path.join(root, f"checkpoint-{step}")
    os.mkdir(folder)
    whole = True
    for name, size in files:
        content = (json.dumps({"global_step": step}).encode() if name == "trainer_state.json"
                   else os.urandom(size))
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(content)
        whole = whole and os.path.isdir(folder)
    whole = whole and os.path.isfile(os.path.join(folder, "trainer_state.json"))
    print(json.dumps({"step": step, "time": time.time(), "whole": whole}), flush=True)
"""


@dataclass
class Outcome:
    """What one scenario measured."""

    name: str
    saves: list[int] = field(default_factory=list)
    completed_at: dict[int, float] = field(default_factory=dict)
    broken_saves: list[int] = field(default_factory=list)
    trainer_exit: int | None = None
    trainer_error: str = ""
    peak: int = 0
    survivors: list[int] = field(default_factory=list)
    expected: list[int] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    refusals: int = 0
    prune_runs: int = 0
    skipped: str = ""

    def misses(self) -> list[str]:
        """Given the measurements, return every target missed."""
        found = []
        if self.peak > KEEP_LAST + 2:
            found.append(f"peak {self.peak} > survivors {KEEP_LAST} + 2")
        if self.survivors != self.expected:
            found.append(f"survivors {self.survivors} != one-shot plan {self.expected}")
        if self.broken_saves:
            found.append(f"saves that vanished while being written: {self.broken_saves}")
        if self.trainer_exit != 0:
            found.append(f"trainer exit {self.trainer_exit}: {self.trainer_error[-500:]}")
        if not self.saves:
            found.append("the trainer saved nothing")
        return found


def config_text(root: Path, state: Path) -> str:
    return f"""\
state_dir: {state}
history_file: {state}/history.jsonl
log: {{level: info, format: json}}
defaults:
  policy: {{keep_last: {KEEP_LAST}, tier2_count: 0, tier3_interval: null}}
  trash: {{grace: 0s}}
roots:
  - path: {root}
    layout: hf
snapshots: {{enabled: false}}
disk: {{interval: 1h}}
"""


def history(state: Path) -> list[dict[str, object]]:
    path = state / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def epoch(record: dict[str, object]) -> float:
    return dt.datetime.fromisoformat(str(record["time"])).timestamp()


def checkpoint_count(root: Path) -> int:
    try:
        return sum(1 for entry in os.scandir(root) if entry.name.startswith("checkpoint-"))
    except OSError:
        return 0


def steps_on_disk(root: Path) -> list[int]:
    return sorted(
        int(entry.name.split("-")[1])
        for entry in os.scandir(root)
        if entry.name.startswith("checkpoint-")
    )


def lags(outcome: Outcome, records: list[dict[str, object]]) -> list[float]:
    """Given the saves and the history, return for each save that pushed one out (the one
    KEEP_LAST saves older) the seconds from its completion to the end of the prune run that
    deleted that one."""
    deleted_at = {str(r["checkpoint"]): epoch(r) for r in records if r.get("event") == "delete"}
    run_ends = sorted(epoch(r) for r in records if r.get("event") == "prune_run")
    found = []
    for index in range(KEEP_LAST, len(outcome.saves)):
        pushed_out = f"checkpoint-{outcome.saves[index - KEEP_LAST]}"
        completed = outcome.completed_at.get(outcome.saves[index])
        if pushed_out not in deleted_at or completed is None:
            continue
        end = next((at for at in run_ends if at >= deleted_at[pushed_out]), None)
        if end is not None:
            found.append(end - completed)
    return found


def read_saves(process: subprocess.Popen[str], outcome: Outcome) -> None:
    """Given a running trainer, record each save it reports (one JSON line per save; anything
    else it prints, such as the HF Trainer's summary, is not a save)."""
    assert process.stdout is not None
    for line in process.stdout:
        try:
            save = json.loads(line)
        except ValueError:
            continue
        if not isinstance(save, dict) or "step" not in save:
            continue
        outcome.saves.append(int(save["step"]))
        outcome.completed_at[int(save["step"])] = float(save["time"])
        if not save["whole"]:
            outcome.broken_saves.append(int(save["step"]))


def run_scenario(name: str, trainer: list[str], settings: list[str], folder: Path) -> Outcome:
    """Given a scenario's trainer command and its settings (the root goes between them), run it
    beside `ckptd run` in `folder` and measure."""
    outcome = Outcome(name)
    root, state = folder / "run", folder / "state"
    root.mkdir()
    config = folder / "config.yaml"
    config.write_text(config_text(root, state))
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    )
    log_path = folder / "daemon.log"
    with log_path.open("w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config)],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while '"ready"' not in log_path.read_text():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError(f"ckptd did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        process = subprocess.Popen(
            [*trainer, str(root), *settings],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=folder,
        )
        stderr_lines: list[str] = []
        reader = threading.Thread(
            target=lambda: stderr_lines.extend(process.stderr or []), name="bench-stderr"
        )
        reader.start()
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                outcome.peak = max(outcome.peak, checkpoint_count(root))
                time.sleep(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, name="bench-sampler")
        sampler.start()
        try:
            read_saves(process, outcome)
            outcome.trainer_exit = process.wait()
        finally:
            sampling.set()
            sampler.join()
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join()
        outcome.trainer_error = "".join(stderr_lines)
        expected_plan = plan(
            [Checkpoint(name=f"checkpoint-{s}", step=s, layout="hf") for s in outcome.saves],
            {"default": POLICY},
            root=str(root),
        )
        outcome.expected = sorted(d.checkpoint.step for d in expected_plan.kept)
        deadline = time.monotonic() + 10
        while steps_on_disk(root) != outcome.expected and time.monotonic() < deadline:
            time.sleep(0.05)
        outcome.survivors = steps_on_disk(root)
        records = history(state)
        outcome.lags = lags(outcome, records)
        outcome.refusals = sum(1 for r in records if r.get("event") == "prune_refused")
        outcome.prune_runs = sum(1 for r in records if r.get("event") == "prune_run")
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    return outcome


def print_table(outcomes: list[Outcome]) -> None:
    print(
        f"\n{'trainer':<34} {'saves':>5} {'peak':>5} {'target':>6} {'end = plan':>10} "
        f"{'lag median':>10} {'lag p95':>8} {'lag max':>8} {'runs':>5} {'refused':>7}"
    )
    for outcome in outcomes:
        if outcome.skipped:
            print(f"{outcome.name:<34} skipped: {outcome.skipped}")
            continue
        lags_sorted = sorted(outcome.lags) or [float("nan")]
        p95 = lags_sorted[min(len(lags_sorted) - 1, int(0.95 * len(lags_sorted)))]
        print(
            f"{outcome.name:<34} {len(outcome.saves):>5} {outcome.peak:>5} "
            f"{'<= ' + str(KEEP_LAST + 2):>6} {outcome.survivors == outcome.expected!s:>10} "
            f"{statistics.median(lags_sorted):>9.2f}s {p95:>7.2f}s {lags_sorted[-1]:>7.2f}s "
            f"{outcome.prune_runs:>5} {outcome.refusals:>7}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-steps", type=int, default=60)
    parser.add_argument("--hf-pace", type=float, default=0.4)
    parser.add_argument("--hf-python", default=HF_PYTHON)
    parser.add_argument("--sim-saves", type=int, default=60)
    parser.add_argument("--sim-pace", type=float, default=0.5)
    arguments = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ckptd-bench-fast-"))
    outcomes: list[Outcome] = []
    try:
        scripts = folder / "scripts"
        scripts.mkdir()
        (scripts / "hf_trainer.py").write_text(HF_TRAINER)
        (scripts / "sim_trainer.py").write_text(SIM_TRAINER)
        hf_name = f"(a) HF Trainer, every step ({arguments.hf_pace} s)"
        sim_name = f"(b) simulated, every {arguments.sim_pace} s"
        if not os.access(arguments.hf_python, os.X_OK):
            outcomes.append(Outcome(hf_name, skipped=f"{arguments.hf_python} is missing"))
        else:
            print(f"running {hf_name} ...", flush=True)
            (folder / "a").mkdir()
            trainer = [arguments.hf_python, str(scripts / "hf_trainer.py")]
            settings = [str(arguments.hf_steps), str(arguments.hf_pace)]
            outcomes.append(run_scenario(hf_name, trainer, settings, folder / "a"))
        print(f"running {sim_name} ...", flush=True)
        (folder / "b").mkdir()
        trainer = [sys.executable, str(scripts / "sim_trainer.py")]
        settings = [str(arguments.sim_saves), str(arguments.sim_pace)]
        outcomes.append(run_scenario(sim_name, trainer, settings, folder / "b"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print_table(outcomes)
    print(
        f"\npolicy keep_last {KEEP_LAST}, tier2_count 0, tier3_interval null; settle_seconds "
        "60 (the default); peak = most checkpoints on disk in any 50 ms sample while training; "
        "lag = a save's trainer_state.json written -> end of the prune that deleted the save "
        f"{KEEP_LAST} older"
    )
    missed = [f"{o.name}: {miss}" for o in outcomes if not o.skipped for miss in o.misses()]
    for miss in missed:
        print(f"MISSED {miss}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
