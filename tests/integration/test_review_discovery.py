"""Defects found in review of discovery and the policy, each pinned by the test that found it."""

from __future__ import annotations

import time
from pathlib import Path

from daemon.config import Config, RootConfig
from daemon.discovery import ScanResult, scan
from daemon.planning import plan_root
from daemon.sizecache import SizeCache
from policies.model import Checkpoint
from tests.layouts_fixtures import hf_checkpoint, hf_run


def run_scan(
    root: Path, cache: SizeCache | None = None, *, want_metrics: bool = False
) -> ScanResult:
    return scan(
        RootConfig(path=str(root)),
        now=time.time(),
        settle_seconds=60,
        cache=cache,
        want_metrics=want_metrics,
    )


def by_name(result: ScanResult) -> dict[str, Checkpoint]:
    return {checkpoint.name: checkpoint for checkpoint in result.checkpoints}


def test_best_model_checkpoint_stays_tracked_while_the_newest_trainer_state_is_half_written(
    tmp_path: Path,
) -> None:
    # Every complete checkpoint names checkpoint-300 as the best; the Trainer is now writing
    # checkpoint-3100's trainer_state.json (cut off mid-write). Reading only that one file would
    # drop the tracker, and the plan would delete the best model load_best_model_at_end needs.
    hf_run(tmp_path, range(100, 3001, 100), best_model_checkpoint=str(tmp_path / "checkpoint-300"))
    saving = hf_checkpoint(tmp_path, 3100, age_seconds=None)
    (saving / "trainer_state.json").write_text('{"global_step": 3100, "best_model_checkpoint": "')
    found = by_name(run_scan(tmp_path))
    assert not found["checkpoint-3100"].complete
    assert found["checkpoint-300"].tracked_by == ("checkpoint-3000/trainer_state.json",)
    _, plan = plan_root(Config(), RootConfig(path=str(tmp_path)), now=time.time())
    decision = next(d for d in plan.decisions if d.checkpoint.name == "checkpoint-300")
    assert decision.keep
    assert "tracked:checkpoint-3000/trainer_state.json" in decision.reasons
