"""The mount table, read in one place: which mount holds a path, its filesystem type, and
whether inotify sees every write on it.

Read from `/proc/self/mountinfo` at each call (no cache): mounts come and go while the daemon
runs (an NFS root mounted after start-up), and the file is small (tens of lines, ~0.1 ms).
The mount of a path is the longest mount point containing its real path; of two mounts on
the same point the later one (the top of the stack, last in the table) wins.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"

# Mount types where inotify does not see writes made by other machines or by a FUSE server.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "lustre",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "9p",
        "ceph",
        "glusterfs",
        "gpfs",
        "beegfs",
        "afs",
        "ncpfs",
        "davfs",
        "virtiofs",
    }
)

# The kernel writes a space, tab, newline or backslash in a path as a 3-digit octal escape.
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of the mount table: where, what type, mounted from what."""

    point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def read_mounts(path: str | None = None) -> list[Mount]:
    """Given a mountinfo file (this process's by default), return its mounts in order; raises
    `OSError` when unreadable.

    A line: `id parent major:minor root POINT options [optional…] - TYPE SOURCE super-options`.
    """
    mounts: list[Mount] = []
    with open(path or MOUNTINFO, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split()
            try:
                separator = fields.index("-")
                mounts.append(
                    Mount(
                        point=_unescape(fields[4]),
                        fstype=fields[separator + 1],
                        source=_unescape(fields[separator + 2])
                        if len(fields) > separator + 2
                        else "",
                    )
                )
            except (ValueError, IndexError):
                continue  # a malformed line says nothing about the others
    return mounts


def mount_of(path: str, mounts: Sequence[Mount] | None = None) -> Mount | None:
    """Given a path (it need not exist yet) and the mount table (read now when not given),
    return the mount that holds it; None when the table is unreadable."""
    if mounts is None:
        try:
            mounts = read_mounts()
        except OSError:
            return None
    real = os.path.realpath(path)
    best: Mount | None = None
    best_length = -1
    for mount in mounts:
        point = mount.point.rstrip("/") or "/"
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best_length:
            best, best_length = mount, len(point)
    return best


def filesystem_type(path: str) -> str:
    """Given a path (it need not exist yet), return the type of the filesystem that holds it
    (`ext4`, `nfs4`, `fuse.sshfs`, ...), or "" when unknown."""
    mount = mount_of(path)
    return mount.fstype if mount is not None else ""


def mount_point(path: str) -> str:
    """Given an existing path, return the mount point of its filesystem.

    Without a readable mount table, the topmost folder on the same device.
    """
    mount = mount_of(path)
    if mount is not None:
        return mount.point
    current = os.path.realpath(path)
    device = os.stat(current).st_dev
    while True:
        parent = os.path.dirname(current)
        if parent == current or os.stat(parent).st_dev != device:
            return current
        current = parent


def is_network_filesystem(fstype: str) -> bool:
    """Given a mount's filesystem type, return whether inotify would miss remote writes."""
    fstype = fstype.lower()
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith(("fuse", "nfs"))


# Mount types other machines write to as well: several ckptd daemons may see one root there, so
# a root on one is `shared` (one pruner, by lease: daemon/pruning/leasing.py) unless configured
# otherwise. Unlike NETWORK_FILESYSTEMS (inotify), a VM's own share (9p, virtiofs) is not here.
SHARED_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "lustre",
        "gpfs",
        "wekafs",
        "ceph",
        "cephfs",
        "beegfs",
        "glusterfs",
        "cifs",
        "smb3",
        "smbfs",
        "afs",
        "ocfs2",
        "gfs2",
        "orangefs",
        "pvfs2",
    }
)
# FUSE mounts of network or cluster storage (`fuse.<name>` in the mount table).
SHARED_FUSE = frozenset(
    {
        "sshfs",
        "s3fs",
        "gcsfuse",
        "rclone",
        "juicefs",
        "glusterfs",
        "ceph-fuse",
        "cephfs",
        "mountpoint-s3",
        "goofys",
        "blobfuse",
        "blobfuse2",
        "weka",
        "beegfs",
        "lustre",
        "alluxio-fuse",
        "seaweedfs",
        "geesefs",
        "davfs",
    }
)


def is_shared_filesystem(fstype: str) -> bool:
    """Given a mount's filesystem type, return whether other machines may write to it too (a
    network or cluster filesystem, or a FUSE mount of one)."""
    fstype = fstype.lower()
    if fstype.startswith("fuse."):
        return fstype.removeprefix("fuse.") in SHARED_FUSE
    return fstype in SHARED_FILESYSTEMS or fstype.startswith("nfs")
