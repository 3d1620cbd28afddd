"""What the commands share: which config file, which roots, which policy applies to each and
said how, which history file, and how a missing root is reported.

No command imports another; each takes these from here.

Which config: `--config FILE`, else `$CKPTD_CONFIG`, else /etc/ckptd/config.yaml — the same for
every command, with or without a ROOT. A ROOT that is one of the config's roots gets that
root's settings; any other ROOT (or no config file at all) gets the config's defaults, the
balanced preset unless the config changes them, and the first line of `plan` and `prune` says
so. The history goes to the config's `history_file`; without a config file to the user's own
(`default_history_path`), where `ckptd history` without a config file reads it too.

A configured root that does not exist is not created and not an error that stops the others:
every command prints a warning naming it on stderr, does the other roots, and exits 1
(EXIT_MISSING_ROOT) unless something worse happened.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import TYPE_CHECKING

from daemon.cli import DEFAULT_CONFIG, build_parser
from daemon.clock import machine_zone, zone_for
from daemon.columns import wrap
from daemon.config import (
    Config,
    PolicyConfig,
    RootConfig,
    default_config_for_root,
    load_config,
    policy_for,
    settings_for,
)
from daemon.errors import EXIT_FAILED, UsageError
from daemon.fsio import TRASH_DIRECTORY
from daemon.history.log import default_history_path
from daemon.render import Protected, describe_policy, format_duration
from daemon.storage.url import is_remote
from policies.model import Plan

# The exit code of a command that did every root but found a configured one missing.
EXIT_MISSING_ROOT = EXIT_FAILED

if TYPE_CHECKING:
    from rich.console import Console

    from daemon.verification import VerificationState


def config_path(explicit: str | None) -> str:
    """Given the --config argument, return the config file path to use."""
    return explicit or os.environ.get("CKPTD_CONFIG") or DEFAULT_CONFIG


def cli_parser() -> argparse.ArgumentParser:
    """Given nothing, return the CLI's parser (completion and the man page are made from it)."""
    return build_parser()


def load_selected_config(explicit: str | None) -> Config:
    """Given the --config argument, return the config it (or the default path) names."""
    return load_config(config_path(explicit))


@dataclass(frozen=True)
class Selection:
    """Given ROOT and --config: the config, the roots to act on (present ones) and the
    configured roots that do not exist, the config file read (None: none), the history file,
    and for each root (by path) the line that says which policy applies."""

    config: Config
    roots: tuple[RootConfig, ...]
    missing: tuple[RootConfig, ...] = ()
    source: str | None = None
    history_path: str = ""
    policies: Mapping[str, PolicyNote] = field(default_factory=dict)

    def policy_line(self, root: RootConfig) -> str:
        """Given one of the selected roots, return its `policy: …` line with the settings."""
        note = self.policies.get(root.path)
        return f"{note.headline}; {note.settings}" if note is not None else ""

    def print_policy(self, console: Console, root: RootConfig) -> None:
        """Given a console and one of the selected roots, print which policy applies: the
        `policy: …` headline, then its settings, indented."""
        note = self.policies.get(root.path)
        if note is None:
            return
        console.print(note.headline, markup=False)
        console.print("\n".join(wrap(note.settings, console.width, indent="  ")), markup=False)


@dataclass(frozen=True)
class PolicyNote:
    """Which policy applies to a root: where it comes from (`policy: balanced preset (no
    config for this root)`), and its settings as numbers."""

    headline: str
    settings: str


def _limits(config: Config, root: RootConfig) -> str:
    settings = settings_for(config, root)
    return (
        f"max_delete_fraction {settings.max_delete_fraction:.0%}, min_keep {settings.min_keep}, "
        f"trash grace {format_duration(settings.trash_grace)}"
    )


