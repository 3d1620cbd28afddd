"""`ckptd demo`: a simulated trainer and the real daemon in a temporary folder, shown live.

The trainer (a thread) saves Hugging-Face-style checkpoints every ~0.3 s in bursts, with an
"evaluation" pause between bursts, as real runs do; the daemon is `serve()` itself with a small
policy, so the tiers fill and thin out within seconds. Nothing outside the temporary folder is
touched; it is removed at the end unless `keep`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from daemon.logs import configure_logging
from daemon.render import history_table, why_of
from daemon.service.lifecycle import serve
from policies import plan
from policies.model import Checkpoint, PolicySpec

STEP = 10
SAVE_EVERY_SECONDS = 0.3
BURST = 5
EVALUATION_SECONDS = 1.2
SETTLE_SECONDS = 0.4
POLICY = PolicySpec(keep_last=5, tier2_count=4, tier3_interval=10 * STEP)


@dataclass
class TrainerProgress:
    written: int = 0
    step: int = 0


def demo_config(folder: Path) -> str:
    """Given the demo folder, return the YAML config the demo's daemon runs with."""
    return f"""\
# ckptd demo config (generated)
state_dir: {folder / "state"}
history_file: {folder / "state" / "history.jsonl"}
log: {{level: info, format: json}}
defaults:
  policy: {{keep_last: {POLICY.keep_last}, tier2_count: {POLICY.tier2_count}, \
tier3_interval: {POLICY.tier3_interval}}}
  settle_seconds: {SETTLE_SECONDS}
  min_keep: 3
  max_delete_fraction: 0.9
  trash: {{grace: 0s}}
roots:
  - path: {folder / "run"}
    layout: hf
prune: {{schedule: "0 4 * * sun", on_new_checkpoint: true}}
snapshots: {{enabled: false}}
disk: {{interval: 1h}}
"""


def train(root: Path, stop: threading.Event, progress: TrainerProgress) -> None:
    """Given a root, save a checkpoint every ~0.3 s (folder, weights, state last) until `stop`."""
    while not stop.is_set():
        for _ in range(BURST):
            if stop.is_set():
                return
            progress.step += STEP
            folder = root / f"checkpoint-{progress.step}"
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(os.urandom(4096))
            (folder / "optimizer.pt").write_bytes(os.urandom(8192))
            state = {"global_step": progress.step, "log_history": []}
            (folder / "trainer_state.json").write_text(json.dumps(state))
            progress.written += 1
            stop.wait(SAVE_EVERY_SECONDS)
        stop.wait(EVALUATION_SECONDS)


def read_history(path: Path) -> list[dict[str, Any]]:
    """Given the history file, return its records (a half-written last line is skipped)."""
    records: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def present_checkpoints(root: Path) -> list[Checkpoint]:
    found: list[Checkpoint] = []
    for entry in os.scandir(root):
        if entry.name.startswith("checkpoint-") and entry.is_dir():
            complete = os.path.exists(os.path.join(entry.path, "trainer_state.json"))
            found.append(
                Checkpoint(
                    name=entry.name,
                    step=int(entry.name.split("-")[1]),
                    layout="hf",
                    complete=complete,
                    incomplete_reason=None if complete else "writing",
                )
            )
    return found


def tiers(root: Path) -> dict[str, list[int]]:
    """Given the root, return tier label -> steps on disk now (the policy's view of them)."""
    rows: dict[str, list[int]] = {"tier 1": [], "tier 2": [], "tier 3": [], "writing": []}
    checkpoints = present_checkpoints(root)
    if not checkpoints:
        return rows
    for decision in plan(checkpoints, {"default": POLICY}, root=str(root)).decisions:
        label = f"tier {decision.tier}" if decision.tier else "writing"
        rows.setdefault(label, []).append(decision.checkpoint.step)
    return rows


def deletions(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record for record in history if record.get("event") == "delete"]


