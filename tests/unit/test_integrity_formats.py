"""The pure parts of the integrity checks: checksums, headers, tables, pickles, bytes in memory."""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.integrity import crc, pickles, safetensors, tfindex
from daemon.integrity.files import Damaged
from daemon.integrity.result import Signature, SignatureEntry


def test_crc32c_matches_the_standard_check_values() -> None:
    assert crc.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert crc.crc32c(b"") == 0
    assert crc.crc32c(b"\0" * 32) == 0x8A9136AA  # RFC 3720 B.4 test vectors
    assert crc.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc.crc32c(bytes(range(32))) == 0x46DD794E


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_crc32c_extends_over_any_split(data: bytes, cut: int) -> None:
    whole = crc._pure_extend(0, data)
    assert crc._pure_extend(crc._pure_extend(0, data[:cut]), data[cut:]) == whole
    assert crc._bytewise(data, 0xFFFFFFFF) ^ 0xFFFFFFFF == whole  # slicing-by-8 = bytewise


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_mask_and_unmask_are_inverse(value: int) -> None:
    assert crc.unmask(crc.mask(value)) == value


def tensors(*spans: tuple[str, str, list[int], int, int]) -> dict[str, object]:
    return {
        name: {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        for name, dtype, shape, begin, end in spans
    }


def test_safetensors_tensors_must_cover_the_buffer_exactly() -> None:
    header = tensors(("a", "F32", [2, 2], 0, 16), ("b", "BF16", [3], 16, 22))
    assert safetensors._check_tensors(dict(header), 22) == {"a", "b"}
    with pytest.raises(Damaged, match="truncated"):
        safetensors._check_tensors(dict(header), 20)
    with pytest.raises(Damaged, match="bytes appended"):
        safetensors._check_tensors(dict(header), 30)
    gap = tensors(("a", "F32", [2, 2], 0, 16), ("b", "BF16", [3], 18, 24))
    with pytest.raises(Damaged, match="starts at 18"):
        safetensors._check_tensors(gap, 24)
    wrong = tensors(("a", "F32", [2, 2], 0, 12))
    with pytest.raises(Damaged, match="needs 16 bytes"):
        safetensors._check_tensors(wrong, 12)
    sub_byte = tensors(("q", "F4", [3], 0, 2))  # 12 bits: not whole bytes
    with pytest.raises(Damaged):
        safetensors._check_tensors(sub_byte, 2)
    future = tensors(("z", "F2_NEW", [7], 0, 3))  # an unknown dtype: sizes not judged
    assert safetensors._check_tensors(future, 3) == {"z"}


def test_safetensors_header_must_be_a_json_object_with_string_metadata() -> None:
    assert safetensors._parse_header(b'{"__metadata__": {"format": "pt"}}   ') == {}
    for bad in (b"[1]", b"\0\0\0\0", b'{"a": ', b'{"__metadata__": {"n": 1}}'):
        with pytest.raises(Damaged):
            safetensors._parse_header(bad)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        _varint(0) + _varint(len(key)) + _varint(len(value)) + key + value for key, value in entries
    )
    return body + struct.pack("<II", 0, 1)


def _table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A TensorFlow-style table of one data block, built by hand."""
    data_block = _block(entries)
    trailer = b"\0" + struct.pack("<I", crc.mask(crc.crc32c(data_block + b"\0")))
    handle = _varint(0) + _varint(len(data_block))
    index_block = _block([(b"\xff", handle)])
    index_offset = len(data_block) + 5
    index_trailer = b"\0" + struct.pack("<I", crc.mask(crc.crc32c(index_block + b"\0")))
    footer_handles = _varint(0) + _varint(0) + _varint(index_offset) + _varint(len(index_block))
    footer = footer_handles.ljust(40, b"\0") + struct.pack("<Q", tfindex.TABLE_MAGIC)
    return data_block + trailer + index_block + index_trailer + footer


def test_a_hand_built_tensor_bundle_index_parses() -> None:
    header = b"\x08\x03"  # num_shards = 3
    entry = b"\x08\x01" + b"\x18\x02" + b"\x20\x10" + b"\x28\x08" + b"\x35" + b"\x01\x02\x03\x04"
    bundle = tfindex.parse_index(_table([(b"", header), (b"w", entry)]), verify_crc=True)
    assert bundle.num_shards == 3
    (parsed,) = bundle.entries
    assert (parsed.key, parsed.dtype, parsed.shard, parsed.offset, parsed.size) == (
        "w",
        1,
        2,
        16,
        8,
    )
    assert parsed.crc == 0x04030201
    assert tfindex.shard_name("ckpt-1", 2, 3) == "ckpt-1.data-00002-of-00003"


def test_a_damaged_index_is_refused() -> None:
    table = _table([(b"", b"\x08\x01")])
    with pytest.raises(Damaged, match="table magic"):
        tfindex.parse_index(table[:-1] + b"\0", verify_crc=False)
    flipped = bytearray(table)
    flipped[1] ^= 0xFF
    with pytest.raises(Damaged, match="CRC-32C"):
        tfindex.parse_index(bytes(flipped), verify_crc=True)
    with pytest.raises(Damaged, match="no bundle header"):
        tfindex.parse_index(_table([(b"w", b"\x08\x01")]), verify_crc=True)
    with pytest.raises(Damaged, match="too short"):
        tfindex.parse_index(b"\0" * 10, verify_crc=False)


@given(st.binary(max_size=200))
def test_garbage_never_crashes_the_index_parser(data: bytes) -> None:
    try:
        tfindex.parse_index(data + struct.pack("<Q", tfindex.TABLE_MAGIC), verify_crc=False)
    except Damaged:
        pass
    except Exception as failure:  # the only other allowed answer: not a bundle ckptd reads
        assert type(failure).__name__ == "Unreadable", failure


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("exit 1",))


def test_stand_ins_take_the_place_of_every_global() -> None:
    payload = pickle.dumps({"x": _Boom(), "n": 3, "f": zlib.crc32}, protocol=4)
    value, unpickler = pickles.loads(payload)
    assert value["n"] == 3
    assert pickles.class_name(value["x"]) == f"{os.system.__module__}.system"
    assert value["x"].args == ("exit 1",)
    assert pickles.class_name(value["f"]) == "zlib.crc32"  # a stand-in class, never zlib's
    assert {module for module, _ in unpickler.classes} <= {"posix", "os", "zlib"}


@given(st.binary(max_size=200))
def test_garbage_pickles_fail_as_pickle_errors(data: bytes) -> None:
    with contextlib.suppress(pickles.PickleError):
        pickles.loads(data)


def test_a_signature_digest_changes_with_any_size_or_mtime() -> None:
    one = Signature((SignatureEntry("a", "file", 1, 5), SignatureEntry("b", "dir", 0, 6)))
    assert one.digest == Signature(one.entries).digest
    assert one.total_bytes == 1
    for other in (
        Signature((SignatureEntry("a", "file", 2, 5), one.entries[1])),
        Signature((SignatureEntry("a", "file", 1, 7), one.entries[1])),
        Signature((SignatureEntry("a", "symlink", 1, 5), one.entries[1])),
        Signature(one.entries[:1]),
    ):
        assert other.digest != one.digest
