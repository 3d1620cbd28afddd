"""The config file: pydantic models of every key, and resolution into per-root settings.

`load_config(path)` is the one way in: it parses the YAML, validates it and returns a `Config`,
or raises `ConfigError` carrying *every* problem as `file:line field.path: message`.
`load_config_with_warnings(path)` also returns the things that are allowed but probably wrong.

Loading has no side effects (it creates, caches and logs nothing), so the daemon can call it on
SIGHUP and keep the old config in force when it raises.
"""

from __future__ import annotations

import difflib
import os
import pwd
import re
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails

from daemon.errors import ConfigError
from policies.model import PRESETS, KeepBest, PolicySpec

# --- units -------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_DURATION_FACTORS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}


def parse_duration(value: object) -> float:
    """Given `90`, `"30s"`, `"5m"`, `"1h"` or `"2d"`, return seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 1h or 2d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match.group(1)) * _DURATION_FACTORS[match.group(2) or "s"]
    raise ValueError(f"{value!r} is not a duration such as 30s, 5m, 1h or 2d")


def parse_size(value: object) -> int:
    """Given `1024`, `"3.6GB"` (powers of 1000) or `"2GiB"` (powers of 1024), return bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 50GB or 2GiB")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return int(value)
    if isinstance(value, str) and (match := _SIZE.match(value)):
        return int(float(match.group(1)) * _SIZE_FACTORS[(match.group(2) or "B").lower()])
    raise ValueError(f"{value!r} is not a size such as 50GB or 2GiB")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


# --- models ------------------------------------------------------------------------------------


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo must never silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KeepBestConfig(StrictModel):
    count: int = Field(default=1, ge=1)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"


class PolicyConfig(StrictModel):
    """A preset, optionally with individual knobs overriding it."""

    preset: Literal["balanced", "conservative", "aggressive"] = "balanced"
    keep_last: int | None = Field(default=None, ge=1)
    tier2_count: int | None = Field(default=None, ge=0)
    # Explicit null keeps nothing past tier 2; absent takes the preset's interval.
    tier3_interval: int | None = Field(default=None, gt=0)
    cadence: int | None = Field(default=None, ge=1)
    keep_best: KeepBestConfig | None = None

    def to_spec(self) -> PolicySpec:
        """Given this policy config, return the resolved PolicySpec."""
        base = PRESETS[self.preset]
        fields_set = self.model_fields_set
        keep_best = (
            KeepBest(self.keep_best.count, self.keep_best.metric, self.keep_best.mode)
            if self.keep_best is not None
            else None
        )
        return PolicySpec(
            keep_last=self.keep_last if self.keep_last is not None else base.keep_last,
            tier2_count=self.tier2_count if self.tier2_count is not None else base.tier2_count,
            tier3_interval=(
                self.tier3_interval if "tier3_interval" in fields_set else base.tier3_interval
            ),
            cadence=self.cadence,
            keep_best=keep_best,
        )


class TrashConfig(StrictModel):
    grace: Duration = 3600.0


class TrainerConfig(StrictModel):
    pid_file: str | None = None
    cmdline: str | None = None

    @field_validator("cmdline")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression: {error}") from None
        return value


Layout = Literal["auto", "hf", "pt", "lightning", "deepspeed", "megatron", "orbax", "dcp", "tf"]


class SeriesConfig(StrictModel):
    pattern: str
    policy: PolicyConfig | None = None


class RootConfig(StrictModel):
    path: str
    layout: Layout = "auto"
    pattern: str | None = None
    policy: PolicyConfig | None = None
    protect: list[str] = Field(default_factory=list)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    watch: Literal["auto", "inotify", "poll"] = "auto"
    series: list[SeriesConfig] = Field(default_factory=list)
    # Per-root overrides of `defaults`; None inherits.
    settle_seconds: Duration | None = None
    min_keep: int | None = Field(default=None, ge=0)
    max_delete_fraction: float | None = Field(default=None, gt=0, le=1)
    trash: TrashConfig | None = None


class DefaultsConfig(StrictModel):
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    settle_seconds: Duration = 60.0
    min_keep: int = Field(default=3, ge=0)
    max_delete_fraction: float = Field(default=0.9, gt=0, le=1)
    trash: TrashConfig = Field(default_factory=TrashConfig)


