"""Slimming as a user drives it (issue 11): the installed CLI as a subprocess on real folders.

`ckptd plan` shows SLIM (and `--json` gives `"action": "slim"` and the files), `ckptd prune -y`
slims, `ckptd trash restore` puts the resume state back, `ckptd status` and `ckptd forecast`
count slimmed bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.configs import write_config
from tests.layouts_fixtures import well_formed_bytes

RESUME = {"optimizer.pt": 20_000, "scheduler.pt": 1_000, "rng_state.pth": 1_000}
WEIGHTS = {"model.safetensors": 10_000, "config.json": 100, "trainer_state.json": 100}


def hugging_face_run(root: Path, steps: range) -> None:
    past = time.time() - 86_400
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name, size in {**WEIGHTS, **RESUME}.items():
            # trainer_state.json is read by discovery: JSON, padded with whitespace.
            # The rest well-formed: the integrity checks (on by default) read their headers.
            data = b"{}".ljust(size) if name.endswith(".json") else well_formed_bytes(name, size)
            (folder / name).write_bytes(data)
        stamp = past + step
        for path in (*folder.iterdir(), folder):
            os.utime(path, (stamp, stamp))


def run(command: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_plan_shows_slim_and_prune_slims_then_restore_puts_it_back(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    hugging_face_run(root, range(100, 17001, 100))
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        history_file=tmp_path / "history.jsonl",
        settle_seconds=0,
        min_keep=0,
        grace="1h",
        root_settings={"policy": {"preset": "balanced", "slim": {"after": "tier1"}}},
    )

    shown = run(ckptd_command, cli_env, "plan", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "SLIM" in shown.stdout and "slim:after-tier1" in shown.stdout
    assert "slim 23 (frees" in shown.stdout

    planned = run(ckptd_command, cli_env, "plan", "--config", str(config), "--json")
    document = json.loads(planned.stdout)
    slims = [c for c in document["checkpoints"] if c["action"] == "slim"]
    assert len(slims) == 23 and document["summary"]["slim"] == 23
    assert {c["step"] for c in slims} == set(range(1000, 13001, 1000)) | set(
        range(13200, 15001, 200)
    )
    assert all(c["files"] == sorted(RESUME) and c["bytes_freed"] > 0 for c in slims)
    assert all(c["action"] == "keep" for c in document["checkpoints"] if c["step"] > 15000)

    pruned = run(ckptd_command, cli_env, "prune", "--config", str(config), "-y", "--json")
    assert pruned.returncode == 0, pruned.stderr
    result = json.loads(pruned.stdout)["result"]
    assert len(result["slimmed"]) == 23 and len(result["slims_in_trash"]) == 23
    assert len(result["deleted"]) == 127
    assert sorted(os.listdir(root / "checkpoint-13000")) == sorted([*WEIGHTS, ".ckptd-slim.json"])

    listed = run(ckptd_command, cli_env, "trash", "list", "--config", str(config), "--json")
    slim_items = [row for row in json.loads(listed.stdout) if row["name"] == "checkpoint-13000"]
    assert len(slim_items) == 1 and slim_items[0]["kind"] == "slim"

    status = run(ckptd_command, cli_env, "status", "--config", str(config), "--json")
    root_status = json.loads(status.stdout)["roots"][0]
    assert root_status["slimmed"] == 23 and root_status["to_slim"] == 0
    assert root_status["bytes_slimmed"] > 0

    restored = run(
        ckptd_command, cli_env, "trash", "restore", "checkpoint-13000", "--config", str(config)
    )
    assert restored.returncode == 0, restored.stderr
    assert sorted(os.listdir(root / "checkpoint-13000")) == sorted([*WEIGHTS, *RESUME, ".keep"])
    replanned = json.loads(
        run(ckptd_command, cli_env, "plan", "--config", str(config), "--json").stdout
    )
    entry = next(c for c in replanned["checkpoints"] if c["name"] == "checkpoint-13000")
    assert entry["action"] == "keep" and not entry["slimmed"]
    assert "pinned:.keep" in entry["reasons"]


def test_forecast_has_a_with_slim_row(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    args = ("forecast", "--steps", "100000", "--every", "100", "--size", "3.6GB")
    given = run(ckptd_command, cli_env, *args, "--slim-fraction", "0.6667", "--json")
    assert given.returncode == 0, given.stderr
    document = json.loads(given.stdout)
    assert document["with_policy"]["checkpoints"] == 126
    assert document["with_slim"]["slimmed"] == 106
    assert round(document["with_slim"]["bytes"] / 1e9, 1) == 199.2
    text = run(ckptd_command, cli_env, *args, "--slim-fraction", "0.6667")
    assert "with slim" in text.stdout and "199.2 GB" in text.stdout

    root = tmp_path / "run"
    hugging_face_run(root, range(100, 501, 100))
    measured = run(ckptd_command, cli_env, *args, "--slim-from", str(root), "--json")
    assert measured.returncode == 0, measured.stderr
    fraction = json.loads(measured.stdout)["with_slim"]["slim_fraction"]
    resume, weights = sum(RESUME.values()), sum(WEIGHTS.values())
    assert abs(fraction - resume / (resume + weights)) < 1e-9
    refused = run(ckptd_command, cli_env, *args, "--slim-fraction", "1.5")
    assert refused.returncode == 2 and "between 0 and 1" in refused.stderr
