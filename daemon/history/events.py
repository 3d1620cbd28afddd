"""Every kind of record the cleanup history holds: one frozen dataclass per event.

The history file is a contract (people `tail -F` it, scripts parse it): each class knows the
`event` name written on disk and `fields()` gives the record's fields in the order they are
written, with the same names and value formats the writers used before these classes existed
(tests/history_golden.py holds a golden line of each). A field listed in `optional` is left out
of the record when it is None (those records have always come in more than one shape); any
other None is written as `null`.

Written by `daemon.pruning`: `delete`, `slim`, `veto`, `prune_refused`, `prune_run`, `trash_purge`;
by `ckptd trash restore`: `trash_restore`; by `daemon.snapshots.daily`: `snapshot`,
`snapshot_removed`, `snapshot_skipped`, `snapshot_failed`; by `daemon.disk.pressure`:
`disk_warn`, `disk_critical`, `disk_trash_emptied`, `disk_prune`, `emergency_prune`,
`disk_recovered`, `alert`; by `daemon.verification`: `integrity_corrupt`, `user_test`,
`hold_expired` (and `alert` for a corrupt checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar


def _plain(value: object) -> object:
    """Given a field's value, return it as the writers passed it: tuples as lists, mappings as
    dicts (json writes both the same; readers of the fields in memory compare with lists)."""
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class HistoryEvent:
    """Given one thing that happened, the history record that says so (subclasses: one each)."""

    event: ClassVar[str] = ""
    # Fields left out of the record when None (not written as null).
    optional: ClassVar[frozenset[str]] = frozenset()

    def fields(self) -> dict[str, object]:
        """Given the event, return its record's fields after `time` and `event`, in order."""
        record: dict[str, object] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in self.optional:
                continue
            record[field.name] = _plain(value)
        return record


# --- pruning --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Delete(HistoryEvent):
    """A checkpoint deleted: removed (`bytes_freed`), or in the trash for its grace
    (`bytes_in_trash`), or partly removed (`partial`, with the first `errors`)."""

    event: ClassVar[str] = "delete"
    root: str
    checkpoint: str
    step: int
    series: str
    bytes_freed: int
    bytes_in_trash: int
    trash_grace: float
    partial: bool
    errors: tuple[str, ...]
    why: tuple[str, ...]
    tier: int | None
    policy: Mapping[str, object]
    # Added with issue 10: `bytes_freed` is what the filesystem got back (allocated blocks);
    # this is the files' logical size (a sparse file's length), shown apart.
    bytes_logical: int = 0


@dataclass(frozen=True, kw_only=True)
class Slim(HistoryEvent):
    """A checkpoint slimmed (issue 11): its resume state (`files`, paths inside it) moved into
    the trash as one item, its weights kept. `bytes_freed` are allocated bytes really freed
    (0 while the trash's grace keeps them: then `bytes_in_trash`); `partial` with `errors`
    when the item could not be removed whole (its remains stay in the trash)."""

    event: ClassVar[str] = "slim"
    root: str
    checkpoint: str
    step: int
    series: str
    files: tuple[str, ...]
    bytes_freed: int
    bytes_in_trash: int
    trash_grace: float
    partial: bool
    errors: tuple[str, ...]
    why: tuple[str, ...]
    tier: int | None
    policy: Mapping[str, object]


@dataclass(frozen=True, kw_only=True)
class Veto(HistoryEvent):
    """A deletion vetoed: by the safety guard (its reasons), or at the last moment by a process
    holding the checkpoint (`pid` and `cmdline` of that process)."""

    event: ClassVar[str] = "veto"
    optional: ClassVar[frozenset[str]] = frozenset({"pid", "cmdline"})
    root: str
    checkpoint: str
    step: int
    reason: str
    pid: int | None = None
    cmdline: str | None = None


@dataclass(frozen=True, kw_only=True)
class PruneRefused(HistoryEvent):
    """A whole root refused for this run, with the processes involved. `dry_run` is None (left
    out) when the run never got as far as planning (another prune held the root, or another
    node the root's lease: then `holder_host`, `holder_pid` and `lease_expires` name it)."""

    event: ClassVar[str] = "prune_refused"
    optional: ClassVar[frozenset[str]] = frozenset(
        {"dry_run", "holder_host", "holder_pid", "lease_expires"}
    )
    root: str
    reason: str
    pids: tuple[int, ...]
    cmdlines: tuple[str, ...]
    dry_run: bool | None = None
    # A shared root whose lease another node holds (issue 14): that node's name, its PID
    # (on that node) and when its lease expires (UTC ISO). Left out for every other refusal.
    holder_host: str | None = None
    holder_pid: int | None = None
    lease_expires: str | None = None


