"""Issue 10, piece by piece: the fd-relative primitives, the trash folder's checks, the root's
identity, old-format items, and a full filesystem — without a second user."""

from __future__ import annotations

import errno
import json
import os
import resource
import time
from pathlib import Path

import pytest

from daemon.errors import UsageError
from daemon.fsio import At, Dir, LocalFileSystem, measure_at, remove_tree_at, rename_noreplace
from daemon.pruning import deleter, trash
from daemon.rootdir import IdentityStore, RootChanged, open_root
from policies.model import Checkpoint, Decision, Plan
from tests.configs import write_config
from tests.sizes import blocks

NOW = 1_800_000_000.0


def opened(path: Path) -> Dir:
    return Dir(os.open(path, os.O_RDONLY | os.O_DIRECTORY), str(path))


def deep_tree(top: Path, depth: int) -> None:
    """Given a path, make `top/d/d/.../d/leaf`, `depth` folders deep (by descriptor: the path
    is longer than PATH_MAX)."""
    top.mkdir()
    descriptor = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _level in range(depth):
        os.mkdir("d", dir_fd=descriptor)
        deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=descriptor)
        os.close(descriptor)
        descriptor = deeper
    leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=descriptor)
    os.write(leaf, b"x" * 8192)
    os.close(leaf)
    os.close(descriptor)


