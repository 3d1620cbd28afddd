"""Which config applies, said plainly: `ckptd plan|prune ROOT` reads the config that --help
names ($CKPTD_CONFIG) as every other command does, and the first line says which policy
applies to the root and where it comes from."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from daemon.history.log import read_records
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


def run(
    command: list[str], arguments: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_a_root_of_the_exported_config_gets_that_roots_settings(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    make_hf_root(root, range(100, 17001, 100))  # the plan deletes 127 of 170: 75%
    config = write_config(
        tmp_path / "ckptd.yaml",
        [root],
        history_file=tmp_path / "log" / "history.jsonl",
        root_settings={"max_delete_fraction": 0.5, "trash": {"grace": "0s"}},
    )
    cli_env["CKPTD_CONFIG"] = str(config)
    exported = run(ckptd_command, ["prune", "--dry-run", str(root)], cli_env)
    named = run(ckptd_command, ["prune", "--dry-run", str(root), "-c", str(config)], cli_env)
    for result in (exported, named):
        assert result.returncode == 3, result.stdout + result.stderr
        assert "max_delete_fraction 50%" in result.stderr
        first, settings = result.stdout.splitlines()[:2]
        assert first == f"policy: this root's in {config}", first
        assert settings.startswith("  keep_last 20, tier2_count 20, tier3_interval 1000")
        assert "max_delete_fraction 50%" in " ".join(result.stdout.split())
    plan = run(ckptd_command, ["plan", str(root)], cli_env)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines()[0] == f"policy: this root's in {config}"
    assert "ckptd prune would refuse this root" in plan.stdout
    document = json.loads(run(ckptd_command, ["plan", str(root), "--json"], cli_env).stdout)
    assert document["policy"].startswith(f"policy: this root's in {config}; keep_last 20")


def test_a_root_without_a_config_says_so_on_its_first_line(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    make_hf_root(root, range(100, 3100, 100))
    for command in (["plan", str(root)], ["prune", "--dry-run", str(root)]):
        result = run(ckptd_command, command, cli_env)  # $CKPTD_CONFIG names no file
        assert result.returncode == 0, result.stderr
        first = result.stdout.splitlines()[0]
        assert first == "policy: balanced preset (no config for this root)", first
    other = tmp_path / "elsewhere"
    other.mkdir()
    config = write_config(
        tmp_path / "ckptd.yaml",
        [other],
        history_file=tmp_path / "log" / "history.jsonl",
        root_settings={"max_delete_fraction": 0.5, "trash": {"grace": "0s"}},
    )
    cli_env["CKPTD_CONFIG"] = str(config)
    result = run(ckptd_command, ["plan", str(root)], cli_env)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("policy: balanced preset (no config for this root; the defaults of")
    said = f"policy: balanced preset (no config for this root; the defaults of {config})"
    # A long path may wrap or fold: compare without the line breaks.
    assert "".join(said.split()) in "".join(result.stdout.split())


def test_a_prune_by_root_records_where_history_reads(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    make_hf_root(root, range(100, 3100, 100))
    config = write_config(
        tmp_path / "ckptd.yaml",
        [root],
        history_file=tmp_path / "log" / "history.jsonl",
        root_settings={"max_delete_fraction": 0.9, "trash": {"grace": "0s"}},
    )
    cli_env["CKPTD_CONFIG"] = str(config)
    cli_env["XDG_STATE_HOME"] = str(tmp_path / "xdg")
    pruned = run(ckptd_command, ["prune", "-y", str(root)], cli_env)
    assert pruned.returncode == 0, pruned.stderr
    records = read_records(str(tmp_path / "log" / "history.jsonl"))
    deleted = [record["checkpoint"] for record in records if record["event"] == "delete"]
    assert deleted and [r["event"] for r in records][-1] == "prune_run"
    assert not (tmp_path / "xdg" / "ckptd" / "history.jsonl").exists()
    shown = run(ckptd_command, ["history"], cli_env)
    assert shown.returncode == 0, shown.stderr
    assert all(name in shown.stdout for name in deleted)