def view(root: Path, history_path: Path, progress: TrainerProgress, elapsed: float) -> Group:
    history = read_history(history_path)
    table = Table(title=f"ckptd demo — {elapsed:4.1f} s", expand=False)
    table.add_column("tier")
    table.add_column("steps on disk")
    for label, steps in tiers(root).items():
        table.add_row(label, " ".join(str(step) for step in sorted(steps)) or "-")
    pruned = deletions(history)
    summary = Text(
        f"written {progress.written}   on disk {len(present_checkpoints(root))}   "
        f"pruned {len(pruned)}   policy keep_last={POLICY.keep_last} "
        f"tier2_count={POLICY.tier2_count} tier3_interval={POLICY.tier3_interval}"
    )
    recent = Text(
        "\n".join(
            f"  deleted {record.get('checkpoint', '?')}: {why_of(record)}" for record in pruned[-4:]
        )
    )
    return Group(table, summary, recent)


def plain_line(root: Path, history_path: Path, progress: TrainerProgress, elapsed: float) -> str:
    rows = tiers(root)
    return (
        f"t={elapsed:4.1f}s written={progress.written} on_disk={len(present_checkpoints(root))} "
        f"pruned={len(deletions(read_history(history_path)))} "
        + " ".join(f"{label.replace(' ', '')}={sorted(steps)}" for label, steps in rows.items())
    )


def run_demo(seconds: float = 30.0, *, keep: bool = False, out: TextIO | None = None) -> int:
    """Given a duration, run the trainer and the daemon, show them live, then the history."""
    out = sys.stdout if out is None else out
    console = Console(file=out, highlight=False)
    if not console.is_terminal:
        console = Console(file=out, highlight=False, width=200)
    folder = Path(tempfile.mkdtemp(prefix="ckptd-demo-"))
    root = folder / "run"
    root.mkdir()
    (folder / "state").mkdir()
    config_path = folder / "config.yaml"
    config_path.write_text(demo_config(folder))
    history_path = folder / "state" / "history.jsonl"
    log_file = (folder / "daemon.log").open("w", encoding="utf-8")
    configure_logging("info", "json", stream=log_file)

    stop_daemon, reload, stop_trainer = threading.Event(), threading.Event(), threading.Event()
    progress = TrainerProgress()
    result: dict[str, int] = {}
    daemon = threading.Thread(
        target=lambda: result.setdefault(
            "exit",
            serve(
                str(config_path),
                stop=stop_daemon,
                reload=reload,
                tick=0.1,
                configure_logs=False,
            ),
        ),
        name="ckptd-demo-daemon",
    )
    trainer = threading.Thread(
        target=train, args=(root, stop_trainer, progress), name="ckptd-demo-trainer"
    )
    console.print(f"ckptd demo in {folder} for {seconds:g} s (daemon log: {folder / 'daemon.log'})")
    daemon.start()
    trainer.start()
    started = time.monotonic()
    try:
        if console.is_terminal:
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while (elapsed := time.monotonic() - started) < seconds:
                    live.update(view(root, history_path, progress, elapsed))
                    time.sleep(0.25)
                live.update(view(root, history_path, progress, time.monotonic() - started))
        else:
            while (elapsed := time.monotonic() - started) < seconds:
                console.print(plain_line(root, history_path, progress, elapsed))
                time.sleep(min(2.0, max(0.1, seconds - elapsed)))
    except KeyboardInterrupt:
        console.print("interrupted")
    finally:
        stop_trainer.set()
        trainer.join()
        # Let the last burst settle and be pruned, so the history shows the policy's answer.
        time.sleep(SETTLE_SECONDS + 1.0)
        stop_daemon.set()
        daemon.join()
        configure_logging("info", "auto")
        log_file.close()

    history = read_history(history_path)
    survivors = sorted(checkpoint.step for checkpoint in present_checkpoints(root))
    console.print(history_table(history))
    console.print(
        f"demo: wrote {progress.written} checkpoints, pruned {len(deletions(history))}, "
        f"kept {len(survivors)}: {survivors}"
    )
    if keep:
        console.print(f"kept the demo folder: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return result.get("exit", 1)
