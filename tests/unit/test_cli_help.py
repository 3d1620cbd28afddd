"""The CLI's help: every option says what it does, `--every` and `--cadence` are told apart,
and the $CKPTD_CONFIG footer is shown exactly by the commands that read a config."""

from __future__ import annotations

import argparse
import subprocess

from daemon.cli import CONFIG_FOOTER, build_parser


def parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    found = {"ckptd": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def test_every_option_and_argument_has_help_text() -> None:
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in parsers().items()
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert missing == []


def test_the_config_footer_only_where_a_config_is_read() -> None:
    for name, parser in parsers().items():
        if name == "ckptd":
            continue
        reads_config = any("--config" in action.option_strings for action in parser._actions)
        assert (CONFIG_FOOTER in parser.format_help()) == reads_config, name


def test_forecast_help_tells_every_from_cadence(
    ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    result = subprocess.run(
        [*ckptd_command, "forecast", "--help"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--steps N how many training steps to run" in text
    assert "--every N the run saves a checkpoint every N steps" in text
    assert "--every is how the run saves, --cadence how the policy counts" in text
    assert "CKPTD_CONFIG" not in text


def test_check_help_gives_the_nagios_exit_codes() -> None:
    text = parsers()["check"].format_help()
    assert "0 OK; 1 WARNING; 2 CRITICAL; 3 UNKNOWN" in text
    assert "3 refused for safety" not in text
