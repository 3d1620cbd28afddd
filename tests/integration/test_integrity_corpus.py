"""A corpus of broken checkpoints per layout: each break detected, no intact checkpoint flagged.

The intact checkpoints are real ones, saved by the frameworks themselves
(`tests/fixtures/integrity/trees/`, made by `generate.py` there). Each case copies one into a
temporary root and breaks it the way disks, crashes and people do: truncating a file, zeroing a
range, deleting a shard or an item, changing bytes inside a zip member. `cheap` says the break
is visible in headers and indexes; the others need the deep pass's checksums (a changed byte
inside a tensor has no other trace).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.integrity.check import check_checkpoint
from daemon.integrity.trackers import check_root_trackers

TREES = Path(__file__).resolve().parents[1] / "fixtures" / "integrity" / "trees"

# (fixture folder, checkpoint name, layout)
INTACT = [
    ("hf", "checkpoint-10", "hf"),
    ("hf-sharded", "checkpoint-20", "hf"),
    ("pt", "model_100.pt", "pt"),
    ("pt", "legacy_200.pt", "pt"),
    ("pt", "epoch=0-step=10.ckpt", "lightning"),
    ("dcp", "step_10", "dcp"),
    ("deepspeed", "global_step1", "deepspeed"),
    ("orbax", "1", "orbax"),
    ("tf", "ckpt-1", "tf"),
]
# Checkpoints whose formats carry no checksum (safetensors, legacy torch.save).
WITHOUT_CHECKSUMS = {"checkpoint-20", "legacy_200.pt"}


# --- the corpus builder -------------------------------------------------------------------------


def truncate(path: Path, *, keep: int | None = None, cut: int | None = None) -> None:
    """Given a file, keep its first `keep` bytes, or cut its last `cut` bytes."""
    size = path.stat().st_size
    os.truncate(path, keep if keep is not None else max(0, size - (cut or 0)))


def zero_range(path: Path, offset: int, length: int) -> None:
    """Given a file, overwrite `length` bytes from `offset` (negative: from the end) with zeros."""
    size = path.stat().st_size
    start = offset if offset >= 0 else size + offset
    with open(path, "r+b") as handle:
        handle.seek(start)
        handle.write(b"\0" * min(length, size - start))


def flip_bytes(path: Path, offset: int, count: int = 4) -> None:
    """Given a file, invert `count` bytes at `offset` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    start = offset if offset >= 0 else len(data) + offset
    for index in range(start, start + count):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_zip_member(path: Path, member_suffix: str) -> None:
    """Given a zip archive, invert bytes in the middle of the data of the member whose name ends
    with `member_suffix` (its directory and local header stay intact)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = (
            int.from_bytes(handle.read(2), "little"),
            int.from_bytes(handle.read(2), "little"),
        )
    data_start = info.header_offset + 30 + name_length + extra_length
    assert info.compress_size >= 4
    flip_bytes(path, data_start + info.compress_size // 2 - 2, 4)


def delete(path: Path) -> None:
    """Given a file or folder, remove it."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def distcp_member_offset(folder: Path) -> int:
    """Given a DCP folder, return an offset inside the data of the last item's zip member."""
    data = (folder / "__0_0.distcp").read_bytes()
    last_item = data.rfind(b"PK\x03\x04", 0, data.rfind(b"PK\x01\x02"))
    name_length = int.from_bytes(data[last_item + 26 : last_item + 28], "little")
    extra_length = int.from_bytes(data[last_item + 28 : last_item + 30], "little")
    return last_item + 30 + name_length + extra_length + 4


@dataclass(frozen=True)
class Break:
    fixture: str
    name: str
    layout: str
    what: str
    apply: Callable[[Path], None]  # given the checkpoint's root
    cheap: bool  # detected without the deep pass
    culprit: str  # a file name the problem must mention


def _hf(what: str, apply: Callable[[Path], None], cheap: bool, culprit: str) -> Break:
    return Break("hf", "checkpoint-10", "hf", what, apply, cheap, culprit)


def _orbax(what: str, apply: Callable[[Path], None], cheap: bool, culprit: str) -> Break:
    return Break("orbax", "1", "orbax", what, apply, cheap, culprit)


