"""The pydantic models of every config key, and what they resolve to for one root.

`settings_for` and `policy_for` turn a root plus the defaults into typed values: the most
specific setting wins (series, then root, then `defaults`).
"""

from __future__ import annotations

import re
import shlex
import string
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from daemon.config.units import Duration, Size
from policies.model import PRESETS, KeepBest, PolicySpec, SlimSpec

# --- models ------------------------------------------------------------------------------------


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo must never silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KeepBestConfig(StrictModel):
    count: int = Field(default=1, ge=1)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"


class SlimConfig(StrictModel):
    """`slim:` of a policy: which kept checkpoints lose their resume state (issue 11)."""

    # tier1: tiers 2 and 3 keep weights only; tier2: tier 3 only; null: nothing is slimmed.
    after: Literal["tier1", "tier2"] | None = None
    keep_best_full: StrictBool = False
    # Globs of paths inside a checkpoint (`opt_state`, `mp_rank_*/distrib_optim.pt`) that are
    # its resume state, instead of the layout's own file names.
    drop: list[str] | None = None

    @field_validator("drop")
    @classmethod
    def _relative_globs(cls, value: list[str] | None) -> list[str] | None:
        for glob in value or ():
            parts = glob.split("/")
            if not glob or glob.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ValueError(
                    f"{glob!r}: give a path inside the checkpoint such as opt_state or "
                    "mp_rank_*/distrib_optim.pt (no leading /, no . or .. parts)"
                )
        return value

    def to_spec(self) -> SlimSpec | None:
        """Given this slim config, return the SlimSpec (None when `after` is null: off)."""
        if self.after is None:
            return None
        drop = tuple(self.drop) if self.drop is not None else None
        return SlimSpec(self.after, self.keep_best_full, drop)


class PolicyConfig(StrictModel):
    """A preset, optionally with individual knobs overriding it."""

    preset: Literal["balanced", "conservative", "aggressive"] = "balanced"
    keep_last: int | None = Field(default=None, ge=1)
    tier2_count: int | None = Field(default=None, ge=0)
    # Explicit null keeps nothing past tier 2; absent takes the preset's interval.
    tier3_interval: int | None = Field(default=None, gt=0)
    cadence: int | None = Field(default=None, ge=1)
    keep_best: KeepBestConfig | None = None
    slim: SlimConfig | None = None

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
            slim=self.slim.to_spec() if self.slim is not None else None,
        )


class TrashConfig(StrictModel):
    grace: Duration = 3600.0


class LeaseConfig(StrictModel):
    """`lease:` of a shared root: one pruner per root (issue 14, daemon/pruning/leasing.py).

    The holder renews every third of `duration`; another node takes over only `skew` after
    its expiry, so clocks that differ by less than `skew` never let two nodes prune at once.
    """

    duration: Duration = Field(default=300.0, gt=0)
    skew: Duration = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _duration_exceeds_twice_the_skew(self) -> LeaseConfig:
        if self.duration <= 2 * self.skew:
            raise ValueError(
                f"duration ({self.duration:g} s) must be more than twice the skew"
                f" ({self.skew:g} s): the holder acts only until `skew` before expiry"
            )
        return self


# `shared:` of a root: auto = shared when its mount is a network or cluster filesystem (NFS,
# Lustre, GPFS, Weka, CephFS, BeeGFS, GlusterFS, shared FUSE mounts); object storage always is.
Shared = Literal["auto"] | StrictBool


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
    # How often `watch: poll` lists the root (object-storage roots are always polled); None
    # inherits `defaults.poll_interval`.
    poll_interval: Duration | None = Field(default=None, gt=0)
    # For `s3://` roots: passed to the store in s3fs's spelling (endpoint_url, key, secret,
    # profile, ...). Holds secrets: never printed by a command, a log line or an error
    # (repr=False keeps it out of the model's repr too).
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    series: list[SeriesConfig] = Field(default_factory=list)
    # Per-root overrides of `defaults`; None inherits.
    settle_seconds: Duration | None = None
    abandoned_after: Duration | None = None
    min_keep: int | None = Field(default=None, ge=0)
    max_delete_fraction: float | None = Field(default=None, gt=0, le=1)
    trash: TrashConfig | None = None
    shared: Shared | None = None
    lease: LeaseConfig | None = None


class DefaultsConfig(StrictModel):
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    settle_seconds: Duration = 60.0
    # An incomplete save held by no process and quiet this long was cut off (a crash): it goes
    # to the trash, so the framework's resume starts from the newest complete checkpoint.
    abandoned_after: Duration = 3600.0
    min_keep: int = Field(default=3, ge=0)
    max_delete_fraction: float = Field(default=0.9, gt=0, le=1)
    trash: TrashConfig = Field(default_factory=TrashConfig)
    shared: Shared = "auto"
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    # How often a polled root (`watch: poll`, every object-storage root) is listed.
    poll_interval: Duration = Field(default=30.0, gt=0)


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
        return clock_time(value)


