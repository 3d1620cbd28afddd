"""`ckptd snapshot` through the real CLI: take, once per date, --verify, --json, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.configs import write_config
from tests.layouts_fixtures import well_formed_bytes


def write_hf_checkpoint(root: Path, step: int, *, age: float = 3600.0) -> None:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name, size in (("model.safetensors", 256 * 1024), ("optimizer.pt", 64 * 1024)):
        (folder / name).write_bytes(well_formed_bytes(name, size, random=True))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    past = time.time() - age
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (past, past))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "current_model"
    for step in (100, 200, 300):
        write_hf_checkpoint(root, step)
    snapshots = tmp_path / "snapshots"
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        timezone="UTC",
        history_file=tmp_path / "history.jsonl",
        layout="hf",
        snapshots={"dir": snapshots, "method": "auto"},
        disk={"critical_percent": 100},
    )
    return root, snapshots, config


def ckptd(
    command: list[str], env: dict[str, str], *arguments: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *arguments], env=env, capture_output=True, text=True, timeout=60
    )


def test_snapshot_takes_verifies_and_reports_differences(
    ckptd_command: list[str], cli_env: dict[str, str], setup: tuple[Path, Path, Path]
) -> None:
    _root, snapshots, config = setup
    taken = ckptd(ckptd_command, cli_env, "snapshot", "--config", str(config))
    assert taken.returncode == 0, taken.stdout + taken.stderr
    (date_folder,) = [p for p in snapshots.iterdir() if not p.name.startswith(".")]
    assert (date_folder / "current_model" / "checkpoint-300" / "model.safetensors").exists()
    assert sorted(os.listdir(date_folder / "current_model")) == ["checkpoint-300"]
    assert "checkpoint-300" in taken.stdout
    history = [
        json.loads(line) for line in (config.parent / "history.jsonl").read_text().splitlines()
    ]
    assert [record["event"] for record in history] == ["snapshot"]

    again = ckptd(ckptd_command, cli_env, "snapshot", "--config", str(config), "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout)["status"] == "exists"

    verified = ckptd(ckptd_command, cli_env, "snapshot", "--config", str(config), "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout

    (date_folder / "current_model" / "checkpoint-300" / "optimizer.pt").unlink()
    (date_folder / "current_model" / "checkpoint-300" / "extra.bin").write_bytes(b"x")
    broken = ckptd(
        ckptd_command, cli_env, "snapshot", "--config", str(config), "--verify", date_folder.name
    )
    assert broken.returncode == 1
    assert "missing: current_model/checkpoint-300/optimizer.pt" in broken.stdout
    assert "extra: current_model/checkpoint-300/extra.bin" in broken.stdout

    as_json = ckptd(
        ckptd_command, cli_env, "snapshot", "--config", str(config), "--verify", "--json"
    )
    document = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and document["ok"] is False
    assert document["missing"] == ["current_model/checkpoint-300/optimizer.pt"]


def test_verify_of_an_unknown_date_is_a_usage_error(
    ckptd_command: list[str], cli_env: dict[str, str], setup: tuple[Path, Path, Path]
) -> None:
    _root, _snapshots, config = setup
    result = ckptd(
        ckptd_command, cli_env, "snapshot", "--config", str(config), "--verify", "1999-01-01"
    )
    assert result.returncode == 2
    assert "1999-01-01" in result.stderr


def test_snapshot_help(ckptd_command: list[str], cli_env: dict[str, str]) -> None:
    result = ckptd(ckptd_command, cli_env, "snapshot", "--help")
    assert result.returncode == 0 and "--verify" in result.stdout


def test_progress_bar_on_a_terminal_only(
    ckptd_command: list[str], cli_env: dict[str, str], setup: tuple[Path, Path, Path]
) -> None:
    import pty
    import select

    root, _snapshots, config = setup
    config.write_text(config.read_text().replace("method: auto", "method: copy"))
    quiet = ckptd(ckptd_command, cli_env, "snapshot", "--config", str(config))
    assert quiet.returncode == 0 and quiet.stderr == ""
    # A second date cannot be taken today: remove today's, and run again on a terminal.
    snapshots = config.parent / "snapshots"
    for entry in snapshots.iterdir():
        if not entry.name.startswith("."):
            subprocess.run(["rm", "-rf", str(entry)], check=True)
    # Enough data that the copy is still running when the bar first draws.
    big = root / "checkpoint-300" / "model.safetensors"
    big.write_bytes(well_formed_bytes(big.name, 48 << 20, random=True))
    past = time.time() - 3600
    os.utime(big, (past, past))  # settled long ago, like the rest of the checkpoint
    leader, follower = pty.openpty()
    environment = {**cli_env, "TERM": "xterm"}
    environment.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [*ckptd_command, "snapshot", "--config", str(config)],
        env=environment,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=30) == 0
    text = output.decode(errors="replace")
    assert "━" in text or "MB" in text, text[-2000:]
    assert "snapshot" in text


def test_no_snapshots_dir_is_a_usage_error(
    ckptd_command: list[str], cli_env: dict[str, str], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", [tmp_path], state_dir=None)
    result = ckptd(ckptd_command, cli_env, "snapshot", "--config", str(config))
    assert result.returncode == 2
    assert "snapshots.dir" in result.stderr


def _snapshot_without_shared_checksums(config: Path) -> None:
    """Take today's snapshot as older versions did: hard-linked (or reflinked) files recorded
    with their size and mtime only, their checksum left to the first --verify."""
    from datetime import UTC, datetime

    from daemon.config import load_config
    from daemon.history.log import NULL_HISTORY
    from daemon.snapshots.daily import run_daily_snapshot

    report = run_daily_snapshot(
        load_config(str(config)),
        now=datetime.now(UTC),
        history=NULL_HISTORY,
        method="hardlink",
        hash_shared=False,
        force=True,
    )
    assert report.status == "done", report


def test_verify_says_ok_only_after_comparing_content(
    ckptd_command: list[str], cli_env: dict[str, str], setup: tuple[Path, Path, Path]
) -> None:
    _root, _snapshots, config = setup
    _snapshot_without_shared_checksums(config)
    first = ckptd(ckptd_command, cli_env, "snapshot", "--config", str(config), "--verify")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "OK" not in first.stdout and "match" not in first.stdout
    assert first.stdout.rstrip().endswith(
        "recorded 3 checksums; nothing to compare yet (the next --verify compares them)"
    )
    second = ckptd(ckptd_command, cli_env, "snapshot", "--config", str(config), "--verify")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "OK, 3 files match the manifest (content compared)" in second.stdout
    assert (
        json.loads(
            ckptd(
                ckptd_command, cli_env, "snapshot", "-c", str(config), "--verify", "--json"
            ).stdout
        )["compared"]
        == 3
    )


def test_a_snapshot_taken_now_is_compared_at_its_first_verify(
    ckptd_command: list[str], cli_env: dict[str, str], setup: tuple[Path, Path, Path]
) -> None:
    _root, _snapshots, config = setup
    config.write_text(config.read_text().replace("method: auto", "method: hardlink"))
    taken = ckptd(ckptd_command, cli_env, "snapshot", "--config", str(config))
    assert taken.returncode == 0, taken.stdout + taken.stderr
    first = ckptd(ckptd_command, cli_env, "snapshot", "--config", str(config), "--verify")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "OK, 3 files match the manifest (content compared)" in first.stdout
    assert "recorded" not in first.stdout


def test_verify_of_something_not_a_date_says_so(
    ckptd_command: list[str], cli_env: dict[str, str], setup: tuple[Path, Path, Path]
) -> None:
    _root, _snapshots, config = setup
    result = ckptd(
        ckptd_command, cli_env, "snapshot", "--config", str(config), "--verify", "yesterday"
    )
    assert result.returncode == 2
    assert "'yesterday' is not a date: give one as YYYY-MM-DD" in result.stderr


def test_a_long_verify_draws_a_progress_bar_on_a_terminal(
    cli_env: dict[str, str], setup: tuple[Path, Path, Path]
) -> None:
    from tests.e2e.terminal import on_terminal

    root, _snapshots, config = setup
    big = root / "checkpoint-300" / "model.safetensors"
    big.write_bytes(os.urandom(32 << 20))
    past = time.time() - 3600
    os.utime(big, (past, past))
    _snapshot_without_shared_checksums(config)
    # The real CLI, with the bar drawn from the first byte instead of after half a second.
    program = (
        "import sys; import daemon.commands.snapshot as snapshot; snapshot.HASH_BAR_AFTER = 0.0; "
        "from daemon.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    environment = {**cli_env, "TERM": "xterm"}
    code, output = on_terminal(
        [sys.executable, "-c", program, "snapshot", "--config", str(config), "--verify"],
        environment,
    )
    assert code == 0, output
    assert "verifying" in output and "━" in output, output[-2000:]
    assert "recorded 3 checksums" in output
