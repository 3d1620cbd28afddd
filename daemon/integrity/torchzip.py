"""`torch.save` files: the zip archive's directory, the storages `data.pkl` refers to, CRCs.

A `torch.save` file (`.pt`, `.pth`, `.bin`, Lightning's `.ckpt`, DeepSpeed's `*_states.pt`) is,
since torch 1.6, a zip archive (stored, not compressed, 64-byte aligned): `<prefix>/data.pkl`
(the object, pickled, tensors as persistent references `("storage", <type>, key, location,
numel)`), `<prefix>/data/<key>` (each storage's raw bytes), `version`, `byteorder`. Older saves
(`_use_new_zipfile_serialization=False`) are five pickles (magic number, protocol, system info,
the object, the storage keys) followed by each storage as an int64 element count and its bytes.

The cheap check reads the end-of-central-directory record (zip64 too), the central directory,
and every member's local header (signature, name, where its data starts); then `data.pkl`
through stand-ins (`daemon/integrity/pickles.py`: no torch, no code run), and checks that every
storage it refers to has its member with exactly `numel * element size` bytes. For a legacy file
it walks the storage records to the end. Any zip archive is checked the same way up to
`data.pkl`. The deep check streams every member and compares its CRC-32 with the directory's
(`zlib.crc32`, one reused buffer, stoppable, reporting progress).

What it catches: truncation or bytes cut from the end (no end record, a directory pointing past
the end), a zeroed or overwritten directory or local header, a storage member missing or of the
wrong size; in deep mode any changed byte inside any member.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

from daemon.integrity.files import Context, Damaged, Deferred, FileHandle, Unreadable
from daemon.integrity.pickles import (
    PickleError,
    StandIn,
    StandInUnpickler,
    load_one,
    loads,
)

ZIP_MAGIC: Final = b"PK\x03\x04"
EMPTY_ZIP_MAGIC: Final = b"PK\x05\x06"
PICKLE_MAGIC: Final = 0x80
LEGACY_MAGIC_NUMBER: Final = 0x1950A86A20F9469CFC6C

CHEAP_PICKLE_CAP: Final = 32 << 20
DEEP_PICKLE_CAP: Final = 512 << 20
DIRECTORY_CAP: Final = 256 << 20

_EOCD = struct.Struct("<4s4H2LH")  # signature, disk, cd disk, entries here, total, size, offset
_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, zip64 record offset, disks
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # ..., entries here, total, cd size, cd offset
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_MAX_COMMENT = 65535

# Bytes per element of each storage type torch pickles (`torch.<Type>Storage`).
ELEMENT_BYTES: Final = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "BFloat16Storage": 2,
    "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8,
    "QInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt8Storage": 1,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
    "UntypedStorage": 1,
}

# Names that torch.save writes even though they end in `.bin` (other `.bin` files may be
# anything, and are checked only when they look like a zip or a pickle).
_TORCH_BIN_NAMES = ("training_args.bin", "optimizer.bin", "scheduler.bin", "scaler.bin")


def is_torch_name(name: str) -> bool:
    """Given a file name, return whether torch.save is what writes files so named."""
    if name.endswith((".pt", ".pth", ".ckpt")):
        return True
    return name in _TORCH_BIN_NAMES or (name.startswith("pytorch_model") and name.endswith(".bin"))


@dataclass(frozen=True, slots=True)
class Member:
    """One member of a zip archive: where its data lies in the file and what the directory says."""

    name: str
    method: int
    flags: int
    crc: int
    compressed: int
    size: int
    header_offset: int  # absolute, in the file
    data_offset: int  # absolute, in the file


@dataclass(frozen=True, slots=True)
class Archive:
    """A zip archive found in a file (the whole file, or a range of it for DCP)."""

    start: int
    members: tuple[Member, ...]

    def find(self, name: str) -> Member | None:
        return next((member for member in self.members if member.name == name), None)


# --- the zip directory --------------------------------------------------------------------------


def read_archive(handle: FileHandle, start: int, end: int) -> Archive:
    """Given a file and the range [start, end) that must hold exactly one zip archive, read its
    directory and every local header; raise Damaged on anything inconsistent."""
    length = end - start
    if length < _EOCD.size:
        raise Damaged(f"{length} bytes: too short for a zip archive")
    tail_length = min(length, _EOCD.size + _MAX_COMMENT)
    tail = handle.read_at(end - tail_length, tail_length)
    record_at = _find_end_record(tail)
    if record_at < 0:
        raise Damaged("no zip end-of-central-directory record at the end (truncated?)")
    eocd_position = end - tail_length + record_at
    _, disk, cd_disk, _, total, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, record_at)
    if disk != 0 or cd_disk != 0:
        raise Damaged("a multi-disk zip archive")
    directory_end = eocd_position
    if eocd_position - start >= _LOCATOR.size:
        locator = handle.read_at(eocd_position - _LOCATOR.size, _LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":
            total, cd_size, cd_offset, directory_end = _read_zip64(handle, start, eocd_position)
    base = directory_end - cd_size - cd_offset
    if base != start:
        raise Damaged(
            f"the central directory ({cd_size} bytes at {cd_offset}) does not end where the"
            f" end record begins ({directory_end - start})"
        )
    if cd_size > DIRECTORY_CAP:
        raise Unreadable(f"a central directory of {cd_size} bytes: larger than ckptd reads")
    directory = handle.read_at(start + cd_offset, cd_size)
    members = _parse_directory(directory, total, start, start + cd_offset)
    return Archive(start, tuple(_locate(handle, members, start + cd_offset)))


def _find_end_record(tail: bytes) -> int:
    """Given the last bytes of an archive, return where its end record starts, or -1: the last
    `PK\x05\x06` whose comment length reaches exactly to the end."""
    position = len(tail)
    while (position := tail.rfind(EMPTY_ZIP_MAGIC, 0, position)) >= 0:
        if len(tail) - position >= _EOCD.size:
            (comment_length,) = struct.unpack_from("<H", tail, position + 20)
            if position + _EOCD.size + comment_length == len(tail):
                return position
    return -1


def _read_zip64(handle: FileHandle, start: int, eocd_position: int) -> tuple[int, int, int, int]:
    locator = handle.read_at(eocd_position - _LOCATOR.size, _LOCATOR.size)
    _, _, record_offset, _ = _LOCATOR.unpack(locator)
    record_position = eocd_position - _LOCATOR.size - _EOCD64.size
    if record_position < start:
        raise Damaged("zip64 locator without room for its record")
    record = handle.read_at(record_position, _EOCD64.size)
    fields = _EOCD64.unpack(record)
    if fields[0] != b"PK\x06\x06":
        raise Damaged(f"no zip64 end record at {record_position - start}")
    if record_offset != record_position - start:
        raise Damaged(
            f"zip64 locator points at {record_offset}, the record is at {record_position}"
        )
    total, cd_size, cd_offset = fields[7], fields[8], fields[9]
    return total, cd_size, cd_offset, record_position


def _parse_directory(directory: bytes, total: int, start: int, directory_at: int) -> list[Member]:
    members: list[Member] = []
    position = 0
    for index in range(total):
        if position + _CENTRAL.size > len(directory):
            raise Damaged(f"central directory ends after {index} of {total} entries")
        fields = _CENTRAL.unpack_from(directory, position)
        if fields[0] != b"PK\x01\x02":
            raise Damaged(f"central directory entry {index} has a bad signature")
        flags, method = fields[5], fields[6]
        crc, compressed, size = fields[9], fields[10], fields[11]
        name_length, extra_length, comment_length = fields[12], fields[13], fields[14]
        offset = fields[18]
        name_end = position + _CENTRAL.size + name_length
        extra_end = name_end + extra_length
        if extra_end + comment_length > len(directory):
            raise Damaged(f"central directory entry {index} runs past the directory")
        name = directory[position + _CENTRAL.size : name_end].decode("utf-8", "replace")
        if 0xFFFFFFFF in (compressed, size, offset):
            size, compressed, offset = _zip64_extra(
                directory[name_end:extra_end], size, compressed, offset, name
            )
        if start + offset >= directory_at:
            raise Damaged(f"member {name!r}: local header offset {offset} lies in the directory")
        members.append(Member(name, method, flags, crc, compressed, size, start + offset, 0))
        position = extra_end + comment_length
    if position != len(directory):
        raise Damaged(f"central directory holds more than its {total} entries")
    return members


def _zip64_extra(
    extra: bytes, size: int, compressed: int, offset: int, name: str
) -> tuple[int, int, int]:
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, position)
        body = extra[position + 4 : position + 4 + length]
        if tag == 0x0001:
            values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if size == 0xFFFFFFFF and values:
                size = values.pop(0)
            if compressed == 0xFFFFFFFF and values:
                compressed = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
            return size, compressed, offset
        position += 4 + length
    raise Damaged(f"member {name!r}: sizes need a zip64 extra field, and there is none")


def _locate(handle: FileHandle, members: list[Member], directory_at: int) -> list[Member]:
    """Given the directory's members, read each local header; return the members with their
    data offsets, after checking that no member's data overlaps the next one's header."""
    located: list[Member] = []
    for member in members:
        encoded = member.name.encode("utf-8")
        header = handle.read_at(member.header_offset, min(_LOCAL.size + len(encoded), 1 << 16))
        fields = _LOCAL.unpack_from(header)
        if fields[0] != ZIP_MAGIC:
            raise Damaged(f"member {member.name!r}: no local header at {member.header_offset}")
        name_length, extra_length = fields[10], fields[11]
        if header[_LOCAL.size : _LOCAL.size + name_length] != encoded:
            raise Damaged(f"member {member.name!r}: its local header names another file")
        data_offset = member.header_offset + _LOCAL.size + name_length + extra_length
        located.append(
            Member(
                member.name,
                member.method,
                member.flags,
                member.crc,
                member.compressed,
                member.size,
                member.header_offset,
                data_offset,
            )
        )
    ordered = sorted(located, key=lambda member: member.header_offset)
    for current, following in zip(ordered, [*ordered[1:], None], strict=True):
        limit = following.header_offset if following is not None else directory_at
        if current.data_offset + current.compressed > limit:
            raise Damaged(
                f"member {current.name!r}: its {current.compressed} bytes run into"
                f" {'the next member' if following is not None else 'the central directory'}"
            )
        if current.method == 0 and current.compressed != current.size:
            raise Damaged(f"member {current.name!r}: stored, but sizes differ")
    return located


def read_member(handle: FileHandle, member: Member, cap: int) -> bytes:
    """Given a member of at most `cap` bytes, return its content (inflated if deflated)."""
    if member.size > cap:
        raise Unreadable(f"member {member.name!r} of {member.size} bytes: larger than ckptd reads")
    raw = handle.read_at(member.data_offset, member.compressed)
    if member.method == 0:
        return raw
    if member.method == 8:
        try:
            data = zlib.decompressobj(-15).decompress(raw, cap + 1)
        except zlib.error as failure:
            raise Damaged(f"member {member.name!r} does not inflate ({failure})") from None
        if len(data) != member.size:
            raise Damaged(f"member {member.name!r} inflates to {len(data)} of {member.size} bytes")
        return data
    raise Unreadable(f"member {member.name!r} uses compression method {member.method}")


# --- deep: CRC of every member ------------------------------------------------------------------


def verify_crcs(context: Context, handle: FileHandle, archive: Archive) -> None:
    """Given an archive of an open file, stream every member and compare its CRC-32 with the
    directory's; each mismatch is a problem of the file (the others are still checked)."""
    for member in sorted(archive.members, key=lambda member: member.data_offset):
        if member.flags & 0x1:
            context.findings.skip(handle.path, f"member {member.name!r} is encrypted")
            continue
        try:
            crc, produced = _member_crc(context, handle, member)
        except Unreadable as failure:
            context.findings.skip(handle.path, str(failure))
            continue
        if produced != member.size:
            context.findings.problem(
                handle.path,
                f"member {member.name!r} inflates to {produced} bytes, the directory says"
                f" {member.size}",
            )
        elif crc != member.crc:
            context.findings.problem(
                handle.path,
                f"member {member.name!r}: CRC-32 {crc:08x}, the directory says {member.crc:08x}",
            )


