"""What a scan reads inside checkpoint folders, while the root's owner swaps one for a symlink.

ckptd runs as root. After the walk of a checkpoint, the scan reads its `trainer_state.json`
(metrics, and `best_model_checkpoint`: a tracker that protects the checkpoint it names) and its
`metrics.json`; to detect the layout it lists a few folders for marker names. If the owner
swaps the folder for a symlink to an outside folder (another user's run, /etc) between the
listing or walk and that read, a by-path read refuses a symlink at the file's own name only,
and reads (up to a MB, as root) or lists the outside folder: metrics and the best checkpoint
come from there, or its names decide the layout. The scan opens the folder relative to the
root's descriptor with O_DIRECTORY|O_NOFOLLOW, then the file relative to it: nothing outside
is read or listed, whatever the timing.

The outside run here is unmistakable: its trainer_state.json names another best checkpoint of
the root and an eval_loss no checkpoint of the root has, its metrics.json a key of its own; for
layout detection, another holds a DCP save (`*.distcp`, `.metadata`).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import daemon.discovery.scan as scan_module
import daemon.discovery.walker as walker
from daemon.config import RootConfig
from daemon.config.models import Layout
from daemon.discovery.scan import ScanResult, scan
from daemon.fsio import (
    At,
    DirEntryLike,
    FileSystem,
    LocalFileSystem,
    NotRegularFile,
    list_in,
    read_regular_in,
)
from tests.hostile.conftest import RACE_SECONDS
from tests.hostile.test_walk_fds import Swap, SwappingFileSystem, arm_os_swap, flipping
from tests.layouts_fixtures import (
    age,
    dcp_checkpoint,
    hf_checkpoint,
    orbax_checkpoint,
    write_json,
)

pytestmark = pytest.mark.hostile

OUTSIDE_LOSS = 0.001  # no checkpoint of the root scored this
OUTSIDE_KEY = "outside_secret"  # nor has a metric of this name
SWAPPED = "checkpoint-300"


def hf_root(root: Path) -> None:
    """Given a folder, write an hf run: checkpoint-100/200/300, settled, each with its own
    eval_loss; both trainer states of 200 and 300 name checkpoint-200 the best; 300 also has a
    metrics.json sidecar inside."""
    hf_checkpoint(root, 100, eval_loss=0.9, age_seconds=None)
    for step, loss in ((200, 0.5), (300, 0.7)):
        hf_checkpoint(
            root,
            step,
            eval_loss=loss,
            best_model_checkpoint=str(root / "checkpoint-200"),
            best_metric=0.5,
            age_seconds=None,
        )
    write_json(root / SWAPPED / "metrics.json", {"eval_accuracy": 0.8})
    for folder in root.iterdir():
        age(folder)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An outside folder the owner points a symlink at: another run's trainer_state.json (its
    best is checkpoint-100 of the root, its eval_loss OUTSIDE_LOSS), a metrics.json with
    OUTSIDE_KEY."""
    folder = tmp_path / "secret-run"
    folder.mkdir()
    write_json(
        folder / "trainer_state.json",
        {
            "global_step": 300,
            "best_metric": OUTSIDE_LOSS,
            "best_model_checkpoint": str(tmp_path / "root" / "checkpoint-100"),
            "log_history": [{"step": 300, "eval_loss": OUTSIDE_LOSS}],
        },
    )
    write_json(folder / "metrics.json", {OUTSIDE_KEY: 42.0, "eval_loss": OUTSIDE_LOSS})
    return folder


@pytest.fixture
def outside_dcp(tmp_path: Path) -> Path:
    """An outside folder holding a torch.distributed.checkpoint save (`*.distcp`, `.metadata`)
    and nothing else: what layout detection would call "dcp"."""
    return dcp_checkpoint(tmp_path, "secret-dcp-save")


