"""`ckptd forecast` as a user runs it: a subprocess; a table for people, JSON for scripts."""

from __future__ import annotations

import json
import subprocess

import pytest


def run(command: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, "forecast", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("steps", "checkpoints", "kept"),
    [("50000", 500, 76), ("100000", 1000, 126)],  # six months, a year
)
def test_json_gives_the_users_tables_exactly(
    ckptd_command: list[str], cli_env: dict[str, str], steps: str, checkpoints: int, kept: int
) -> None:
    result = run(
        ckptd_command, cli_env, "--steps", steps, "--every", "100", "--size", "3.6GB", "--json"
    )

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    size = 3_600_000_000
    assert document["without_policy"] == {"checkpoints": checkpoints, "bytes": checkpoints * size}
    assert document["with_policy"]["checkpoints"] == kept
    assert document["with_policy"]["bytes"] == kept * size
    assert sum(document["with_policy"]["by_tier"].values()) == kept
    assert document["saved"] == {
        "checkpoints": checkpoints - kept,
        "bytes": (checkpoints - kept) * size,
    }
    assert document["policy"] == {
        "preset": "balanced",
        "overridden": [],
        "keep_last": 20,
        "tier2_count": 20,
        "tier3_interval": 1000,
        "cadence": 100,
    }


def test_the_table_for_people_shows_counts_and_sizes_past_1000_gb_in_tb(
    ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    result = run(ckptd_command, cli_env, "--steps", "100000", "--every", "100", "--size", "3.6GB")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    row = {line.split("│")[0].strip(): line for line in lines if "│" in line}
    assert "1,000" in row["without policy"] and "3.6 TB" in row["without policy"]
    assert "126" in row["with policy"] and "453.6 GB" in row["with policy"]
    assert "874 (87.4%)" in row["saved"] and "3.1 TB" in row["saved"]
    assert "balanced preset" in result.stdout
    assert "96 in tier 3" in result.stdout


def test_presets_and_knobs_change_the_answer(
    ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    common = ("--steps", "100000", "--every", "100", "--size", "1GiB", "--json")

    conservative = json.loads(
        run(ckptd_command, cli_env, *common, "--preset", "conservative").stdout
    )
    rotation = json.loads(
        run(
            ckptd_command,
            cli_env,
            *common,
            "--keep-last",
            "5",
            "--tier2-count",
            "0",
            "--tier3-interval",
            "none",
        ).stdout
    )

    assert conservative["with_policy"]["checkpoints"] == 50 + 18 + 184
    assert conservative["size_bytes"] == 1024**3
    assert rotation["with_policy"]["checkpoints"] == 5
    assert rotation["policy"]["tier3_interval"] is None
    assert rotation["policy"]["overridden"] == ["keep_last", "tier2_count", "tier3_interval"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--size", "huge"), "--size: 'huge' is not a size"),
        (("--size", "1GB", "--tier3-interval", "often"), "--tier3-interval takes a number"),
        (("--size", "1GB", "--tier3-interval", "0"), "--tier3-interval must be at least 1"),
        (("--size", "1GB", "--keep-last", "0"), "--keep-last must be at least 1"),
        (("--size", "1GB", "--cadence", "0"), "--cadence must be at least 1"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(
    ckptd_command: list[str], cli_env: dict[str, str], arguments: tuple[str, ...], message: str
) -> None:
    result = run(ckptd_command, cli_env, "--steps", "1000", "--every", "100", *arguments)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("ckptd forecast: " + message), result.stderr


def test_every_zero_and_a_missing_size_are_usage_errors(
    ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    assert (
        run(ckptd_command, cli_env, "--steps", "10", "--every", "0", "--size", "1GB").returncode
        == 2
    )
    missing = run(ckptd_command, cli_env, "--steps", "10", "--every", "1")
    assert missing.returncode == 2
    assert "--size" in missing.stderr
