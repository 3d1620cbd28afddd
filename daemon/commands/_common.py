"""What the commands share: which config file, which roots and which history file.

No command imports another; each takes these from here.
"""

from __future__ import annotations

import argparse
import os

from daemon.cli import DEFAULT_CONFIG, build_parser
from daemon.config import Config, RootConfig, default_config_for_root, load_config
from daemon.errors import UsageError
from daemon.history.log import default_history_path


def config_path(explicit: str | None) -> str:
    """Given the --config argument, return the config file path to use."""
    return explicit or os.environ.get("CKPTD_CONFIG") or DEFAULT_CONFIG


def cli_parser() -> argparse.ArgumentParser:
    """Given nothing, return the CLI's parser (completion and the man page are made from it)."""
    return build_parser()


def load_selected_config(explicit: str | None) -> Config:
    """Given the --config argument, return the config it (or the default path) names."""
    return load_config(config_path(explicit))


def select_roots(
    root_argument: str | None, config_argument: str | None
) -> tuple[Config, list[RootConfig]]:
    """Given the ROOT and --config arguments, return the config and the roots to act on.

    A ROOT without --config gets the built-in defaults (the balanced preset). A ROOT with --config
    must be one of its roots, or it gets the config's defaults. Neither: every configured root of
    the default config file.
    """
    if root_argument is not None:
        root_path = os.path.abspath(root_argument)
        if not os.path.exists(root_path):
            raise UsageError(f"{root_argument}: no such folder")
        if not os.path.isdir(root_path):
            raise UsageError(f"{root_argument}: not a folder")
        if config_argument is None:
            config = default_config_for_root(root_path)
            return config, list(config.roots)
        config = load_config(config_argument)
        for root in config.roots:
            if os.path.realpath(root.path) == os.path.realpath(root_path):
                return config, [root]
        return config, [RootConfig(path=root_path)]
    path = config_path(config_argument)
    if config_argument is None and not os.path.exists(path):
        raise UsageError(f"give a ROOT folder or --config FILE (no config at {path})")
    config = load_config(path)
    if not config.roots:
        raise UsageError(f"{path}: no roots configured")
    return config, list(config.roots)


def history_path_for(config: Config, root_argument: str | None, config_argument: str | None) -> str:
    """Given the selected config and the ROOT and --config arguments, return the history file.

    A bare ROOT without --config writes to the user's own history (`default_history_path`), so
    a person can prune by hand without root; otherwise the config's `history_file`.
    """
    if root_argument is not None and config_argument is None:
        return default_history_path()
    return config.history_path


def history_path(config_argument: str | None) -> str:
    """Given --config (or none), return the history file to read: the config's, else (no config
    file) the user default."""
    path = config_path(config_argument)
    if config_argument is not None or os.path.exists(path):
        return load_config(path).history_path
    return default_history_path()