def test_removal_unlinks_links_and_fifos_and_descends_deep_trees(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "precious").write_text("keep")
    tree = tmp_path / "tree"
    # Deeper than Python's recursion limit, and than the descriptors a service may open.
    deep_tree(tree, 3000)
    (tree / "to-folder").symlink_to(outside / "folder")
    (tree / "to-file").symlink_to(outside / "folder" / "precious")
    os.mkfifo(tree / "fifo")
    parent = opened(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        started = time.monotonic()
        usage = measure_at(parent.at("tree"))
        assert usage.logical == 8192 and usage.allocated >= 8192
        remove_tree_at(parent.at("tree"))
        assert time.monotonic() - started < 30
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(parent.fd)
    assert not tree.exists()
    assert (outside / "folder" / "precious").read_text() == "keep"


def test_renames_never_replace(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    folder = opened(tmp_path)
    try:
        with pytest.raises(FileExistsError):
            rename_noreplace(folder.at("a"), folder.at("b"))
        rename_noreplace(folder.at("a"), folder.at("c"))
    finally:
        os.close(folder.fd)
    assert (tmp_path / "b").read_text() == "b" and (tmp_path / "c").read_text() == "a"


def test_measuring_counts_allocated_blocks_once_and_skips_shared_inodes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(10_000))
    os.link(tree / "data", tree / "same-data")  # counted once
    (tree / "shared").write_bytes(os.urandom(5_000))
    os.link(tree / "shared", tmp_path / "snapshot-of-shared")  # frees nothing
    with open(tree / "sparse", "wb") as handle:
        handle.truncate(10**12)
    folder = opened(tmp_path)
    try:
        usage = measure_at(folder.at("tree"))
    finally:
        os.close(folder.fd)
    assert usage.allocated == blocks(tree / "data", tree / "sparse")
    assert usage.logical == 10_000 + 10**12


def test_an_old_trash_of_ckptd_becomes_private_and_items_of_the_old_layout_still_go(
    tmp_path: Path,
) -> None:
    folder = tmp_path / ".ckptd-trash"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    old = folder / f"checkpoint-100@{int(NOW)}"
    old.mkdir()
    (old / "weights.bin").write_bytes(b"w" * 100)
    (items,) = [trash.list_trash(str(tmp_path))]
    assert [(item.name, item.layout) for item in items] == [("checkpoint-100", "legacy")]
    assert os.stat(folder).st_mode & 0o777 == 0o700
    trash.restore(str(tmp_path), "checkpoint-100")
    assert (tmp_path / "checkpoint-100" / "weights.bin").read_bytes() == b"w" * 100
    assert (tmp_path / "checkpoint-100" / ".keep").is_file()


def test_a_journal_naming_paths_outside_its_item_moves_nothing_there(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "victim").write_text("outside")
    item = root / ".ckptd-trash" / f"ckpt-5@{int(NOW)}"
    item.mkdir(parents=True)
    (item / trash.JOURNAL).write_text(json.dumps({"name": "x", "members": ["../../victim"]}))
    (item / "ckpt-5.index").write_text("index")
    (root / "ckpt-5.data").write_text("data")  # a member "still in the root": would roll back
    trash.recover(str(root))
    trash.purge(str(root), now=NOW, grace=0, everything=True)
    assert (tmp_path / "victim").read_text() == "outside"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the trash another owner")
def test_a_trash_owned_by_someone_else_is_refused_and_never_changed(tmp_path: Path) -> None:
    folder = tmp_path / ".ckptd-trash"
    folder.mkdir(mode=0o755)
    item = folder / f"checkpoint-100@{int(NOW)}"
    item.mkdir()
    os.chown(folder, 4242, 4242)
    (tmp_path / "checkpoint-200").mkdir()
    with pytest.raises(trash.TrashRefused, match="owned by uid 4242"):
        trash.purge(str(tmp_path), now=NOW, grace=0, everything=True)
    plan = Plan(
        root=str(tmp_path),
        decisions=(Decision(Checkpoint(name="checkpoint-200", step=200), False, ("r",)),),
    )
    with pytest.raises(trash.TrashRefused):
        deleter.apply(plan, str(tmp_path), dry_run=False, now=NOW, holders_check=None)
    assert item.is_dir() and (tmp_path / "checkpoint-200").is_dir()
    assert os.stat(folder).st_mode & 0o777 == 0o755


def test_a_root_is_checked_against_the_identity_first_seen(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    store = IdentityStore(str(state))
    root = tmp_path / "run"
    root.mkdir()
    with open_root(str(root), store=store) as first:
        assert store.recorded(str(root)) == first.identity
    os.rename(root, tmp_path / "run.old")
    root.mkdir()
    with pytest.raises(RootChanged, match="root identity changed") as refused:
        open_root(str(root), store=store)
    assert refused.value.exit_code == 3 and "ckptd forget-root" in str(refused.value)
    assert store.forget(str(root)) is not None
    with open_root(str(root), store=store) as again:
        assert store.recorded(str(root)) == again.identity
    with open_root(str(root)) as unchecked, pytest.raises(RootChanged, match="during the run"):
        os.rename(root, tmp_path / "run.swapped")
        root.symlink_to(tmp_path / "run.old")
        unchecked.verify_path()


class FullDisk(LocalFileSystem):
    """A filesystem with no block left: nothing new can be made, renames still work."""

    def mkdir_at(self, at: At, mode: int = 0o700) -> None:
        if trash.TRASH_DIRECTORY not in at.name:
            raise OSError(errno.ENOSPC, "No space left on device", at.path)
        super().mkdir_at(at, mode)


def test_a_full_filesystem_still_moves_one_entry_checkpoints_into_the_trash(
    tmp_path: Path,
) -> None:
    (tmp_path / "checkpoint-100").mkdir()
    (tmp_path / "checkpoint-100" / "w.bin").write_bytes(b"w" * 4096)
    for name in ("ckpt-5.index", "ckpt-5.data-00000-of-00001"):
        (tmp_path / name).write_text(name)
    fs = FullDisk()
    trash.move_to_trash(str(tmp_path), "checkpoint-100", ["checkpoint-100"], now=NOW, fs=fs)
    with pytest.raises(OSError, match="No space"):  # several need a journal: left whole
        trash.move_to_trash(
            str(tmp_path), "ckpt-5", ["ckpt-5.index", "ckpt-5.data-00000-of-00001"], now=NOW, fs=fs
        )
    assert (tmp_path / "ckpt-5.index").exists() and not (tmp_path / "checkpoint-100").exists()
    (item,) = trash.list_trash(str(tmp_path))
    assert (item.name, item.layout, item.deleted_at) == ("checkpoint-100", "bare", NOW)
    trash.restore(str(tmp_path), "checkpoint-100")
    assert (tmp_path / "checkpoint-100" / "w.bin").read_bytes() == b"w" * 4096
    with pytest.raises(UsageError, match="no checkpoint named"):
        trash.restore(str(tmp_path), "checkpoint-100")


class Killed(BaseException):
    """Stands for a kill -9 in the middle of a move: no clean-up of ours runs after it."""


class KilledAtSecondRename(LocalFileSystem):
    renames = 0

    def rename_at(self, source: At, destination: At) -> None:
        KilledAtSecondRename.renames += 1
        if KilledAtSecondRename.renames == 2:
            raise Killed
        super().rename_at(source, destination)


def test_a_move_cut_short_midway_is_rolled_back_from_its_journal(tmp_path: Path) -> None:
    members = ["ckpt-5.index", "ckpt-5.data-00000-of-00002", "ckpt-5.data-00001-of-00002"]
    for name in members:
        (tmp_path / name).write_text(name)
    with pytest.raises(Killed):
        trash.move_to_trash(str(tmp_path), "ckpt-5", members, now=NOW, fs=KilledAtSecondRename())
    assert not (tmp_path / "ckpt-5.index").exists()  # moved first: never complete half-moved
    (item,) = trash.list_trash(str(tmp_path))
    assert (item.name, item.layout, item.state) == ("ckpt-5", "item", "moving")
    assert trash.purge(str(tmp_path), now=NOW + 10**6, grace=0).removed == ()
    assert trash.recover(str(tmp_path)) == ["rolled back the interrupted deletion of ckpt-5"]
    assert all((tmp_path / name).read_text() == name for name in members)
    assert trash.list_trash(str(tmp_path)) == []


def test_the_metrics_of_a_prune_refused_for_a_foreign_trash_are_still_kept(
    tmp_path: Path,
) -> None:
    from daemon.config import load_config
    from daemon.metrics import Monitor
    from daemon.pruning.pipeline import prune_root

    root, state, elsewhere = tmp_path / "run", tmp_path / "state", tmp_path / "elsewhere"
    for folder in (root / "checkpoint-100", state, elsewhere):
        folder.mkdir(parents=True)
    (root / ".ckptd-trash").symlink_to(elsewhere)
    config_file = write_config(tmp_path / "config.yaml", [root], state_dir=state, layout="hf")
    config = load_config(str(config_file))
    monitor = Monitor(config, clock=time.time)
    monitor.start()
    report = prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert report.refused is not None and "symlink" in report.refused
    monitor.pruned(report)  # the trash it refuses is not measured, the refusal is counted
    assert f'ckptd_root_refused{{root="{root}"}} 1.0'.encode() in monitor.metrics.text()
    assert list(elsewhere.iterdir()) == []
