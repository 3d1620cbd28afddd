"""The user's disk (issue 12), with the real framework: a Hugging Face Trainer saves a tiny GPT-2
every 2 steps; the disk fills during a save, so the newest two checkpoints are truncated (their
`model.safetensors` and `optimizer.pt` cut short, `trainer_state.json` written); `ckptd prune
-y` runs with a policy that keeps only the newest checkpoint. The last good checkpoint survives,
`ckptd last-good` names it, and a real `Trainer.train(resume_from_checkpoint=...)` resumes from
it to the end (while resuming from the newest, truncated one fails, as it would have).

Needs the frameworks' virtualenv (`/work/fw-venv`, or `$CKPTD_FW_VENV`): torch (CPU) and
transformers; skipped without it. ckptd itself runs from this checkout, without them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.configs import rotation, write_config

FW_VENV = Path(os.environ.get("CKPTD_FW_VENV", "/work/fw-venv"))
FW_PYTHON = FW_VENV / "bin" / "python"

TRAIN = """
import json, sys
import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

out, max_steps = sys.argv[1], int(sys.argv[2])
resume = sys.argv[3] if len(sys.argv) > 3 else None


class Tokens(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        ids = torch.tensor([(index * 7 + j) % 50 for j in range(16)])
        return {"input_ids": ids, "labels": ids}


# Counts the optimizer steps this process runs (a resume from step 6 to 12 runs 6).
class CountSteps(TrainerCallback):

    run = 0

    def on_step_end(self, args, state, control, **kwargs):
        CountSteps.run += 1


torch.manual_seed(0)
config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)
arguments = TrainingArguments(
    output_dir=out, max_steps=max_steps, save_steps=2, per_device_train_batch_size=4,
    report_to=[], logging_steps=1, use_cpu=True, seed=0, dataloader_num_workers=0,
)
trainer = Trainer(
    model=GPT2LMHeadModel(config), args=arguments, train_dataset=Tokens(), callbacks=[CountSteps]
)
result = trainer.train(resume_from_checkpoint=resume)
print("RESULT " + json.dumps({"global_step": result.global_step, "run": CountSteps.run}))
"""


def train(
    script: Path, out: Path, steps: int, resume: Path | None = None
) -> subprocess.CompletedProcess[str]:
    command = [str(FW_PYTHON), str(script), str(out), str(steps)]
    if resume is not None:
        command.append(str(resume))
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    environment.pop("PYTHONPATH", None)  # the frameworks' own environment, nothing of ours
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, env=environment
    )


def outcome(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """Given a training run, return its final global step and the steps this process ran."""
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    found: dict[str, int] = json.loads(line.removeprefix("RESULT "))
    return found


def cut_short(path: Path) -> None:
    """Given a file, cut it to a third of its size: what a full disk leaves of a write."""
    os.truncate(path, path.stat().st_size // 3)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_after_a_full_disk_a_real_trainer_resumes_from_the_checkpoint_ckptd_kept(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    if not FW_PYTHON.exists():
        pytest.skip(f"no frameworks' virtualenv at {FW_VENV} (torch + transformers)")
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    root = tmp_path / "run"
    trained = train(script, root, 10)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert outcome(trained) == {"global_step": 10, "run": 10}
    saved = sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))
    assert saved == [f"checkpoint-{step}" for step in (10, 2, 4, 6, 8)]

    # The disk fills during the saves of steps 8 and 10.
    for step in (8, 10):
        cut_short(root / f"checkpoint-{step}" / "model.safetensors")
        cut_short(root / f"checkpoint-{step}" / "optimizer.pt")

    config = write_config(
        tmp_path / "config.yaml",
        [root],
        policy=rotation(1),
        settle_seconds=0,
        min_keep=1,
        grace="0s",
        layout="hf",
    )
    environment = dict(cli_env)
    pruned = subprocess.run(
        [*ckptd_command, "prune", "--config", str(config), "-y"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        check=False,
    )
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))
    # The last good checkpoint survives; the truncated ones are kept (corrupt, for a person).
    assert left == ["checkpoint-10", "checkpoint-6", "checkpoint-8"]
    history = [
        json.loads(line) for line in (tmp_path / "state" / "history.jsonl").read_text().splitlines()
    ]
    deleted = sorted(r["checkpoint"] for r in history if r["event"] == "delete")
    assert deleted == ["checkpoint-2", "checkpoint-4"]
    corrupt = sorted(r["checkpoint"] for r in history if r["event"] == "integrity_corrupt")
    assert corrupt == ["checkpoint-10", "checkpoint-8"]

    named = subprocess.run(
        [*ckptd_command, "last-good", str(root), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        check=False,
    )
    assert named.returncode == 0, named.stderr
    last_good = Path(named.stdout.strip())
    assert last_good == root / "checkpoint-6"

    # The losses of steps 7 and 8 as the first run logged them (its trainer_state.json of step
    # 8 was written whole): a true resume from step 6 repeats them.
    before = json.loads((root / "checkpoint-8" / "trainer_state.json").read_text())
    first_losses = {r["step"]: r["loss"] for r in before["log_history"] if "loss" in r}
    # Resuming from the newest (truncated) checkpoint fails, as it would have for the user...
    broken = train(script, root, 12, root / "checkpoint-10")
    assert broken.returncode != 0
    # ...and from the one ckptd kept and named, a real Trainer resumes and trains to the end.
    resumed = train(script, root, 12, last_good)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outcome(resumed) == {"global_step": 12, "run": 6}  # steps 7 to 12, from step 6
    state = json.loads((root / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    losses = {r["step"]: r["loss"] for r in state["log_history"] if "loss" in r}
    assert sorted(losses) == list(range(1, 13))
    assert losses[7] == pytest.approx(first_losses[7], rel=1e-4)
    assert losses[8] == pytest.approx(first_losses[8], rel=1e-4)