class PruneConfig(StrictModel):
    schedule: str = "0 4 * * sun"
    on_new_checkpoint: StrictBool = True

    @field_validator("schedule")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        # Imported here: APScheduler is the scheduler's dependency, and `ckptd --help` stays fast.
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value, timezone="UTC")
        except ValueError as error:
            raise ValueError(
                f'{value!r} is not a cron schedule such as "0 4 * * sun": {error}'
            ) from None
        return value


class SnapshotsConfig(StrictModel):
    enabled: StrictBool = True
    at: str = "03:00"
    dir: str | None = None
    scope: Literal["latest", "all"] = "latest"
    keep: int = Field(default=7, ge=1)
    method: Literal["auto", "reflink", "hardlink", "copy"] = "auto"
    mutable: list[str] = Field(default_factory=lambda: ["last.pt", "best.pt", "last.ckpt"])

    @field_validator("at")
    @classmethod
    def _clock_time(cls, value: str) -> str:
        match = re.fullmatch(r"(\d{1,2}):(\d{2})", value)
        if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
            raise ValueError(f'{value!r} is not a time of day such as "03:00"')
        return f"{int(match.group(1)):02d}:{match.group(2)}"


class DiskConfig(StrictModel):
    interval: Duration = Field(default=300.0, gt=0)
    warn_percent: float = Field(default=85, gt=0, le=100)
    critical_percent: float = Field(default=95, gt=0, le=100)
    min_free: Size | None = None
    emergency: PolicyConfig = Field(default_factory=lambda: PolicyConfig(preset="aggressive"))
    alert: str | None = None


class LogConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = "auto"


class Config(StrictModel):
    timezone: str | None = None
    state_dir: str = "/var/lib/ckptd"
    history_file: str | None = None  # default: <state_dir>/history.jsonl
    log: LogConfig = Field(default_factory=LogConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    roots: list[RootConfig] = Field(default_factory=list)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    snapshots: SnapshotsConfig = Field(default_factory=SnapshotsConfig)
    disk: DiskConfig = Field(default_factory=DiskConfig)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown timezone {value!r}") from None
        return value

    @property
    def history_path(self) -> str:
        return self.history_file or f"{self.state_dir.rstrip('/')}/history.jsonl"


def settings_for(config: Config, root: RootConfig) -> dict[str, Any]:
    """Given the config and one of its roots, return that root's effective safety settings."""
    defaults = config.defaults
    return {
        "settle_seconds": root.settle_seconds
        if root.settle_seconds is not None
        else defaults.settle_seconds,
        "min_keep": root.min_keep if root.min_keep is not None else defaults.min_keep,
        "max_delete_fraction": root.max_delete_fraction
        if root.max_delete_fraction is not None
        else defaults.max_delete_fraction,
        "trash_grace": (root.trash or defaults.trash).grace,
    }


def policy_for(config: Config, root: RootConfig, series: SeriesConfig | None = None) -> PolicySpec:
    """Given a root (and one of its series), return the policy that applies: most specific wins."""
    if series is not None and series.policy is not None:
        return series.policy.to_spec()
    if root.policy is not None:
        return root.policy.to_spec()
    return config.defaults.policy.to_spec()


def default_config_for_root(path: str) -> Config:
    """Given a bare ROOT on the command line, return a config with the built-in defaults."""
    return Config(roots=[RootConfig(path=path)])


# --- YAML: strict scalars, duplicate keys, a line for every key ----------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.1's implicit types that surprise people: `no` is false, `3:00` is 180, `0755` is octal,
# `2024-01-01` is a date. ckptd reads scalars the YAML 1.2 way instead.
_REPLACED_TAGS = {
    _BOOL_TAG,
    _INT_TAG,
    _FLOAT_TAG,
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:value",
}


class StrictYamlLoader(yaml.SafeLoader):
    """A SafeLoader whose plain scalars follow YAML 1.2: only true/false are booleans, numbers
    are decimal (no sexagesimal `3:00`, no octal `0755`), and dates stay text."""


StrictYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictYamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
StrictYamlLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789")
)
StrictYamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _construct_decimal_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    return int(text.replace("_", ""), 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = str(loader.construct_scalar(node)).replace("_", "").lower()  # type: ignore[arg-type]
    sign = -1.0 if text.startswith("-") else 1.0
    unsigned = text.lstrip("+-")
    if unsigned == ".inf":
        return sign * float("inf")
    if unsigned == ".nan":
        return float("nan")
    return float(text)


StrictYamlLoader.add_constructor(_INT_TAG, _construct_decimal_int)
StrictYamlLoader.add_constructor(_FLOAT_TAG, _construct_float)

Path = tuple[str | int, ...]


@dataclass(frozen=True, order=True)
class Problem:
    """One finding about the config: a line in the file, the field it concerns, a message."""

    line: int
    path: Path = field(compare=False)
    message: str = field(compare=False)

    def format(self, file: str) -> str:
        """Given the file name to show, return `file:line field.path: message`."""
        return f"{file}:{self.line} {format_path(self.path)}: {self.message}"


def format_path(path: Path) -> str:
    """Given a location such as ("roots", 0, "policy"), return `roots[0].policy`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


@dataclass
class _Document:
    """A parsed YAML file: plain Python data, the line of every key and item, and problems."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # Values that could not be read at all: a second "expected ..." about them would be noise.
    unreadable: set[Path] = field(default_factory=set)

    def line_of(self, path: Path) -> int:
        """Given a location, return the line of it or of its nearest ancestor in the file."""
        for length in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:length]))
            if line is not None:
                return line
        return 1