def _member_crc(context: Context, handle: FileHandle, member: Member) -> tuple[int, int]:
    chunks = handle.stream(member.data_offset, member.compressed, context.options, context.findings)
    crc = 0
    if member.method == 0:
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
        return crc, member.compressed
    if member.method != 8:
        raise Unreadable(f"member {member.name!r} uses compression method {member.method}")
    inflater = zlib.decompressobj(-15)
    produced = 0
    try:
        for chunk in chunks:
            pending = bytes(chunk)
            while pending:
                output = inflater.decompress(pending, 1 << 22)
                crc = zlib.crc32(output, crc)
                produced += len(output)
                pending = inflater.unconsumed_tail
        output = inflater.flush()
    except zlib.error as failure:
        raise Damaged(f"member {member.name!r} does not inflate ({failure})") from None
    return zlib.crc32(output, crc), produced + len(output)


# --- torch.save files ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TorchFile:
    """What a check of a torch.save file read: the unpickled object (stand-ins inside)."""

    obj: Any
    archive: Archive | None


def check_file(context: Context, path: str, *, required: bool) -> TorchFile | None:
    """Given a file torch.save may have written, check it; return what was read, or None.

    `required`: the file's name says torch.save wrote it, so anything other than a zip archive
    or a pickle is damage. Otherwise such a file is simply not checked."""
    found: TorchFile | None = None
    with context.files.open(path) as handle:
        if handle.size == 0:
            if required:
                context.findings.problem(path, "empty file")
            return None
        head = handle.read_at(0, min(4, handle.size))
        if head in (ZIP_MAGIC, EMPTY_ZIP_MAGIC):
            with context.checking(path):
                found = _check_zip(context, handle)
        elif head[0] == PICKLE_MAGIC:
            with context.checking(path):
                found = _check_pickle_file(context, handle)
        elif required:
            context.findings.problem(
                path, f"neither a torch.save zip archive nor a pickle (starts with {head.hex()})"
            )
    return found


