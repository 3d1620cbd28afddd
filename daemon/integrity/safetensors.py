"""safetensors: the header parses and indexes the whole file, exactly as the loader demands.

Format (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian `N`, then
`N` bytes of UTF-8 JSON starting with `{` (`{"name": {"dtype", "shape", "data_offsets": [b, e]},
..., "__metadata__": {str: str}}`, space-padded), then the byte buffer. The loader rejects a
header over 100,000,000 bytes, and a buffer that the tensors do not cover exactly: sorted by
offset, each tensor starts where the previous one ended, the last ends at the end of the file,
and each spans `prod(shape) * bits(dtype) / 8` bytes.

So the cheap check reads only the header and catches a truncated file, bytes appended, a zeroed
or cut header, and a header that disagrees with the file. A zeroed range inside the tensor
data is invisible to any check: the format has no checksum (zeros are valid numbers).

A sharded model's `model.safetensors.index.json` names, per tensor, the shard holding it:
every shard must exist and hold the tensors it is named for.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, Final

from daemon.integrity.files import Context, Damaged, Deferred, Unreadable

MAX_HEADER: Final = 100_000_000  # the loader's own limit (MAX_HEADER_SIZE)
CHEAP_HEADER_CAP: Final = 16 << 20  # headers beyond this are read by the deep check only
INDEX_CAP: Final = 64 << 20

DTYPE_BITS: Final = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def check_file(context: Context, path: str) -> frozenset[str] | None:
    """Given a `.safetensors` file of the checkpoint, check its header against the file; return
    the names of its tensors, or None when the header could not be read."""
    names: frozenset[str] | None = None
    with context.checking(path), context.files.open(path) as handle:
        if handle.size < 8:
            raise Damaged(f"{handle.size} bytes: too short for a safetensors header")
        (length,) = struct.unpack("<Q", handle.read_at(0, 8))
        if length == 0 or length > MAX_HEADER:
            raise Damaged(f"header length {length} is outside 1..{MAX_HEADER}")
        if 8 + length > handle.size:
            raise Damaged(
                f"header length {length} runs past the end of the {handle.size}-byte file"
            )
        if length > CHEAP_HEADER_CAP and not context.deep:
            raise Deferred(f"a header of {length} bytes is left to the deep check")
        header = _parse_header(handle.read_at(8, length))
        names = _check_tensors(header, handle.size - 8 - length)
    return names


def _parse_header(raw: bytes) -> dict[str, Any]:
    if not raw.startswith(b"{"):
        raise Damaged(f"header does not start with '{{' (starts with {raw[:8].hex()})")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as failure:
        raise Damaged(f"header is not valid JSON ({failure})") from None
    if not isinstance(header, dict):
        raise Damaged("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
    ):
        raise Damaged("__metadata__ is not a map of strings")
    return header


def _check_tensors(header: dict[str, Any], buffer_bytes: int) -> frozenset[str]:
    """Given a parsed header (without `__metadata__`) and the size of the byte buffer, check that
    the tensors cover the buffer exactly; return their names."""
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise Damaged(f"tensor {name!r}: entry is not an object")
        offsets = info.get("data_offsets")
        shape = info.get("shape")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(value) is int and value >= 0 for value in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise Damaged(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
        if not (isinstance(shape, list) and all(type(v) is int and v >= 0 for v in shape)):
            raise Damaged(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        bits = DTYPE_BITS.get(str(info.get("dtype")))
        if bits is not None:
            expected = math.prod(shape) * bits
            if expected % 8 or expected // 8 != offsets[1] - offsets[0]:
                raise Damaged(
                    f"tensor {name!r}: {info.get('dtype')} {shape} needs {expected / 8:g} bytes,"
                    f" data_offsets span {offsets[1] - offsets[0]}"
                )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise Damaged(f"tensor {name!r} starts at {begin}, the previous one ends at {position}")
        position = end
    if position != buffer_bytes:
        raise Damaged(
            f"tensors cover {position} bytes of data, the file holds {buffer_bytes}"
            + (" (truncated)" if buffer_bytes < position else " (bytes appended)")
        )
    return frozenset(name for _, _, name in spans)


def check_index(
    context: Context, path: str, shard_tensors: dict[str, frozenset[str] | None]
) -> None:
    """Given a `*.safetensors.index.json` and the tensor names found in each shard checked (None
    for a shard whose header could not be read), check that every shard it names exists beside
    it and holds the tensors the index assigns to it."""
    folder = path.rpartition("/")[0]
    prefix = f"{folder}/" if folder else ""
    with context.checking(path), context.files.open(path) as handle:
        if handle.size > INDEX_CAP:
            raise Unreadable(f"{handle.size} bytes: larger than ckptd reads")
        try:
            document = json.loads(handle.read_at(0, handle.size))
        except (UnicodeDecodeError, ValueError) as failure:
            raise Damaged(f"not valid JSON ({failure})") from None
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict):
            raise Damaged("has no weight_map object")
        wanted: dict[str, list[str]] = {}
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or shard in ("", ".", ".."):
                raise Damaged(f"tensor {tensor!r} is mapped to {shard!r}, not a file name")
            wanted.setdefault(shard, []).append(tensor)
        for shard, tensors in sorted(wanted.items()):
            shard_path = prefix + shard
            kind = context.files.kind(shard_path)
            if kind is None:
                context.findings.problem(shard_path, f"missing (named by {path})")
                continue
            held = shard_tensors.get(shard_path)
            if held is None:
                continue
            absent = [tensor for tensor in tensors if tensor not in held]
            if absent:
                context.findings.problem(
                    shard_path,
                    f"lacks {len(absent)} tensor(s) {path} assigns to it (e.g. {absent[0]!r})",
                )
