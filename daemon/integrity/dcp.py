"""torch.distributed.checkpoint: `.metadata` unpickles and every `.distcp` range it names is there.

A DCP checkpoint folder holds `.metadata` (with `use_collectives=False`, one `__<rank>.metadata`
per rank) and the `__<rank>_<n>.distcp` files. `.metadata` is a pickle of
`torch.distributed.checkpoint.metadata.Metadata`, whose `storage_data` maps each item to a
`_StorageInfo(relative_path, offset, length)`: the file and byte range holding it. It is read
through stand-ins (`daemon/integrity/pickles.py`: no torch, no code run).

Cheap: the metadata unpickles, and every range it names lies inside an existing file. Deep: each
range that is a `torch.save` zip archive (as FileSystemWriter writes every item) has its
directory read and every member's CRC-32 checked.

Megatron's `torch_dist` format is this format too (plus `common.pt` and `metadata.json`), and so
is a DCP folder nested inside another layout's checkpoint (Accelerate's FSDP folders).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from daemon.integrity import torchzip
from daemon.integrity.files import Context, Damaged, Deferred, Unreadable
from daemon.integrity.pickles import PickleError, StandIn, class_name, loads

METADATA_NAMES = re.compile(r"(?:__\d+)?\.metadata")
CHEAP_CAP: Final = 128 << 20
DEEP_CAP: Final = 1 << 30


@dataclass(frozen=True, slots=True)
class StorageRange:
    """One item's bytes: the file (relative to the DCP folder), where they start, how many."""

    item: str
    relative_path: str
    offset: int
    length: int


def is_metadata(name: str) -> bool:
    """Given a file name, return whether it is a DCP metadata file."""
    return METADATA_NAMES.fullmatch(name) is not None


def check_folder(context: Context, folder: str, metadata_names: list[str]) -> None:
    """Given a folder of the checkpoint (`""` for its top) and its DCP metadata files, check
    each and the `.distcp` ranges it names."""
    prefix = f"{folder}/" if folder else ""
    for name in metadata_names:
        path = prefix + name
        ranges: list[StorageRange] | None = None
        with context.checking(path):
            ranges = _read_ranges(context, path)
        if ranges is None:
            _expect_some_distcp(context, prefix, path)
            continue
        _check_ranges(context, prefix, path, ranges)


def _read_ranges(context: Context, path: str) -> list[StorageRange] | None:
    with context.files.open(path) as handle:
        if handle.size > DEEP_CAP:
            raise Unreadable(f"{handle.size} bytes: larger than ckptd reads")
        if handle.size > CHEAP_CAP and not context.deep:
            raise Deferred(f"{handle.size} bytes are left to the deep check")
        if handle.size == 0:
            raise Damaged("empty file")
        try:
            metadata, _ = loads(handle.read_at(0, handle.size))
        except PickleError as failure:
            raise Damaged(f"does not unpickle ({failure})") from None
    storage = metadata.field("storage_data") if isinstance(metadata, StandIn) else None
    if not isinstance(storage, dict):
        context.findings.skip(
            path, f"a {class_name(metadata)} without storage_data: its files cannot be listed"
        )
        return None
    return [_range_of(key, info, path) for key, info in storage.items()]


def _range_of(key: Any, info: Any, path: str) -> StorageRange:
    item = key.field("fqn") if isinstance(key, StandIn) else None
    relative = info.field("relative_path") if isinstance(info, StandIn) else None
    offset = info.field("offset") if isinstance(info, StandIn) else None
    length = info.field("length") if isinstance(info, StandIn) else None
    if not (
        isinstance(relative, str)
        and type(offset) is int
        and type(length) is int
        and offset >= 0
        and length >= 0
    ):
        raise Damaged(f"item {item!r} has no usable (relative_path, offset, length)")
    if relative.startswith("/") or ".." in relative.split("/"):
        raise Damaged(f"item {item!r} names {relative!r}, outside its folder")
    return StorageRange(str(item), relative, offset, length)


def _expect_some_distcp(context: Context, prefix: str, path: str) -> None:
    folder_files = [
        name
        for name in context.files.files()
        if name.startswith(prefix) and name.endswith(".distcp")
    ]
    if not folder_files:
        context.findings.problem(path, "no .distcp file beside it")


def _check_ranges(context: Context, prefix: str, path: str, ranges: list[StorageRange]) -> None:
    by_file: dict[str, list[StorageRange]] = {}
    for storage in ranges:
        by_file.setdefault(prefix + storage.relative_path, []).append(storage)
    for data_path, items in sorted(by_file.items()):
        kind = context.files.kind(data_path)
        if kind is None:
            context.findings.problem(data_path, f"missing ({len(items)} item(s) named by {path})")
            continue
        if kind != "file":
            context.findings.problem(data_path, f"is a {kind}, not a file")
            continue
        size = context.files.size(data_path)
        beyond = [item for item in items if item.offset + item.length > size]
        if beyond:
            worst = max(beyond, key=lambda item: item.offset + item.length)
            context.findings.problem(
                data_path,
                f"{len(beyond)} item(s) lie past its end ({worst.item!r} ends at"
                f" {worst.offset + worst.length}, the file has {size} bytes)",
            )
            continue
        with context.checking(data_path):
            if context.deep:
                _verify_items(context, data_path, items)


def _verify_items(context: Context, data_path: str, items: list[StorageRange]) -> None:
    with context.files.open(data_path) as handle:
        for item in sorted(items, key=lambda item: item.offset):
            if item.length < 4:
                continue
            if handle.read_at(item.offset, 4) != torchzip.ZIP_MAGIC:
                continue  # raw bytes (a transform extension): no checksum to verify
            try:
                archive = torchzip.read_archive(handle, item.offset, item.offset + item.length)
            except Damaged as failure:
                context.findings.problem(data_path, f"item {item.item!r}: {failure}")
                continue
            torchzip.verify_crcs(context, handle, archive)
