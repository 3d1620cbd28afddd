"""The `ckptd` command line: it only parses and forwards.

Each command lives in `daemon.commands.<name>` as `main(args) -> int`, callable from Python too;
this module builds the parser, imports the command lazily (so `ckptd --help` stays fast) and turns
`CkptdError`s into one message on stderr and the documented exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from collections.abc import Callable, Sequence

from daemon import __version__
from daemon.errors import EXIT_FAILED, EXIT_USAGE, CkptdError, ConfigError

# The config file when neither --config nor $CKPTD_CONFIG names one (daemon.commands._common).
DEFAULT_CONFIG = "/etc/ckptd/config.yaml"

EXIT_CODES = "exit codes: 0 done; 1 failed; 2 usage or config error; 3 refused for safety."
CONFIG_FOOTER = "The config defaults to $CKPTD_CONFIG, else " + DEFAULT_CONFIG + "."
NAGIOS_EXIT_CODES = "exit codes (Nagios): 0 OK; 1 WARNING; 2 CRITICAL; 3 UNKNOWN (could not look)."
EPILOG = EXIT_CODES + "\n" + CONFIG_FOOTER
QUIET_HELP = "print nothing when the command succeeds (for cron: mail only on trouble)"


def _add_config(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        required=required,
        default=None,
        help="the YAML config file (default: $CKPTD_CONFIG or " + DEFAULT_CONFIG + ")",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: an absent `COMMAND --quiet` must not overwrite a given `ckptd --quiet COMMAND`.
    parser.add_argument(
        "--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP
    )


def _add_policy_knobs(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("policy (default: the balanced preset)")
    group.add_argument(
        "--preset",
        choices=["balanced", "conservative", "aggressive"],
        default=None,
        help="the preset the knobs below override",
    )
    group.add_argument(
        "--keep-last", type=int, metavar="N", default=None, help="tier 1: the newest N are kept"
    )
    group.add_argument(
        "--tier2-count",
        type=int,
        metavar="N",
        default=None,
        help="tier 2: the N save slots below tier 1, thinned to every second save",
    )
    group.add_argument(
        "--tier3-interval",
        metavar="STEPS",
        default=None,
        help="steps between tier-3 survivors, or 'none' to keep nothing past tier 2",
    )
    group.add_argument(
        "--cadence",
        type=int,
        metavar="STEPS",
        default=None,
        help="the save spacing the policy assumes when it sizes tier 2 (default: read from "
        "tier 1, which here is --every); --every is how the run saves, --cadence how the "
        "policy counts",
    )


def _commands(parser: argparse.ArgumentParser) -> Callable[..., argparse.ArgumentParser]:
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, help_text: str, *, reads_config: bool = True, epilog: str = EXIT_CODES
    ) -> argparse.ArgumentParser:
        # The $CKPTD_CONFIG footer only where the command reads a config.
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=epilog + ("\n" + CONFIG_FOOTER if reads_config else ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    return command


def _add_integrity_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Given the function that adds a command, add verify, last-good, hold, release, holds."""
    verify = command("verify", "check checkpoints' integrity (headers, or --deep every checksum)")
    verify.add_argument("root", nargs="?", metavar="ROOT", help="a checkpoint folder")
    _add_config(verify)
    verify.add_argument("--deep", action="store_true", help="read every checksummed byte")
    verify.add_argument(
        "--test", action="store_true", help="also run verify.command on the newest checkpoint"
    )
    _add_json(verify)

    last_good = command("last-good", "print the newest complete checkpoint that is not corrupt")
    last_good.add_argument("root", metavar="ROOT", help="a checkpoint folder")
    _add_config(last_good)
    last_good.add_argument("--series", metavar="SERIES", default=None, help="only this series")
    _add_json(last_good)

    hold = command("hold", "keep a checkpoint until a time (a hold file other tools can write)")
    hold.add_argument("root", metavar="ROOT", help="a checkpoint folder")
    hold.add_argument("name", metavar="NAME", help="the checkpoint, as `ckptd plan` names it")
    _add_config(hold)
    until = hold.add_mutually_exclusive_group(required=True)
    until.add_argument("--until", metavar="TIME", help="e.g. 2026-12-24T00:00 (config's zone)")
    until.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 6h, 2d, 1w")
    hold.add_argument("--by", required=True, metavar="HOLDER", help="who holds it: eval-sweep")
    hold.add_argument("--reason", default="", metavar="TEXT", help="why (shown by ckptd holds)")
    hold.add_argument("--force", action="store_true", help="allow a hold of more than a year")

    release = command("release", "remove a holder's hold (exit 1 when it had none)")
    release.add_argument("root", metavar="ROOT", help="a checkpoint folder")
    release.add_argument("name", metavar="NAME", help="the held checkpoint")
    _add_config(release)
    release.add_argument("--by", required=True, metavar="HOLDER", help="whose hold")

    holds = command("holds", "list the holds of a root (or of every configured root)")
    holds.add_argument("root", nargs="?", metavar="ROOT", help="a checkpoint folder")
    _add_config(holds)
    _add_json(holds)


