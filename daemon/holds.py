"""Holds: "keep this checkpoint until T", placed by a person or a process, several per checkpoint.

A hold keeps one checkpoint of a root from being deleted (or slimmed) until its expiry; an eval
sweep, a colleague comparing runs or a release script each place their own. Each hold is one
small JSON file, so any process can place one by hand without ckptd:

    <root>/.ckptd-holds/<checkpoint name>/<holder>.json

    {"until": "2026-12-24T00:00:00+01:00", "reason": "eval sweep v3"}

- `<checkpoint name>` is the checkpoint's name as `ckptd plan` shows it (a root entry such as
  `checkpoint-5000` or `model_1200.pt`, or a TensorFlow prefix such as `ckpt-12`);
- `<holder>` names who holds it (`eval-sweep`, `alice`): letters, digits and `._@+-`, starting
  with a letter or digit, at most 64 characters. One file per holder: holders never write the
  same file, so no locking is needed; a holder placing its hold again replaces its own (to
  extend or shorten it);
- `until` (required) is an ISO 8601 time; with an offset (`+01:00`, `Z`) it is exact, without
  one it is read in the daemon's configured time zone. `reason` (optional) is free text.
  ckptd also writes `holder`, `placed` (when) and `given` (the expiry in the holder's own words,
  `6h` or `2026-12-24T00:00`); other keys are kept and ignored.

Write a hold atomically, as ckptd does: write a temporary file whose name starts with `.` in the
same folder, then `mv` it onto `<holder>.json` (readers ignore names starting with `.` and names
not ending in `.json`):

    d=/data/run/.ckptd-holds/checkpoint-5000 && mkdir -p "$d"
    printf '{"until": "2026-12-24T00:00:00+01:00", "reason": "eval"}\\n' > "$d/.eval.json.tmp"
    mv "$d/.eval.json.tmp" "$d/eval.json"

Release a hold by deleting its file (`ckptd release` also removes the folder once empty).

What ckptd does with them: an active hold keeps its checkpoint (reason `held:<holder> until
<time>` in `plan`); a hold file that cannot be parsed also keeps it (reason `held:<holder>
(unreadable hold: ...)`) and is reported, so a typo never costs a checkpoint; an expired hold is
removed by the next prune, which records it. Removal of an expired hold is safe against its
holder renewing it at that moment: the file is renamed aside, read again, and put back if it
turned out to be live.

Every path is opened relative to directory descriptors without following symlinks: the holds
folder, a checkpoint's folder in it or a hold file that is a symlink is refused (reported,
never followed); files are read only if regular and at most 64 KiB. When ckptd runs as root,
the folders and files it creates are given to the owner of the root, so the training user can
write holds by hand beside ckptd's.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat as stat_module
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Final

from daemon.errors import UsageError

HOLDS_DIRECTORY: Final = ".ckptd-holds"
SUFFIX: Final = ".json"
MAX_AHEAD: Final = timedelta(days=365)
MAX_HOLD_BYTES: Final = 64 * 1024
MAX_REASON: Final = 1000
MAX_ENTRIES: Final = 100_000

_HOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RETRIES: Final = 5


class HoldError(UsageError):
    """A hold that cannot be placed or released as asked (exit 2, nothing done)."""


# --- values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hold:
    """One hold: who holds which checkpoint until when, and why."""

    checkpoint: str
    holder: str
    until: datetime  # timezone-aware
    reason: str = ""
    placed: datetime | None = None
    given: str | None = None  # the expiry in the holder's words ("6h", "2026-12-24T00:00")

    def expired(self, now: datetime | float) -> bool:
        """Given the time now, return whether the hold has run out."""
        return self.until <= _aware(now)

    def label(self, tz: tzinfo | None = None) -> str:
        """Return the reason `plan` shows: `held:<holder> until <time>` (in `tz`)."""
        return f"held:{self.holder} until {_show(self.until, tz)}"

    def to_record(self) -> dict[str, Any]:
        """Return the fields of a history record about this hold."""
        return {
            "checkpoint": self.checkpoint,
            "holder": self.holder,
            "until": self.until.isoformat(),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class MalformedHold:
    """A file in the holds folder that is not a readable hold; it still holds its checkpoint
    (when it names one), and `problem` says what is wrong."""

    checkpoint: str | None
    holder: str | None
    path: str  # relative to the root
    problem: str

    def label(self) -> str:
        return f"held:{self.holder or '?'} (unreadable hold: {self.problem})"


@dataclass(frozen=True, slots=True)
class HoldSet:
    """Every hold of one root at one moment: active, expired (still on disk) and malformed."""

    active: tuple[Hold, ...] = ()
    expired: tuple[Hold, ...] = ()
    malformed: tuple[MalformedHold, ...] = ()

    def held(self) -> frozenset[str]:
        """Return the names of the checkpoints that must be kept: an active or unreadable hold."""
        names = {hold.checkpoint for hold in self.active}
        names.update(bad.checkpoint for bad in self.malformed if bad.checkpoint is not None)
        return frozenset(names)

    def reasons(self, tz: tzinfo | None = None) -> dict[str, tuple[str, ...]]:
        """Return, per held checkpoint, its `held:...` reasons (one per holder)."""
        found: dict[str, list[str]] = {}
        for hold in sorted(self.active, key=lambda hold: (hold.checkpoint, hold.holder)):
            found.setdefault(hold.checkpoint, []).append(hold.label(tz))
        for bad in self.malformed:
            if bad.checkpoint is not None:
                found.setdefault(bad.checkpoint, []).append(bad.label())
        return {name: tuple(labels) for name, labels in found.items()}

    def of(self, checkpoint: str) -> tuple[Hold, ...]:
        """Given a checkpoint name, return its active holds."""
        return tuple(hold for hold in self.active if hold.checkpoint == checkpoint)


@dataclass(frozen=True, slots=True)
class ExpireResult:
    """What `expire_holds` did: the holds it removed, and files it could not remove (why)."""

    removed: tuple[Hold, ...] = ()
    failed: tuple[str, ...] = ()


# --- time ---------------------------------------------------------------------------------------


def _aware(moment: datetime | float) -> datetime:
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            raise ValueError("a naive datetime: pass one with a time zone")
        return moment
    return datetime.fromtimestamp(moment, tz=UTC)


def _local_zone() -> tzinfo:
    zone = datetime.now().astimezone().tzinfo
    return zone if zone is not None else UTC


def _show(moment: datetime, tz: tzinfo | None) -> str:
    return moment.astimezone(tz or _local_zone()).isoformat(timespec="minutes")


def parse_duration(text: str) -> timedelta:
    """Given a duration in the holder's words (`6h`, `90m`, `2d`, `1w`, `1d12h`, `1.5h`),
    return it; raise HoldError for anything else or for zero."""
    compact = text.strip().lower()
    position = 0
    seconds = 0.0
    for found in _DURATION_PART.finditer(compact):
        if compact[position : found.start()].strip():
            break
        seconds += float(found.group(1)) * _UNIT_SECONDS[found.group(2)]
        position = found.end()
    if not compact or compact[position:].strip() or position == 0:
        raise HoldError(f"{text!r} is not a duration such as 6h, 90m, 2d, 1w or 1d12h")
    if seconds <= 0:
        raise HoldError(f"{text!r} is no time at all")
    return timedelta(seconds=seconds)


def parse_time(text: str, tz: tzinfo | None = None) -> datetime:
    """Given an ISO 8601 time (`2026-12-24T00:00`, `2026-12-24 00:00+01:00`, `2026-12-24`),
    return it; one without an offset is in `tz` (default: the machine's zone)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise HoldError(
            f"{text!r} is not a time such as 2026-12-24T00:00 or 2026-12-24T00:00+01:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz or _local_zone())
    return moment


def expiry(
    *,
    until: str | None,
    duration: str | None,
    now: datetime | float,
    tz: tzinfo | None = None,
) -> tuple[datetime, str]:
    """Given `--until T` or `--for D` (exactly one) and the time now, return (the expiry, the
    holder's own words for it)."""
    if (until is None) == (duration is None):
        raise HoldError("give exactly one of --until TIME and --for DURATION")
    if until is not None:
        return parse_time(until, tz), until.strip()
    assert duration is not None
    return _aware(now) + parse_duration(duration), duration.strip()


# --- validation ---------------------------------------------------------------------------------


def check_holder(holder: str) -> str:
    """Given a holder name, return it, or raise HoldError when it cannot name a hold file."""
    if not _HOLDER.fullmatch(holder) or holder.endswith(SUFFIX):
        raise HoldError(
            f"holder {holder!r}: use letters, digits and ._@+- (starting with a letter or a"
            " digit, at most 64 characters)"
        )
    return holder


def check_name(name: str) -> str:
    """Given a checkpoint name, return it, or raise HoldError when it is not one root entry."""
    if not name or "/" in name or "\0" in name or name.startswith(".") or len(name.encode()) > 255:
        raise HoldError(f"{name!r} is not the name of a checkpoint in the root")
    return name


def _exists(root_fd: int, name: str) -> bool:
    """Given a root and a checkpoint name, return whether a root entry (not a symlink) has that
    name, or a TensorFlow checkpoint that prefix (`<name>.index`)."""
    for candidate in (name, f"{name}.index"):
        try:
            mode = os.lstat(candidate, dir_fd=root_fd).st_mode
        except OSError:
            continue
        if stat_module.S_ISDIR(mode) or stat_module.S_ISREG(mode):
            return True
    return False


# --- placing and releasing ----------------------------------------------------------------------


@contextmanager
def _root(root: int | str | os.PathLike[str]) -> Iterator[int]:
    """Given a root's path, or a descriptor of the root already open (the prune's, whose
    identity it checked: used through a duplicate, never closed here), yield a descriptor."""
    try:
        if isinstance(root, int):
            descriptor = os.dup(root)
        else:
            descriptor = os.open(os.fspath(root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as failure:
        shown = f"descriptor {root}" if isinstance(root, int) else os.fspath(root)
        raise HoldError(f"{shown}: {failure.strerror}") from None
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def _open_dir(parent: int, name: str, *, create: bool, owner: tuple[int, int] | None) -> int:
    """Given a parent folder, open its folder `name` without following a symlink (creating it
    when asked and absent); raise HoldError when it is not a folder."""
    for _ in range(_RETRIES):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as failure:
            if failure.errno in (errno.ELOOP, errno.ENOTDIR):
                raise HoldError(f"{name} is not a folder (a symlink or a file)") from None
            raise HoldError(f"{name}: {failure.strerror}") from None
        try:
            os.mkdir(name, 0o775, dir_fd=parent)
        except FileExistsError:
            continue
        descriptor = os.open(name, _DIR_FLAGS, dir_fd=parent)
        _give(descriptor, owner)
        return descriptor
    raise HoldError(f"{name} keeps changing; try again")


def _give(descriptor: int, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        with suppress(OSError):
            os.fchown(descriptor, owner[0], owner[1])


def _owner(root_fd: int) -> tuple[int, int] | None:
    """Return the root's (uid, gid) when ckptd runs as root (new folders and files go to the
    root's owner), else None."""
    if os.geteuid() != 0:
        return None
    status = os.fstat(root_fd)
    return status.st_uid, status.st_gid


def place_hold(
    root: str | os.PathLike[str],
    name: str,
    holder: str,
    until: datetime,
    reason: str = "",
    *,
    now: datetime | float,
    force: bool = False,
    known_names: Collection[str] | None = None,
    given: str | None = None,
) -> Hold:
    """Given a root, a checkpoint name, a holder and an expiry, write the holder's hold
    (replacing its earlier one) and return it.

    Raises HoldError when the checkpoint does not exist (`known_names`, the names a scan found,
    when given; else a root entry or `<name>.index`), the expiry is not in the future, or it is
    more than a year ahead without `force`."""
    check_name(name)
    check_holder(holder)
    moment = _aware(now)
    if until.tzinfo is None:
        raise HoldError("the expiry needs a time zone")
    if until <= moment:
        raise HoldError(f"{_show(until, None)} is not in the future")
    if until - moment > MAX_AHEAD and not force:
        raise HoldError(f"{_show(until, None)} is more than a year ahead: add --force to hold it")
    if len(reason) > MAX_REASON:
        raise HoldError(f"the reason is longer than {MAX_REASON} characters")
    hold = Hold(name, holder, until, reason, moment, given)
    document = {
        "holder": holder,
        "until": until.isoformat(),
        "reason": reason,
        "placed": moment.isoformat(),
        "given": given or until.isoformat(),
    }
    payload = (json.dumps(document, indent=2) + "\n").encode()
    with _root(root) as root_fd:
        present = name in known_names if known_names is not None else _exists(root_fd, name)
        if not present:
            raise HoldError(f"no checkpoint named {name!r} in {os.fspath(root)}")
        owner = _owner(root_fd)
        holds_fd = _open_dir(root_fd, HOLDS_DIRECTORY, create=True, owner=owner)
        try:
            _write_hold(holds_fd, name, holder + SUFFIX, payload, owner)
        finally:
            os.close(holds_fd)
    return hold


def _write_hold(
    holds_fd: int, name: str, file_name: str, payload: bytes, owner: tuple[int, int] | None
) -> None:
    for _ in range(_RETRIES):
        folder = _open_dir(holds_fd, name, create=True, owner=owner)
        try:
            _write_atomically(folder, file_name, payload, owner)
            os.fsync(folder)
            return
        except FileNotFoundError:
            # Another holder's release removed the (then empty) folder after we opened it: no
            # file can be made in a removed folder. Open (re-create) it and write again.
            continue
        finally:
            os.close(folder)
    raise HoldError(f"{HOLDS_DIRECTORY}/{name} keeps changing; try again")


def _write_atomically(
    folder: int, file_name: str, payload: bytes, owner: tuple[int, int] | None
) -> None:
    temporary = f".{file_name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temporary, flags, 0o644, dir_fd=folder)
    try:
        try:
            os.write(descriptor, payload)
            _give(descriptor, owner)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.rename(temporary, file_name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary, dir_fd=folder)
        raise


def release_hold(root: str | os.PathLike[str], name: str, holder: str) -> bool:
    """Given a root, a checkpoint name and a holder, remove that holder's hold; return whether
    there was one. The checkpoint's folder in the holds folder goes once empty."""
    check_name(name)
    check_holder(holder)
    with _root(root) as root_fd:
        try:
            holds_fd = _open_dir(root_fd, HOLDS_DIRECTORY, create=False, owner=None)
        except FileNotFoundError:
            return False
        try:
            try:
                folder = _open_dir(holds_fd, name, create=False, owner=None)
            except FileNotFoundError:
                return False
            try:
                removed = _unlink_file(folder, holder + SUFFIX)
            finally:
                os.close(folder)
            _remove_if_empty(holds_fd, name)
            return removed
        finally:
            os.close(holds_fd)


def _unlink_file(folder: int, file_name: str) -> bool:
    try:
        mode = os.lstat(file_name, dir_fd=folder).st_mode
    except FileNotFoundError:
        return False
    if stat_module.S_ISDIR(mode):
        raise HoldError(f"{file_name} is a folder, not a hold")
    try:
        os.unlink(file_name, dir_fd=folder)  # unlink never follows a symlink
    except FileNotFoundError:
        return False
    return True


def _remove_if_empty(holds_fd: int, name: str) -> None:
    with suppress(OSError):  # not empty (another holder), already gone, or not ours to remove
        os.rmdir(name, dir_fd=holds_fd)


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Read:
    """One file of the holds folder: a hold, a malformed hold, or (both None) nothing."""

    hold: Hold | None
    bad: MalformedHold | None


def read_holds(
    root: str | os.PathLike[str], *, now: datetime | float, tz: tzinfo | None = None
) -> HoldSet:
    """Given a root and the time now, return its holds: active, expired (still on disk) and
    malformed (reported, never raised). An expiry without an offset is read in `tz`."""
    moment = _aware(now)
    active: list[Hold] = []
    expired: list[Hold] = []
    malformed: list[MalformedHold] = []
    with _root(root) as root_fd:
        for read in _scan(root_fd, tz):
            if read.bad is not None:
                malformed.append(read.bad)
            elif read.hold is not None:
                (expired if read.hold.expired(moment) else active).append(read.hold)
    order = _hold_order
    return HoldSet(
        tuple(sorted(active, key=order)),
        tuple(sorted(expired, key=order)),
        tuple(sorted(malformed, key=lambda bad: bad.path)),
    )


def _hold_order(hold: Hold) -> tuple[str, str]:
    return hold.checkpoint, hold.holder


def _scan(root_fd: int, tz: tzinfo | None) -> Iterator[_Read]:
    try:
        holds_fd = _open_dir(root_fd, HOLDS_DIRECTORY, create=False, owner=None)
    except FileNotFoundError:
        return
    except HoldError as failure:
        yield _Read(None, MalformedHold(None, None, HOLDS_DIRECTORY, str(failure)))
        return
    try:
        for name, is_dir in _listing(holds_fd):
            relative = f"{HOLDS_DIRECTORY}/{name}"
            if not is_dir:
                yield _Read(None, MalformedHold(None, None, relative, _NOT_A_FOLDER))
                continue
            yield from _scan_checkpoint(holds_fd, name, tz)
    finally:
        os.close(holds_fd)


_NOT_A_FOLDER = f"not a folder: holds live in {HOLDS_DIRECTORY}/<checkpoint>/<holder>.json"


def _listing(descriptor: int) -> list[tuple[str, bool]]:
    found: list[tuple[str, bool]] = []
    with os.scandir(descriptor) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue  # temporary files of a write in progress
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            found.append((entry.name, is_dir))
            if len(found) >= MAX_ENTRIES:
                break
    return sorted(found)


def _scan_checkpoint(holds_fd: int, name: str, tz: tzinfo | None) -> Iterator[_Read]:
    relative = f"{HOLDS_DIRECTORY}/{name}"
    try:
        folder = os.open(name, _DIR_FLAGS, dir_fd=holds_fd)
    except OSError as failure:
        yield _Read(None, MalformedHold(name, None, relative, f"cannot open: {failure.strerror}"))
        return
    try:
        for file_name, is_dir in _listing(folder):
            holder = file_name[: -len(SUFFIX)] if file_name.endswith(SUFFIX) else None
            path = f"{relative}/{file_name}"
            if holder is None or is_dir:
                yield _Read(None, MalformedHold(name, holder, path, "not a <holder>.json file"))
                continue
            yield _read_file(folder, name, holder, path, tz)
    finally:
        os.close(folder)


def _read_file(folder: int, name: str, holder: str, path: str, tz: tzinfo | None) -> _Read:
    def bad(problem: str) -> _Read:
        return _Read(None, MalformedHold(name, holder, path, problem))

    if not _HOLDER.fullmatch(holder):
        return bad("the holder in its name has characters a holder cannot have")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(holder + SUFFIX, flags, dir_fd=folder)
    except OSError as failure:
        if failure.errno == errno.ENOENT:
            return _Read(None, None)  # released while we looked
        if failure.errno == errno.ELOOP:
            return bad("a symbolic link (not followed)")
        return bad(f"cannot be read: {failure.strerror}")
    try:
        status = os.fstat(descriptor)
        if not stat_module.S_ISREG(status.st_mode):
            return bad("not a regular file")
        if status.st_size > MAX_HOLD_BYTES:
            return bad(f"{status.st_size} bytes: larger than a hold")
        raw = os.pread(descriptor, MAX_HOLD_BYTES, 0)
    finally:
        os.close(descriptor)
    try:
        hold = parse_hold(raw, name, holder, tz)
    except ValueError as failure:
        return bad(str(failure))
    return _Read(hold, None)


def parse_hold(raw: bytes, checkpoint: str, holder: str, tz: tzinfo | None = None) -> Hold:
    """Given a hold file's bytes and the checkpoint and holder its path names, return the hold;
    raise ValueError saying what is wrong."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as failure:
        raise ValueError(f"not valid JSON ({failure})") from None
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    until_text = document.get("until")
    if not isinstance(until_text, str):
        raise ValueError('no "until" time')
    try:
        until = parse_time(until_text, tz)
    except HoldError as failure:
        raise ValueError(str(failure)) from None
    named = document.get("holder", holder)
    if named != holder:
        raise ValueError(f"says holder {named!r}, its file name says {holder!r}")
    reason = document.get("reason", "")
    placed = document.get("placed")
    given = document.get("given")
    return Hold(
        checkpoint,
        holder,
        until,
        reason if isinstance(reason, str) else str(reason),
        _maybe_time(placed),
        given if isinstance(given, str) else None,
    )


def _maybe_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


# --- expiring -----------------------------------------------------------------------------------


def expire_holds(
    root: int | str | os.PathLike[str], *, now: datetime | float, tz: tzinfo | None = None
) -> ExpireResult:
    """Given a root and the time now, remove every expired hold (safe against its holder
    renewing it meanwhile) and the folders left empty; return what was removed, for the
    history (`hold_expired`, with `Hold.to_record()`)."""
    moment = _aware(now)
    removed: list[Hold] = []
    failed: list[str] = []
    with _root(root) as root_fd:
        try:
            holds_fd = _open_dir(root_fd, HOLDS_DIRECTORY, create=False, owner=None)
        except (FileNotFoundError, HoldError):
            return ExpireResult()
        try:
            for name, is_dir in _listing(holds_fd):
                if not is_dir:
                    continue
                try:
                    folder = os.open(name, _DIR_FLAGS, dir_fd=holds_fd)
                except OSError:
                    continue
                try:
                    _expire_in(folder, name, moment, tz, removed, failed)
                finally:
                    os.close(folder)
                _remove_if_empty(holds_fd, name)
        finally:
            os.close(holds_fd)
    return ExpireResult(tuple(removed), tuple(failed))


def _expire_in(
    folder: int,
    name: str,
    moment: datetime,
    tz: tzinfo | None,
    removed: list[Hold],
    failed: list[str],
) -> None:
    for file_name, is_dir in _listing(folder):
        if is_dir or not file_name.endswith(SUFFIX):
            continue
        holder = file_name[: -len(SUFFIX)]
        path = f"{HOLDS_DIRECTORY}/{name}/{file_name}"
        read = _read_file(folder, name, holder, path, tz)
        if read.hold is None or not read.hold.expired(moment):
            continue
        try:
            hold = _take_if_still_expired(folder, file_name, read, moment, tz)
        except OSError as failure:
            failed.append(f"{path}: {failure.strerror}")
            continue
        if hold is not None:
            removed.append(hold)


def _take_if_still_expired(
    folder: int, file_name: str, read: _Read, moment: datetime, tz: tzinfo | None
) -> Hold | None:
    """Given an expired hold's file, move it aside, read it again there, and delete it if it is
    the same expired hold; put it back (never over a newer one) if its holder renewed it."""
    aside = f".expired.{file_name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        os.rename(file_name, aside, src_dir_fd=folder, dst_dir_fd=folder)
    except FileNotFoundError:
        return None  # released meanwhile
    assert read.hold is not None
    moved = _read_aside(folder, aside, read.hold, tz)
    if moved is not None and moved.expired(moment):
        os.unlink(aside, dir_fd=folder)
        return moved
    # Renewed between our read and our rename: put it back, unless a newer one is there already.
    try:
        os.link(aside, file_name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
    except FileExistsError:
        pass
    except OSError:
        with suppress(FileExistsError):
            os.rename(aside, file_name, src_dir_fd=folder, dst_dir_fd=folder)
        return None
    os.unlink(aside, dir_fd=folder)
    return None


def _read_aside(folder: int, aside: str, hold: Hold, tz: tzinfo | None) -> Hold | None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(aside, flags, dir_fd=folder)
    except OSError:
        return None
    try:
        if not stat_module.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        raw = os.pread(descriptor, MAX_HOLD_BYTES, 0)
    finally:
        os.close(descriptor)
    try:
        return parse_hold(raw, hold.checkpoint, hold.holder, tz)
    except ValueError:
        return None