@dataclass(frozen=True, kw_only=True)
class PruneRun(HistoryEvent):
    """One prune of one root, counted: the last record of every run that was not refused and
    did something. `quiet_runs`: the runs of this root since the last record that did nothing
    and wrote none (left out when there were none)."""

    event: ClassVar[str] = "prune_run"
    # `slimmed`, `bytes_slimmed` only in runs that slimmed (or would slim) anything: other runs
    # keep their earlier shape.
    optional: ClassVar[frozenset[str]] = frozenset({"quiet_runs", "slimmed", "bytes_slimmed"})
    root: str
    dry_run: bool
    checkpoints: int
    kept: int
    deleted: int
    would_delete: int
    vetoed: int
    failed: int
    trashed: int
    bytes_freed: int
    bytes_in_trash: int
    seconds: float
    force: bool
    policy: Mapping[str, object]
    quiet_runs: int | None = None
    bytes_logical: int = 0  # the logical size of what `bytes_freed` (allocated) counts
    slimmed: int | None = None  # checkpoints slimmed (issue 11), or that a dry run would slim
    bytes_slimmed: int | None = None  # allocated bytes the slims freed (not in bytes_freed)


@dataclass(frozen=True, kw_only=True)
class TrashPurge(HistoryEvent):
    """A trash item removed (its grace over, or the trash emptied)."""

    event: ClassVar[str] = "trash_purge"
    root: str
    checkpoint: str
    bytes_freed: int
    deleted_at: float
    partial: bool
    errors: tuple[str, ...]
    bytes_logical: int = 0  # the logical size of what `bytes_freed` (allocated) counts


@dataclass(frozen=True, kw_only=True)
class TrashRestore(HistoryEvent):
    """A checkpoint renamed back from the trash into its root (`ckptd trash restore`)."""

    event: ClassVar[str] = "trash_restore"
    root: str
    checkpoint: str


# --- snapshots ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SnapshotTaken(HistoryEvent):
    """The daily snapshot of `date`, taken."""

    event: ClassVar[str] = "snapshot"
    date: str
    path: str
    method: str
    checkpoints: tuple[str, ...]
    files: int
    bytes: int
    bytes_written: int
    by_method: Mapping[str, int]
    seconds: float


@dataclass(frozen=True, kw_only=True)
class SnapshotRemoved(HistoryEvent):
    """An old snapshot removed to keep `keep` of them."""

    event: ClassVar[str] = "snapshot_removed"
    date: str
    removed: str
    keep: int


@dataclass(frozen=True, kw_only=True)
class SnapshotSkipped(HistoryEvent):
    """The daily snapshot not started, and why."""

    event: ClassVar[str] = "snapshot_skipped"
    optional: ClassVar[frozenset[str]] = frozenset({"errors", "bytes_to_write", "checkpoints"})
    date: str
    reason: str
    errors: tuple[str, ...] | None = None
    bytes_to_write: int | None = None
    checkpoints: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class SnapshotFailed(HistoryEvent):
    """The daily snapshot abandoned (or its old snapshots not removed), and why."""

    event: ClassVar[str] = "snapshot_failed"
    optional: ClassVar[frozenset[str]] = frozenset({"method", "checkpoints"})
    date: str
    reason: str
    method: str | None = None
    checkpoints: tuple[str, ...] | None = None


# --- the disk check -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DiskWarn(HistoryEvent):
    """A filesystem above `warn_percent` (on crossing, then hourly)."""

    event: ClassVar[str] = "disk_warn"
    mount: str
    roots: tuple[str, ...]
    used_percent: float
    free_bytes: int
    warn_percent: float


@dataclass(frozen=True, kw_only=True)
class DiskCritical(HistoryEvent):
    """A filesystem above `critical_percent` or under `min_free`: the escalation starts."""

    event: ClassVar[str] = "disk_critical"
    mount: str
    roots: tuple[str, ...]
    used_percent: float
    free_bytes: int
    critical_percent: float
    min_free: int | None


@dataclass(frozen=True, kw_only=True)
class EmptiedTrash:
    """What emptying one root's trash freed (None when not known)."""

    trash_bytes_freed: int | None

    def fields(self) -> dict[str, object]:
        return {"trash_bytes_freed": self.trash_bytes_freed}


