"""The shipped unit: `systemd-analyze verify` finds nothing, and ExecStart is our console script."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "ckptd.service"
LOGROTATE = REPO / "systemd" / "ckptd.logrotate"


def unit_lines(text: str) -> dict[str, list[str]]:
    """Given a unit file, return key -> every value (systemd allows repeated keys)."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_exec_start_is_the_console_script_with_run_config() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ckptd"] == "daemon.cli:main"
    command = shlex.split(unit_lines(UNIT.read_text())["ExecStart"][0])
    assert command[0] == "/opt/ckptd/venv/bin/ckptd"
    assert Path(command[0]).name in scripts
    assert command[1:] == ["run", "--config", "/etc/ckptd/config.yaml"]
    # And the CLI really has that command and option.
    from daemon.cli import build_parser

    arguments = build_parser().parse_args(command[1:])
    assert arguments.command == "run" and arguments.config == "/etc/ckptd/config.yaml"


def test_hardening_and_notify_settings() -> None:
    values = unit_lines(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "60",
        "Restart": "on-failure",
        "User": "ckptd",
        "Group": "ckptd",
        "StateDirectory": "ckptd",
        "LogsDirectory": "ckptd",
        "ConfigurationDirectory": "ckptd",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectHome": "read-only",
        "RestrictAddressFamilies": "AF_UNIX",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallFilter": "@system-service",
        "Nice": "10",
        "IOSchedulingClass": "idle",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    for key, value in expected.items():
        assert values.get(key) == [value], key
    assert "-/data/training" in values["ReadWritePaths"][0].split()
    assert "ProtectProc" not in values  # would hide the trainer from the safety check
    # The stop timeout leaves room for ckptd's own 30 s wait for the deletion in progress.
    assert int(values["TimeoutStopSec"][0]) > 30


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify needs ExecStart's binary to exist; the shipped unit keeps /opt/ckptd/venv.
    copy = tmp_path / "ckptd.service"
    text = UNIT.read_text()
    assert "/opt/ckptd/venv/bin/ckptd" in text
    copy.write_text(text.replace("/opt/ckptd/venv/bin/ckptd", sys.executable))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if str(copy) in line or "Unknown" in line or "Failed" in line
    ]
    assert result.returncode == 0, result.stderr
    assert complaints == []


def test_logrotate_snippet_has_no_copytruncate() -> None:
    text = LOGROTATE.read_text()
    assert text.splitlines()[0].startswith("#")
    assert "/var/log/ckptd/history.jsonl {" in text
    assert not re.search(r"^\s*copytruncate", text, re.MULTILINE)
    assert re.search(r"^\s*create 0640 ckptd ckptd", text, re.MULTILINE)
    logrotate = shutil.which("logrotate")
    if logrotate is None:
        return
    # logrotate --debug parses without rotating; it must accept the snippet.
    result = subprocess.run(
        [logrotate, "--debug", str(LOGROTATE)], capture_output=True, text=True, check=False
    )
    assert "error" not in result.stderr.lower(), result.stderr


def test_unit_parses_as_ini() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    assert parser["Install"]["WantedBy"] == "multi-user.target"
