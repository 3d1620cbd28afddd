"""What ckptd knows about a checkpoint's soundness, and what a prune does with it (issue 12).

A checkpoint's *verdict* combines two sources, each valid only while the checkpoint's signature
(every entry's path, kind, size and mtime: `daemon/integrity/result.py`) is unchanged:

- the integrity check of its formats (`daemon/integrity/`), remembered in
  `<state_dir>/integrity-cache.json`;
- the user's own test (`verify.command`, `daemon/usertest.py`), remembered in
  `<state_dir>/user-tests.json`.

A verdict is `corrupt` when the check found a problem or the user's test failed (the problem
wins over a passed test: a test that loads the weights says nothing about a truncated
optimizer state), `passed` when the check said ok or the user's test passed, else `unchecked`.

`assess` decides which checkpoints of a root to look at, so a plan stays cheap: per series,
the complete checkpoints from the newest down to the first one that passed (that one is the
last good checkpoint), stopping early after `UNKNOWN_RUN` unchecked ones in a row (a format
ckptd cannot check: looking further finds nothing either); every checkpoint with a remembered
corrupt verdict (checked again for its signature: a few walks); and, for the prune
(`check_new`), every complete checkpoint the cache has never seen, so each new checkpoint is
checked once after it completes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any, Final, Literal

from daemon.alerts import run_alert_command
from daemon.config import Config
from daemon.history.events import HoldExpired, IntegrityCorrupt
from daemon.history.log import History
from daemon.holds import expire_holds
from daemon.integrity.cache import IntegrityCache
from daemon.integrity.check import check_checkpoint, signature_of
from daemon.integrity.result import IntegrityResult, Signature
from daemon.jsonfile import RecordsByRoot
from policies.model import Checkpoint

VerdictStatus = Literal["passed", "corrupt", "unchecked"]
PASSED: Final = "passed"
CORRUPT: Final = "corrupt"
UNCHECKED: Final = "unchecked"

# Unchecked checkpoints in a row after which the walk down a series stops.
UNKNOWN_RUN: Final = 3
USER_TESTS_FILE: Final = "user-tests.json"
ALERT_TIMEOUT: Final = 60.0
_VERSION: Final = 1


# --- verdicts -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserTestRecord:
    """The user's test of one checkpoint: `verified` or `failed` (an `error`, a command that
    could not start, is no verdict and is not remembered), for the signature `digest`."""

    digest: str
    verdict: Literal["verified", "failed"]
    exit_code: int | None
    last_lines: tuple[str, ...]
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "last_lines": list(self.last_lines),
            "at": self.at,
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> UserTestRecord:
        """Given a dict written by `to_json`, return it (KeyError/TypeError/ValueError if not)."""
        verdict = document["verdict"]
        if verdict not in ("verified", "failed"):
            raise ValueError(f"verdict {verdict!r}")
        code = document["exit_code"]
        return cls(
            digest=str(document["digest"]),
            verdict=verdict,
            exit_code=None if code is None else int(code),
            last_lines=tuple(str(line) for line in document["last_lines"]),
            at=float(document["at"]),
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    """Given what the integrity check and the user's test said about one checkpoint, its
    verdict: `passed`, `corrupt` (with the problems, each naming its file) or `unchecked`."""

    status: VerdictStatus
    integrity: str | None = None  # the check's ok / corrupt / unknown; None: not checked
    test: str | None = None  # the user's test: verified / failed; None: not tested
    problems: tuple[str, ...] = ()
    deep: bool = False

    @property
    def first_problem(self) -> str:
        return self.problems[0] if self.problems else ""


def combine(result: IntegrityResult | None, test: UserTestRecord | None) -> Verdict:
    """Given a checkpoint's integrity result and user test (either may be None), return its
    verdict: any problem or a failed test is corrupt; an ok check or a passed test passes."""
    integrity = result.status if result is not None else None
    tested = test.verdict if test is not None else None
    problems = list(result.problems) if result is not None else []
    if test is not None and test.verdict == "failed":
        code = "timed out" if test.exit_code is None else f"exit {test.exit_code}"
        problems.append(f"the user's test failed ({code})")
    status: VerdictStatus = UNCHECKED
    if problems:
        status = CORRUPT
    elif integrity == "ok" or tested == "verified":
        status = PASSED
    deep = result.deep if result is not None else False
    return Verdict(status, integrity, tested, tuple(problems), deep)


# --- the user's test results on disk ------------------------------------------------------------


class UserTestStore(RecordsByRoot[UserTestRecord]):
    """Given an optional file path: the user's test verdicts by (root, checkpoint), each for
    the signature digest it was run on. Thread-safe; written like the integrity cache."""

    VERSION = _VERSION

    def __init__(self, path: str | None = None) -> None:
        super().__init__(path)
        if path is not None:
            self._load(path)

    def lookup(self, root: str, name: str, digest: str) -> UserTestRecord | None:
        """Given a checkpoint and its signature digest now, return the test run on exactly
        that content, else None."""
        with self._lock:
            record = self._roots.get(root, {}).get(name)
        return record if record is not None and record.digest == digest else None

    def store(self, root: str, name: str, record: UserTestRecord) -> None:
        with self._lock:
            self._roots.setdefault(root, {})[name] = record
            self._dirty = True

    def failures(self, root: str) -> set[str]:
        """Given a root, return the checkpoints with a remembered failed test (any signature)."""
        with self._lock:
            entries = self._roots.get(root, {})
            return {name for name, record in entries.items() if record.verdict == "failed"}

    def retain(self, root: str, names: Collection[str]) -> None:
        """Given a root and the names of its checkpoints now, forget every other one."""
        keep = set(names)
        with self._lock:
            entries = self._roots.get(root, {})
            for name in [name for name in entries if name not in keep]:
                del entries[name]
                self._dirty = True

    def _load(self, path: str) -> None:
        try:
            with open(path, "rb") as handle:
                document = json.loads(handle.read())
            if document.get("version") != _VERSION:
                return
            for root, entries in document["roots"].items():
                self._roots[str(root)] = {
                    str(name): UserTestRecord.from_json(entry) for name, entry in entries.items()
                }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._roots = {}  # unreadable or from another version: test again


@dataclass
class VerificationState:
    """The integrity cache and the user's test results, kept together in one folder (or in
    memory only, with `folder` None). With `create` False, `save` writes only into a folder
    that exists already (the daemon's state_dir, which the daemon makes)."""

    cache: IntegrityCache = field(default_factory=IntegrityCache)
    tests: UserTestStore = field(default_factory=UserTestStore)
    folder: str | None = None
    create: bool = False

    @classmethod
    def in_folder(cls, folder: str, *, create: bool = False) -> VerificationState:
        """Given a state folder, return the state remembered there (empty when nothing is)."""
        return cls(
            IntegrityCache.in_state_dir(folder),
            UserTestStore(os.path.join(folder, USER_TESTS_FILE)),
            folder,
            create,
        )

    @classmethod
    def sharing(cls, folder: str, cache: IntegrityCache) -> VerificationState:
        """Given a state folder and an integrity cache kept in memory for it (the daemon's,
        shared with its deep pass), return the state with the user's tests read afresh."""
        return cls(cache, UserTestStore(os.path.join(folder, USER_TESTS_FILE)), folder)

    def retain(self, root: str, names: Collection[str]) -> None:
        """Given a root and its checkpoints now, forget what is remembered of any other."""
        self.cache.retain(root, names)
        self.tests.retain(root, names)

    def save(self, *, tests: bool = True) -> None:
        """Write both files if they changed (silently not, where the folder is not writable).
        `tests` False leaves the user's test results alone: a prune only reads them, and must
        not write back a copy older than a test that finished meanwhile."""
        if self.folder is not None and not self.create and not os.path.isdir(self.folder):
            return
        self.cache.save()
        if tests:
            self.tests.save()


# --- assessing a root ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Assessment:
    """Given the checkpoints of a root looked at: their verdicts by name, and the integrity
    results computed now (`fresh`, not remembered before: the history records those)."""

    verdicts: Mapping[str, Verdict] = field(default_factory=dict)
    fresh: tuple[IntegrityResult, ...] = ()

    def corrupt(self) -> dict[str, Verdict]:
        """Return the corrupt checkpoints' verdicts by name."""
        return {name: v for name, v in self.verdicts.items() if v.status == CORRUPT}

    def status_of(self, name: str) -> VerdictStatus:
        verdict = self.verdicts.get(name)
        return verdict.status if verdict is not None else UNCHECKED


class _Assessor:
    """One assessment of one root: looks each checkpoint up once."""

    def __init__(self, root: str, state: VerificationState) -> None:
        self.root = root
        self.state = state
        self.verdicts: dict[str, Verdict] = {}
        self.fresh: list[IntegrityResult] = []

    def look(self, checkpoint: Checkpoint) -> Verdict:
        """Given a checkpoint, return its verdict: remembered for its signature, else checked
        now (cheaply) and remembered."""
        found = self.verdicts.get(checkpoint.name)
        if found is not None:
            return found
        signature = signature_of(self.root, checkpoint.name, checkpoint.layout)
        result = self.state.cache.lookup(self.root, checkpoint.name, signature)
        if result is None:
            result = check_checkpoint(self.root, checkpoint.name, checkpoint.layout)
            self.state.cache.store(self.root, result)
            self.fresh.append(result)
        test = self._test_of(checkpoint.name, signature)
        verdict = combine(result, test)
        self.verdicts[checkpoint.name] = verdict
        return verdict

    def _test_of(self, name: str, signature: Signature) -> UserTestRecord | None:
        if not signature.entries:
            return None
        return self.state.tests.lookup(self.root, name, signature.digest)


def assess(
    root: str,
    checkpoints: Sequence[Checkpoint],
    state: VerificationState,
    *,
    check_new: bool = False,
) -> Assessment:
    """Given a root (its real path), its checkpoints as scanned and the remembered state,
    return the verdicts of the checkpoints that matter (see the module's docstring); with
    `check_new`, every complete checkpoint never checked before is checked too."""
    assessor = _Assessor(root, state)
    complete = [checkpoint for checkpoint in checkpoints if checkpoint.complete]
    remembered = state.cache.results(root)
    if check_new:
        for checkpoint in complete:
            if checkpoint.name not in remembered:
                assessor.look(checkpoint)
    for series in _newest_first_by_series(complete):
        _walk_down(assessor, series)
    suspects = {name for name, cached in remembered.items() if cached.status == CORRUPT}
    suspects |= state.tests.failures(root)
    for checkpoint in complete:
        if checkpoint.name in suspects:
            assessor.look(checkpoint)
    return Assessment(dict(assessor.verdicts), tuple(assessor.fresh))


def _newest_first_by_series(checkpoints: Iterable[Checkpoint]) -> list[list[Checkpoint]]:
    groups: dict[str, list[Checkpoint]] = {}
    for checkpoint in checkpoints:
        groups.setdefault(checkpoint.series, []).append(checkpoint)
    return [
        sorted(group, key=lambda c: (c.step, c.name), reverse=True)
        for _, group in sorted(groups.items())
    ]


def _walk_down(assessor: _Assessor, newest_first: list[Checkpoint]) -> None:
    unknown_run = 0
    for checkpoint in newest_first:
        status = assessor.look(checkpoint).status
        if status == PASSED:
            return
        unknown_run = unknown_run + 1 if status == UNCHECKED else 0
        if unknown_run >= UNKNOWN_RUN:
            return


# --- what the plan makes of it ------------------------------------------------------------------


def corrupt_reason(verdict: Verdict) -> str:
    """Given a corrupt verdict, return the checkpoint's `incomplete_reason`."""
    return f"corrupt: {verdict.first_problem}"


def is_marked_corrupt(checkpoint: Checkpoint) -> bool:
    """Given a checkpoint from a planned scan, return whether the planner marked it corrupt."""
    return not checkpoint.complete and (checkpoint.incomplete_reason or "").startswith("corrupt: ")


def last_good_protection(
    checkpoints: Sequence[Checkpoint], assessment: Assessment
) -> frozenset[str]:
    """Given a root's checkpoints (corrupt ones marked incomplete) and its assessment, return
    the checkpoints to keep as `last-good`: per series, the newest that passed, when some newer
    one of the series is corrupt or complete but not passed (a save in progress does not
    count: the newest complete checkpoint is kept by the policy anyway). A slimmed checkpoint is
    never the last good one: it cannot resume."""
    protected: set[str] = set()
    for series in _newest_first_by_series(checkpoints):
        newer_doubtful = False
        for checkpoint in series:
            if checkpoint.slimmed:
                # Weights only (issue 11): a resume from it starts a fresh optimizer.
                continue
            status = assessment.status_of(checkpoint.name)
            if status == PASSED:
                if newer_doubtful:
                    protected.add(checkpoint.name)
                break
            if status == CORRUPT or checkpoint.complete:
                newer_doubtful = True
    return frozenset(protected)


def newest_sound(checkpoints: Sequence[Checkpoint], series: str | None = None) -> Checkpoint | None:
    """Given a planned scan's checkpoints (corrupt ones marked incomplete), return the newest
    complete one that was not slimmed (a resume needs its optimizer state): per series the
    highest step, then the most recently written of those (or of `series` only). None when
    there is none."""
    newest: dict[str, Checkpoint] = {}
    for checkpoint in checkpoints:
        if not checkpoint.complete or checkpoint.slimmed:
            continue
        if series is not None and checkpoint.series != series:
            continue
        current = newest.get(checkpoint.series)
        if current is None or (checkpoint.step, checkpoint.name) > (current.step, current.name):
            newest[checkpoint.series] = checkpoint
    if not newest:
        return None
    return max(newest.values(), key=lambda c: (c.mtime, c.step, c.name))


# --- recording ----------------------------------------------------------------------------------


def record_corrupt(
    config: Config, root: str, results: Iterable[IntegrityResult], history: History
) -> list[IntegrityCorrupt]:
    """Given integrity results checked now, record each corrupt one (`integrity_corrupt`) and
    run the `alert` command for it; return the events recorded."""
    events = []
    for result in results:
        if result.status != CORRUPT:
            continue
        event = IntegrityCorrupt(
            root=root, checkpoint=result.checkpoint, problems=result.problems, deep=result.deep
        )
        history.record(event)
        events.append(event)
        run_corrupt_alert(config, root, result.checkpoint, result.problems, history)
    return events


def run_corrupt_alert(
    config: Config,
    root: str,
    checkpoint: str,
    problems: Sequence[str],
    history: History,
    *,
    timeout: float = ALERT_TIMEOUT,
) -> int | None:
    """Given a corrupt checkpoint, run the `alert` command (no shell; `CKPTD_LEVEL=corrupt`,
    the root, checkpoint, its path and the problems in its environment), record an `alert`
    record and return its exit code (None when there is no command, or it could not run)."""
    command = config.disk.alert
    if not command:
        return None
    mount = _mount_of(root)
    variables = {
        "CKPTD_LEVEL": "corrupt",
        "CKPTD_ROOT": root,
        "CKPTD_ROOTS": root,
        "CKPTD_CHECKPOINT": checkpoint,
        "CKPTD_PATH": os.path.join(root, checkpoint),
        "CKPTD_PROBLEMS": "\n".join(problems),
        "CKPTD_MOUNT": mount,
    }
    return run_alert_command(
        command, variables, mount=mount, level="corrupt", history=history, timeout=timeout
    )


def _mount_of(root: str) -> str:
    from daemon.disk.mounts import mount_point  # only when an alert runs: `ckptd plan` stays quick

    try:
        return mount_point(root)
    except OSError:
        return root


def expire_and_record(
    root: str, *, now: float, tz: tzinfo | None, history: History, opened: int | None = None
) -> tuple[HoldExpired, ...]:
    """Given a root (its path for the records; `opened`, the prune's descriptor of it, when
    there is one: nothing is then opened by path) and the time, remove its expired holds and
    record each (`hold_expired`); return the records."""
    expired = expire_holds(root if opened is None else opened, now=now, tz=tz)
    events = tuple(HoldExpired(root=root, **hold.to_record()) for hold in expired.removed)
    for event in events:
        history.record(event)
    return events
