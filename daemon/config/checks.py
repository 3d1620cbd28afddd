"""Checks beyond single fields: roots (not `/`, not a system folder, no overlaps), snapshot
folder, policies, disk thresholds, the prune schedule. Each finding carries its key path."""

from __future__ import annotations

import difflib
import os
import pwd
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ValidationError,
)

from daemon.config.models import DiskConfig, PolicyConfig, PruneConfig
from daemon.config.yaml_lines import Path, Problem, _Document, format_path
from daemon.storage.azure import KNOWN_OPTIONS as AZURE_OPTIONS
from daemon.storage.gcs import KNOWN_OPTIONS as GCS_OPTIONS
from daemon.storage.s3 import KNOWN_OPTIONS as S3_OPTIONS
from daemon.storage.url import StorageUrlError, is_remote
from daemon.storage.url import parse as parse_url

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
        raw_path = raw.get("path")
        if isinstance(raw_path, str) and is_remote(raw_path):
            _check_remote_root(findings, here, raw)
        else:
            _check_local_root(findings, here, raw, usable)
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


def _check_local_root(
    findings: _Findings, here: Path, raw: dict[str, Any], usable: list[tuple[Path, str]]
) -> None:
    """Given a root with a local path, report what makes it unusable, else add it to usable."""
    path = _check_absolute(findings, (*here, "path"), raw.get("path"), "a root")
    if path is not None:
        reason = system_folder_reason(path)
        if reason is not None:
            findings.problem((*here, "path"), f"refused as a root: {reason}")
        elif os.path.exists(path) and not os.path.isdir(path):
            findings.problem((*here, "path"), f"{path} is a file, not a folder")
        else:
            usable.append((here, path))
    if raw.get("storage_options"):
        findings.problem(
            (*here, "storage_options"), "only object-storage roots (s3://...) take storage_options"
        )


# The storage_options each implemented scheme knows (its fsspec package's names).
REMOTE_OPTIONS = {"s3": S3_OPTIONS, "gs": GCS_OPTIONS, "az": AZURE_OPTIONS}


def _check_remote_root(findings: _Findings, here: Path, raw: dict[str, Any]) -> None:
    """Given a root on object storage, report an address or storage_options that cannot work
    (option names only: their values may be secrets and are never shown)."""
    try:
        url = parse_url(raw["path"])
    except StorageUrlError as error:
        findings.problem((*here, "path"), str(error))
        return
    known = REMOTE_OPTIONS.get(url.scheme)
    if known is None:
        findings.problem(
            (*here, "path"),
            f"{url.scheme}:// roots are not implemented yet: only s3:// (AWS and S3-compatible"
            " servers such as MinIO or Ceph through storage_options.endpoint_url), gs:// and"
            " az://",
        )
        return
    if raw.get("watch") == "inotify":
        findings.problem((*here, "watch"), "object storage has no inotify: use poll (or auto)")
    options = raw.get("storage_options")
    if isinstance(options, dict):
        unknown = sorted(str(name) for name in options if name not in known)
        if unknown:
            findings.problem(
                (*here, "storage_options"),
                f"unknown option(s) {', '.join(unknown)}; {url.scheme}:// knows "
                + ", ".join(sorted(known)),
            )


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