def policy_note(
    config: Config, root: RootConfig, source: str | None, *, configured: bool
) -> PolicyNote:
    """Given the config, a root, the config file and whether the root is one of its roots,
    return which policy applies, where it comes from, and its settings."""
    if configured:
        if root.series:
            policies = "; ".join(
                f"series {series.pattern}: {describe_policy(policy_for(config, root, series))}"
                for series in root.series
            )
        else:
            policies = describe_policy(policy_for(config, root))
        headline = f"policy: this root's in {source}"
        return PolicyNote(headline, f"{policies}; {_limits(config, root)}")
    preset = config.defaults.policy
    plain_preset = preset == PolicyConfig(preset=preset.preset)
    name = f"{preset.preset} preset" if plain_preset else "the config's defaults"
    where = "no config for this root"
    if source is not None:
        where += f"; the defaults of {source}"
    spec = describe_policy(preset.to_spec())
    return PolicyNote(f"policy: {name} ({where})", f"{spec}; {_limits(config, root)}")


def _same_folder(first: str, second: str) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


def select(root_argument: str | None, config_argument: str | None) -> Selection:
    """Given the ROOT and --config arguments, return what to act on (see the module's text).

    A ROOT given that does not exist is a usage error (exit 2); a configured root that does
    not exist is in `missing`.
    """
    path = config_path(config_argument)
    if root_argument is not None and is_remote(root_argument):
        return _select_remote(root_argument, config_argument, path)
    if root_argument is not None:
        root_path = os.path.abspath(root_argument)
        if not os.path.exists(root_path):
            raise UsageError(f"{root_argument}: no such folder")
        if not os.path.isdir(root_path):
            raise UsageError(f"{root_argument}: not a folder")
        if config_argument is None and not os.path.exists(path):
            config = default_config_for_root(root_path)
            root = config.roots[0]
            line = policy_note(config, root, None, configured=False)
            return Selection(
                config, (root,), history_path=default_history_path(), policies={root.path: line}
            )
        config = load_config(path)
        configured = [root for root in config.roots if _same_folder(root.path, root_path)]
        root = configured[0] if configured else RootConfig(path=root_path)
        line = policy_note(config, root, path, configured=bool(configured))
        return Selection(
            config,
            (root,),
            source=path,
            history_path=config.history_path,
            policies={root.path: line},
        )
    if config_argument is None and not os.path.exists(path):
        raise UsageError(f"give a ROOT folder or --config FILE (no config at {path})")
    config = load_config(path)
    if not config.roots:
        raise UsageError(f"{path}: no roots configured")
    present = tuple(root for root in config.roots if root_exists(root))
    return Selection(
        config,
        present,
        missing=tuple(root for root in config.roots if root not in present),
        source=path,
        history_path=config.history_path,
        policies={root.path: policy_note(config, root, path, configured=True) for root in present},
    )


def _select_remote(root_argument: str, config_argument: str | None, path: str) -> Selection:
    """Given an object-storage ROOT: the configured root of that URL (its storage_options), or
    with none configured the defaults, credentials from botocore's usual chain (AWS_*
    environment variables, ~/.aws)."""
    wanted = root_argument.rstrip("/")
    if config_argument is None and not os.path.exists(path):
        config = default_config_for_root(wanted)
        root = config.roots[0]
        line = policy_note(config, root, None, configured=False)
        return Selection(
            config, (root,), history_path=default_history_path(), policies={root.path: line}
        )
    config = load_config(path)
    configured = [root for root in config.roots if root.path.rstrip("/") == wanted]
    root = configured[0] if configured else RootConfig(path=wanted)
    line = policy_note(config, root, path, configured=bool(configured))
    return Selection(
        config, (root,), source=path, history_path=config.history_path, policies={root.path: line}
    )


# What needs a local folder: the object-storage roots of a selection are skipped, saying so.
LOCAL_ONLY = "needs a local folder (object-storage roots have no holds or integrity checks)"


def local_roots(command: str, roots: Sequence[RootConfig]) -> list[RootConfig]:
    """Given a command and its roots, return the local ones; say on stderr which
    object-storage roots it skips."""
    for root in roots:
        if is_remote(root.path):
            print(f"ckptd {command}: {root.path}: skipped: {command} {LOCAL_ONLY}", file=sys.stderr)
    return [root for root in roots if not is_remote(root.path)]


def refuse_remote(command: str, root: RootConfig) -> None:
    """Given a command that needs a local folder and its ROOT, raise UsageError for an
    object-storage root."""
    if is_remote(root.path):
        raise UsageError(f"{root.path}: {command} {LOCAL_ONLY}")


