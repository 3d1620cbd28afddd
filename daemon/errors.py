"""Exit codes and the errors that map onto them (the CLI contract of DESIGN.md)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


class CkptdError(Exception):
    """An error the CLI reports as one message and an exit code, without a traceback."""

    exit_code = EXIT_FAILED


class UsageError(CkptdError):
    """Bad arguments, a missing or unreadable root: exit 2, nothing done."""

    exit_code = EXIT_USAGE


class ConfigError(CkptdError):
    """A config that fails validation: every problem, each with file, line and field.

    `problems` holds one line per problem, already formatted as `file:line field: message`.
    """

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class SafetyRefusal(CkptdError):
    """Refused for safety (the trainer holds the newest checkpoint, a limit tripped): exit 3."""

    exit_code = EXIT_REFUSED