def build_parser() -> argparse.ArgumentParser:
    """Given nothing, return the parser for every ckptd command."""
    parser = argparse.ArgumentParser(
        prog="ckptd",
        description="Keep a training machine's disk healthy without losing a checkpoint "
        "that matters.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptd {__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", default=False, help=QUIET_HELP)
    command = _commands(parser)
    _add_root_commands(command)
    _add_other_commands(command)
    return parser


def _add_root_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Given the subcommand factory, add the commands that act on the configured roots."""
    run = command("run", "run the daemon (systemd Type=notify service)")
    _add_config(run)

    plan = command("plan", "show what would be kept and deleted, with every reason")
    plan.add_argument(
        "root", nargs="?", metavar="ROOT", help="a checkpoint folder (default: every root)"
    )
    _add_config(plan)
    _add_json(plan)
    plan.add_argument("--all", action="store_true", help="list every checkpoint, unfolded")

    prune = command("prune", "delete what the policy does not keep (safety-checked)")
    prune.add_argument(
        "root", nargs="?", metavar="ROOT", help="a checkpoint folder (default: every root)"
    )
    _add_config(prune)
    prune.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    prune.add_argument(
        "--dry-run", action="store_true", help="change nothing, say what would be done"
    )
    prune.add_argument(
        "--force", action="store_true", help="allow deleting more than max_delete_fraction"
    )
    _add_json(prune)
    _add_quiet(prune)

    snapshot = command("snapshot", "take today's snapshot now, or verify one")
    _add_config(snapshot)
    snapshot.add_argument(
        "--verify",
        nargs="?",
        const="latest",
        default=None,
        metavar="DATE",
        help="check a snapshot against its MANIFEST.json (default: the newest)",
    )
    _add_json(snapshot)
    _add_quiet(snapshot)

    status = command("status", "per root: tiers, bytes, disk use, days until full")
    _add_config(status)
    _add_json(status)

    history = command("history", "show the cleanup history")
    _add_config(history)
    history.add_argument("-n", type=int, default=20, metavar="N", help="last N records")
    history.add_argument("--follow", "-f", action="store_true", help="keep printing, like tail -F")
    _add_json(history)

    trash = command("trash", "list, restore or purge checkpoints in the trash")
    _add_config(trash)
    trash.add_argument(
        "action",
        choices=["list", "restore", "purge"],
        help="list the trash, restore NAME to its root, or purge what is past its grace",
    )
    trash.add_argument("name", nargs="?", metavar="NAME", help="the checkpoint to restore")
    trash.add_argument("--root", metavar="ROOT", default=None, help="only this root")
    trash.add_argument(
        "-y", "--yes", action="store_true", help="purge without asking (it cannot be undone)"
    )
    _add_json(trash)
    _add_quiet(trash)

    forget = command(
        "forget-root", "accept that a root's folder was re-created (its identity changed)"
    )
    forget.add_argument(
        "path", metavar="PATH", help="the root, as configured (its recorded identity is dropped)"
    )
    _add_config(forget)


def _add_other_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Given the subcommand factory, add forecast, the checks, the demo and the docs."""
    forecast = command(
        "forecast",
        "checkpoints and bytes after N steps, with and without policy",
        reads_config=False,
    )
    forecast.add_argument(
        "--steps", type=int, required=True, metavar="N", help="how many training steps to run"
    )
    forecast.add_argument(
        "--every",
        type=int,
        required=True,
        metavar="N",
        help="the run saves a checkpoint every N steps (its save cadence)",
    )
    forecast.add_argument(
        "--size", required=True, metavar="SIZE", help="one checkpoint's size, e.g. 3.6GB"
    )
    _add_policy_knobs(forecast)
    slim = forecast.add_argument_group("slimming (issue 11: older checkpoints keep weights only)")
    slim.add_argument(
        "--slim-fraction",
        type=float,
        metavar="F",
        default=None,
        help="the share of a checkpoint slimming moves out (its resume state; about 0.67 with "
        "Adam, whose state is twice the weights); adds a 'with slim' row",
    )
    slim.add_argument(
        "--slim-from",
        metavar="ROOT",
        default=None,
        help="read that share from ROOT's checkpoints (slimmed ones, else the newest's "
        "resume-state files)",
    )
    slim.add_argument(
        "--slim-after",
        choices=["tier1", "tier2"],
        default="tier1",
        help="slim the kept checkpoints past this tier (default tier1: tiers 2 and 3)",
    )
    _add_json(forecast)

    _add_integrity_commands(command)

    check_config = command(
        "check-config", "validate a config file; exit 2 with every problem", reads_config=False
    )
    check_config.add_argument("file", metavar="FILE", help="the YAML config file to validate")

    check = command(
        "check",
        "the daemon's health in one line, with Nagios exit codes",
        epilog=NAGIOS_EXIT_CODES,
    )
    _add_config(check)
    _add_json(check)
    _add_quiet(check)

    demo = command(
        "demo",
        "a simulated trainer and the daemon, live, in a temporary folder",
        reads_config=False,
    )
    demo.add_argument("--seconds", type=float, default=30.0, help="how long (default 30)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")

    completion = command(
        "completion", "print a shell completion script for ckptd", reads_config=False
    )
    completion.add_argument(
        "shell",
        choices=["bash", "zsh", "fish"],
        help='the shell to complete in (see README.md, "Shell completion")',
    )

    manpage = command(
        "manpage", "print ckptd's man page (roff), made from this parser", reads_config=False
    )
    manpage.add_argument(
        "--output", "-o", metavar="FILE", default=None, help="write it here instead of stdout"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Given command-line arguments, run the command and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return int(exit_request.code or 0) if exit_request.code != 2 else EXIT_USAGE
    quiet = bool(getattr(args, "quiet", False))
    asks = (args.command == "prune" and not args.dry_run) or (
        args.command == "trash" and args.action == "purge"
    )
    if quiet and asks and not args.yes:
        print(
            f"ckptd {args.command}: --quiet needs -y (no question can be asked quietly)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not quiet:
        return _run(args)
    # Quiet: what the command prints is kept back and shown only if it did not succeed, so
    # cron mails the output of a failure and nothing else. Errors go to stderr either way.
    kept_back = io.StringIO()
    with contextlib.redirect_stdout(kept_back):
        code = _run(args)
    if code != 0:
        sys.stdout.write(kept_back.getvalue())
    return code


def _run(args: argparse.Namespace) -> int:
    """Given parsed arguments, run the command; turn its errors into a message and a code."""
    module = importlib.import_module("daemon.commands." + args.command.replace("-", "_"))
    try:
        return int(module.main(args))
    except ConfigError as error:
        # Each problem already names its file, line and field: one line per problem.
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return error.exit_code
    except CkptdError as error:
        print(f"ckptd {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"ckptd {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # `ckptd history | head`: the reader left; that is not a failure of ours.
        sys.stderr.close()
        return 0
