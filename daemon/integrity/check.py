"""`check_checkpoint`: the integrity of one checkpoint, from its headers and indexes (or, deep,
every checksum), without any ML framework.

What is checked, by file (any layout: formats nest, e.g. a DCP folder inside an HF checkpoint):

| file                                              | module        |
|---------------------------------------------------|---------------|
| `*.safetensors`, `*.safetensors.index.json`       | `safetensors` |
| `*.pt`, `*.pth`, `*.ckpt`, torch `.bin`           | `torchzip`    |
| `.metadata`, `__<n>.metadata` + `*.distcp`        | `dcp`         |
| `*_states.pt` sets (DeepSpeed)                    | `deepspeed`   |
| `_CHECKPOINT_METADATA`, Orbax items, OCDBT files  | `orbax`       |
| `<prefix>.index` + `.data-*` shards               | `tfindex`     |
| `*.json`                                          | `trackers`    |

and by layout, what a complete checkpoint of it must have: hf its `trainer_state.json`, tf its
`.index`, dcp a metadata file, orbax its markers and items, deepspeed a model states file (pt
and Lightning files are torch.save files by their names). Other files (tokenizers, scripts, raw
arrays) are part of the signature but not checked.

The checkpoint is walked before and after the check; if anything changed in between (a save
still going on, a trainer resuming into it), the result is "unknown" and not to be cached.
"""

from __future__ import annotations

import os
import re
import stat as stat_module
import threading
from collections.abc import Callable
from typing import Any

from daemon.integrity import dcp, deepspeed, orbax, safetensors, tfindex, torchzip, trackers
from daemon.integrity.files import (
    Changed,
    CheckpointFiles,
    Context,
    Damaged,
    DeepOptions,
    Findings,
    Stopped,
    Unreadable,
    open_root,
)
from daemon.integrity.result import CORRUPT, OK, UNKNOWN, IntegrityResult, Signature, Status

_TF_MEMBER = r"\.(?:index|meta|data-\d+-of-\d+)"
_TF_DATA = re.compile(r"(.+)\.data-\d+-of-\d+")


def check_checkpoint(
    root: int | str | os.PathLike[str],
    checkpoint_name: str,
    layout: str,
    *,
    deep: bool = False,
    stop: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
) -> IntegrityResult:
    """Given a root (an open directory descriptor or a path), the name of one of its checkpoints
    (a root entry, or a TensorFlow prefix such as `ckpt-5`) and its layout, check it.

    `deep` reads every byte that has a checksum (zip CRC-32, TensorFlow and OCDBT CRC-32C);
    `stop` (a `threading.Event`) ends a deep pass between chunks (the result is then "unknown",
    `stopped`); `progress` is told the number of bytes verified after each chunk."""
    descriptor, owned = open_root(root)
    try:
        findings = Findings()
        try:
            files = _files_of(descriptor, checkpoint_name, layout)
            if files is None:
                findings.skip(checkpoint_name, "not found (or a symbolic link, not followed)")
                return _result(checkpoint_name, layout, findings, Signature(), deep)
            before = files.walk()
        except _WALK_FAILURES as failure:
            findings.record_failure(checkpoint_name, _as_finding(failure))
            return _result(checkpoint_name, layout, findings, Signature(), deep)
        if files.truncated:
            findings.skip(checkpoint_name, "more entries than ckptd walks")
        context = Context(files, findings, deep, DeepOptions(stop, progress))
        try:
            _check_files(context, layout)
        except Stopped:
            findings.stopped = True
        if not findings.stopped and _rewalk(files) != before:
            findings.changed = True
            findings.skip(checkpoint_name, "changed while checking")
        return _result(checkpoint_name, layout, findings, before, deep)
    finally:
        if owned:
            os.close(descriptor)


def signature_of(
    root: int | str | os.PathLike[str], checkpoint_name: str, layout: str
) -> Signature:
    """Given a root, a checkpoint name and its layout, return the checkpoint's signature now (one
    walk, no file read): what a cached result must match to be reused. Empty when there is no
    such checkpoint or it cannot be walked."""
    descriptor, owned = open_root(root)
    try:
        try:
            files = _files_of(descriptor, checkpoint_name, layout)
            return files.walk() if files is not None else Signature()
        except _WALK_FAILURES:
            return Signature()
    finally:
        if owned:
            os.close(descriptor)


_WALK_FAILURES = (Changed, Unreadable, Damaged, OSError)


def _as_finding(failure: Exception) -> Exception:
    if isinstance(failure, (Changed, Unreadable, Damaged)):
        return failure
    return Unreadable(f"cannot be walked: {getattr(failure, 'strerror', failure)}")


def _rewalk(files: CheckpointFiles) -> Signature | None:
    try:
        return files.walk()
    except _WALK_FAILURES:  # vanished or became unreadable: not the signature checked
        return None


