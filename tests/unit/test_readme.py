"""The README's command list is complete (every command and option of the parser), its sizes
past 1,000 GB are in TB, and it shows a `ckptd check` line and the metrics."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from daemon.cli import build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _command_lines() -> dict[str, str]:
    """Given the README, return each command's text in the "## Commands" block (with its
    continuation lines)."""
    section = README[README.index("## Commands") :]
    block = section[section.index("```\n") + 4 :]
    block = block[: block.index("```")]
    commands: dict[str, str] = {}
    name = ""
    for line in block.splitlines():
        if line.startswith("ckptd "):
            name = line.split()[1]
            commands[name] = line
        elif line.startswith(" ") and name:
            commands[name] += " " + line.strip()
    return commands


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_and_option_is_in_the_readmes_command_list() -> None:
    listed = _command_lines()
    missing: list[str] = []
    for name, subparser in _subparsers().items():
        if name not in listed:
            missing.append(f"ckptd {name}")
            continue
        for action in subparser._actions:
            flags = [flag for flag in action.option_strings if flag not in ("-h", "--help")]
            if flags and not any(
                re.search(rf"\[{re.escape(f)}[\] ]|(?<![\w-]){re.escape(f)}(?![\w-])", listed[name])
                for f in flags
            ):
                missing.append(f"ckptd {name} {flags[0]}")
    assert not missing, f"not in the README's command list: {missing}"


def test_sizes_past_1000_gb_are_in_tb() -> None:
    assert not re.findall(r"\d,\d{3}(?:\.\d)? GB", README)


def test_the_readme_shows_a_check_line_and_the_metrics() -> None:
    assert re.search(r"^CKPTD OK - .*\| '/data'=", README, re.M)
    assert "ckptd_checkpoints{root=" in README and "ckptd_prune_duration_seconds_count" in README
