"""Orbax: the commit markers and metadata parse, every item is there, OCDBT files are whole.

An Orbax step folder (`<step>/`, `step_<step>/`) holds `_CHECKPOINT_METADATA` (JSON; its
`item_handlers` maps each item name to its handler) and, on filesystems without atomic rename,
`commit_success.txt`; one folder per item (`default/`, `state/`, ...) with `_METADATA`,
`_sharding`, `array_metadatas/process_<n>` (JSON), and the arrays: an OCDBT database
(`manifest.ocdbt`, `d/<hash>` data files, and `ocdbt.process_<n>/` per writing process) or zarr.

OCDBT files (TensorStore's format) that hold a manifest or a tree node begin with a 4-byte
big-endian magic (`0x0cdb3a2a` manifest, `0x0cdb20de` b-tree node: any `0x0cdb....`), then the
file's length as a little-endian uint64, and end with a CRC-32C of everything before it. Data
files of large values are raw (zstd frames) with neither.

Cheap: markers and metadata parse; each item named by `item_handlers` exists; no
`.orbax-checkpoint-tmp` folder is left inside; each `manifest.ocdbt` has its magic, its length
and its CRC; each process with array metadata has its `ocdbt.process_<n>/manifest.ocdbt`.
Deep: every OCDBT file's length and CRC (data files whose bytes are raw values carry no magic
and no checksum: they are not checked).
"""

from __future__ import annotations

import json
import struct
from typing import Any, Final

from daemon.integrity.crc import crc32c_extend
from daemon.integrity.files import Context, Damaged, Unreadable

CHECKPOINT_METADATA: Final = "_CHECKPOINT_METADATA"
COMMIT_SUCCESS: Final = "commit_success.txt"
TMP_MARK: Final = ".orbax-checkpoint-tmp"
MANIFEST: Final = "manifest.ocdbt"
OCDBT_MAGIC_PREFIX: Final = 0x0CDB
JSON_CAP: Final = 64 << 20
MANIFEST_CAP: Final = 64 << 20
JSON_NAMES: Final = frozenset({CHECKPOINT_METADATA, "_METADATA", "_sharding", ".zarray", ".zattrs"})


def is_orbax_json(path: str) -> bool:
    """Given a path inside a checkpoint, return whether Orbax writes it as JSON (without a
    `.json` suffix)."""
    name = path.rpartition("/")[2]
    return name in JSON_NAMES or path.rpartition("/")[0].endswith("array_metadatas")


def check_step(context: Context) -> None:
    """Given a context whose checkpoint is an Orbax step folder, check its structure."""
    files = context.files
    has_metadata = files.kind(CHECKPOINT_METADATA) == "file"
    if not has_metadata and files.kind(COMMIT_SUCCESS) != "file":
        context.findings.problem(".", f"neither {CHECKPOINT_METADATA} nor {COMMIT_SUCCESS}")
    for path in sorted(files.entries):
        if TMP_MARK in path.rpartition("/")[2]:
            context.findings.problem(path, "an unfinished save (temporary name) inside the step")
    if has_metadata:
        document = read_json(context, CHECKPOINT_METADATA)
        handlers = document.get("item_handlers") if isinstance(document, dict) else None
        if isinstance(handlers, dict):
            for item in sorted(handlers):
                if files.kind(str(item)) != "dir":
                    context.findings.problem(
                        str(item), f"missing (an item of {CHECKPOINT_METADATA})"
                    )
    _check_process_databases(context)


def _check_process_databases(context: Context) -> None:
    files = context.files
    for path in sorted(files.entries):
        folder, _, name = path.rpartition("/")
        parent, _, container = folder.rpartition("/")
        if container != "array_metadatas" or not name.startswith("process_"):
            continue
        item = f"{parent}/" if parent else ""
        if files.kind(f"{item}{MANIFEST}") != "file":
            continue  # not OCDBT (zarr arrays)
        expected = f"{item}ocdbt.{name}/{MANIFEST}"
        if files.kind(expected) is None:
            context.findings.problem(expected, f"missing ({path} says process {name[8:]} wrote)")


def read_json(context: Context, path: str) -> Any:
    """Given a JSON file of the checkpoint, return its parsed value (None when it could not be
    read: the reason is recorded)."""
    value: Any = None
    with context.checking(path), context.files.open(path) as handle:
        if handle.size > JSON_CAP:
            raise Unreadable(f"{handle.size} bytes: larger than ckptd reads")
        try:
            value = json.loads(handle.read_at(0, handle.size))
        except (UnicodeDecodeError, ValueError) as failure:
            raise Damaged(f"not valid JSON ({failure})") from None
    return value


def is_ocdbt_candidate(path: str, deep: bool) -> bool:
    """Given a path, return whether the OCDBT check reads it: manifests always, data files
    (`d/...`) in a deep check."""
    name = path.rpartition("/")[2]
    if name == MANIFEST:
        return True
    return deep and "/d/" in f"/{path}"


def check_ocdbt_file(context: Context, path: str) -> None:
    """Given a manifest or OCDBT data file, check its magic (manifests only: data files may be
    raw values), length and CRC-32C."""
    manifest = path.rpartition("/")[2] == MANIFEST
    with context.checking(path), context.files.open(path) as handle:
        if handle.size < 16:
            if manifest:
                raise Damaged(f"{handle.size} bytes: too short for an OCDBT manifest")
            return
        head = handle.read_at(0, 12)
        magic, length = struct.unpack(">I", head[:4])[0], struct.unpack("<Q", head[4:])[0]
        if magic >> 16 != OCDBT_MAGIC_PREFIX:
            if manifest:
                raise Damaged(f"no OCDBT magic (starts with {head[:4].hex()})")
            return  # a data file of raw values
        if length > handle.size:
            raise Damaged(f"says it is {length} bytes long, the file has {handle.size}")
        if length != handle.size:
            if manifest:
                raise Damaged(f"says it is {length} bytes long, the file has {handle.size}")
            return  # a node followed by more: a layout this check does not take apart
        if manifest and handle.size > MANIFEST_CAP:
            raise Unreadable(f"{handle.size} bytes: larger than ckptd reads")
        crc = 0
        for chunk in handle.stream(0, handle.size - 4, context.options, context.findings):
            crc = crc32c_extend(crc, chunk)
        (stored,) = struct.unpack("<I", handle.read_at(handle.size - 4, 4))
        if crc != stored:
            raise Damaged("fails its CRC-32C")
