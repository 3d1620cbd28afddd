"""The trash: grace, list, restore, purge, empty under disk pressure, crash leftovers, and a
running prune's root lock keeping every other hand off it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from daemon.errors import UsageError
from daemon.history.log import HistoryLog, read_records
from daemon.pruning import trash
from daemon.pruning.pipeline import root_lock
from tests.sizes import blocks, tree_blocks

NOW = 1_800_000_000.0


def make(root: Path, name: str, content: bytes = b"x" * 1000) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "weights.bin").write_bytes(content)
    (root / name / "trainer_state.json").write_text("{}")


def test_moved_items_wait_for_the_grace_then_purge_frees_their_bytes(tmp_path: Path) -> None:
    make(tmp_path, "checkpoint-100")
    make(tmp_path, "checkpoint-200")
    allocated = tree_blocks(tmp_path / "checkpoint-100")
    trash.move_to_trash(str(tmp_path), "checkpoint-100", ["checkpoint-100"], now=NOW)
    trash.move_to_trash(str(tmp_path), "checkpoint-200", ["checkpoint-200"], now=NOW + 600)
    items = trash.list_trash(str(tmp_path))
    assert [(i.name, i.deleted_at, i.state) for i in items] == [
        ("checkpoint-100", NOW, "trashed"),
        ("checkpoint-200", NOW + 600, "trashed"),
    ]
    # Freed bytes are what the filesystem gets back; the files' lengths are shown apart.
    assert items[0].bytes == allocated and items[0].bytes_logical == 1002  # weights + "{}"
    history = HistoryLog(str(tmp_path.parent / f"{tmp_path.name}.jsonl"))
    early = trash.purge(str(tmp_path), now=NOW + 3599, grace=3600, history=history)
    assert early.removed == ()
    result = trash.purge(str(tmp_path), now=NOW + 3600, grace=3600, history=history)
    history.close()
    assert result.removed == ("checkpoint-100",) and result.bytes_freed == allocated
    assert result.bytes_logical == 1002
    assert [i.name for i in trash.list_trash(str(tmp_path))] == ["checkpoint-200"]
    (record,) = read_records(history.path)
    assert record["event"] == "trash_purge" and record["bytes_freed"] == allocated
    assert record["bytes_logical"] == 1002


def test_restore_renames_back_and_refuses_a_taken_name(tmp_path: Path) -> None:
    make(tmp_path, "checkpoint-100", b"original")
    trash.move_to_trash(str(tmp_path), "checkpoint-100", ["checkpoint-100"], now=NOW)
    make(tmp_path, "checkpoint-100", b"a new one with the same name")
    with pytest.raises(UsageError, match="already exists"):
        trash.restore(str(tmp_path), "checkpoint-100")
    assert (
        tmp_path / "checkpoint-100" / "weights.bin"
    ).read_bytes() == b"a new one with the same name"
    os.system(f"rm -rf '{tmp_path / 'checkpoint-100'}'")
    trash.restore(str(tmp_path), "checkpoint-100")
    assert (tmp_path / "checkpoint-100" / "weights.bin").read_bytes() == b"original"
    assert trash.list_trash(str(tmp_path)) == []
    with pytest.raises(UsageError, match="no checkpoint named"):
        trash.restore(str(tmp_path), "checkpoint-100")


def test_empty_trash_removes_everything_regardless_of_grace(tmp_path: Path) -> None:
    allocated = 0
    for step in (100, 200, 300):
        make(tmp_path, f"checkpoint-{step}")
        allocated += tree_blocks(tmp_path / f"checkpoint-{step}")
        trash.move_to_trash(str(tmp_path), f"checkpoint-{step}", [f"checkpoint-{step}"], now=NOW)
    assert trash.empty_trash(str(tmp_path)) == allocated
    assert trash.list_trash(str(tmp_path)) == []


def test_hard_linked_files_free_nothing_when_purged(tmp_path: Path) -> None:
    make(tmp_path, "checkpoint-100")
    snapshot = tmp_path.parent / f"{tmp_path.name}-snapshot.bin"
    os.link(tmp_path / "checkpoint-100" / "weights.bin", snapshot)
    # Only trainer_state.json is really freed: the snapshot shares weights.bin.
    freed = blocks(tmp_path / "checkpoint-100" / "trainer_state.json")
    trash.move_to_trash(str(tmp_path), "checkpoint-100", ["checkpoint-100"], now=NOW)
    assert trash.empty_trash(str(tmp_path)) == freed
    assert snapshot.read_bytes() == b"x" * 1000


def test_recovery_rolls_back_a_half_moved_multi_file_checkpoint(tmp_path: Path) -> None:
    members = ["ckpt-5.index", "ckpt-5.data-00000-of-00002", "ckpt-5.data-00001-of-00002"]
    for name in members:
        (tmp_path / name).write_text(name)
    # What a kill -9 after the journal and the first rename leaves behind.
    item = tmp_path / ".ckptd-trash" / f"ckpt-5@{int(NOW)}"
    item.mkdir(parents=True)
    (item / trash.JOURNAL).write_text(json.dumps({"name": "ckpt-5", "members": members}))
    os.rename(tmp_path / "ckpt-5.index", item / "ckpt-5.index")
    (state,) = [i.state for i in trash.list_trash(str(tmp_path))]
    assert state == "moving"
    # A purge never removes a half-moved item, whatever the grace.
    assert trash.purge(str(tmp_path), now=NOW + 10**6, grace=0).removed == ()
    notes = trash.recover(str(tmp_path))
    assert notes == ["rolled back the interrupted deletion of ckpt-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".ckptd-trash", *members])
    assert (tmp_path / "ckpt-5.index").read_text() == "ckpt-5.index"
    assert trash.list_trash(str(tmp_path)) == []


def test_recovery_finishes_unfinished_and_half_removed_items(tmp_path: Path) -> None:
    folder = tmp_path / ".ckptd-trash"
    # A crash while writing a multi-file checkpoint's journal, before any rename.
    unfinished = folder / f"ckpt-7@{int(NOW)}"
    unfinished.mkdir(parents=True)
    (unfinished / (trash.JOURNAL + ".tmp")).write_text('{"members": ["ckpt-7.ind')
    # A crash halfway through removing a folder checkpoint.
    half = folder / f"checkpoint-200@{int(NOW)}"
    (half / "rng").mkdir(parents=True)
    (half / "weights.bin").write_bytes(b"left over")
    allocated = tree_blocks(half)
    notes = trash.recover(str(tmp_path))
    assert notes == [f"removed the unfinished trash item ckpt-7@{int(NOW)}"]
    purged = trash.purge(str(tmp_path), now=NOW, grace=0)
    assert purged.removed == ("checkpoint-200",) and purged.bytes_freed == allocated
    assert purged.bytes_logical == 9
    assert list(folder.iterdir()) == []


def test_a_failed_move_of_a_multi_file_checkpoint_leaves_it_whole(tmp_path: Path) -> None:
    from daemon.fsio import At, LocalFileSystem

    class SecondRenameFails(LocalFileSystem):
        renames = 0

        def rename_at(self, source: At, destination: At) -> None:
            if ".ckptd-trash" in destination.path and not destination.path.endswith(trash.JOURNAL):
                SecondRenameFails.renames += 1
                if SecondRenameFails.renames == 2:
                    raise PermissionError(13, "Permission denied", source.path)
            super().rename_at(source, destination)

    members = ["ckpt-5.index", "ckpt-5.data-00000-of-00001"]
    for name in members:
        (tmp_path / name).write_text(name)
    with pytest.raises(PermissionError):
        trash.move_to_trash(str(tmp_path), "ckpt-5", members, now=NOW, fs=SecondRenameFails())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".ckptd-trash") == sorted(members)
    assert trash.list_trash(str(tmp_path)) == []


def _half_moved_tensorflow_checkpoint(root: Path) -> Path:
    """Given a root, leave it as a running prune has it mid-move of a TF checkpoint: the
    journal and the `.index` in the trash item, the data shard still in the root."""
    (root / "ckpt-1.data-00000-of-00001").write_bytes(b"d" * 1000)
    item = root / ".ckptd-trash" / "ckpt-1@1000"
    item.mkdir(parents=True)
    members = ["ckpt-1.index", "ckpt-1.data-00000-of-00001"]
    (item / ".ckptd-entry.json").write_text(json.dumps({"name": "ckpt-1", "members": members}))
    (item / "ckpt-1.index").write_bytes(b"i" * 10)
    return item


def _layout(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_disk_pressure_does_not_touch_the_trash_while_a_prune_moves_into_it(
    tmp_path: Path,
) -> None:
    # A prune (the CLI) is mid-move while the daemon's disk check empties the trash. Rolling
    # the half-moved item back and removing its folder races the prune's next rename into that
    # folder: a member moved in between is removed with the folder, and the checkpoint is left
    # under its name without its data. The trash belongs to whoever holds the root lock.
    item = _half_moved_tensorflow_checkpoint(tmp_path)
    with root_lock(str(tmp_path)) as acquired:
        assert acquired
        before = _layout(tmp_path)
        assert not trash.empty_trash(str(tmp_path))
        assert _layout(tmp_path) == before
    assert item.is_dir()


def test_trash_commands_refuse_while_a_prune_holds_the_root(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _half_moved_tensorflow_checkpoint(root)
    cli_env["XDG_STATE_HOME"] = str(tmp_path / "state")
    with root_lock(str(root)) as acquired:
        assert acquired
        before = _layout(root)
        for action in (["purge", "-y"], ["restore", "ckpt-1"]):
            done = subprocess.run(
                [*ckptd_command, "trash", *action, "--root", str(root)],
                env=cli_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 3, (action, done.stdout, done.stderr)
            assert "another prune" in done.stderr
            assert _layout(root) == before
    assert os.path.isdir(root / ".ckptd-trash" / "ckpt-1@1000")