HF = "checkpoint-10"
SHARDED = "checkpoint-20"
ORBAX_ITEM = "1/default"

BREAKS = [
    _hf(
        "safetensors truncated",
        lambda r: truncate(r / HF / "model.safetensors", cut=100),
        True,
        "model.safetensors",
    ),
    _hf(
        "safetensors header zeroed",
        lambda r: zero_range(r / HF / "model.safetensors", 0, 4096),
        True,
        "model.safetensors",
    ),
    _hf(
        "safetensors bytes appended",
        lambda r: (r / HF / "model.safetensors").open("ab").write(b"\0" * 64),
        True,
        "model.safetensors",
    ),
    _hf(
        "optimizer.pt tail zeroed (directory)",
        lambda r: zero_range(r / HF / "optimizer.pt", -512, 512),
        True,
        "optimizer.pt",
    ),
    _hf(
        "optimizer.pt truncated to half",
        lambda r: truncate(
            r / HF / "optimizer.pt", keep=(r / HF / "optimizer.pt").stat().st_size // 2
        ),
        True,
        "optimizer.pt",
    ),
    _hf(
        "optimizer.pt zeroed whole (crash before writeback)",
        lambda r: zero_range(r / HF / "optimizer.pt", 0, 1 << 20),
        True,
        "optimizer.pt",
    ),
    _hf(
        "scheduler.pt empty",
        lambda r: truncate(r / HF / "scheduler.pt", keep=0),
        True,
        "scheduler.pt",
    ),
    _hf(
        "optimizer.pt member bytes changed",
        lambda r: corrupt_zip_member(r / HF / "optimizer.pt", "data/1"),
        False,
        "optimizer.pt",
    ),
    _hf(
        "rng_state.pth data.pkl bytes changed",
        lambda r: corrupt_zip_member(r / HF / "rng_state.pth", "data.pkl"),
        False,
        "rng_state.pth",
    ),
    _hf(
        "trainer_state.json deleted",
        lambda r: delete(r / HF / "trainer_state.json"),
        True,
        "trainer_state.json",
    ),
    _hf(
        "trainer_state.json truncated",
        lambda r: truncate(r / HF / "trainer_state.json", cut=10),
        True,
        "trainer_state.json",
    ),
    _hf(
        "config.json zeroed",
        lambda r: zero_range(r / HF / "config.json", 0, 64),
        True,
        "config.json",
    ),
    Break(
        "hf-sharded",
        SHARDED,
        "hf",
        "a shard deleted",
        lambda r: delete(r / SHARDED / "model-00002-of-00002.safetensors"),
        True,
        "model-00002-of-00002.safetensors",
    ),
    Break(
        "hf-sharded",
        SHARDED,
        "hf",
        "a shard truncated",
        lambda r: truncate(r / SHARDED / "model-00001-of-00002.safetensors", cut=8),
        True,
        "model-00001-of-00002.safetensors",
    ),
    Break(
        "hf-sharded",
        SHARDED,
        "hf",
        "the index truncated",
        lambda r: truncate(r / SHARDED / "model.safetensors.index.json", cut=20),
        True,
        "model.safetensors.index.json",
    ),
    Break(
        "pt",
        "model_100.pt",
        "pt",
        "truncated",
        lambda r: truncate(r / "model_100.pt", cut=40),
        True,
        "model_100.pt",
    ),
    Break(
        "pt",
        "model_100.pt",
        "pt",
        "member bytes changed",
        lambda r: corrupt_zip_member(r / "model_100.pt", "data/0"),
        False,
        "model_100.pt",
    ),
    Break(
        "pt",
        "legacy_200.pt",
        "pt",
        "legacy storages truncated",
        lambda r: truncate(r / "legacy_200.pt", cut=16),
        True,
        "legacy_200.pt",
    ),
    Break(
        "pt",
        "legacy_200.pt",
        "pt",
        "legacy pickles zeroed",
        lambda r: zero_range(r / "legacy_200.pt", 0, 64),
        True,
        "legacy_200.pt",
    ),
    Break(
        "pt",
        "epoch=0-step=10.ckpt",
        "lightning",
        "directory zeroed",
        lambda r: zero_range(r / "epoch=0-step=10.ckpt", -100, 100),
        True,
        "epoch=0-step=10.ckpt",
    ),
    Break(
        "dcp",
        "step_10",
        "dcp",
        "the .distcp deleted",
        lambda r: delete(r / "step_10" / "__0_0.distcp"),
        True,
        "__0_0.distcp",
    ),
    Break(
        "dcp",
        "step_10",
        "dcp",
        "the .distcp truncated",
        lambda r: truncate(r / "step_10" / "__0_0.distcp", cut=100),
        True,
        "__0_0.distcp",
    ),
    Break(
        "dcp",
        "step_10",
        "dcp",
        ".metadata truncated",
        lambda r: truncate(r / "step_10" / ".metadata", cut=100),
        True,
        ".metadata",
    ),
    Break(
        "dcp",
        "step_10",
        "dcp",
        ".metadata deleted",
        lambda r: delete(r / "step_10" / ".metadata"),
        True,
        ".metadata",
    ),
    Break(
        "dcp",
        "step_10",
        "dcp",
        "a zip member inside the .distcp changed",
        lambda r: flip_bytes(r / "step_10" / "__0_0.distcp", distcp_member_offset(r / "step_10")),
        False,
        "__0_0.distcp",
    ),
    Break(
        "deepspeed",
        "global_step1",
        "deepspeed",
        "a data-parallel rank's shard deleted",
        lambda r: delete(r / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        True,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ),
    Break(
        "deepspeed",
        "global_step1",
        "deepspeed",
        "the model states deleted",
        lambda r: delete(r / "global_step1" / "mp_rank_00_model_states.pt"),
        True,
        "model_states",
    ),
    Break(
        "deepspeed",
        "global_step1",
        "deepspeed",
        "an optimizer shard truncated",
        lambda r: truncate(
            r / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", cut=300
        ),
        True,
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ),
    Break(
        "deepspeed",
        "global_step1",
        "deepspeed",
        "an optimizer member changed",
        lambda r: corrupt_zip_member(
            r / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", "data/1"
        ),
        False,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ),
    _orbax(
        "_CHECKPOINT_METADATA truncated",
        lambda r: truncate(r / "1" / "_CHECKPOINT_METADATA", cut=30),
        True,
        "_CHECKPOINT_METADATA",
    ),
    _orbax("an item deleted", lambda r: delete(r / ORBAX_ITEM), True, "default"),
    _orbax(
        "the item manifest zeroed",
        lambda r: zero_range(r / ORBAX_ITEM / "manifest.ocdbt", 0, 16),
        True,
        "manifest.ocdbt",
    ),
    _orbax(
        "the process manifest changed",
        lambda r: flip_bytes(r / ORBAX_ITEM / "ocdbt.process_0" / "manifest.ocdbt", 40),
        True,
        "manifest.ocdbt",
    ),
    _orbax(
        "the process database deleted",
        lambda r: delete(r / ORBAX_ITEM / "ocdbt.process_0"),
        True,
        "ocdbt.process_0",
    ),
    _orbax(
        "_METADATA zeroed",
        lambda r: zero_range(r / ORBAX_ITEM / "_METADATA", 0, 32),
        True,
        "_METADATA",
    ),
    _orbax(
        "a b-tree node truncated",
        lambda r: truncate(next((r / ORBAX_ITEM / "ocdbt.process_0" / "d").iterdir()), cut=10),
        False,
        "/d/",
    ),
    _orbax(
        "a b-tree node changed",
        lambda r: flip_bytes(next((r / ORBAX_ITEM / "ocdbt.process_0" / "d").iterdir()), 30),
        False,
        "/d/",
    ),
    Break(
        "tf",
        "ckpt-1",
        "tf",
        "a data shard deleted",
        lambda r: delete(r / "ckpt-1.data-00001-of-00002"),
        True,
        "ckpt-1.data-00001-of-00002",
    ),
    Break(
        "tf",
        "ckpt-1",
        "tf",
        "a data shard truncated",
        lambda r: truncate(r / "ckpt-1.data-00001-of-00002", cut=50),
        True,
        "ckpt-1.data-00001-of-00002",
    ),
    Break(
        "tf",
        "ckpt-1",
        "tf",
        "the index truncated",
        lambda r: truncate(r / "ckpt-1.index", cut=20),
        True,
        "ckpt-1.index",
    ),
    Break(
        "tf",
        "ckpt-1",
        "tf",
        "the index zeroed in the middle",
        lambda r: zero_range(r / "ckpt-1.index", 100, 64),
        True,
        "ckpt-1.index",
    ),
    Break(
        "tf",
        "ckpt-1",
        "tf",
        "the index deleted",
        lambda r: delete(r / "ckpt-1.index"),
        True,
        "ckpt-1",
    ),
    Break(
        "tf",
        "ckpt-1",
        "tf",
        "tensor bytes changed",
        lambda r: flip_bytes(r / "ckpt-1.data-00001-of-00002", 36),
        False,
        "ckpt-1.data-00001-of-00002",
    ),
]


def copy_fixture(fixture: str, tmp_path: Path) -> Path:
    root = tmp_path / fixture
    shutil.copytree(TREES / fixture, root, symlinks=True)
    return root


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True], ids=["cheap", "deep"])
@pytest.mark.parametrize(("fixture", "name", "layout"), INTACT)
def test_no_intact_checkpoint_is_flagged(
    fixture: str, name: str, layout: str, deep: bool, tmp_path: Path
) -> None:
    root = copy_fixture(fixture, tmp_path)
    result = check_checkpoint(root, name, layout, deep=deep)
    assert result.status == "ok", (result.problems, result.skipped)
    assert result.problems == () and result.skipped == ()
    assert result.checked_files  # something was really looked at
    if deep and name not in WITHOUT_CHECKSUMS:
        assert result.bytes_read > 0  # the deep pass read checksummed bytes