def root_exists(root: RootConfig) -> bool:
    """Given a configured root, return whether it is there (an object-store URL is taken to be:
    its listing says)."""
    return "://" in root.path or os.path.isdir(root.path)


def select_roots(
    root_argument: str | None, config_argument: str | None
) -> tuple[Config, list[RootConfig]]:
    """Given the ROOT and --config arguments, return the config and the roots to act on (the
    present ones: `select` says which are missing)."""
    selection = select(root_argument, config_argument)
    return selection.config, list(selection.roots)


def history_path_for(config: Config, root_argument: str | None, config_argument: str | None) -> str:
    """Given the selected config and the ROOT and --config arguments, return the history file:
    the config's, or without a config file the user's own (`default_history_path`)."""
    no_file = config_argument is None and not os.path.exists(config_path(None))
    if root_argument is not None and no_file:
        return default_history_path()
    return config.history_path


@dataclass(frozen=True)
class HistorySource:
    """Given --config: the history file to read, the zone its times are shown in (the config's,
    else the machine's) and the configured roots (the width of their column)."""

    path: str
    zone: tzinfo
    roots: tuple[str, ...] = ()


def history_source(config_argument: str | None) -> HistorySource:
    """Given --config (or none), return the history to read: the config's, else (no config
    file) the user default."""
    path = config_path(config_argument)
    if config_argument is not None or os.path.exists(path):
        config = load_config(path)
        roots = tuple(root.path for root in config.roots)
        return HistorySource(config.history_path, zone_for(config), roots)
    return HistorySource(default_history_path(), machine_zone())


def history_path(config_argument: str | None) -> str:
    """Given --config (or none), return the history file to read: the config's, else (no config
    file) the user default."""
    return history_source(config_argument).path


def warn_missing(command: str, missing: Sequence[RootConfig]) -> int:
    """Given the command's name and the configured roots that do not exist, say so on stderr,
    one line each; return the exit code that reports them (0 when none)."""
    for root in missing:
        print(
            f"ckptd {command}: warning: {root.path}: no such folder (a configured root); "
            "skipped, the other roots are done",
            file=sys.stderr,
        )
    return EXIT_MISSING_ROOT if missing else 0


def _entry_bytes(path: str, status: os.stat_result) -> int:
    if not stat.S_ISDIR(status.st_mode):
        return status.st_size
    total = 0
    for folder, _folders, files in os.walk(path):  # never follows symlinks out of the root
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def protected_entries(root: RootConfig, plan: Plan) -> tuple[Protected, ...]:
    """Given a root and its plan, return the entries directly inside it that a `protect:` glob
    names and that are no checkpoint's (`best.pt`, `last.pt`): never deleted, listed with why."""
    if not root.protect or "://" in root.path:
        return ()
    members = {member for decision in plan.decisions for member in decision.checkpoint.members}
    try:
        names = sorted(os.listdir(root.path))
    except OSError:
        return ()
    found: list[Protected] = []
    for name in names:
        globs = [glob for glob in root.protect if fnmatch.fnmatchcase(name, glob)]
        if not globs or name in members or name == TRASH_DIRECTORY:
            continue
        path = os.path.join(root.path, name)
        try:
            status = os.lstat(path)
        except OSError:
            continue
        reasons = tuple(f"protect:{glob}" for glob in globs)
        found.append(Protected(name, _entry_bytes(path, status), status.st_mtime, reasons))
    return tuple(found)


def verification_state_for(
    config: Config, root_argument: str | None, config_argument: str | None
) -> VerificationState:
    """Given the selected config and the ROOT and --config arguments, return the integrity
    state to read and keep: beside the user's own history for a bare ROOT without --config
    (as `history_path_for`), else in the config's state_dir."""
    from daemon.verification import VerificationState  # not every command checks integrity

    if root_argument is not None and config_argument is None:
        folder = os.path.dirname(default_history_path())
    else:
        folder = config.state_dir
    return VerificationState.in_folder(folder, create=True)


def open_root_argument(
    root_argument: str, config_argument: str | None
) -> tuple[Config, RootConfig]:
    """Given a ROOT argument (required) and --config, return the config and that root."""
    config, roots = select_roots(root_argument, config_argument)
    return config, roots[0]
