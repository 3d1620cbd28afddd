"""`ckptd manpage`: the man page made from the real parser, rendered by the real man(1)/groff.
Every command and every option of every command is on the page, and groff finds nothing to
warn about."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.cli import build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.fixture
def page(tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]) -> Path:
    env = dict(cli_env, SOURCE_DATE_EPOCH="1767225600")
    path = tmp_path / "ckptd.1"
    result = subprocess.run(
        [*ckptd_command, "manpage", "--output", str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    to_stdout = subprocess.run(
        [*ckptd_command, "manpage"], env=env, capture_output=True, text=True, check=True
    )
    assert to_stdout.stdout == path.read_text()
    return path


def test_man_renders_every_command_and_option(page: Path, cli_env: dict[str, str]) -> None:
    man = shutil.which("man")
    if man is None:
        pytest.skip("man is not installed")
    rendered = subprocess.run(
        [man, "-l", str(page)],
        env=dict(cli_env, MANPAGER="cat", PAGER="cat", MANWIDTH="200", MAN_KEEP_FORMATTING=""),
        capture_output=True,
        text=True,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    text = rendered.stdout
    assert text.startswith("CKPTD(1)")
    assert "2026-01-01" in text and "ckptd 0." in text
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS"):
        assert f"\n{section}\n" in text, section
    assert "CKPTD_CONFIG" in text and "Nagios" in text
    for name, parser in subcommands().items():
        assert f"\n   {name}\n" in text, name
        assert parser.description and parser.description in " ".join(text.split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # the page says once that every command takes -h
            for option in action.option_strings:
                assert option in text, f"{name} {option}"


def test_groff_finds_nothing_to_warn_about(page: Path) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed")
    result = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True, text=True
    )
    assert (result.returncode, result.stderr) == (0, "")
