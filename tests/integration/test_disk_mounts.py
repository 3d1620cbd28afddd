"""The one reader of the mount table: parsing mountinfo, the mount holding a path, its type."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.disk import mounts
from daemon.disk.mounts import Mount, filesystem_type, mount_of, mount_point, read_mounts

SAMPLE = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 27 0:40 / /data rw,relatime shared:20 master:3 - nfs4 server:/export/data rw,vers=4.2
41 27 0:41 / /data2 rw,relatime - xfs /dev/vdb rw
42 40 0:42 / /data/my\040runs rw - tmpfs tmpfs rw
43 40 0:43 / /data/back\134slash rw - fuse.sshfs me@host:/x rw
not a mountinfo line
44 27 0:44 / /data2 rw,relatime - tmpfs over rw
"""


@pytest.fixture
def table(tmp_path: Path) -> list[Mount]:
    path = tmp_path / "mountinfo"
    path.write_text(SAMPLE)
    return read_mounts(str(path))


def test_mountinfo_lines_are_parsed_with_escapes_and_optional_fields(table: list[Mount]) -> None:
    assert [mount.point for mount in table] == [
        "/proc",
        "/",
        "/data",
        "/data2",
        "/data/my runs",
        "/data/back\\slash",
        "/data2",
    ]
    assert table[2] == Mount("/data", "nfs4", "server:/export/data")
    assert table[5].fstype == "fuse.sshfs"


def test_the_longest_mount_point_holding_the_path_wins(table: list[Mount]) -> None:
    def fstype(path: str) -> str | None:
        mount = mount_of(path, table)
        return mount.fstype if mount is not None else None

    assert fstype("/data/run-1/checkpoint-100") == "nfs4"
    assert fstype("/data/my runs/checkpoint-100") == "tmpfs"
    assert fstype("/data") == "nfs4"
    assert fstype("/datasets/run") == "ext4"  # /data is not a prefix of /datasets
    assert fstype("/home/me") == "ext4"
    # Two mounts on one point: the later one is on top.
    assert fstype("/data2/run") == "tmpfs"


def test_the_real_table_has_root_and_a_missing_path_resolves_to_its_ancestor() -> None:
    assert mount_point("/") == "/"
    assert filesystem_type("/") != ""
    assert filesystem_type("/no/such/folder/anywhere") == filesystem_type("/")


@pytest.mark.root
def test_a_tmpfs_with_a_space_in_its_mount_point(
    tmp_path: Path, tmpfs: Callable[[int], Path]
) -> None:
    point = tmpfs(1 << 20)
    spaced = tmp_path / "my runs"
    spaced.mkdir()
    result = subprocess.run(
        ["mount", "--bind", str(point), str(spaced)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot bind-mount: {result.stderr.strip()}")
    try:
        (spaced / "run").mkdir()
        assert mount_point(str(spaced / "run")) == str(spaced)
        assert filesystem_type(str(spaced / "run")) == "tmpfs"
        assert filesystem_type(str(spaced / "not-yet" / "run")) == "tmpfs"
        assert mount_point(str(point / "run")) == str(point)
    finally:
        subprocess.run(["umount", "-l", str(spaced)], check=False)


@pytest.mark.root
def test_a_bind_mount_on_the_same_device_is_its_own_mount_point(tmp_path: Path) -> None:
    # `df` names the bind mount; the topmost folder on the same device would be far above it.
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    result = subprocess.run(
        ["mount", "--bind", str(source), str(target)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot bind-mount: {result.stderr.strip()}")
    try:
        assert os.stat(target).st_dev == os.stat(tmp_path).st_dev
        assert mount_point(str(target / "run")) == str(target)
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.root
def test_without_a_readable_table_the_mount_point_is_the_top_of_the_device(
    tmpfs: Callable[[int], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    point = tmpfs(1 << 20)
    (point / "run").mkdir()
    monkeypatch.setattr(mounts, "MOUNTINFO", "/nonexistent/mountinfo")
    assert mount_of(str(point)) is None
    assert filesystem_type(str(point / "run")) == ""
    assert mount_point(str(point / "run")) == str(point)
