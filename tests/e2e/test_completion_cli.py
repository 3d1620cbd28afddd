"""`ckptd completion bash|zsh|fish` through the real CLI, loaded into the real shells: bash
completes through the function it registers, fish through `complete -C`, zsh registers it with
compinit from $fpath. A shell that is not installed is skipped, with the reason."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def completion(command: list[str], env: dict[str, str], shell: str) -> str:
    result = subprocess.run(
        [*command, "completion", shell], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def needs(shell: str) -> str:
    found = shutil.which(shell)
    if found is None:
        pytest.skip(f"{shell} is not installed")
    return found


BASH_COMPLETE = """
source "$1"
complete -p ckptd
words() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}
  COMPREPLY=(); _shtab_ckptd; echo "${{COMPREPLY[*]}}"; }}
words ckptd pr
words ckptd check --
words ckptd completion ''
words ckptd forecast --pre
words ckptd forecast --preset ''
words ckptd plan --config {config_prefix}
"""


def test_bash_completes_commands_options_choices_and_files(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    bash = needs("bash")
    script = tmp_path / "ckptd.bash"
    script.write_text(completion(ckptd_command, cli_env, "bash"))
    (tmp_path / "my-config.yaml").write_text("roots: []\n")
    driver = BASH_COMPLETE.format(config_prefix=str(tmp_path / "my-con"))
    result = subprocess.run(
        [bash, "-c", driver, "bash", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("complete ") and lines[0].endswith(" ckptd")
    assert lines[1] == "prune"
    assert set(lines[2].split()) == {"--help", "--config", "--json", "--quiet"}
    assert lines[3].split() == ["bash", "zsh", "fish"]
    assert lines[4] == "--preset"
    assert lines[5].split() == ["balanced", "conservative", "aggressive"]
    assert lines[6] == str(tmp_path / "my-config.yaml")


def test_fish_completes_commands_and_options(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    fish = needs("fish")
    script = tmp_path / "ckptd.fish"
    script.write_text(completion(ckptd_command, cli_env, "fish"))
    syntax = subprocess.run([fish, "--no-execute", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    result = subprocess.run(
        [
            fish,
            "--no-config",
            "-c",
            f"source {script}; complete -C 'ckptd pr'; echo ---; complete -C 'ckptd check --'",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    commands, options = result.stdout.split("---\n")
    assert [line.split("\t")[0] for line in commands.splitlines()] == ["prune"]
    assert {line.split("\t")[0] for line in options.splitlines()} == {
        "--help",
        "--config",
        "--json",
        "--quiet",
    }
    # Each candidate carries its help text, as fish shows it.
    assert "print JSON for scripts" in options


def test_zsh_registers_the_completion_from_fpath(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    zsh = needs("zsh")
    functions = tmp_path / "functions"
    functions.mkdir()
    script = functions / "_ckptd"
    script.write_text(completion(ckptd_command, cli_env, "zsh"))
    assert script.read_text().startswith("#compdef ckptd")
    syntax = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    result = subprocess.run(
        [
            zsh,
            "-f",
            "-c",
            f"fpath=({functions} $fpath); autoload -U compinit; compinit -u -D; "
            "print -r -- $_comps[ckptd]",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout.strip() == "_ckptd", result
    for name in ("prune", "check", "completion", "--quiet", "--cadence", "balanced"):
        assert name in script.read_text()


def test_an_unknown_shell_is_a_usage_error(
    ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    result = subprocess.run(
        [*ckptd_command, "completion", "powershell"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert result.stdout == ""
