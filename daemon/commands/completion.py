"""`ckptd completion bash|zsh|fish`: a completion script made from the real parser by shtab.

Installed as, for example:

    ckptd completion bash > /etc/bash_completion.d/ckptd
    ckptd completion zsh  > "${fpath[1]}/_ckptd"
    ckptd completion fish > ~/.config/fish/completions/ckptd.fish

Every command, option and choice completes; `--config`, `check-config FILE` and
`manpage --output` complete file names, `ROOT` and `--root` folder names.
"""

from __future__ import annotations

import argparse
import sys

import shtab

from daemon.commands._common import cli_parser

# Option destinations whose value is a file, or a folder, on this machine.
FILE_VALUES = frozenset({"config", "file", "output"})
FOLDER_VALUES = frozenset({"root"})


def annotate(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Given the ckptd parser, mark its path arguments so the shells complete paths there;
    return the same parser."""
    for action in parser._actions:
        if action.dest in FILE_VALUES:
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif action.dest in FOLDER_VALUES:
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                annotate(subparser)
    return parser


def script(shell: str) -> str:
    """Given a shell name, return ckptd's completion script for it."""
    return str(shtab.complete(annotate(cli_parser()), shell=shell))


def main(args: argparse.Namespace) -> int:
    """Given parsed `completion` arguments, print the script and return 0."""
    text = script(args.shell)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
