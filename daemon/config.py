"""The config file: pydantic models of every key, and resolution into per-root settings.

`load_config(path)` is the one way in: it parses the YAML, validates it and returns a `Config`,
or raises `ConfigError` carrying *every* problem as `file:line field.path: message`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

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
    on_new_checkpoint: bool = True


class SnapshotsConfig(StrictModel):
    enabled: bool = True
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
    interval: Duration = 300.0
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


def load_config(path: str) -> Config:
    """Given a YAML file path, return the validated Config or raise ConfigError with every problem.

    Filled in by the config work: duplicate keys, YAML 1.1 traps, file:line for every error.
    """
    raise NotImplementedError
