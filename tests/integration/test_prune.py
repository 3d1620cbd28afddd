"""The deleter on real temporary filesystems: trash first, symlinks, errors, honest bytes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from daemon.fsio import At, LocalFileSystem
from daemon.history.log import HistoryLog, read_records
from daemon.pruning import deleter, trash
from daemon.safety import facts as proc_facts
from policies.model import Checkpoint, Decision, Plan
from tests.sizes import blocks, tree_blocks

NOW = 1_800_000_000.0
FILE_BYTES = 3000


def make_checkpoint(root: Path, step: int, files: int = 3) -> Checkpoint:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for index in range(files):
        (folder / f"shard-{index}.bin").write_bytes(bytes([step % 256]) * FILE_BYTES)
    (folder / "nested").mkdir()
    (folder / "nested" / "optimizer.pt").write_bytes(b"o" * FILE_BYTES)
    size = FILE_BYTES * (files + 1)
    return Checkpoint(
        name=folder.name, step=step, size_bytes=size, freeable_bytes=size, mtime=NOW - 3600
    )


def plan_of(root: Path, keep: list[Checkpoint], delete: list[Checkpoint]) -> Plan:
    decisions = [Decision(c, True, ("tier1",), 1) for c in keep]
    decisions += [
        Decision(c, False, ("tier3:every-1000: 1000 represents the bucket",), 3) for c in delete
    ]
    decisions.sort(key=lambda d: d.checkpoint.step)
    return Plan(root=str(root), decisions=tuple(decisions))


def no_holders(root: str, _entries: object) -> proc_facts.Facts:
    return proc_facts.Facts(root_path=root, now=NOW)


def run_apply(root: Path, plan: Plan, **options: object) -> deleter.ApplyResult:
    arguments: dict[str, object] = {"dry_run": False, "now": NOW, "holders_check": no_holders}
    arguments.update(options)
    return deleter.apply(plan, str(root), **arguments)  # type: ignore[arg-type]


def test_deletes_exactly_the_planned_checkpoints_and_reports_their_bytes(tmp_path: Path) -> None:
    checkpoints = [make_checkpoint(tmp_path, step) for step in (100, 200, 300, 400)]
    history = HistoryLog(str(tmp_path.parent / f"{tmp_path.name}-history.jsonl"))
    plan = plan_of(tmp_path, checkpoints[2:], checkpoints[:2])
    # Freed bytes are the blocks the filesystem gets back; the files' lengths are apart.
    first_allocated = tree_blocks(tmp_path / "checkpoint-100")
    allocated = first_allocated + tree_blocks(tmp_path / "checkpoint-200")
    result = run_apply(tmp_path, plan, history=history, policy={"keep_last": 2})
    history.close()
    assert result.deleted == ("checkpoint-100", "checkpoint-200")
    assert result.bytes_freed == allocated and result.bytes_logical == 2 * 4 * FILE_BYTES
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".ckptd-trash",
        "checkpoint-300",
        "checkpoint-400",
    ]
    assert list((tmp_path / ".ckptd-trash").iterdir()) == []
    records = read_records(history.path)
    assert [r["checkpoint"] for r in records if r["event"] == "delete"] == [
        "checkpoint-100",
        "checkpoint-200",
    ]
    first = records[0]
    assert first["step"] == 100 and first["bytes_freed"] == first_allocated
    assert first["bytes_logical"] == 4 * FILE_BYTES
    assert first["why"] == ["tier3:every-1000: 1000 represents the bucket"]
    assert first["policy"] == {"keep_last": 2}
    assert first["time"].endswith("+00:00")


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    checkpoints = [make_checkpoint(tmp_path, step) for step in (100, 200)]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = run_apply(tmp_path, plan_of(tmp_path, [], checkpoints), dry_run=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert result.deleted == () and result.bytes_freed == 0
    assert result.would_delete == ("checkpoint-100", "checkpoint-200")
    assert result.would_free == 2 * 4 * FILE_BYTES


def test_a_symlink_inside_a_checkpoint_loses_only_the_link(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "dataset.bin").write_bytes(b"precious" * 100)
    (outside / "folder").mkdir()
    (outside / "folder" / "inner.bin").write_bytes(b"also precious")
    checkpoint = make_checkpoint(root, 100)
    (root / "checkpoint-100" / "data-link").symlink_to(outside / "dataset.bin")
    (root / "checkpoint-100" / "folder-link").symlink_to(outside / "folder")
    result = run_apply(root, plan_of(root, [], [checkpoint]))
    assert result.deleted == ("checkpoint-100",)
    assert not (root / "checkpoint-100").exists()
    assert (outside / "dataset.bin").read_bytes() == b"precious" * 100
    assert (outside / "folder" / "inner.bin").read_bytes() == b"also precious"


def test_a_multi_file_checkpoint_goes_whole(tmp_path: Path) -> None:
    for name in ("ckpt-5.index", "ckpt-5.data-00000-of-00002", "ckpt-5.data-00001-of-00002"):
        (tmp_path / name).write_bytes(b"t" * 100)
    (tmp_path / "ckpt-6.index").write_bytes(b"keep")
    allocated = blocks(*tmp_path.glob("ckpt-5.*"))
    checkpoint = Checkpoint(
        name="ckpt-5",
        step=5,
        entries=("ckpt-5.data-00000-of-00002", "ckpt-5.data-00001-of-00002", "ckpt-5.index"),
        freeable_bytes=300,
    )
    result = run_apply(tmp_path, plan_of(tmp_path, [], [checkpoint]), trash_grace=3600)
    assert result.trashed == ("ckpt-5",) and result.bytes_freed == 0
    assert result.bytes_in_trash == allocated
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckptd-trash", "ckpt-6.index"]
    (item,) = trash.list_trash(str(tmp_path))
    assert item.name == "ckpt-5" and len(item.members) == 3
    trash.restore(str(tmp_path), "ckpt-5")
    assert (tmp_path / "ckpt-5.index").read_bytes() == b"t" * 100


def test_a_process_holding_the_checkpoint_at_the_last_moment_vetoes_it(tmp_path: Path) -> None:
    checkpoints = [make_checkpoint(tmp_path, step) for step in (100, 200)]
    allocated = tree_blocks(tmp_path / "checkpoint-200")
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; h = open(sys.argv[1]); print('ready', flush=True); time.sleep(60)",
            str(tmp_path / "checkpoint-100" / "shard-0.bin"),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == b"ready\n"
        history = HistoryLog(str(tmp_path.parent / f"{tmp_path.name}-veto.jsonl"))
        result = deleter.apply(
            plan_of(tmp_path, [], checkpoints),
            str(tmp_path),
            dry_run=False,
            now=NOW,
            history=history,
        )
        history.close()
    finally:
        reader.kill()
        reader.wait()
    assert result.deleted == ("checkpoint-200",)
    ((name, reason),) = result.vetoed
    assert name == "checkpoint-100" and reason.startswith(f"in-use:pid {reader.pid} (")
    assert (tmp_path / "checkpoint-100" / "shard-0.bin").exists()
    assert result.bytes_freed == allocated
    (veto,) = [r for r in read_records(history.path) if r["event"] == "veto"]
    assert veto["pid"] == reader.pid and "python" in veto["cmdline"]


class FailingFileSystem(LocalFileSystem):
    """The real filesystem, except for the failures a test asks for."""

    def __init__(
        self,
        rename_error: Callable[[str], OSError | None] | None = None,
        remove_error: Callable[[str], OSError | None] | None = None,
    ) -> None:
        self.rename_error = rename_error
        self.remove_error = remove_error

    def rename_at(self, source: At, destination: At) -> None:
        error = self.rename_error(source.path) if self.rename_error else None
        if error is not None:
            raise error
        super().rename_at(source, destination)

    def remove_tree_at(
        self, at: At, on_error: Callable[[str, OSError], None] | None = None
    ) -> None:
        def guarded(current: str, error: OSError) -> None:
            if on_error is None:
                raise error
            on_error(current, error)

        # Fail on chosen files inside the tree, like a file the deleter may not unlink.
        for directory, _folders, files in os.walk(at.path):
            for name in files:
                full = os.path.join(directory, name)
                error = self.remove_error(full) if self.remove_error else None
                if error is not None:
                    guarded(full, error)
                    return
        super().remove_tree_at(at, on_error)


def test_permission_denied_on_one_checkpoint_fails_it_and_goes_on(tmp_path: Path) -> None:
    checkpoints = [make_checkpoint(tmp_path, step) for step in (100, 200, 300)]
    allocated = tree_blocks(tmp_path / "checkpoint-100", tmp_path / "checkpoint-300")
    denied = str(tmp_path / "checkpoint-200")
    fs = FailingFileSystem(
        rename_error=lambda source: (
            PermissionError(errno.EACCES, "Permission denied", source) if source == denied else None
        )
    )
    result = run_apply(tmp_path, plan_of(tmp_path, [], checkpoints), fs=fs)
    assert result.deleted == ("checkpoint-100", "checkpoint-300")
    ((name, message),) = result.failed
    assert name == "checkpoint-200" and "Permission denied" in message
    assert result.bytes_freed == allocated
    assert (tmp_path / "checkpoint-200" / "shard-0.bin").exists()


def test_a_partly_removed_checkpoint_is_failed_and_frees_nothing_claimed(tmp_path: Path) -> None:
    checkpoints = [make_checkpoint(tmp_path, step) for step in (100, 200)]
    allocated = tree_blocks(tmp_path / "checkpoint-200")
    fs = FailingFileSystem(
        remove_error=lambda path: (
            PermissionError(errno.EACCES, "Permission denied", path)
            if "checkpoint-100" in path and path.endswith("shard-1.bin")
            else None
        )
    )
    result = run_apply(tmp_path, plan_of(tmp_path, [], checkpoints), fs=fs)
    assert result.deleted == ("checkpoint-200",)
    assert result.partial == ("checkpoint-100",)
    assert "partly removed" in result.failed[0][1]
    assert result.bytes_freed == allocated  # only checkpoint-200's
    assert not (tmp_path / "checkpoint-100").exists()  # out of the root, remains in the trash
    (item,) = trash.list_trash(str(tmp_path))
    assert item.name == "checkpoint-100"


def test_a_checkpoint_vanishing_before_its_deletion_is_reported_not_counted(tmp_path: Path) -> None:
    checkpoints = [make_checkpoint(tmp_path, step) for step in (100, 200)]
    allocated = tree_blocks(tmp_path / "checkpoint-200")

    def vanish(source: str) -> OSError | None:
        if source.endswith("checkpoint-100"):
            os.system(f"rm -rf '{source}'")  # someone else deleted it just now
        return None

    result = run_apply(tmp_path, plan_of(tmp_path, [], checkpoints), fs=FailingFileSystem(vanish))
    assert result.deleted == ("checkpoint-200",)
    assert result.failed[0][0] == "checkpoint-100"
    assert "No such file" in result.failed[0][1]
    assert result.bytes_freed == allocated


def test_files_vanishing_mid_delete_are_not_errors(tmp_path: Path) -> None:
    checkpoints = [make_checkpoint(tmp_path, step) for step in (100,)]

    class Racing(LocalFileSystem):
        def remove_tree_at(
            self, at: At, on_error: Callable[[str, OSError], None] | None = None
        ) -> None:
            nested = os.path.join(at.path, "nested")
            if os.path.isdir(nested):
                os.system(f"rm -rf '{nested}'")
            super().remove_tree_at(at, on_error)

    result = run_apply(tmp_path, plan_of(tmp_path, [], checkpoints), fs=Racing())
    assert result.deleted == ("checkpoint-100",) and result.failed == ()


@pytest.fixture
def read_only_root(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_read_only_filesystem_fails_every_deletion_and_frees_nothing(
    read_only_root: Path,
) -> None:
    checkpoints = [make_checkpoint(read_only_root, step) for step in (100, 200)]
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_root)], check=True)
    result = run_apply(read_only_root, plan_of(read_only_root, [], checkpoints))
    assert result.deleted == () and result.bytes_freed == 0
    assert [name for name, _ in result.failed] == ["checkpoint-100", "checkpoint-200"]
    assert all("Read-only file system" in message for _, message in result.failed)
    assert (read_only_root / "checkpoint-100" / "shard-0.bin").exists()


def test_stop_finishes_the_current_deletion_and_starts_no_other(tmp_path: Path) -> None:
    checkpoints = [make_checkpoint(tmp_path, step) for step in (100, 200, 300)]
    stop = threading.Event()

    class SignalledAfterFirstRename(LocalFileSystem):
        def rename_at(self, source: At, destination: At) -> None:
            super().rename_at(source, destination)
            stop.set()  # SIGTERM arrives while the first checkpoint is being deleted

    result = run_apply(
        tmp_path, plan_of(tmp_path, [], checkpoints), stop=stop, fs=SignalledAfterFirstRename()
    )
    # The first is out of the root (its removal is left to the next run's purge), no other started.
    assert result.deleted == ("checkpoint-100",) and result.trashed == ("checkpoint-100",)
    assert result.bytes_freed == 0
    assert result.skipped == ("checkpoint-200", "checkpoint-300")
    assert (tmp_path / "checkpoint-200" / "shard-0.bin").exists()
    assert [item.name for item in trash.list_trash(str(tmp_path))] == ["checkpoint-100"]


def test_processes_are_looked_at_again_when_moving_takes_long(tmp_path: Path) -> None:
    checkpoints = [make_checkpoint(tmp_path, step) for step in (100, 200, 300, 400)]
    checked: list[list[str]] = []

    def counting(root: str, entries: object) -> proc_facts.Facts:
        checked.append(list(entries))  # type: ignore[call-overload]
        return proc_facts.Facts(root_path=root, now=NOW)

    class SlowRename(LocalFileSystem):
        def rename_at(self, source: At, destination: At) -> None:
            time.sleep(deleter.RECHECK_SECONDS * 0.6)
            super().rename_at(source, destination)

    result = run_apply(
        tmp_path, plan_of(tmp_path, [], checkpoints), holders_check=counting, fs=SlowRename()
    )
    assert len(result.deleted) == 4
    # The first check covers all four; later ones only what is still to be moved.
    assert checked[0] == [c.name for c in checkpoints]
    assert len(checked) >= 2 and checked[1][-1] == "checkpoint-400" and len(checked[1]) < 4


def test_a_file_opened_between_the_holder_check_and_the_rename_vetoes_the_removal(
    tmp_path: Path,
) -> None:
    # A trainer resuming opens checkpoint-200's weights just after the last-moment check and
    # just before the rename: it holds the file, by then inside the trash. The invariant "any
    # process holding a file inside the checkpoint vetoes its deletion" must still hold.
    root = tmp_path / "run"
    checkpoints = []
    for step in (100, 200, 300, 400):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.bin").write_bytes(b"m" * 5000)
        checkpoints.append(Checkpoint(name=folder.name, step=step, freeable_bytes=5000))
    decisions = [Decision(c, c.step > 300, ("tier1",)) for c in checkpoints]
    plan = Plan(root=str(root), decisions=tuple(decisions))
    reader: list[subprocess.Popen[str]] = []

    def check_then_open(root_path: str, entries: Iterable[str]) -> proc_facts.Facts:
        facts = proc_facts.recheck(root_path, entries)
        if not reader:
            reader.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        "import sys, time; handle = open(sys.argv[1], 'rb'); print('open', "
                        "flush=True); time.sleep(60)",
                        str(root / "checkpoint-200" / "model.bin"),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            assert reader[0].stdout is not None and reader[0].stdout.readline() == "open\n"
        return facts

    try:
        result = deleter.apply(
            plan, str(root), dry_run=False, now=time.time(), holders_check=check_then_open
        )
    finally:
        for process in reader:
            process.kill()
            process.wait()
    assert result.deleted == ("checkpoint-100", "checkpoint-300")
    assert [name for name, _ in result.vetoed] == ["checkpoint-200"]
    assert f"pid {reader[0].pid}" in result.vetoed[0][1]
    assert (root / "checkpoint-200" / "model.bin").read_bytes() == b"m" * 5000
    assert not (root / "checkpoint-100").exists() and not (root / "checkpoint-300").exists()
    assert trash.list_trash(str(root)) == []
