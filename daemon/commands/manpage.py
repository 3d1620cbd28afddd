"""`ckptd manpage [--output FILE]`: the ckptd(1) man page in roff, made from the real parser.

Every command's synopsis, description and options come from `daemon.cli.build_parser()`, so the
page cannot drift from `--help`. Install it with
`ckptd manpage -o /usr/local/share/man/man1/ckptd.1` (then `man ckptd`). The date is
$SOURCE_DATE_EPOCH's when set (reproducible builds), else today's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from collections.abc import Iterator

from daemon import __version__
from daemon.commands._common import cli_parser
from daemon.fsio import TRASH_DIRECTORY

ENVIRONMENT = (
    (
        "CKPTD_CONFIG",
        "the config file of commands given no --config (default /etc/ckptd/config.yaml)",
    ),
    ("NO_COLOR", "set: no colours in tables"),
)
FILES = (
    ("/etc/ckptd/config.yaml", "the config (config.example.yaml documents every key)"),
    ("/var/lib/ckptd/state.json", "the running daemon's state: pid, last and next runs"),
    ("/var/lib/ckptd/history.jsonl", "the cleanup history, one JSON record a line"),
    (f"ROOT/{TRASH_DIRECTORY}/", "deleted checkpoints awaiting their grace"),
)
EXIT_STATUS = (
    ("0", "done"),
    ("1", "failed"),
    ("2", "usage or config error"),
    ("3", "refused for safety (the trainer holds the newest checkpoint, a limit tripped)"),
    ("ckptd check", "Nagios codes instead: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN"),
)


def escape(text: str) -> str:
    """Given plain text, return it as roff text: backslashes and hyphens escaped, and no line
    starting with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def _date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (
        dt.datetime.fromtimestamp(int(epoch), dt.UTC)
        if epoch and epoch.isdigit()
        else dt.datetime.now(dt.UTC)
    )
    return moment.strftime("%Y-%m-%d")


def _synopsis(parser: argparse.ArgumentParser) -> str:
    usage = re.sub(r"\s+", " ", parser.format_usage().removeprefix("usage:").strip())
    return escape(usage)


def _option(action: argparse.Action) -> str:
    """Given an argparse action, return its `.TP` tag: the option names and its value."""
    value = action.metavar or (action.dest.upper() if action.nargs != 0 else None)
    if action.choices and not action.option_strings:
        value = "{" + ",".join(map(str, action.choices)) + "}"
    if not action.option_strings:
        return f"\\fI{escape(str(value))}\\fR"
    names = ", ".join(f"\\fB{escape(name)}\\fR" for name in action.option_strings)
    if value and action.nargs != 0:
        names += f" \\fI{escape(str(value))}\\fR"
    return names


def _help(action: argparse.Action) -> str:
    text = (action.help or "") % {"default": action.default, "prog": "ckptd"}
    if action.choices and action.option_strings:
        text += f" (one of: {', '.join(map(str, action.choices))})"
    if action.required and action.option_strings:
        text += " (required)"
    return escape(text)


def _options(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        yield ".TP"
        yield _option(action)
        yield _help(action)


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render(parser: argparse.ArgumentParser) -> str:
    """Given the ckptd parser, return the man page in roff (the man(7) macros)."""
    lines = [
        f'.TH CKPTD 1 "{_date()}" "ckptd {__version__}" "User Commands"',
        ".SH NAME",
        "ckptd \\- " + escape((parser.description or "").rstrip(".").lower()),
        ".SH SYNOPSIS",
        ".B ckptd",
        "[\\fB\\-\\-version\\fR] [\\fB\\-\\-quiet\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        escape(parser.description or ""),
        "Each command's options follow it; every command takes \\fB\\-h\\fR.",
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    for name, command in _commands(parser).items():
        lines += [f".SS {name}", ".nf", _synopsis(command), ".fi", ".PP"]
        lines.append(escape(command.description or ""))
        lines += list(_options(command))
    for title, rows in (
        ("EXIT STATUS", EXIT_STATUS),
        ("ENVIRONMENT", ENVIRONMENT),
        ("FILES", FILES),
    ):
        lines.append(f".SH {title}")
        for tag, text in rows:
            lines += [".TP", f"\\fB{escape(tag)}\\fR", escape(text)]
    lines += [
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBsystemd.exec\\fR(5), the README and config.example.yaml of "
        "ckptd.",
    ]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    """Given parsed `manpage` arguments, write the page and return 0."""
    page = render(cli_parser())
    if args.output is None:
        sys.stdout.write(page)
        return 0
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write(page)
    return 0
