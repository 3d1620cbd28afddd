"""The shape issue 8 gave the code: commands stand alone, functions stay small.

- a command imports no other command: what they share is in `daemon/commands/_common.py`;
- nothing below the CLI imports a command (the library does not depend on its front end), and
  commands do not reach into `daemon.cli` (only `_common`, for the default config path);
- no module finds another through `importlib` (except the CLI loading the command asked for);
- in `daemon/` and `policies/`, no function is longer than 120 lines or above cyclomatic
  complexity 25 (radon), and the `ckptd trash` subcommands stay under 15.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

DAEMON = Path(__file__).resolve().parents[2] / "daemon"
COMMANDS = DAEMON / "commands"
POLICIES = DAEMON.parent / "policies"
REORGANISED = [DAEMON, POLICIES]
MAX_LINES = 120
MAX_COMPLEXITY = 25


def modules(*places: Path) -> Iterator[Path]:
    for place in places:
        yield from sorted(place.rglob("*.py")) if place.is_dir() else [place]


def imported(path: Path) -> set[str]:
    """Given a module, return every module it imports (at any depth, lazily or not)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_command_imports_another_command() -> None:
    offenders = {
        f"{path.name} imports {name}"
        for path in COMMANDS.glob("*.py")
        for name in imported(path)
        if name.startswith("daemon.commands.") and name.split(".")[2] not in ("_common", path.stem)
    }
    assert offenders == set()


def test_only_the_cli_imports_commands_and_commands_leave_the_cli_alone() -> None:
    below_the_cli = [p for p in modules(DAEMON) if p.parent != COMMANDS and p.name != "cli.py"]
    library = {
        f"{path.relative_to(DAEMON)} imports {name}"
        for path in below_the_cli
        for name in imported(path)
        if name == "daemon.commands" or name.startswith("daemon.commands.")
    }
    assert library == set()
    reaching_up = {
        f"{path.name} imports {name}"
        for path in COMMANDS.glob("*.py")
        if path.name != "_common.py"
        for name in imported(path)
        if name == "daemon.cli" or name.startswith("daemon.cli.")
    }
    assert reaching_up == set()


def test_no_module_but_the_cli_uses_importlib() -> None:
    users = {
        str(path.relative_to(DAEMON))
        for path in modules(DAEMON)
        if path.name != "cli.py" and "importlib" in imported(path)
    }
    assert users == set()


def functions(path: Path) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_function_is_longer_than_120_lines() -> None:
    long = {
        f"{path.relative_to(DAEMON.parent)}:{node.lineno} {node.name} "
        f"({(node.end_lineno or node.lineno) - node.lineno + 1} lines)"
        for path in modules(*REORGANISED)
        for node in functions(path)
        if (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_LINES
    }
    assert long == set()


def test_no_function_is_above_complexity_25_and_trash_subcommands_under_15() -> None:
    import radon.complexity as radon  # the test extra installs it

    complex_ = set()
    for path in modules(*REORGANISED):
        limit = 14 if path == COMMANDS / "trash.py" else MAX_COMPLEXITY
        for block in radon.cc_visit(path.read_text()):
            for function in [block, *getattr(block, "methods", [])]:
                if function.complexity > limit:
                    complex_.add(
                        f"{path.relative_to(DAEMON.parent)} {function.name} {function.complexity}"
                    )
    assert complex_ == set()