_MAX_NODES = 200_000


class _TooLarge(Exception):
    """The document expands to more values than any config has."""


class _DocumentBuilder:
    """Turns composed YAML nodes into Python data, recording lines and duplicate keys."""

    def __init__(self, loader: StrictYamlLoader) -> None:
        self.loader = loader
        self.document = _Document(data=None)
        self._open_nodes: set[int] = set()
        self._budget = _MAX_NODES

    def build(self, node: yaml.Node, path: Path) -> Any:
        self._budget -= 1
        if self._budget < 0:
            # Aliases of aliases grow exponentially ("billion laughs"); no real config is close.
            raise _TooLarge
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except (ValueError, TypeError, OverflowError):
                # An explicit tag that does not fit its text, such as `!!int 0x1F`.
                tag = node.tag.rsplit(":", 1)[-1]
                self.document.problems.append(
                    Problem(node.start_mark.line + 1, path, f"{node.value!r} is not a valid {tag}")
                )
                self.document.unreadable.add(path)
                return None
        if id(node) in self._open_nodes:
            self.document.problems.append(
                Problem(node.start_mark.line + 1, path, "an alias refers to itself")
            )
            return None
        self._open_nodes.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, path)
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return None
        finally:
            self._open_nodes.discard(id(node))

    def _sequence(self, node: yaml.SequenceNode, path: Path) -> list[Any]:
        items = []
        for index, item in enumerate(node.value):
            self.document.lines[(*path, index)] = item.start_mark.line + 1
            items.append(self.build(item, (*path, index)))
        return items

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        own: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                # `<<: *anchor` (or a list of anchors, earlier ones winning) supplies defaults
                # that keys written here override: that is not a duplicate.
                sources = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                for source in reversed(sources):
                    value = self.build(source, path)
                    if isinstance(value, dict):
                        merged.update(value)
                    else:
                        self.document.problems.append(
                            Problem(line, path, "'<<' must merge a mapping (an &anchor of keys)")
                        )
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.document.problems.append(
                    Problem(line, path, "a key must be a plain name, not a list or mapping")
                )
                continue
            # The key's text as written: `yes:` or `3:00:` must not turn into True or 180.
            key = str(key_node.value)
            if key in first_line:
                self.document.problems.append(
                    Problem(line, (*path, key), f"duplicate key (first at line {first_line[key]})")
                )
            else:
                first_line[key] = line
            self.document.lines[(*path, key)] = line
            own[key] = self.build(value_node, (*path, key))
        return {**merged, **own}