def assert_nothing_read_from_outside(result: ScanResult) -> None:
    """Given a scan of `hf_root`, assert no metric and no tracker came from the outside run."""
    for checkpoint in result.checkpoints:
        assert OUTSIDE_KEY not in checkpoint.metrics, (checkpoint.name, checkpoint.metrics)
        assert OUTSIDE_LOSS not in checkpoint.metrics.values(), (checkpoint.name, checkpoint)
        if checkpoint.name == "checkpoint-100":
            # Only the outside trainer_state.json names it the best model.
            assert checkpoint.tracked_by == (), checkpoint.tracked_by


def arm_after_walk(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run `action` the moment the scan's walk of the checkpoints returns: after the folder
    was listed and walked as a folder, before anything in it is read."""
    real_walk_many = walker.walk_many  # what the scan calls, by the name it imported

    def walk_then_act(*arguments: Any, **keywords: Any) -> Any:
        walks = real_walk_many(*arguments, **keywords)
        action()
        return walks

    monkeypatch.setattr(scan_module, "walk_many", walk_then_act)


class SwapAtRead(LocalFileSystem):
    """A FileSystem whose owner swaps the folder at the first read or open that touches it
    once `armed` (after the walk): the owner winning the race at the read itself."""

    def __init__(self, swap: Swap) -> None:
        self.swap = swap
        self.armed = False

    def _maybe_swap(self, path: str) -> None:
        folder = str(self.swap.folder)
        if self.armed and (path == folder or path.startswith(folder + "/")):
            swap_now(self.swap)

    def read_bytes(self, path: str, limit: int = 1 << 20) -> bytes:
        self._maybe_swap(path)
        return super().read_bytes(path, limit)

    def open_dir(self, at: At) -> int:
        self._maybe_swap(at.path)
        return super().open_dir(at)

    def read_at(self, at: At, limit: int = 1 << 20) -> bytes:
        self._maybe_swap(at.path)
        return super().read_at(at, limit)

    def scandir(self, path: str) -> Iterator[DirEntryLike]:
        self._maybe_swap(path)
        return super().scandir(path)


def swap_now(swap: Swap) -> None:
    """Given a swap not done yet, do it now (later calls do nothing)."""
    swap.trigger(os.stat(swap.folder, follow_symlinks=False))


def scan_of(
    root: Path, fs: FileSystem, *, want_metrics: bool, layout: Layout = "auto"
) -> ScanResult:
    return scan(
        RootConfig(path=str(root), layout=layout),
        now=time.time(),
        settle_seconds=60,
        fs=fs,
        want_metrics=want_metrics,
    )


# --- trainer_state.json and metrics.json --------------------------------------------------------


@pytest.mark.parametrize("want_metrics", [True, False], ids=["keep_best", "trackers-only"])
@pytest.mark.parametrize("moment", ["after-walk", "at-the-read"])
def test_a_checkpoint_swapped_for_a_symlink_before_its_state_is_read_gives_nothing_outside(
    tmp_path: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
    want_metrics: bool,
    moment: str,
) -> None:
    root = tmp_path / "root"
    hf_root(root)
    honest = scan_of(root, LocalFileSystem(), want_metrics=want_metrics)
    by_name = {checkpoint.name: checkpoint for checkpoint in honest.checkpoints}
    assert by_name["checkpoint-200"].tracked_by == ("checkpoint-300/trainer_state.json",)
    if want_metrics:
        assert by_name[SWAPPED].metrics["eval_loss"] == 0.7
        assert by_name[SWAPPED].metrics["eval_accuracy"] == 0.8
    swap = Swap(root / SWAPPED, outside, tmp_path / "parked")
    fs: LocalFileSystem
    if moment == "after-walk":  # the real filesystem, swapped once the walk is over
        fs = LocalFileSystem()
        arm_after_walk(monkeypatch, lambda: swap_now(swap))
    else:  # a FileSystem swapping it at the very read (or open) that comes after the walk
        fs = swapping = SwapAtRead(swap)
        arm_after_walk(monkeypatch, lambda: setattr(swapping, "armed", True))
    before = len(os.listdir("/proc/self/fd"))
    result = scan_of(root, fs, want_metrics=want_metrics)
    monkeypatch.undo()
    assert swap.done and (root / SWAPPED).is_symlink(), "the scan never came to the read"
    assert len(os.listdir("/proc/self/fd")) == before, "a descriptor was left open"
    assert_nothing_read_from_outside(result)
    swapped = {checkpoint.name: checkpoint for checkpoint in result.checkpoints}[SWAPPED]
    # Walked as a folder, its state then refused: not complete, no metrics at all.
    assert not swapped.complete
    assert swapped.incomplete_reason == "trainer_state.json unreadable (being written, or cut off)"
    assert dict(swapped.metrics) == {}
    # The best model's protection falls back to the newest sound trainer_state.json inside.
    by_name = {checkpoint.name: checkpoint for checkpoint in result.checkpoints}
    assert by_name["checkpoint-200"].tracked_by == ("checkpoint-200/trainer_state.json",)


def test_a_file_checkpoints_sidecar_swapped_for_a_symlink_is_not_read(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `<name>.metrics.json` beside a file checkpoint lies at the root's top: a symlink there
    # was refused before (O_NOFOLLOW on its own name) and still is, through the descriptor.
    root = tmp_path / "root"
    root.mkdir()
    for step in (100, 200):
        (root / f"epoch=0-step={step}.ckpt").write_bytes(b"w" * 100)
        write_json(root / f"epoch=0-step={step}.ckpt.metrics.json", {"val_loss": 0.3})
    for entry in root.iterdir():
        age(entry)
    sidecar = root / "epoch=0-step=200.ckpt.metrics.json"

    def swap_sidecar() -> None:
        sidecar.unlink()
        sidecar.symlink_to(outside / "metrics.json")

    arm_after_walk(monkeypatch, swap_sidecar)
    result = scan_of(root, LocalFileSystem(), want_metrics=True, layout="lightning")
    monkeypatch.undo()
    assert sidecar.is_symlink()
    metrics = {checkpoint.name: dict(checkpoint.metrics) for checkpoint in result.checkpoints}
    assert metrics == {"epoch=0-step=100.ckpt": {"val_loss": 0.3}, "epoch=0-step=200.ckpt": {}}


# --- layout detection ----------------------------------------------------------------------------


def orbax_root(root: Path) -> str:
    for step in (100, 200):
        orbax_checkpoint(root, step)
    return "200"


def single_hf_root(root: Path) -> str:
    hf_checkpoint(root, 100)
    return "checkpoint-100"


LAYOUT_ROOTS = {"orbax": orbax_root, "hf": single_hf_root}


@pytest.mark.parametrize("how", ["os-calls", "filesystem-methods"])
@pytest.mark.parametrize("layout", sorted(LAYOUT_ROOTS))
def test_a_folder_swapped_as_layout_detection_looks_into_it_never_decides_the_layout(
    tmp_path: Path, outside_dcp: Path, monkeypatch: pytest.MonkeyPatch, layout: str, how: str
) -> None:
    # Names alone cannot tell DCP's `*.distcp` folders from Orbax's numbered ones (or from the
    # Trainer's `checkpoint-N/`): detection lists a few. Listed through a symlink to the
    # outside DCP save, the root became "dcp" and its real checkpoints, holding no *.distcp,
    # were not checkpoints any more.
    root = tmp_path / "root"
    name = LAYOUT_ROOTS[layout](root)
    assert scan_of(root, LocalFileSystem(), want_metrics=False).layout == layout
    swap = Swap(root / name, outside_dcp, tmp_path / "parked")
    fs: LocalFileSystem
    if how == "os-calls":
        fs = LocalFileSystem()
        arm_os_swap(monkeypatch, swap)
    else:
        fs = SwappingFileSystem(swap)
    result = scan_of(root, fs, want_metrics=False)
    monkeypatch.undo()
    assert swap.done and (root / name).is_symlink(), "detection never looked into the folder"
    assert result.layout == layout
    if layout == "orbax":  # the other checkpoint is still one
        assert [checkpoint.name for checkpoint in result.checkpoints] == ["100", "200"]
        assert result.checkpoints[0].complete


# --- a real race: another process flipping a folder while scans run -----------------------------


def summary(result: ScanResult) -> list[tuple[str, bool, dict[str, float]]]:
    """Given a scan, return what a flip shows in: each checkpoint's name, completeness and
    metrics (a flipped folder's own times may change with its renames)."""
    return [(c.name, c.complete, dict(c.metrics)) for c in result.checkpoints]


def race(root: Path, folder: Path, outside: Path, check: Callable[[ScanResult], bool]) -> int:
    """Given a root and a folder of it, scan again and again while another process flips the
    folder between itself and a symlink to `outside`; `check` asserts what must hold of each
    scan and returns whether that scan met a flip. Return how many did."""
    scans = raced = 0
    deadline = time.monotonic() + max(RACE_SECONDS, 1.0)
    with flipping(folder, outside, root.parent / "parked"):
        while time.monotonic() < deadline or scans < 50:
            raced += check(scan_of(root, LocalFileSystem(), want_metrics=True))
            scans += 1
    return raced


def test_scans_racing_a_checkpoint_flipped_to_a_symlink_never_read_outside(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "root"
    hf_root(root)
    honest = scan_of(root, LocalFileSystem(), want_metrics=True)

    def check(result: ScanResult) -> bool:
        assert_nothing_read_from_outside(result)
        return summary(result) != summary(honest)

    assert race(root, root / SWAPPED, outside, check) > 0, "no scan met a flip"
    after = scan_of(root, LocalFileSystem(), want_metrics=True)
    assert [c.metrics for c in after.checkpoints] == [c.metrics for c in honest.checkpoints]


def test_scans_racing_a_folder_flipped_to_a_symlink_never_take_its_layout(
    tmp_path: Path, outside_dcp: Path
) -> None:
    root = tmp_path / "root"
    orbax_root(root)
    honest = scan_of(root, LocalFileSystem(), want_metrics=True)

    def check(result: ScanResult) -> bool:
        assert result.layout == "orbax"
        assert "100" in [checkpoint.name for checkpoint in result.checkpoints]
        return summary(result) != summary(honest)

    assert race(root, root / "200", outside_dcp, check) > 0, "no scan met a flip"
    assert summary(scan_of(root, LocalFileSystem(), want_metrics=True)) == summary(honest)


# --- the fd-relative helpers themselves ---------------------------------------------------------


# O_DIRECTORY|O_NOFOLLOW on a symlink: Linux says ENOTDIR (the O_DIRECTORY check comes first).
REFUSED_FOLDER = (errno.ELOOP, errno.ENOTDIR)


def test_read_regular_in_and_list_in_follow_no_symlink_below_the_descriptor(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "real" / "state.json").write_bytes(b"x" * 5000)
    os.mkfifo(root / "real" / "fifo.json")
    (root / "swapped").symlink_to(outside)
    (root / "real" / "inner-link").symlink_to(outside / "metrics.json")
    descriptor = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_regular_in(descriptor, "real", "state.json", 100) == b"x" * 100
        assert sorted(list_in(descriptor, "real")) == ["fifo.json", "inner-link", "state.json"]
        with pytest.raises(OSError) as refused:
            read_regular_in(descriptor, "swapped", "trainer_state.json")
        assert refused.value.errno in REFUSED_FOLDER
        with pytest.raises(OSError) as refused:
            list_in(descriptor, "swapped")
        assert refused.value.errno in REFUSED_FOLDER
        with pytest.raises(OSError) as refused:
            read_regular_in(descriptor, "real", "inner-link")
        assert refused.value.errno == errno.ELOOP
        with pytest.raises(NotRegularFile):  # a FIFO: neither waited on nor read
            read_regular_in(descriptor, "real", "fifo.json")
    finally:
        os.close(descriptor)
