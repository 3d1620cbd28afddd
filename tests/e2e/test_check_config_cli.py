"""`ckptd check-config FILE` as a user runs it: the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


def check(
    command: list[str], environment: dict[str, str], file: str | Path, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Given the CLI, its environment and a config path, run check-config and return the result."""
    environment = dict(environment)
    # Run from another folder too: import paths must not depend on where the user stands.
    entries = environment.get("PYTHONPATH", "").split(os.pathsep)
    environment["PYTHONPATH"] = os.pathsep.join(
        os.path.abspath(entry) for entry in entries if entry
    )
    return subprocess.run(
        [*command, "check-config", str(file)],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    file = folder / name
    file.write_text(textwrap.dedent(text))
    return file


def test_the_example_is_ok_with_a_summary(
    ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    result = check(ckptd_command, cli_env, EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{EXAMPLE}: ok\n")
    assert result.stderr == ""
    assert "roots: 3" in result.stdout
    assert "/data/training/current_model  (layout hf, watch auto)" in result.stdout
    assert (
        "series mid_epoch_{epoch}_{step}.pt: keep_last 5, tier2_count 0, tier3_interval none"
        in result.stdout
    )
    assert "pattern ckpt-{step}: keep_last 20, tier2_count 20, tier3_interval 1000" in result.stdout
    assert 'prune: "0 4 * * sun" (next ' in result.stdout
    assert "snapshots: daily at 03:00 into /data/training/snapshots" in result.stdout
    assert "disk: every 5m, warn 85%, critical 95%, min free 50 GB" in result.stdout


@pytest.mark.parametrize("written", ["3:00", "03:00"])
def test_three_oclock_with_or_without_the_zero(
    ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path, written: str
) -> None:
    file = write(tmp_path, f"snapshots:\n  at: {written}\n  enabled: false\n")
    result = check(ckptd_command, cli_env, "config.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config.yaml: ok\n")
    assert "snapshots: off" in result.stdout
    # An empty config is valid, but a daemon without roots has nothing to do: say so.
    assert result.stderr == (
        "warning: config.yaml:1 roots: no roots: `ckptd run` has nothing to look after\n"
    )
    file.write_text(f"snapshots:\n  at: {written}\n  dir: /data/snapshots\n")
    result = check(ckptd_command, cli_env, "config.yaml", cwd=tmp_path)
    assert "snapshots: daily at 03:00 into /data/snapshots" in result.stdout


def test_malformed_yaml_gives_line_and_column(
    ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    file = write(tmp_path, "roots:\n  - path: /data/training/run1\n   layout: hf\n")
    result = check(ckptd_command, cli_env, file)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{file}:3:")
    assert "invalid YAML" in lines[0]
    assert lines[1:] == [f"{file}: 1 problem"]


def test_one_problem_per_line_for_each_kind(
    ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    write(
        tmp_path,
        """\
        snapshots: {dir: /data/snapshots}
        roots:
          - path: /
          - path: /data/training/run1
            polciy: {keep_last: 5}
            settle_seconds: a while
            trainer: {pid_file: train.pid}
        disk:
          interval: 5m
          interval: 10m
        """,
    )
    result = check(ckptd_command, cli_env, "config.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "config.yaml:3 roots[0].path: refused as a root: / is a system folder; point the root "
        "at the training output folder",
        "config.yaml:5 roots[1].polciy: unknown key (did you mean 'policy'?)",
        "config.yaml:6 roots[1].settle_seconds: 'a while' is not a duration such as 30s, 5m, "
        "1h or 2d",
        "config.yaml:7 roots[1].trainer.pid_file: pid_file must be an absolute path "
        "(got 'train.pid')",
        "config.yaml:10 disk.interval: duplicate key (first at line 9)",
        "config.yaml: 5 problems",
    ]


def test_several_errors_deep_in_a_realistic_file(
    ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    text = EXAMPLE.read_text()
    lines = text.splitlines()
    # Break three keys of the real example; their lines are wherever they are in the file.
    edits = {
        "      keep_last: 20": "      keep_last: 0",
        "        mode: min": "        mode: lowest",
        "  critical_percent: 95": "  critical_percent: 80",
    }
    broken_lines = {}
    for number, line in enumerate(lines):
        for old, new in edits.items():
            if line.startswith(old + " ") or line == old:
                lines[number] = line.replace(old, new)
                broken_lines[old] = number + 1
    assert len(broken_lines) == 3
    file = write(tmp_path, "\n".join(lines) + "\n")
    result = check(ckptd_command, cli_env, file)
    assert result.returncode == 2
    keep_last, mode, critical = (broken_lines[old] for old in edits)
    assert result.stderr.splitlines() == [
        f"{file}:{keep_last} roots[0].policy.keep_last: must be >= 1 (got 0)",
        f"{file}:{mode} roots[0].policy.keep_best.mode: must be one of min or max (got 'lowest')",
        f"{file}:{critical} disk.critical_percent: critical_percent (80) must be above "
        "warn_percent (85)",
        f"{file}: 3 problems",
    ]


def test_warnings_do_not_fail(
    ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    write(
        tmp_path,
        """\
        snapshots: {enabled: false}
        roots:
          - path: /data/training/run1
            policy: {cadence: 500, tier3_interval: 500}
        """,
    )
    result = check(ckptd_command, cli_env, "config.yaml", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("config.yaml: ok\n")
    assert result.stderr == (
        "warning: config.yaml:4 roots[0].policy.tier3_interval: tier 3 keeps one per 500 steps, "
        "denser than tier 2's one per 1000 (2 x cadence 500); use tier3_interval >= 1000\n"
    )


def test_a_missing_file_is_named(
    ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    result = check(ckptd_command, cli_env, tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"{tmp_path}/nope.yaml: no such config file"


def test_help(ckptd_command: list[str], cli_env: dict[str, str]) -> None:
    result = subprocess.run(
        [*ckptd_command, "check-config", "--help"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "validate a config file" in result.stdout