def _syntax_problem(file: str, error: yaml.YAMLError, text: str) -> str:
    if isinstance(error, yaml.reader.ReaderError):
        before = text[: error.position]
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        character = error.character
        code = character if isinstance(character, int) else ord(character)
        return f"{file}:{line}:{column} invalid YAML: character U+{code:04X} is not allowed"
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"{file}: invalid YAML: {error}"
    mark = error.problem_mark
    message = error.problem or "invalid YAML"
    if error.context:
        context_line = error.context_mark.line + 1 if error.context_mark is not None else None
        message += f" ({error.context}" + (f" at line {context_line})" if context_line else ")")
    if "'\\t'" in message:
        message += "; YAML indents with spaces, not tabs"
    if "'*'" in message or "alphabetic or numeric character" in message:
        message += '; quote values that start with * or &, e.g. schedule: "0 4 * * sun"'
    return f"{file}:{mark.line + 1}:{mark.column + 1} invalid YAML: {message}"


def _parse_yaml(text: str, file: str) -> _Document:
    try:
        # Constructing the loader already checks characters (a NUL is a ReaderError).
        loader = StrictYamlLoader(text)
    except yaml.YAMLError as error:
        raise ConfigError([_syntax_problem(file, error, text)]) from None
    try:
        builder = _DocumentBuilder(loader)
        node = loader.get_single_node()
        builder.document.data = {} if node is None else builder.build(node, ())
        return builder.document
    except yaml.YAMLError as error:
        raise ConfigError([_syntax_problem(file, error, text)]) from None
    except _TooLarge:
        raise ConfigError([f"{file}: expands to more than {_MAX_NODES} values"]) from None
    except RecursionError:
        raise ConfigError([f"{file}: invalid YAML: nested too deeply"]) from None
    finally:
        loader.dispose()