@pytest.mark.parametrize("case", BREAKS, ids=[f"{b.fixture}: {b.what}" for b in BREAKS])
def test_each_break_is_detected(case: Break, tmp_path: Path) -> None:
    root = copy_fixture(case.fixture, tmp_path)
    case.apply(root)
    deep = check_checkpoint(root, case.name, case.layout, deep=True)
    assert deep.status == "corrupt", (deep.problems, deep.skipped)
    assert any(case.culprit in problem for problem in deep.problems), deep.problems
    if case.cheap:
        cheap = check_checkpoint(root, case.name, case.layout)
        assert cheap.status == "corrupt", (cheap.problems, cheap.skipped)
        assert any(case.culprit in problem for problem in cheap.problems), cheap.problems


def test_the_corpus_covers_every_layout_and_every_kind_of_break() -> None:
    layouts = {case.layout for case in BREAKS}
    assert layouts == {layout for _, _, layout in INTACT}
    kinds = " ".join(case.what for case in BREAKS)
    for kind in ("truncated", "zeroed", "deleted", "changed"):
        assert kind in kinds


def test_root_trackers_naming_missing_checkpoints_are_reported(tmp_path: Path) -> None:
    deepspeed = copy_fixture("deepspeed", tmp_path)
    assert check_root_trackers(deepspeed).problems == ()
    delete(deepspeed / "global_step1")
    assert "latest: names 'global_step1'" in check_root_trackers(deepspeed).problems[0]
    tensorflow = copy_fixture("tf", tmp_path)
    report = check_root_trackers(str(tensorflow))
    assert report.problems == () and report.checked == ("checkpoint",)
    delete(tensorflow / "ckpt-1.index")
    assert "ckpt-1.index does not exist" in check_root_trackers(tensorflow).problems[0]
    (tmp_path / "megatron").mkdir()
    (tmp_path / "megatron" / "latest_checkpointed_iteration.txt").write_text("1200\n")
    assert "iter_0001200/" in check_root_trackers(tmp_path / "megatron").problems[0]
    (tmp_path / "megatron" / "iter_0001200").mkdir()
    assert check_root_trackers(tmp_path / "megatron").problems == ()
