"""TensorFlow checkpoints (tensor bundles): the `.index` table parses and its shards are there.

A bundle `<prefix>` is `<prefix>.index` plus `<prefix>.data-<i>-of-<n>` shards (5 digits each).
The index is a LevelDB-format table (TensorFlow's `table` library, uncompressed): a 48-byte
footer (metaindex and index block handles as varints, then the magic `0xdb4775248b80fb57`), an
index block of data block handles, data blocks of prefix-compressed entries with a restart
array, each block followed by its type byte and a masked CRC-32C of block and type. Its entries
are protocol buffers: the empty key holds `BundleHeaderProto` (1: num_shards, 2: endianness,
3: version); every other key a `BundleEntryProto` (1: dtype, 2: shape, 3: shard_id, 4: offset,
5: size, 6: masked CRC-32C of the tensor's bytes, 7: slices).

Cheap: footer, blocks and entries parse (block CRCs verified for an index up to 1 MiB), every
shard `0..num_shards-1` exists, and every entry's bytes lie inside its shard. Deep: block CRCs,
and each tensor's bytes against its CRC-32C (string tensors as TensorFlow frames them: varint
lengths, a checksum of the lengths, the bytes; variant tensors have no plain checksum).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Final

from daemon.integrity.crc import crc32c, crc32c_extend, unmask
from daemon.integrity.files import Context, Damaged, FileHandle, Unreadable

TABLE_MAGIC: Final = 0xDB4775248B80FB57
FOOTER_BYTES: Final = 48
BLOCK_TRAILER: Final = 5
INDEX_CAP: Final = 256 << 20
CHEAP_CRC_CAP: Final = 1 << 20
STRING_CAP: Final = 64 << 20

DT_STRING: Final = 7
DT_RESOURCE: Final = 20
DT_VARIANT: Final = 21


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor (or slice) of a bundle: where its bytes are and their checksum."""

    key: str
    dtype: int
    elements: int
    shard: int
    offset: int
    size: int
    crc: int | None


@dataclass(frozen=True, slots=True)
class Bundle:
    """A parsed `.index`: its shard count and entries."""

    num_shards: int
    entries: tuple[Entry, ...]


def shard_name(prefix: str, shard: int, count: int) -> str:
    """Given a bundle prefix, a shard number and the shard count, return the shard's path."""
    return f"{prefix}.data-{shard:05d}-of-{count:05d}"


def check_bundle(context: Context, index_path: str) -> None:
    """Given the path of a `<prefix>.index`, check the index, its shards and (deep) the data."""
    prefix = index_path[: -len(".index")]
    bundle: Bundle | None = None
    with context.checking(index_path), context.files.open(index_path) as handle:
        if handle.size > INDEX_CAP:
            raise Unreadable(f"{handle.size} bytes: larger than ckptd reads")
        verify = context.deep or handle.size <= CHEAP_CRC_CAP
        bundle = parse_index(handle.read_at(0, handle.size), verify_crc=verify)
    if bundle is None:
        return
    shard_sizes: dict[int, int] = {}
    for shard in range(bundle.num_shards):
        path = shard_name(prefix, shard, bundle.num_shards)
        kind = context.files.kind(path)
        if kind is None:
            context.findings.problem(path, f"missing (shard {shard} of {bundle.num_shards})")
        elif kind != "file":
            context.findings.problem(path, f"is a {kind}, not a file")
        else:
            shard_sizes[shard] = context.files.size(path)
    _check_extents(context, prefix, bundle, shard_sizes)
    if context.deep:
        for shard, _ in sorted(shard_sizes.items()):
            path = shard_name(prefix, shard, bundle.num_shards)
            entries = [entry for entry in bundle.entries if entry.shard == shard]
            with context.checking(path), context.files.open(path) as handle:
                _verify_tensors(context, handle, entries)
    else:
        for shard in shard_sizes:
            context.findings.mark_checked(shard_name(prefix, shard, bundle.num_shards))


def _check_extents(
    context: Context, prefix: str, bundle: Bundle, shard_sizes: dict[int, int]
) -> None:
    for entry in bundle.entries:
        if entry.size == 0:
            continue
        if not 0 <= entry.shard < bundle.num_shards:
            context.findings.problem(
                f"{prefix}.index",
                f"tensor {entry.key!r} is in shard {entry.shard} of {bundle.num_shards}",
            )
            continue
        size = shard_sizes.get(entry.shard)
        if size is not None and entry.offset + entry.size > size:
            context.findings.problem(
                shard_name(prefix, entry.shard, bundle.num_shards),
                f"tensor {entry.key!r} ends at {entry.offset + entry.size}, the shard has"
                f" {size} bytes",
            )


# --- the table ----------------------------------------------------------------------------------


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise Damaged("a varint runs past its block")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def parse_index(data: bytes, *, verify_crc: bool) -> Bundle:
    """Given the bytes of a `.index` file, return its bundle; raise Damaged when it is not one."""
    if len(data) < FOOTER_BYTES:
        raise Damaged(f"{len(data)} bytes: too short for a table footer")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != TABLE_MAGIC:
        raise Damaged(f"no table magic at the end (found {magic:016x})")
    footer = data[len(data) - FOOTER_BYTES :]
    _, position = _varint(footer, 0)  # metaindex offset
    _, position = _varint(footer, position)  # metaindex size
    index_offset, position = _varint(footer, position)
    index_size, _ = _varint(footer, position)
    index_block = _block(data, index_offset, index_size, verify_crc)
    header: bytes | None = None
    entries: list[Entry] = []
    for _, handle in _entries(index_block):
        offset, position = _varint(handle, 0)
        size, _ = _varint(handle, position)
        for key, value in _entries(_block(data, offset, size, verify_crc)):
            if key == b"":
                header = value
            else:
                entries.append(_entry(key, value))
    if header is None:
        raise Damaged("no bundle header entry")
    fields = _fields(header)
    num_shards = _int(fields, 1, 1)
    if num_shards < 1:
        raise Damaged(f"bundle header says {num_shards} shards")
    if _int(fields, 2, 0) != 0:
        raise Unreadable("a big-endian bundle")
    return Bundle(num_shards, tuple(entries))


