"""Trackers and JSON files: they parse, and a root's trackers name checkpoints that exist.

Inside a checkpoint, every `.json` file must parse (`trainer_state.json`, `config.json`,
`model.safetensors.index.json`, `metrics.json`, ...): the cheap check reads those up to 1 MiB and
the ones the frameworks resume from (`trainer_state.json`, `*.index.json`) up to 64 MiB; the
deep check reads them all.

At the top of a root, `check_root_trackers` reads the files a framework resumes from:

- DeepSpeed `latest`: one line naming a tag folder, which must exist;
- Megatron `latest_checkpointed_iteration.txt`: an iteration number (its `iter_<7 digits>/`
  must exist) or `release`;
- TensorFlow `checkpoint`: a text protocol buffer; `model_checkpoint_path` (when relative)
  must have its `.index`.

A tracker that is absent is fine (not every layout has one); one that is unreadable for ckptd
is reported as skipped.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat as stat_module
from dataclasses import dataclass
from typing import Final

from daemon.integrity.files import Context, Damaged, Deferred, Unreadable, open_root

CHEAP_JSON_CAP: Final = 1 << 20
RESUME_JSON_CAP: Final = 64 << 20
DEEP_JSON_CAP: Final = 512 << 20
TRACKER_CAP: Final = 1 << 20

DEEPSPEED_TRACKER: Final = "latest"
MEGATRON_TRACKER: Final = "latest_checkpointed_iteration.txt"
TF_TRACKER: Final = "checkpoint"

_TF_LINE = re.compile(r'\s*([A-Za-z_]+)\s*:\s*"((?:[^"\\]|\\.)*)"\s*')
_TF_NUMBER_LINE = re.compile(r"\s*([A-Za-z_]+)\s*:\s*[-+0-9.eE]+\s*")


def is_resume_json(name: str) -> bool:
    """Given a file name, return whether a framework resumes from it (read even when large)."""
    return name == "trainer_state.json" or name.endswith(".index.json")


def check_json(context: Context, path: str) -> None:
    """Given a `.json` file of the checkpoint, check that it parses (within the caps)."""
    name = path.rpartition("/")[2]
    with context.checking(path), context.files.open(path) as handle:
        cheap_cap = RESUME_JSON_CAP if is_resume_json(name) else CHEAP_JSON_CAP
        if handle.size > DEEP_JSON_CAP:
            raise Unreadable(f"{handle.size} bytes: larger than ckptd reads")
        if handle.size > cheap_cap and not context.deep:
            raise Deferred(f"{handle.size} bytes are left to the deep check")
        try:
            json.loads(handle.read_at(0, handle.size))
        except (UnicodeDecodeError, ValueError) as failure:
            raise Damaged(f"not valid JSON ({failure})") from None


@dataclass(frozen=True, slots=True)
class TrackerReport:
    """Given a check of a root's trackers: problems (naming the tracker), what was skipped, and
    which trackers were read."""

    problems: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()


def check_root_trackers(root: int | str | os.PathLike[str]) -> TrackerReport:
    """Given a root (path or open directory descriptor), check the trackers at its top."""
    descriptor, owned = open_root(root)
    problems: list[str] = []
    skipped: list[str] = []
    checked: list[str] = []
    try:
        for name, check in (
            (DEEPSPEED_TRACKER, _deepspeed),
            (MEGATRON_TRACKER, _megatron),
            (TF_TRACKER, _tensorflow),
        ):
            try:
                text = _read_tracker(descriptor, name)
            except Unreadable as failure:
                skipped.append(f"{name}: {failure}")
                continue
            except Damaged as failure:
                problems.append(f"{name}: {failure}")
                continue
            if text is None:
                continue
            checked.append(name)
            problems.extend(f"{name}: {problem}" for problem in check(descriptor, text))
    finally:
        if owned:
            os.close(descriptor)
    return TrackerReport(tuple(problems), tuple(skipped), tuple(checked))


def _read_tracker(root: int, name: str) -> str | None:
    try:
        descriptor = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=root
        )
    except FileNotFoundError:
        return None
    except OSError as failure:
        if failure.errno == errno.ELOOP:
            return None  # a symlink named like a tracker: not a tracker ckptd reads
        raise Unreadable(f"cannot be read: {failure.strerror}") from None
    try:
        status = os.fstat(descriptor)
        if stat_module.S_ISDIR(status.st_mode):
            return None  # a folder named `checkpoint` or `latest`: not a tracker
        if not stat_module.S_ISREG(status.st_mode):
            raise Damaged("not a regular file")
        if status.st_size > TRACKER_CAP:
            raise Damaged(f"{status.st_size} bytes: too large for a tracker")
        data = os.pread(descriptor, TRACKER_CAP, 0)
    finally:
        os.close(descriptor)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Damaged("not UTF-8 text") from None


def _is_dir(root: int, name: str) -> bool:
    if not name or "/" in name or name in (".", ".."):
        return False
    try:
        return stat_module.S_ISDIR(os.lstat(name, dir_fd=root).st_mode)
    except OSError:
        return False


def _is_file(root: int, name: str) -> bool:
    if not name or "/" in name or name in (".", ".."):
        return False
    try:
        return stat_module.S_ISREG(os.lstat(name, dir_fd=root).st_mode)
    except OSError:
        return False


def _deepspeed(root: int, text: str) -> list[str]:
    tag = text.strip()
    if not tag:
        return ["empty"]
    if not _is_dir(root, tag):
        return [f"names {tag!r}, which is not a folder of the root"]
    return []


def _megatron(root: int, text: str) -> list[str]:
    value = text.strip()
    if value == "release":
        return []
    if not value.isdigit():
        return [f"holds {value[:40]!r}, neither an iteration nor 'release'"]
    folder = f"iter_{int(value):07d}"
    if not _is_dir(root, folder):
        return [f"names iteration {int(value)}, and {folder}/ does not exist"]
    return []


def _tensorflow(root: int, text: str) -> list[str]:
    fields: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        found = _TF_LINE.fullmatch(line)
        if found is None:
            if _TF_NUMBER_LINE.fullmatch(line):
                continue
            return [f'line {number} is not a `key: "value"` line']
        fields.setdefault(found.group(1), []).append(found.group(2))
    paths = fields.get("model_checkpoint_path")
    if not paths:
        return ["has no model_checkpoint_path"]
    current = paths[-1]
    if os.path.isabs(current) or "/" in current:
        return []  # TF1 wrote absolute paths (the root may have moved since); not a root entry
    if not _is_file(root, f"{current}.index"):
        return [f"names {current!r}, and {current}.index does not exist"]
    return []