def clock_time(value: str) -> str:
    """Given a time of day as written (`3:00`, `03:00`), return it as `HH:MM`; raise ValueError
    for anything else."""
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


# The placeholders `verify.command` may use; each becomes one argument (no shell is involved).
VERIFY_PLACEHOLDERS = ("path", "root", "name", "step")


class VerifyConfig(StrictModel):
    """Integrity checks of each new checkpoint, and the user's own test of the newest one."""

    checks: StrictBool = True
    deep: StrictBool = True
    command: str | None = None
    at: str = "05:00"
    timeout: Duration = Field(default=3600.0, gt=0)

    @field_validator("at")
    @classmethod
    def _clock_time(cls, value: str) -> str:
        return clock_time(value)

    @field_validator("command")
    @classmethod
    def _command_splits(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            words = shlex.split(value)
        except ValueError as error:
            raise ValueError(f"not a command line: {error}") from None
        if not words:
            raise ValueError("an empty command")
        for word in words:
            for _, field, _, _ in string.Formatter().parse(word):
                if field is not None and field not in VERIFY_PLACEHOLDERS:
                    known = ", ".join("{" + name + "}" for name in VERIFY_PLACEHOLDERS)
                    raise ValueError(f"unknown placeholder {{{field}}}: use {known}")
        return value


_LISTEN = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})$"
)


def parse_listen(value: str) -> tuple[str, int]:
    """Given `metrics.listen` ("127.0.0.1:9337", "[::1]:9337", "localhost:9337"), return the
    host and port to bind; raise ValueError for anything else."""
    match = _LISTEN.match(value)
    port = int(match.group("port")) if match else 0
    if not match or not 1 <= port <= 65535:
        raise ValueError(
            f"{value!r} is not HOST:PORT such as 127.0.0.1:9337 or [::1]:9337 (port 1-65535)"
        )
    return match.group("v6") or match.group("host"), port


class MetricsConfig(StrictModel):
    """Prometheus metrics: an HTTP endpoint and/or a file for node_exporter; both off by default."""

    listen: str | None = None
    textfile: str | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

    @field_validator("textfile")
    @classmethod
    def _prom_file(cls, value: str | None) -> str | None:
        # node_exporter's textfile collector reads only *.prom files, and a relative path would
        # depend on the daemon's working folder.
        if value is not None and (not value.startswith("/") or not value.endswith(".prom")):
            raise ValueError(f"{value!r}: give an absolute path ending in .prom")
        return value


class CheckConfig(StrictModel):
    """The thresholds of `ckptd check` (the Nagios-style health check)."""

    max_prune_age: Duration = Field(default=8 * 86400.0, gt=0)
    max_refused_age: Duration = Field(default=3600.0, gt=0)
    snapshot_grace: Duration = Field(default=2 * 3600.0, ge=0)


class LogConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = "auto"


class Config(StrictModel):
    timezone: str | None = None
    # This machine's name in a shared root's lease (default: its hostname); two daemons that
    # share storage must have different names.
    node_name: str | None = Field(default=None, min_length=1, max_length=200)
    state_dir: str = "/var/lib/ckptd"
    history_file: str | None = None  # default: <state_dir>/history.jsonl
    log: LogConfig = Field(default_factory=LogConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    roots: list[RootConfig] = Field(default_factory=list)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    snapshots: SnapshotsConfig = Field(default_factory=SnapshotsConfig)
    disk: DiskConfig = Field(default_factory=DiskConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)

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


@dataclass(frozen=True, slots=True)
class RootSettings:
    """One root's effective safety and trash settings (the root's own, else `defaults`)."""

    settle_seconds: float
    min_keep: int
    max_delete_fraction: float
    trash_grace: float
    abandoned_after: float = 3600.0
    poll_interval: float = 30.0


def settings_for(config: Config, root: RootConfig) -> RootSettings:
    """Given the config and one of its roots, return that root's effective settings."""
    defaults = config.defaults
    return RootSettings(
        settle_seconds=_first(root.settle_seconds, defaults.settle_seconds),
        min_keep=_first(root.min_keep, defaults.min_keep),
        max_delete_fraction=_first(root.max_delete_fraction, defaults.max_delete_fraction),
        trash_grace=(root.trash or defaults.trash).grace,
        abandoned_after=_first(root.abandoned_after, defaults.abandoned_after),
        poll_interval=_first(root.poll_interval, defaults.poll_interval),
    )


_T = TypeVar("_T")


def _first(own: _T | None, default: _T) -> _T:
    """Given a root's own setting and the default, return the one that applies."""
    return default if own is None else own


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