def _check_zip(context: Context, handle: FileHandle) -> TorchFile | None:
    archive = read_archive(handle, 0, handle.size)
    pickles = [member for member in archive.members if member.name.endswith("data.pkl")]
    found: TorchFile | None = None
    if pickles:
        pickled = min(pickles, key=lambda member: member.name.count("/"))
        prefix = pickled.name[: -len("data.pkl")]
        if context.deep or pickled.size <= CHEAP_PICKLE_CAP:
            data = read_member(handle, pickled, DEEP_PICKLE_CAP)
            try:
                obj, unpickler = loads(data)
            except PickleError as failure:
                raise Damaged(f"{pickled.name} does not unpickle ({failure})") from None
            _check_storages(archive, prefix, unpickler.references)
            found = TorchFile(obj, archive)
        else:  # the directory was checked; the storages are left to the deep check
            found = TorchFile(None, archive)
    elif archive.members:
        raise Damaged("a zip archive without data.pkl: not a torch.save file")
    if context.deep:
        verify_crcs(context, handle, archive)
    return found


def _check_storages(archive: Archive, prefix: str, references: list[tuple[Any, ...]]) -> None:
    sizes = {member.name: member.size for member in archive.members}
    seen: set[str] = set()
    for reference in references:
        if len(reference) < 5 or reference[0] != "storage":
            continue
        storage_type, key, location, numel = reference[1], reference[2], reference[3], reference[4]
        key = str(key)
        if key in seen or location == "meta":
            continue
        seen.add(key)
        name = f"{prefix}data/{key}"
        size = sizes.get(name)
        if size is None:
            raise Damaged(f"storage {key} that data.pkl refers to has no member {name!r}")
        element = _element_bytes(storage_type)
        if element is not None and isinstance(numel, int) and numel * element != size:
            raise Damaged(
                f"storage {key}: data.pkl says {numel} x {element} bytes, member has {size}"
            )