def _files_of(root: int, name: str, layout: str) -> CheckpointFiles | None:
    """Given a root and a checkpoint name, return its files: a folder, one file, or the root
    entries of a TensorFlow prefix; None when there is no such checkpoint."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        return None
    try:
        mode = os.lstat(name, dir_fd=root).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as failure:
        raise Unreadable(f"{name}: {failure.strerror}") from None
    if mode is not None and stat_module.S_ISDIR(mode):
        return CheckpointFiles(root, name, ())
    if mode is not None and layout != "tf":
        return CheckpointFiles(root, None, (name,)) if stat_module.S_ISREG(mode) else None
    pattern = re.compile(re.escape(name) + _TF_MEMBER)
    with os.scandir(root) as listing:
        members = tuple(sorted(entry.name for entry in listing if pattern.fullmatch(entry.name)))
    if not members:
        return None
    return CheckpointFiles(root, None, members)


def _check_files(context: Context, layout: str) -> None:
    files = context.files
    paths = files.files()
    folders: dict[str, list[str]] = {}
    for path in paths:
        folder, _, name = path.rpartition("/")
        folders.setdefault(folder, []).append(name)
    shard_tensors: dict[str, frozenset[str] | None] = {}
    torch_objects: dict[str, Any] = {}
    indexes: list[str] = []
    for path, entry in sorted(files.entries.items()):
        # A loader would follow the link, or block on the FIFO: ckptd vouches for neither.
        if entry.kind == "symlink":
            context.findings.skip(path, "a symbolic link (not followed)")
        elif entry.kind == "other" and _is_checked_format(path):
            context.findings.problem(path, "not a regular file")
        elif entry.kind == "other":
            context.findings.skip(path, "not a regular file")
    for path in paths:
        context.options.check_stop()
        _check_one(context, path, layout, shard_tensors, torch_objects, indexes)
    for index in indexes:
        safetensors.check_index(context, index, shard_tensors)
    for folder, names in sorted(folders.items()):
        metadata = sorted(name for name in names if dcp.is_metadata(name))
        if metadata:
            dcp.check_folder(context, folder, metadata)
        if deepspeed.is_shard_folder(names):
            objects = {
                name: torch_objects[f"{folder}/{name}" if folder else name]
                for name in names
                if (f"{folder}/{name}" if folder else name) in torch_objects
            }
            deepspeed.check_shard_set(context, folder, names, objects)
    _check_layout(context, layout, folders)


def _check_one(
    context: Context,
    path: str,
    layout: str,
    shard_tensors: dict[str, frozenset[str] | None],
    torch_objects: dict[str, Any],
    indexes: list[str],
) -> None:
    name = path.rpartition("/")[2]
    if name.endswith(".safetensors"):
        shard_tensors[path] = safetensors.check_file(context, path)
    elif name.endswith(".safetensors.index.json"):
        indexes.append(path)
    elif torchzip.is_torch_name(name) or name.endswith(".bin"):
        _check_torch(context, path, torchzip.is_torch_name(name), torch_objects)
    elif name.endswith(".json") or orbax.is_orbax_json(path):
        trackers.check_json(context, path)
    elif name.endswith(".index") and _is_tf_index(context, path, layout):
        tfindex.check_bundle(context, path)
    elif orbax.is_ocdbt_candidate(path, context.deep):
        orbax.check_ocdbt_file(context, path)


def _is_checked_format(path: str) -> bool:
    name = path.rpartition("/")[2]
    return (
        name.endswith((".safetensors", ".json", ".index", ".distcp", ".bin"))
        or torchzip.is_torch_name(name)
        or dcp.is_metadata(name)
        or orbax.is_orbax_json(path)
    )


def _check_torch(
    context: Context, path: str, required: bool, torch_objects: dict[str, Any]
) -> None:
    found: torchzip.TorchFile | None = None
    try:
        found = torchzip.check_file(context, path, required=required)
    except (Changed, Unreadable, Damaged) as failure:  # opening it failed
        context.findings.record_failure(path, failure)
    if found is not None:
        torch_objects[path] = found.obj


def _is_tf_index(context: Context, path: str, layout: str) -> bool:
    if layout == "tf":
        return True
    prefix = path[: -len(".index")]
    return any(
        (found := _TF_DATA.fullmatch(other)) is not None and found.group(1) == prefix
        for other in context.files.entries
    )


def _check_layout(context: Context, layout: str, folders: dict[str, list[str]]) -> None:
    """Given the layout, report what a complete checkpoint of it must have and lacks."""
    files = context.files
    top = folders.get("", [])
    if layout == "hf" and files.folder is not None and "trainer_state.json" not in top:
        context.findings.problem("trainer_state.json", "missing (the Trainer writes it last)")
    elif layout == "tf" and not any(name.endswith(".index") for name in top):
        context.findings.problem(f"{files.members[0] if files.members else '?'}", "no .index")
    elif layout == "dcp" and not any(dcp.is_metadata(name) for name in top):
        context.findings.problem(".metadata", "missing")
    elif layout == "orbax" and files.folder is not None:
        orbax.check_step(context)


def _result(
    name: str, layout: str, findings: Findings, signature: Signature, deep: bool
) -> IntegrityResult:
    status: Status
    if findings.problems:
        status = CORRUPT
    elif findings.stopped or findings.changed or findings.skipped:
        status = UNKNOWN
    elif not findings.checked:
        status = UNKNOWN
        findings.skip(name, "no file of a format ckptd checks")
    else:
        status = OK
    return IntegrityResult(
        checkpoint=name,
        layout=layout,
        status=status,
        problems=tuple(findings.problems),
        skipped=tuple(findings.skipped),
        deferred=tuple(findings.deferred),
        checked_files=tuple(findings.checked),
        signature=signature,
        deep=deep,
        stopped=findings.stopped,
        changed=findings.changed,
        bytes_read=findings.bytes_read,
    )
