"""Benchmark the daemon: idle memory and CPU with 3 roots x 1,000 checkpoints, and the latency
from a checkpoint's completion to the end of the prune it triggers.

    PYTHONPATH=. python bench/bench_daemon.py [--idle-seconds 60] [--checkpoints 1000]

Targets (issue 4): idle RSS <= 60 MB (at start, and again after the new checkpoints were
pruned), idle CPU <= 1 % over 60 s, completion -> prune end <= settle_seconds + 2 s. For
scale, the same table shows a bare `python3 -c 'sleep'` (the floor any Python daemon starts
from) and `rm -rf` of one checkpoint (the deletion itself). Exit 1 on a miss.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOTS = 3
SETTLE = 2.0
SAMPLES = 5
REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from daemon.demo import safetensors_bytes  # noqa: E402

WEIGHTS = safetensors_bytes(4096)


def make_checkpoint(folder: Path, step: int, *, old: bool) -> None:
    path = folder / f"checkpoint-{step}"
    path.mkdir()
    # Well-formed (the daemon checks every new checkpoint's headers, and deep-checks it).
    (path / "model.safetensors").write_bytes(WEIGHTS)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if old:
        stamp = time.time() - 86400
        for item in (*path.iterdir(), path):
            os.utime(item, (stamp, stamp))


def config_text(roots: list[Path], state: Path, keep: int) -> str:
    lines = [
        f"state_dir: {state}",
        f"history_file: {state}/history.jsonl",
        "log: {level: info, format: json}",
        "defaults:",
        f"  policy: {{keep_last: {keep}, tier2_count: 0, tier3_interval: null}}",
        f"  settle_seconds: {SETTLE}",
        "  min_keep: 3",
        "  trash: {grace: 0s}",
        "snapshots: {enabled: false}",
        "disk: {interval: 5m}",
        "roots:",
    ]
    lines += [f"  - {{path: {root}, layout: hf}}" for root in roots]
    return "\n".join(lines) + "\n"


def prune_runs(state: Path) -> list[dict[str, object]]:
    path = state / "history.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if record.get("event") == "prune_run"]


def idle_usage(process: psutil.Process, seconds: float) -> tuple[float, float]:
    """Given a process, return (max RSS in MB, CPU %) over `seconds` of idling."""
    before = process.cpu_times()
    started = time.monotonic()
    peak = 0
    while time.monotonic() - started < seconds:
        peak = max(peak, sum(p.memory_info().rss for p in [process]))
        time.sleep(1.0)
    after = process.cpu_times()
    elapsed = time.monotonic() - started
    cpu = (after.user - before.user + after.system - before.system) / elapsed * 100
    return peak / 1e6, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--checkpoints", type=int, default=1000)
    arguments = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ckptd-bench-"))
    try:
        roots = [folder / f"run{index}" for index in range(ROOTS)]
        for root in roots:
            root.mkdir()
            for index in range(1, arguments.checkpoints + 1):
                make_checkpoint(root, index * 10, old=True)
        state = folder / "state"
        config = folder / "config.yaml"
        config.write_text(config_text(roots, state, arguments.checkpoints))
        notify_path = str(folder / "notify.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(notify_path)
        listener.settimeout(120)
        environment = dict(os.environ, NOTIFY_SOCKET=notify_path)
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(REPOSITORY), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
        )
        log = (folder / "daemon.log").open("w")
        started = time.monotonic()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config)],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while b"READY=1" not in listener.recv(4096):
                pass
            startup = time.monotonic() - started
            process = psutil.Process(daemon.pid)
            time.sleep(2.0)  # let start-up garbage settle
            rss, cpu = idle_usage(process, arguments.idle_seconds)

            latencies = []
            next_step = (arguments.checkpoints + 1) * 10
            for _ in range(SAMPLES):
                runs_before = len(prune_runs(state))
                make_checkpoint(roots[0], next_step, old=False)
                completed = time.time()
                next_step += 10
                deadline = time.monotonic() + SETTLE + 30
                while time.monotonic() < deadline and len(prune_runs(state)) <= runs_before:
                    time.sleep(0.02)
                runs = prune_runs(state)
                if len(runs) <= runs_before:
                    latencies.append(float("inf"))
                    continue
                ended = dt.datetime.fromisoformat(str(runs[-1]["time"])).timestamp()
                latencies.append(ended - completed)
                time.sleep(SETTLE + 0.5)
            # Idle again after work: what a daemon that has pruned new saves keeps resident (each
            # prune saves the caches; built whole, they grew it by 6 MB within a few prunes).
            rss_after, _ = idle_usage(process, min(arguments.idle_seconds, 20.0))
            daemon.terminate()
            exit_code = daemon.wait(30)
        finally:
            if daemon.poll() is None:
                daemon.kill()
            log.close()
            listener.close()

        # References from the same run: a bare interpreter's RSS, and rm -rf of one checkpoint.
        bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
        time.sleep(1.0)
        bare_rss = psutil.Process(bare.pid).memory_info().rss / 1e6
        bare.wait()
        victim = roots[1] / "checkpoint-10"
        rm_started = time.monotonic()
        subprocess.run(["rm", "-rf", str(victim)], check=True)
        rm_seconds = time.monotonic() - rm_started

        worst = max(latencies)
        target_latency = SETTLE + 2.0
        rows = [
            ("checkpoints watched", f"{ROOTS} x {arguments.checkpoints}", "", "", True),
            ("start-up to READY (scan + prune)", f"{startup:.2f} s", "", "", True),
            (
                f"idle RSS (max over {arguments.idle_seconds:g} s)",
                f"{rss:.1f} MB",
                "<= 60 MB",
                f"{rss / bare_rss:.1f}x bare python3 ({bare_rss:.1f} MB)",
                rss <= 60,
            ),
            (
                f"idle RSS after {SAMPLES} new checkpoints pruned",
                f"{rss_after:.1f} MB",
                "<= 60 MB",
                f"{rss_after - rss:+.1f} MB since idle at start",
                rss_after <= 60,
            ),
            (
                f"idle CPU (over {arguments.idle_seconds:g} s)",
                f"{cpu:.2f} %",
                "<= 1 %",
                "",
                cpu <= 1.0,
            ),
            (
                f"completion -> prune end (worst of {SAMPLES})",
                f"{worst:.2f} s",
                f"<= {target_latency:.1f} s",
                # An hf checkpoint is complete once trainer_state.json is there (issue 9): the
                # prune does not wait for settle_seconds.
                f"settle_seconds {SETTLE:g} s not waited; rm -rf one ckpt {rm_seconds:.3f} s",
                worst <= target_latency,
            ),
            ("exit code after SIGTERM", str(exit_code), "0", "", exit_code == 0),
        ]
        width = max(len(row[0]) for row in rows)
        print(f"{'measure':<{width}}  {'value':>12}  {'target':>10}  result  reference")
        for name, value, target, reference, ok in rows:
            verdict = "ok" if ok else "MISS"
            print(f"{name:<{width}}  {value:>12}  {target:>10}  {verdict:<6}  {reference}")
        print("latencies (s):", " ".join(f"{value:.2f}" for value in latencies))
        return 0 if all(row[4] for row in rows) else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