def _block(data: bytes, offset: int, size: int, verify_crc: bool) -> bytes:
    end = offset + size
    if offset < 0 or size < 0 or end + BLOCK_TRAILER > len(data) - FOOTER_BYTES:
        raise Damaged(f"a block handle ({offset}, {size}) points past the end")
    contents = data[offset:end]
    kind = data[end]
    if kind != 0:
        raise Unreadable(f"a block compressed with type {kind}")
    if verify_crc:
        (stored,) = struct.unpack_from("<I", data, end + 1)
        if unmask(stored) != crc32c(data[offset : end + 1]):
            raise Damaged(f"the block at {offset} fails its CRC-32C")
    return contents


def _entries(block: bytes) -> list[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise Damaged("a block too short for its restart count")
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * restarts
    if restarts == 0 or limit < 0:
        raise Damaged(f"a block with {restarts} restarts")
    found: list[tuple[bytes, bytes]] = []
    key = b""
    position = 0
    while position < limit:
        shared, position = _varint(block, position)
        unshared, position = _varint(block, position)
        value_length, position = _varint(block, position)
        if shared > len(key) or position + unshared + value_length > limit:
            raise Damaged("a block entry runs past its block")
        key = key[:shared] + block[position : position + unshared]
        position += unshared
        found.append((key, block[position : position + value_length]))
        position += value_length
    return found


def _fields(message: bytes) -> dict[int, list[int | bytes]]:
    """Given a protocol buffer message, return its fields (varints as ints, others as bytes)."""
    fields: dict[int, list[int | bytes]] = {}
    position = 0
    while position < len(message):
        tag, position = _varint(message, position)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, position = _varint(message, position)
        elif wire == 1:
            value, position = message[position : position + 8], position + 8
        elif wire == 2:
            length, position = _varint(message, position)
            value, position = message[position : position + length], position + length
        elif wire == 5:
            value, position = message[position : position + 4], position + 4
        else:
            raise Damaged(f"a protocol buffer with wire type {wire}")
        if position > len(message):
            raise Damaged("a protocol buffer field runs past its entry")
        fields.setdefault(number, []).append(value)
    return fields


def _int(fields: dict[int, list[int | bytes]], number: int, default: int) -> int:
    values = fields.get(number)
    if not values:
        return default
    value = values[-1]
    return value if isinstance(value, int) else default


def _entry(key: bytes, value: bytes) -> Entry:
    fields = _fields(value)
    crc_values = fields.get(6)
    crc = None
    if crc_values and isinstance(crc_values[-1], bytes) and len(crc_values[-1]) == 4:
        (crc,) = struct.unpack("<I", crc_values[-1])
    return Entry(
        key=key.decode("utf-8", "replace"),
        dtype=_int(fields, 1, 0),
        elements=_elements(fields.get(2)),
        shard=_int(fields, 3, 0),
        offset=_int(fields, 4, 0),
        size=_int(fields, 5, 0),
        crc=crc,
    )


def _elements(shapes: list[int | bytes] | None) -> int:
    if not shapes or not isinstance(shapes[-1], bytes):
        return 1
    dims = _fields(shapes[-1]).get(2, [])
    sizes = [_int(_fields(dim), 1, 0) if isinstance(dim, bytes) else 0 for dim in dims]
    return math.prod(sizes)


# --- deep: tensor checksums ---------------------------------------------------------------------


def _verify_tensors(context: Context, handle: FileHandle, entries: list[Entry]) -> None:
    for entry in sorted(entries, key=lambda entry: entry.offset):
        if entry.size == 0 or entry.crc is None or entry.dtype in (DT_VARIANT, DT_RESOURCE):
            continue
        if entry.offset + entry.size > handle.size:
            continue  # reported by the extent check
        if entry.dtype == DT_STRING:
            actual = _string_crc(handle, entry)
        else:
            actual = 0
            for chunk in handle.stream(entry.offset, entry.size, context.options, context.findings):
                actual = crc32c_extend(actual, chunk)
        if actual is not None and actual != unmask(entry.crc):
            context.findings.problem(handle.path, f"tensor {entry.key!r} fails its CRC-32C")


def _string_crc(handle: FileHandle, entry: Entry) -> int | None:
    if entry.size > STRING_CAP:
        return None
    data = handle.read_at(entry.offset, entry.size)
    crc = 0
    position = 0
    for _ in range(entry.elements):
        length, position = _varint(data, position)
        packed = struct.pack("<I", length) if length <= 0xFFFFFFFF else struct.pack("<Q", length)
        crc = crc32c_extend(crc, packed)
    crc = crc32c_extend(crc, data[position : position + 4])
    return crc32c_extend(crc, data[position + 4 :])
