"""The config file: pydantic models of every key, and resolution into per-root settings.

`load_config(path)` is the one way in: it parses the YAML, validates it and returns a `Config`,
or raises `ConfigError` carrying *every* problem as `file:line field.path: message`.
`load_config_with_warnings(path)` also returns the things that are allowed but probably wrong.

Loading has no side effects (it creates, caches and logs nothing), so the daemon can call it on
SIGHUP and keep the old config in force when it raises.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pydantic import ValidationError

from daemon.config.checks import _semantic_checks, pattern_problems, system_folder_reason
from daemon.config.messages import _message_for
from daemon.config.models import (
    Config,
    DefaultsConfig,
    DiskConfig,
    KeepBestConfig,
    LeaseConfig,
    LogConfig,
    PolicyConfig,
    PruneConfig,
    RootConfig,
    RootSettings,
    SeriesConfig,
    SlimConfig,
    SnapshotsConfig,
    TrainerConfig,
    TrashConfig,
    VerifyConfig,
    default_config_for_root,
    policy_for,
    settings_for,
)
from daemon.config.units import Duration, Size, parse_duration, parse_size
from daemon.config.yaml_lines import Path, Problem, StrictYamlLoader, _parse_yaml, format_path
from daemon.errors import ConfigError

# --- the way in --------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a folder, not a config file"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not UTF-8 text ({error.reason})"]) from None
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the config: {error.strerror}"]) from None


def validate_text(text: str, file: str = "config.yaml") -> tuple[Config, list[str]]:
    """Given YAML text (and the file name to show in messages), return the Config and its
    warnings, or raise ConfigError with every problem as `file:line field: message`."""
    document = _parse_yaml(text, file)
    problems = list(document.problems)
    if document.data is None:
        document.data = {}
    if not isinstance(document.data, dict):
        problems.append(
            Problem(1, (), "expected a mapping of keys such as roots:, defaults:, snapshots:")
        )
        raise ConfigError([problem.format(file) for problem in sorted(problems)])
    config: Config | None = None
    try:
        config = Config.model_validate(document.data)
    except ValidationError as error:
        for detail in error.errors():
            path: Path = tuple(detail["loc"])
            if path in document.unreadable:
                continue
            problems.append(Problem(document.line_of(path), path, _message_for(detail)))
    findings = _semantic_checks(document)
    problems.extend(findings.problems)
    if problems or config is None:
        raise ConfigError([problem.format(file) for problem in _unique(sorted(problems))])
    return config, [warning.format(file) for warning in sorted(findings.warnings)]


def _unique(problems: Iterable[Problem]) -> list[Problem]:
    seen: set[tuple[int, str, str]] = set()
    result = []
    for problem in problems:
        key = (problem.line, format_path(problem.path), problem.message)
        if key not in seen:
            seen.add(key)
            result.append(problem)
    return result


def load_config_with_warnings(path: str | os.PathLike[str]) -> tuple[Config, list[str]]:
    """Given a YAML file path, return the validated Config and its warnings (allowed, but
    probably not meant), or raise ConfigError with every problem. Reads the file and nothing
    else; changes nothing."""
    file = os.fspath(path)
    return validate_text(_read(file), file)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Given a YAML file path, return the validated Config or raise ConfigError with every
    problem as `file:line field.path: message`."""
    return load_config_with_warnings(path)[0]


__all__ = [
    "Config",
    "ConfigError",
    "DefaultsConfig",
    "DiskConfig",
    "Duration",
    "KeepBestConfig",
    "LeaseConfig",
    "LogConfig",
    "PolicyConfig",
    "Problem",
    "PruneConfig",
    "RootConfig",
    "RootSettings",
    "SeriesConfig",
    "Size",
    "SlimConfig",
    "SnapshotsConfig",
    "StrictYamlLoader",
    "TrainerConfig",
    "TrashConfig",
    "VerifyConfig",
    "default_config_for_root",
    "load_config",
    "load_config_with_warnings",
    "parse_duration",
    "parse_size",
    "pattern_problems",
    "policy_for",
    "settings_for",
    "system_folder_reason",
    "validate_text",
]