def _element_bytes(storage_type: Any) -> int | None:
    if isinstance(storage_type, type) and issubclass(storage_type, StandIn):
        return ELEMENT_BYTES.get(storage_type.qualname)
    return None


def _check_pickle_file(context: Context, handle: FileHandle) -> TorchFile | None:
    """A legacy torch.save file (five pickles, then the storages), or a plain pickle."""
    cap = DEEP_PICKLE_CAP if context.deep else CHEAP_PICKLE_CAP
    if handle.size > cap and not context.deep:
        raise Deferred(f"a pickle of {handle.size} bytes is left to the deep check")
    prefix = handle.read_at(0, min(handle.size, cap))
    stream = io.BytesIO(prefix)
    unpickler = StandInUnpickler(stream)
    try:
        first = load_one(unpickler)
    except PickleError as failure:
        if len(prefix) < handle.size:
            raise Unreadable(f"a pickle larger than the {cap} bytes ckptd reads") from None
        raise Damaged(f"does not unpickle ({failure})") from None
    if first != LEGACY_MAGIC_NUMBER:
        return TorchFile(first, None)  # a plain pickle: it unpickles, nothing more to check
    try:
        load_one(unpickler)  # protocol version
        system = load_one(unpickler)
        obj = load_one(unpickler)
        keys = load_one(unpickler)
    except PickleError as failure:
        if len(prefix) < handle.size:
            raise Unreadable(f"pickles larger than the {cap} bytes ckptd reads") from None
        raise Damaged(f"legacy torch.save pickles do not unpickle ({failure})") from None
    little = not isinstance(system, dict) or system.get("little_endian", True)
    _walk_legacy_storages(handle, stream.tell(), keys, unpickler.references, little)
    return TorchFile(obj, None)


