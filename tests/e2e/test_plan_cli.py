"""`ckptd plan` as a user runs it: the installed CLI as a subprocess on a real folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.configs import rotation, write_config
from tests.layouts_fixtures import write_file


def _hugging_face_run(root: Path, steps: range, *, age_seconds: float = 3600) -> None:
    """Given a folder, fill it with settled Hugging Face Trainer checkpoints at `steps`."""
    past = time.time() - age_seconds
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        write_file(folder / "model.safetensors", 1000)
        write_file(folder / "optimizer.pt", 500)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for path in (*folder.iterdir(), folder):
            os.utime(path, (past, past))


def _run(command: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_plan_json_gives_the_reference_answer_for_170_checkpoints(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    _hugging_face_run(root, range(100, 17001, 100))
    result = _run(ckptd_command, cli_env, "plan", str(root), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    kept = sorted(c["step"] for c in document["checkpoints"] if c["action"] == "keep")
    expected = (
        list(range(1000, 13001, 1000))
        + list(range(13200, 15001, 200))
        + list(range(15100, 17001, 100))
    )
    assert kept == expected
    assert document["summary"]["total"] == 170
    assert document["summary"]["keep"] == 43
    assert document["summary"]["delete"] == 127
    assert document["summary"]["bytes_freed"] == 127 * 1500 + sum(
        len(json.dumps({"global_step": c["step"]}))
        for c in document["checkpoints"]
        if c["action"] == "delete"
    )
    # Nothing was deleted by planning.
    assert len(list(root.iterdir())) == 170


def test_plan_human_view_folds_the_timeline(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    _hugging_face_run(root, range(100, 17001, 100))
    result = _run(ckptd_command, cli_env, "plan", str(root))
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert "170 checkpoints: keep 43" in output
    assert "delete 127" in output
    # Tier 1 (20 kept in a row) is one folded line, and the newest is at the bottom.
    assert "checkpoint-15100 … checkpoint-16900" in output
    assert output.index("tier 3") < output.index("tier 2") < output.index("tier 1")
    assert len(output.splitlines()) < 60


def test_plan_of_a_missing_root_is_a_usage_error(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    missing = tmp_path / "nowhere"
    result = _run(ckptd_command, cli_env, "plan", str(missing))
    assert result.returncode == 2
    assert str(missing) in result.stderr or "nowhere" in result.stderr


def test_plan_of_a_root_that_is_a_file_is_a_usage_error(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    a_file = tmp_path / "model.pt"
    a_file.write_bytes(b"x")
    result = _run(ckptd_command, cli_env, "plan", str(a_file))
    assert result.returncode == 2
    assert "not a folder" in result.stderr


def test_plan_without_root_or_config_explains_what_to_give(
    ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    result = _run(ckptd_command, cli_env, "plan")
    assert result.returncode == 2
    assert "ROOT" in result.stderr and "--config" in result.stderr


def test_a_pattern_that_matches_nothing_warns_and_plans_nothing(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    _hugging_face_run(root, range(100, 501, 100))
    config = write_config(
        tmp_path / "config.yaml", [root], root_settings={"pattern": "ckpt-{step}"}
    )
    result = _run(ckptd_command, cli_env, "plan", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["summary"]["total"] == 0
    assert any("ckpt-{step}" in warning for warning in document["warnings"])


@pytest.mark.parametrize("command", ["plan", "prune", "status", "history", "forecast", "run"])
def test_every_command_has_help(
    command: str, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    result = _run(ckptd_command, cli_env, command, "--help")
    assert result.returncode == 0
    assert "usage: ckptd " + command in result.stdout


def test_plan_shows_ages_cadence_protected_files_and_a_tier3_that_keeps_nothing(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    # The second layout of the example config: mid-epoch saves rotated (keep 5, nothing past
    # tier 2), epoch checkpoints under the balanced preset, best.pt and last.pt protected.
    root = tmp_path / "resnet50"
    root.mkdir()
    names = [f"mid_epoch_{e}_{e * 5000 + s * 1000}.pt" for e in range(4) for s in range(1, 6)]
    names += [f"checkpoint_epoch_{e}.pt" for e in range(4)] + ["best.pt", "last.pt"]
    past = time.time() - 3 * 3600
    for name in names:
        write_file(root / name, 5000)
        os.utime(root / name, (past, past))
    series = [
        {"pattern": "mid_epoch_{epoch}_{step}.pt", "policy": rotation(5)},
        {"pattern": "checkpoint_epoch_{epoch}.pt", "policy": {"preset": "balanced"}},
    ]
    config = write_config(
        tmp_path / "ckptd.yaml",
        [root],
        layout="pt",
        root_settings={"protect": ["best.pt", "last.pt"], "series": series},
    )
    cli_env["COLUMNS"] = "200"  # one line per row (tests/e2e/test_narrow_views_cli.py: 80)
    result = _run(ckptd_command, cli_env, "plan", "-c", str(config))
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert (
        f"{root} cadence: checkpoint_epoch_{{epoch}}.pt every epoch, "
        "mid_epoch_{epoch}_{step}.pt every 1000 steps (pt layout)"
    ) in " ".join(output.split())
    header = next(line for line in output.splitlines() if line.startswith("action"))
    assert header.split() == ["action", "checkpoint", "step", "count", "age", "size", "reasons"]
    for name in ("best.pt", "last.pt"):
        assert re.search(
            rf"^KEEP\s+{re.escape(name)}\s+3h\s+5\.0 KB\s+protect:{name}$", output, re.M
        )
    folded = next(line for line in output.splitlines() if "mid_epoch_0_1000.pt …" in line)
    assert folded.startswith("delete") and "15" in folded.split()
    assert folded.endswith("tier3: keeps nothing past tier 2 (tier3_interval: none)")
    assert re.search(r"^KEEP\s+mid_epoch_3_20000\.pt\s+20000\s+3h\s", output, re.M)
    document = json.loads(_run(ckptd_command, cli_env, "plan", "-c", str(config), "--json").stdout)
    assert [entry["name"] for entry in document["protected"]] == ["best.pt", "last.pt"]
    assert document["protected"][0]["reasons"] == ["protect:best.pt"]


def test_plan_warns_when_max_delete_fraction_would_refuse_the_prune(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    _hugging_face_run(root, range(100, 17001, 100))
    config = write_config(
        tmp_path / "ckptd.yaml", [root], root_settings={"max_delete_fraction": 0.5}
    )
    result = _run(ckptd_command, cli_env, "plan", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert (
        "warning: ckptd prune would refuse this root: the plan deletes 127 of 170 checkpoints "
        "(75%), more than max_delete_fraction 50%; check the policy or pass --force"
    ) in " ".join(result.stdout.split())
    balanced = _run(ckptd_command, cli_env, "plan", str(root))
    assert "would refuse" not in balanced.stdout