# --- pydantic errors as short human messages ---------------------------------------------------


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """Given a field's annotation, return the model inside it (through Optional, list, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _inner_model(argument)
        if found is not None:
            return found
    return None


def _model_at(path: Path) -> type[BaseModel] | None:
    """Given a location in the config, return the model that validates the mapping there."""
    model: type[BaseModel] | None = Config
    for part in path:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _inner_model(model.model_fields[part].annotation)
    return model


def _unknown_key_message(path: Path) -> str:
    key = str(path[-1])
    model = _model_at(path[:-1])
    if model is None:
        return "unknown key"
    names = list(model.model_fields)
    for name in names:
        nested = _inner_model(model.model_fields[name].annotation)
        if nested is not None and key in nested.model_fields:
            return f"unknown key here ({key} belongs under '{name}:')"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return "unknown key (expected one of: " + ", ".join(names) + ")"


def _shown(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, float):
        return f"{value:g}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_MESSAGES: Mapping[str, str] = {
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected text",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "dict_type": "expected a mapping of keys",
    "list_type": "expected a list",
}


def _message_for(error: ErrorDetails) -> str:
    kind = error["type"]
    path: Path = tuple(error["loc"])
    context = error.get("ctx") or {}
    got = error.get("input")
    if kind == "extra_forbidden":
        return _unknown_key_message(path)
    if kind == "missing":
        return "required, but missing"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        operator = {"greater_than_equal": ">=", "greater_than": ">"}.get(kind)
        operator = operator or {"less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(context.values()), "?")
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        return f"must be {operator} {bound} (got {_shown(got)})"
    if kind == "literal_error":
        expected = str(context.get("expected", "")).replace("'", "")
        return f"must be one of {expected} (got {_shown(got)})"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if kind in _MESSAGES:
        message = _MESSAGES[kind]
        if kind.startswith("bool") and isinstance(got, str):
            message += f" (got {got!r}: yes/no/on/off are text in ckptd's YAML)"
        elif kind.startswith("string") and isinstance(got, int | float | bool):
            message += f" (got {_shown(got)}: put quotes around it)"
        else:
            message += f" (got {_shown(got)})"
        return message
    return str(error["msg"])


# --- checks beyond single fields ---------------------------------------------------------------

# Folders that hold the operating system or everyone's files: pruning inside one would be a
# disaster even with perfect pattern matching, so they are refused outright. Deeper paths such
# as /var/lib/training are fine; /usr/* and /var/* themselves (/var/lib, /usr/local) are not.
SYSTEM_FOLDERS = frozenset(
    {
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/sys",
        "/tmp",
        "/usr",
        "/var",
    }
)
# Kernel filesystems: nothing at any depth below them is a checkpoint.
VIRTUAL_FOLDERS = ("/proc", "/sys", "/dev")
PLACEHOLDERS = ("step", "epoch")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def _home_folders() -> set[str]:
    homes = {os.path.normpath(os.path.expanduser("~"))}
    for entry in pwd.getpwall():
        # Real people (uid >= 1000) and root; system accounts have homes such as /var/lib/x.
        if entry.pw_uid == 0 or 1000 <= entry.pw_uid < 65534:
            homes.add(os.path.normpath(entry.pw_dir))
    return homes


def _is_within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _forms(path: str) -> set[str]:
    """Given an absolute path, return it normalized and with symlinks resolved."""
    return {os.path.normpath(path), os.path.realpath(path)}


def system_folder_reason(path: str) -> str | None:
    """Given an absolute root path, return why it must not be a root, or None if it may."""
    homes = _home_folders()
    for form in sorted(_forms(path)):
        if form in SYSTEM_FOLDERS:
            return f"{form} is a system folder; point the root at the training output folder"
        parent = os.path.dirname(form)
        if parent in ("/usr", "/var"):
            return f"{form} is a system folder; use a folder below it for checkpoints"
        # /dev/shm is a RAM disk some trainers save to first: folders inside it are fine.
        in_shared_memory = form.startswith("/dev/shm/")
        if not in_shared_memory and any(_is_within(form, v) for v in VIRTUAL_FOLDERS):
            return f"{form} is inside a kernel filesystem, not a place for checkpoints"
        if form in homes:
            return f"{form} is a home folder; point the root at the training output folder"
    return None


def pattern_problems(pattern: str) -> list[str]:
    """Given a custom checkpoint name pattern, return what is wrong with it (empty if fine)."""
    if not pattern.strip():
        return ["an empty pattern matches nothing"]
    problems = []
    names = _PLACEHOLDER.findall(pattern)
    if "{" in _PLACEHOLDER.sub("", pattern) or "}" in _PLACEHOLDER.sub("", pattern):
        problems.append("unbalanced { or } (placeholders are {step} and {epoch})")
    for name in dict.fromkeys(names):
        if name not in PLACEHOLDERS:
            close = difflib.get_close_matches(name, PLACEHOLDERS, n=1, cutoff=0.5)
            hint = f"did you mean {{{close[0]}}}?" if close else "use {step} or {epoch}"
            problems.append(f"unknown placeholder {{{name}}} ({hint})")
        elif names.count(name) > 1:
            problems.append(f"{{{name}}} appears more than once")
    if not set(names) & set(PLACEHOLDERS) and not any("placeholder" in p for p in problems):
        problems.append("needs {step} or {epoch}: checkpoints are ordered by them")
    if "/" in pattern:
        problems.append("a pattern names entries directly in the root; it cannot contain '/'")
    return problems


_ModelT = TypeVar("_ModelT", bound=BaseModel)


def _valid_or_none(model: type[_ModelT], raw: Any) -> _ModelT | None:
    """Given a model and raw data, return the validated model, or None if it has errors (those
    are reported by the full validation already)."""
    try:
        return model.model_validate({} if raw is None else raw)
    except ValidationError:
        return None


@dataclass
class _Findings:
    document: _Document
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def problem(self, path: Path, message: str) -> None:
        self.problems.append(Problem(self.document.line_of(path), path, message))

    def warning(self, path: Path, message: str) -> None:
        self.warnings.append(Problem(self.document.line_of(path), path, message))


def _mapping_at(data: Any, path: Path) -> Any:
    for part in path:
        if isinstance(part, int):
            if not isinstance(data, list) or part >= len(data):
                return None
        elif not isinstance(data, dict):
            return None
        data = data[part] if isinstance(part, int) else data.get(part)
    return data


def _check_absolute(findings: _Findings, path: Path, value: Any, what: str) -> str | None:
    if not isinstance(value, str):
        return None
    if not value.strip():
        findings.problem(path, f"{what} is empty")
        return None
    if "\x00" in value:
        findings.problem(path, f"{what} contains a NUL character")
        return None
    if not os.path.isabs(value):
        hint = " (~ is not expanded)" if value.startswith("~") else ""
        findings.problem(path, f"{what} must be an absolute path{hint} (got {value!r})")
        return None
    return value


def _check_roots(findings: _Findings, roots: list[Any]) -> list[tuple[Path, str]]:
    """Given the raw roots, report path and pattern problems; return the usable root paths."""
    usable: list[tuple[Path, str]] = []
    for index, raw in enumerate(roots):
        here: Path = ("roots", index)
        if not isinstance(raw, dict):
            continue
        path = _check_absolute(findings, (*here, "path"), raw.get("path"), "a root")
        if path is not None:
            reason = system_folder_reason(path)
            if reason is not None:
                findings.problem((*here, "path"), f"refused as a root: {reason}")
            elif os.path.exists(path) and not os.path.isdir(path):
                findings.problem((*here, "path"), f"{path} is a file, not a folder")
            else:
                usable.append((here, path))
        pattern = raw.get("pattern")
        if isinstance(pattern, str):
            for message in pattern_problems(pattern):
                findings.problem((*here, "pattern"), message)
        series = raw.get("series")
        if isinstance(series, list):
            if series and pattern is not None:
                findings.problem(
                    (*here, "series"),
                    "set either pattern (one series) or series (several), not both; "
                    "move the pattern into the series list",
                )
            seen: dict[str, int] = {}
            for number, item in enumerate(series):
                series_pattern = item.get("pattern") if isinstance(item, dict) else None
                if not isinstance(series_pattern, str):
                    continue
                where: Path = (*here, "series", number, "pattern")
                for message in pattern_problems(series_pattern):
                    findings.problem(where, message)
                if series_pattern in seen:
                    findings.problem(where, f"same pattern as series[{seen[series_pattern]}]")
                seen.setdefault(series_pattern, number)
        _check_globs(findings, (*here, "protect"), raw.get("protect"))
        trainer = raw.get("trainer")
        if isinstance(trainer, dict):
            _check_absolute(
                findings, (*here, "trainer", "pid_file"), trainer.get("pid_file"), "pid_file"
            )
    return usable


def _check_globs(findings: _Findings, path: Path, globs: Any) -> None:
    if isinstance(globs, list):
        for index, glob in enumerate(globs):
            if isinstance(glob, str) and not glob.strip():
                findings.problem((*path, index), "an empty glob matches nothing")


def _check_overlaps(findings: _Findings, roots: list[tuple[Path, str]]) -> None:
    for later, (here, path) in enumerate(roots):
        for there, other in roots[:later]:
            shown = f"{format_path(there)} {other} (line {findings.document.line_of(there)})"
            if _forms(path) & _forms(other):
                message = f"the same folder as {shown}"
            elif any(_is_within(a, b) for a in _forms(path) for b in _forms(other)):
                message = f"inside {shown}: a folder belongs to one root"
            elif any(_is_within(b, a) for a in _forms(path) for b in _forms(other)):
                message = f"contains {shown}: a folder belongs to one root"
            else:
                continue
            findings.problem((*here, "path"), message)


def _check_snapshots(findings: _Findings, raw: Any, roots: list[tuple[Path, str]]) -> None:
    # Read from the raw mapping, so a typo elsewhere in `snapshots:` does not hide these.
    snapshots = raw if isinstance(raw, dict) else {}
    if snapshots.get("enabled", True) is False:
        return
    _check_globs(findings, ("snapshots", "mutable"), snapshots.get("mutable"))
    if snapshots.get("dir") is None:
        if roots:
            findings.problem(
                ("snapshots",) if "snapshots" in findings.document.data else ("roots",),
                "snapshots are enabled (the default) but snapshots.dir is not set; "
                "set it, or snapshots.enabled: false",
            )
        return
    where: Path = ("snapshots", "dir")
    directory = _check_absolute(findings, where, snapshots.get("dir"), "snapshots.dir")
    if directory is None:
        return
    if os.path.exists(directory) and not os.path.isdir(directory):
        findings.problem(where, f"{directory} is a file, not a folder")
    for here, path in roots:
        shown = f"{format_path(here)} {path} (line {findings.document.line_of(here)})"
        if any(_is_within(a, b) for a in _forms(directory) for b in _forms(path)):
            findings.problem(where, f"inside {shown}: snapshots there would be pruned")
        elif any(_is_within(b, a) for a in _forms(directory) for b in _forms(path)):
            findings.problem(where, f"contains {shown}: keep snapshots and roots apart")


def _policy_locations(data: dict[str, Any]) -> Iterator[Path]:
    yield ("defaults", "policy")
    yield ("disk", "emergency")
    roots = data.get("roots")
    for index, root in enumerate(roots if isinstance(roots, list) else []):
        if not isinstance(root, dict):
            continue
        yield ("roots", index, "policy")
        series = root.get("series")
        for number in range(len(series) if isinstance(series, list) else 0):
            yield ("roots", index, "series", number, "policy")


def _check_policies(findings: _Findings, data: dict[str, Any]) -> None:
    for here in _policy_locations(data):
        raw = _mapping_at(data, here)
        if not isinstance(raw, dict):
            continue
        policy = _valid_or_none(PolicyConfig, raw)
        if policy is None:
            continue
        spec = policy.to_spec()
        cadence, interval = spec.cadence, spec.tier3_interval
        if cadence is not None and interval is not None and interval < 2 * cadence:
            where = (*here, "tier3_interval") if "tier3_interval" in raw else here
            findings.warning(
                where,
                f"tier 3 keeps one per {interval} steps, denser than tier 2's one per "
                f"{2 * cadence} (2 x cadence {cadence}); use tier3_interval >= {2 * cadence}",
            )
        if spec.keep_last == 1 and cadence is None and (spec.tier2_count or interval):
            # One tier-1 checkpoint shows no gap: the cadence then comes from the thinned older
            # ones, drifts as they are pruned, and each prune may delete a little more.
            findings.warning(
                (*here, "keep_last") if "keep_last" in raw else here,
                "keep_last: 1 cannot show the save cadence; set cadence: (steps between saves)",
            )


def _number(raw: Any, key: str, default: float) -> float | None:
    value = raw.get(key, default) if isinstance(raw, dict) else default
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _check_disk(findings: _Findings, raw: Any) -> None:
    warn = _number(raw, "warn_percent", DiskConfig.model_fields["warn_percent"].default)
    critical = _number(raw, "critical_percent", DiskConfig.model_fields["critical_percent"].default)
    if warn is not None and critical is not None and critical <= warn:
        where = "critical_percent" if "critical_percent" in (raw or {}) else "warn_percent"
        findings.problem(
            ("disk", where),
            f"critical_percent ({critical:g}) must be above warn_percent ({warn:g})",
        )


def _check_schedule(findings: _Findings, raw: Any) -> None:
    prune = _valid_or_none(PruneConfig, raw)
    if prune is None:
        return
    fields = prune.schedule.split()
    if len(fields) == 5 and re.search(r"\d", fields[4]):
        findings.warning(
            ("prune", "schedule"),
            "a numeric day of week is ambiguous (cron counts 0 as Sunday, ckptd's scheduler "
            "as Monday); write names such as sun or mon-fri",
        )


def _semantic_checks(document: _Document) -> _Findings:
    findings = _Findings(document)
    data: dict[str, Any] = document.data
    for key in ("state_dir", "history_file"):
        _check_absolute(findings, (key,), data.get(key), key)
    roots = data.get("roots")
    usable = _check_roots(findings, roots) if isinstance(roots, list) else []
    _check_overlaps(findings, usable)
    _check_snapshots(findings, data.get("snapshots"), usable)
    _check_policies(findings, data)
    _check_disk(findings, data.get("disk"))
    _check_schedule(findings, data.get("prune"))
    if not roots:
        findings.warning(("roots",), "no roots: `ckptd run` has nothing to look after")
    return findings


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
    "LogConfig",
    "PolicyConfig",
    "Problem",
    "PruneConfig",
    "RootConfig",
    "SeriesConfig",
    "Size",
    "SnapshotsConfig",
    "StrictYamlLoader",
    "TrainerConfig",
    "TrashConfig",
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
