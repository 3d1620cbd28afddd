"""The slimming proof on a real Hugging Face Trainer run (issue 11).

A tiny GPT-2 built in code is trained on CPU by the frameworks' own interpreter
(`/work/fw-venv`: torch 2.13 CPU + transformers; the suite itself never imports them), one
checkpoint per step. Then `ckptd prune -y` with `slim: {after: tier1}` slims the older ones,
and the frameworks themselves say it worked:

- `from_pretrained(slimmed)` loads and gives exactly the logits it gave before slimming;
- the slimmed checkpoint's `trainer_state.json` and `config.json` are byte for byte intact;
- `Trainer(resume_from_checkpoint=newest)` still resumes (the newest is never slimmed).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.slimming import SLIM_RECORD, is_slimmed, read_record
from tests.configs import write_config

FRAMEWORKS = Path(os.environ.get("CKPTD_FW_VENV", "/work/fw-venv")) / "bin" / "python"
RUNNER = Path(__file__).resolve().parents[1] / "fixtures" / "hf_slim_run.py"
CKPTD = Path(sys.executable).parent / "ckptd"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not FRAMEWORKS.exists(),
        reason=f"needs {FRAMEWORKS} with torch and transformers (see "
        "tests/fixtures/frameworks/README.md); the recorded tree covers the rest",
    ),
]


def frameworks(*arguments: str) -> dict[str, Any]:
    """Run hf_slim_run.py in the frameworks' interpreter; return its last line, parsed."""
    result = subprocess.run(
        [str(FRAMEWORKS), str(RUNNER), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_slimmed_hf_checkpoint_loads_with_the_same_logits_and_the_newest_resumes(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    assert frameworks("train", str(run), "--steps", "6")["global_step"] == 6
    before = frameworks("logits", str(run / "checkpoint-2"))
    kept_files = {
        name: digest(run / "checkpoint-2" / name)
        for name in ("trainer_state.json", "config.json", "model.safetensors")
    }
    history = tmp_path / "history.jsonl"
    slim_early = {
        "keep_last": 2,
        "tier2_count": 2,
        "tier3_interval": 1,
        "cadence": 1,
        "slim": {"after": "tier1"},
    }
    config = write_config(
        tmp_path / "config.yaml",
        [run],
        history_file=history,
        settle_seconds=0,
        min_keep=0,
        grace=0,
        root_settings={"policy": slim_early},
    )
    pruned = subprocess.run(
        [str(CKPTD), "prune", "--config", str(config), "-y"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr

    # Tiers 2 and 3 (steps 1-4) lost their resume state; tier 1 (5, 6) is whole.
    for step in range(1, 5):
        folder = run / f"checkpoint-{step}"
        assert is_slimmed(str(run), folder.name)
        assert not {"optimizer.pt", "scheduler.pt", "rng_state.pth"} & set(os.listdir(folder))
    for step in (5, 6):
        assert not is_slimmed(str(run), f"checkpoint-{step}")
        assert (run / f"checkpoint-{step}" / "optimizer.pt").exists()
    record = read_record(str(run), "checkpoint-2")
    assert record is not None
    assert {f.path for f in record.files} == {"optimizer.pt", "rng_state.pth", "scheduler.pt"}
    assert record.bytes_freed > 0

    after = frameworks("logits", str(run / "checkpoint-2"))
    assert after["logits"] == before["logits"]
    assert SLIM_RECORD in after["files"]
    for name, sha in kept_files.items():
        assert digest(run / "checkpoint-2" / name) == sha, name

    resumed = frameworks(
        "resume", str(tmp_path / "resumed"), str(run / "checkpoint-6"), "--steps", "7"
    )
    assert resumed["global_step"] == 7

    # A slimmed checkpoint is still sound to the integrity checks (every checksum read): it is
    # neither corrupt nor alerted on, and the next prune slims nothing more.
    verified = subprocess.run(
        [str(CKPTD), "verify", str(run), "--config", str(config), "--deep", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    checked = {c["name"]: c for c in json.loads(verified.stdout)["checkpoints"]}
    assert sorted(checked) == [f"checkpoint-{step}" for step in range(1, 7)]
    assert all(c["status"] == "ok" and c["deep"] for c in checked.values()), checked

    records = [json.loads(line) for line in history.read_text().splitlines()]
    assert not [r for r in records if r["event"] == "integrity_corrupt"]
    slims = [r for r in records if r["event"] == "slim"]
    assert sorted(r["checkpoint"] for r in slims) == [f"checkpoint-{s}" for s in range(1, 5)]
    assert all(r["bytes_freed"] > 0 and r["files"] for r in slims)