def _walk_legacy_storages(
    handle: FileHandle,
    position: int,
    keys: Any,
    references: list[tuple[Any, ...]],
    little_endian: bool,
) -> None:
    if not isinstance(keys, list):
        raise Damaged("legacy torch.save: the storage key list is not a list")
    element_of: dict[str, int | None] = {}
    for reference in references:
        if len(reference) >= 5 and reference[0] == "storage":
            element_of[str(reference[2])] = _element_bytes(reference[1])
    order = "<q" if little_endian else ">q"
    for key in keys:
        element = element_of.get(str(key))
        if element is None:
            return  # an unknown storage type: its length cannot be told, stop here
        (count,) = struct.unpack(order, handle.read_at(position, 8))
        if count < 0:
            raise Damaged(f"legacy storage {key}: negative element count")
        position += 8 + count * element
        if position > handle.size:
            raise Damaged(
                f"legacy storage {key} ends at {position}, the file has {handle.size} bytes"
            )


def world_sizes(obj: Any) -> dict[str, int]:
    """Given the object of a DeepSpeed model-states file, return its integer `*_world_size`
    entries (`dp_world_size`, `mp_world_size`)."""
    if not isinstance(obj, dict):
        return {}
    return {
        str(key): value
        for key, value in obj.items()
        if isinstance(key, str) and key.endswith("world_size") and type(value) is int
    }