@dataclass(frozen=True, kw_only=True)
class Pruned:
    """What one escalation prune of a root did, its trash emptied after it."""

    deleted: int
    bytes_freed: int
    trash_bytes_freed: int | None
    refused: str | None
    vetoed: int

    def fields(self) -> dict[str, object]:
        return {
            "deleted": self.deleted,
            "bytes_freed": self.bytes_freed,
            "trash_bytes_freed": self.trash_bytes_freed,
            "refused": self.refused,
            "vetoed": self.vetoed,
        }


@dataclass(frozen=True, kw_only=True)
class StepFailed:
    """An escalation step that raised on one root (the other roots still get theirs)."""

    error: str

    def fields(self) -> dict[str, object]:
        return {"error": self.error}


StepOutcome = EmptiedTrash | Pruned | StepFailed


@dataclass(frozen=True, kw_only=True)
class EscalationStep(HistoryEvent):
    """One escalation step on one root: its outcome, and the filesystem's use after it."""

    mount: str
    root: str
    outcome: StepOutcome
    used_percent: float
    free_bytes: int

    def fields(self) -> dict[str, object]:
        return {
            "mount": self.mount,
            "root": self.root,
            **self.outcome.fields(),
            "used_percent": self.used_percent,
            "free_bytes": self.free_bytes,
        }


@dataclass(frozen=True, kw_only=True)
class DiskTrashEmptied(EscalationStep):
    """Escalation step 1: the root's trash emptied, grace or not."""

    event: ClassVar[str] = "disk_trash_emptied"


@dataclass(frozen=True, kw_only=True)
class DiskPrune(EscalationStep):
    """Escalation step 2: the root pruned now with its own policy."""

    event: ClassVar[str] = "disk_prune"


@dataclass(frozen=True, kw_only=True)
class EmergencyPrune(EscalationStep):
    """Escalation step 3: the root pruned with the `emergency` policy."""

    event: ClassVar[str] = "emergency_prune"


@dataclass(frozen=True, kw_only=True)
class DiskRecovered(HistoryEvent):
    """A critical filesystem back below the limits after the escalation."""

    event: ClassVar[str] = "disk_recovered"
    mount: str
    used_percent: float
    free_bytes: int


@dataclass(frozen=True, kw_only=True)
class Alert(HistoryEvent):
    """The `alert` command run: its exit code and the end of its stderr, or why it could not
    run (`error`)."""

    event: ClassVar[str] = "alert"
    optional: ClassVar[frozenset[str]] = frozenset({"exit_code", "stderr", "error"})
    mount: str
    command: str
    level: str
    exit_code: int | None = None
    stderr: str | None = None
    error: str | None = None


# --- integrity and holds --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IntegrityCorrupt(HistoryEvent):
    """A checkpoint found corrupt by an integrity check (`deep`: every checksum was read), with
    what is wrong, each naming its file."""

    event: ClassVar[str] = "integrity_corrupt"
    root: str
    checkpoint: str
    problems: tuple[str, ...]
    deep: bool


@dataclass(frozen=True, kw_only=True)
class UserTest(HistoryEvent):
    """The user's own test (`verify.command`) run on a checkpoint: `verified` (exit 0) or
    `failed`, its exit code (null when it timed out or could not start: `error` says why) and
    its last lines of output."""

    event: ClassVar[str] = "user_test"
    root: str
    checkpoint: str
    command: tuple[str, ...]
    verdict: str
    exit_code: int | None
    seconds: float
    last_lines: tuple[str, ...]
    error: str | None


@dataclass(frozen=True, kw_only=True)
class HoldExpired(HistoryEvent):
    """An expired hold removed by a prune (`Hold.to_record()`: who held which checkpoint until
    when, and why)."""

    event: ClassVar[str] = "hold_expired"
    root: str
    checkpoint: str
    holder: str
    until: str
    reason: str


# Every event class by the name it is written under (a test checks each against its golden).
EVENTS: dict[str, type[HistoryEvent]] = {
    kind.event: kind
    for kind in (
        Delete,
        Slim,
        Veto,
        PruneRefused,
        PruneRun,
        TrashPurge,
        TrashRestore,
        SnapshotTaken,
        SnapshotRemoved,
        SnapshotSkipped,
        SnapshotFailed,
        DiskWarn,
        DiskCritical,
        DiskTrashEmptied,
        DiskPrune,
        EmergencyPrune,
        DiskRecovered,
        Alert,
        IntegrityCorrupt,
        UserTest,
        HoldExpired,
    )
}
