"""Slimming a tree a real Hugging Face Trainer wrote (issue 11), recorded in
tests/fixtures/frameworks/trees/hf-trainer-complete.json (transformers 5.25, a tiny GPT-2, four
saves): the suite needs no framework. tests/e2e/test_slim_hf_real.py runs the framework itself.

What the Trainer wrote is what ckptd takes apart: `optimizer.pt`, `scheduler.pt` and
`rng_state.pth` leave; `model.safetensors`, `config.json`, `generation_config.json`,
`training_args.bin` and `trainer_state.json` stay byte for byte, and discovery still sees a
complete `hf` checkpoint (a slimmed one is not incomplete: `trainer_state.json` stays).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.config import (
    Config,
    DefaultsConfig,
    PolicyConfig,
    RootConfig,
    SlimConfig,
    TrashConfig,
    VerifyConfig,
)
from daemon.discovery.scan import scan
from daemon.history.log import HistoryLog
from daemon.pruning import pipeline
from daemon.slimming import SLIM_RECORD, is_slimmed, read_record

materialize = pytest.importorskip(
    "tests.fixtures.frameworks.materialize",
    reason="the recorded framework trees (branch fixtures) are not merged yet",
)

NOW = 1_800_000_000.0
TRAINER_RESUME_STATE = {"optimizer.pt", "rng_state.pth", "scheduler.pt"}


def recorded_run(tmp_path: Path) -> Path:
    document = materialize.load_tree("hf-trainer-complete")
    materialize.materialize(document, tmp_path / "tree", max_file_bytes=1 << 20)
    root = tmp_path / "tree" / document["root"]
    for step in range(1, 5):
        folder = root / f"checkpoint-{step}"
        stamp = NOW - 3600 + step
        for path in [*folder.iterdir(), folder]:
            os.utime(path, (stamp, stamp))
    return root


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_the_recorded_trainer_tree_is_slimmed_to_its_weights(tmp_path: Path) -> None:
    root = recorded_run(tmp_path)
    before = {step: contents(root / f"checkpoint-{step}") for step in range(1, 5)}
    assert set(before[1]) >= TRAINER_RESUME_STATE
    policy = PolicyConfig(
        keep_last=2, tier2_count=2, tier3_interval=1, cadence=1, slim=SlimConfig(after="tier1")
    )
    root_config = RootConfig(path=str(root), policy=policy)
    config = Config(
        roots=[root_config],
        defaults=DefaultsConfig(settle_seconds=0, min_keep=0, trash=TrashConfig(grace=0)),
        # The recorded tree keeps the torch files' sizes, not their bytes (zeros here): the
        # integrity checks would rightly call them corrupt. tests/e2e/test_slim_hf_real.py checks
        # real slimmed files deeply.
        verify=VerifyConfig(checks=False),
    )
    with HistoryLog(str(tmp_path / "history.jsonl")) as history:
        report = pipeline.prune_root(config, root_config, now=NOW, dry_run=False, history=history)
    assert report.refused is None and not report.failed, report.errors
    assert sorted(report.slims.slimmed) == ["checkpoint-1", "checkpoint-2"]
    for step in (1, 2):
        after = contents(root / f"checkpoint-{step}")
        assert set(after) == set(before[step]) - TRAINER_RESUME_STATE | {SLIM_RECORD}
        assert all(after[name] == before[step][name] for name in after if name != SLIM_RECORD)
        record = read_record(str(root), f"checkpoint-{step}")
        assert record is not None and {f.path for f in record.files} == TRAINER_RESUME_STATE
        assert sum(f.bytes_logical for f in record.files) == sum(
            len(before[step][name]) for name in TRAINER_RESUME_STATE
        )
    for step in (3, 4):
        assert contents(root / f"checkpoint-{step}") == before[step]
        assert not is_slimmed(str(root), f"checkpoint-{step}")
    found = scan(root_config, now=NOW, settle_seconds=0)
    assert found.layout == "hf"
    assert [(c.name, c.complete, c.slimmed) for c in found.checkpoints] == [
        ("checkpoint-1", True, True),
        ("checkpoint-2", True, True),
        ("checkpoint-3", True, False),
        ("checkpoint-4", True, False),
    ]
