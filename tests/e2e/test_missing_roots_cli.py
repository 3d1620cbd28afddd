"""A configured root that does not exist (a typo, a run not started yet) is handled the same by
every command: a warning naming it on stderr, the other roots done, exit 1, and nothing
created at its path."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from daemon.pruning import trash
from tests.configs import write_config
from tests.layouts_fixtures import write_file

OLD = time.time() - 3 * 3600


def make_hf_root(root: Path, steps: range) -> None:
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        write_file(folder / "model.safetensors", 1000)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for path in (*folder.iterdir(), folder):
            os.utime(path, (OLD, OLD))


@pytest.fixture
def two_roots(tmp_path: Path, cli_env: dict[str, str]) -> tuple[Path, Path]:
    """A config of two roots, the second mistyped: `runs/curent` does not exist."""
    present = tmp_path / "runs" / "current"
    make_hf_root(present, range(100, 3100, 100))
    missing = tmp_path / "runs" / "curent"
    config = write_config(tmp_path / "ckptd.yaml", [present, missing])
    cli_env["CKPTD_CONFIG"] = str(config)
    return present, missing


@pytest.mark.parametrize(
    "arguments",
    [
        ["plan"],
        ["plan", "--json"],
        ["prune", "--dry-run"],
        ["prune", "-y"],
        ["status"],
        ["trash", "list"],
        ["trash", "purge", "-y"],
    ],
    ids=" ".join,
)
def test_every_command_warns_does_the_others_and_exits_1(
    arguments: list[str],
    two_roots: tuple[Path, Path],
    ckptd_command: list[str],
    cli_env: dict[str, str],
) -> None:
    present, missing = two_roots
    if arguments[0] == "trash":
        (present / "checkpoint-100").rename(present / "checkpoint-99")  # something to list
        trash.move_to_trash(str(present), "checkpoint-99", ["checkpoint-99"], now=time.time())
    result = subprocess.run(
        [*ckptd_command, *arguments],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"warning: {missing}: no such folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.exists(), "a missing root was created"
    # The root that exists was done.
    done = {
        "plan": str(present),
        "prune": str(present),
        "status": str(present),
        "trash": "removed 1 from the trash" if "purge" in arguments else "checkpoint-99",
    }[arguments[0]]
    assert done in result.stdout
    if arguments[:2] == ["prune", "-y"]:
        assert len(list(present.glob("checkpoint-*"))) < 30
