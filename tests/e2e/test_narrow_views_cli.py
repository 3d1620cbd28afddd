"""At 80 columns no view drops or cuts what matters: checkpoint names, reasons and actions wrap
or move to a line of their own. Each view through the real CLI, on a terminal 80 and 200
columns wide, and piped with $COLUMNS at 80, at 200 and unset."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.history.log import HistoryLog
from daemon.pruning import trash
from tests.configs import write_config
from tests.e2e.terminal import on_terminal, piped
from tests.layouts_fixtures import write_file

OLD = time.time() - 2 * 3600

# (how, width): on a terminal that wide, or piped with $COLUMNS (None: unset, 200 wide).
WAYS = [("terminal", 80), ("terminal", 200), ("piped", 80), ("piped", 200), ("piped", None)]

Run = Callable[[list[str]], tuple[int, str, str]]


@pytest.fixture(params=WAYS, ids=lambda way: f"{way[0]}-{way[1]}")
def view(
    request: pytest.FixtureRequest, ckptd_command: list[str], cli_env: dict[str, str]
) -> tuple[Run, int]:
    """Run the CLI one of the WAYS; give back (exit code, stdout, stderr) and the width."""
    how, width = request.param

    def run(arguments: list[str]) -> tuple[int, str, str]:
        if how == "terminal":
            code, output = on_terminal([*ckptd_command, *arguments], cli_env, columns=width)
            return code, output, output
        result = piped([*ckptd_command, *arguments], cli_env, columns=width)
        return result.returncode, result.stdout, result.stderr

    return run, width or 200


def whole_name(name: str, text: str) -> bool:
    """Given a checkpoint name, return whether it appears whole (not the start of a longer one,
    not broken across lines)."""
    return re.search(re.escape(name) + r"(?![\w.=-])", text) is not None


def words(text: str) -> str:
    """Given output, return its words joined by single spaces (line breaks are not cuts)."""
    return " ".join(text.split())


def assert_fits(text: str, width: int) -> None:
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long, f"lines wider than {width}: {too_long}"


def hf_run_tracking(root: Path) -> None:
    """60 settled Hugging Face checkpoints whose trainer_state.json names checkpoint-1300 as
    the best model: it is kept as `tracked:checkpoint-6000/trainer_state.json`."""
    for step in range(100, 6100, 100):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        write_file(folder / "model.safetensors", 1000)
        state = {"global_step": step, "best_model_checkpoint": "/out/checkpoint-1300"}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        for path in (*folder.iterdir(), folder):
            os.utime(path, (OLD, OLD))


def test_plan_keeps_names_reasons_and_actions_whole(tmp_path: Path, view: tuple[Run, int]) -> None:
    run, width = view
    root = tmp_path / "run"
    hf_run_tracking(root)
    code, output, _ = run(["plan", str(root)])
    assert code == 0, output
    for name in ("checkpoint-100", "checkpoint-1300", "checkpoint-2100", "checkpoint-6000"):
        assert whole_name(name, output), name
    assert "tracked:checkpoint-6000/trainer_state.json" in output
    assert "tier3: not the newest in (1000, 2000]; 2000 represents it" in words(output)
    assert "tier2, tier3: not the newest of their buckets" in words(output)
    assert "tier2:every-200 (2200, 2400 … 3800)" in words(output)
    assert re.search(r"^delete\s+checkpoint-100 … checkpoint-900", output, re.MULTILINE)
    assert re.search(r"^KEEP\s+checkpoint-1300\s", output, re.MULTILINE)
    assert_fits(output, width)


def test_prune_dry_run_keeps_names_and_reasons_whole(tmp_path: Path, view: tuple[Run, int]) -> None:
    run, width = view
    root = tmp_path / "run"
    hf_run_tracking(root)
    code, output, _ = run(["prune", "--dry-run", str(root)])
    assert code == 0, output
    assert "tracked:checkpoint-6000/trainer_state.json" in output
    assert whole_name("checkpoint-1300", output)
    assert "dry run, nothing changed: would delete 27" in words(output)
    assert_fits(output, width)


def test_history_keeps_its_why_column_and_names(tmp_path: Path, view: tuple[Run, int]) -> None:
    run, width = view
    history = tmp_path / "history.jsonl"
    config = write_config(tmp_path / "ckptd.yaml", history_file=history, state_dir=None)
    root = "/data/training/a-rather-long-model-name/current_model"
    why = "tier3: not the newest in (12000, 13000]; checkpoint-13000 represents it"
    reason = "in-use:pid 4242 (python eval.py --model /data/training/current_model)"
    with HistoryLog(str(history)) as log:
        log.write(
            "delete", root=root, checkpoint="checkpoint-12100", bytes_freed=3_600_000_000, why=[why]
        )
        log.write("veto", root=root, checkpoint="checkpoint-12500", reason=reason)
    code, output, _ = run(["history", "--config", str(config)])
    assert code == 0, output
    assert why in words(output) and reason in words(output)
    assert whole_name("checkpoint-12100", output) and whole_name("checkpoint-12500", output)
    assert root in output
    assert_fits(output, width)


def test_trash_list_keeps_the_names_restore_needs(tmp_path: Path, view: tuple[Run, int]) -> None:
    run, width = view
    root = tmp_path / "run"
    names = [
        "epoch=12-step=120000-val_loss=0.2345.ckpt",
        "epoch=13-step=130000-val_loss=0.2290.ckpt",
    ]
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "model.bin").write_bytes(b"m" * 2000)
        trash.move_to_trash(str(root), name, [name], now=time.time())
    code, output, _ = run(["trash", "list", "--root", str(root)])
    assert code == 0, output
    for name in names:
        assert re.search(r"^" + re.escape(name) + r"\s", output, re.MULTILINE), output
    # Purging frees allocated bytes (filesystem-dependent); the logical size is shown apart.
    assert re.search(r"total: 2 checkpoints, [\d.]+ KB \(4\.0 KB logical\)", words(output))
    assert_fits(output, width)
