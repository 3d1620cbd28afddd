"""Checking a snapshot against its MANIFEST.json: files missing or extra, sizes, checksums, and
shared (linked) files rewritten in place since.

A file is only called intact after its content was compared with a checksum recorded earlier.
The daemon records the checksums of hard-linked files while it takes the snapshot; a file
recorded without one (a snapshot by an older version, or `hash_shared=False`) gets it at its
first check ("sealed"), and that check has nothing to compare it with: `compared` counts the
files really compared, `sealed` those only recorded now.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from daemon.snapshots import copying
from daemon.snapshots.execute import MANIFEST, existing_snapshot_dates, write_manifest
from daemon.snapshots.schedule import DATE_NAME


@dataclass(frozen=True)
class VerifyResult:
    """Given one snapshot checked against its manifest: every difference found."""

    path: str
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    size: tuple[str, ...] = ()
    checksum: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()  # shared files not yet hashed whose mtime changed
    sealed: int = 0  # checksums recorded by this verify: nothing to compare them with yet
    checked: int = 0  # files in the manifest
    compared: int = 0  # files whose content (or link target) was compared with the manifest

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.size or self.checksum or self.modified)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class NotADate(ValueError):
    """`--verify yesterday`: what names a snapshot is its date, YYYY-MM-DD."""


def resolve_snapshot(directory: str, which: str) -> str:
    """Given the snapshots folder and a DATE or "latest", return the snapshot's path (raise
    NotADate for anything that is not a date, FileNotFoundError for a date without one)."""
    if which == "latest":
        dates = existing_snapshot_dates(directory)
        if not dates:
            raise FileNotFoundError(errno.ENOENT, "no snapshot yet", directory)
        return os.path.join(directory, dates[-1].isoformat())
    if not DATE_NAME.match(which):
        raise NotADate(f"{which!r} is not a date: give one as YYYY-MM-DD, or none for the newest")
    path = os.path.join(directory, which)
    if not os.path.isdir(path):
        raise FileNotFoundError(errno.ENOENT, "no snapshot for that date", path)
    return path


def verify_snapshot(
    path: str, *, seal: bool = True, progress: Callable[[int, int], None] | None = None
) -> VerifyResult:
    """Given a snapshot folder, return how it differs from its MANIFEST.json.

    Shared (linked) files recorded without a checksum are hashed now and, with `seal`, their
    checksum is written into the manifest so later verifies compare against it.
    `progress(done, total)` is told the bytes hashed so far (a progress bar on long hashes).
    """
    manifest_path = os.path.join(path, MANIFEST)
    with open(manifest_path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    expected = {record["path"]: record for record in manifest["files"]}
    present: set[str] = set()
    for current, folders, files in os.walk(path):
        relative_folder = os.path.relpath(current, path)
        for name in files + [f for f in folders if os.path.islink(os.path.join(current, f))]:
            relative = name if relative_folder == "." else f"{relative_folder}/{name}"
            if relative != MANIFEST:
                present.add(relative)
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    size: list[str] = []
    checksum: list[str] = []
    modified: list[str] = []
    sealed = compared = 0
    both = sorted(set(expected) & present)
    total = sum(int(expected[name].get("size", 0)) for name in both)
    hashed = 0

    def advance(count: int) -> None:
        nonlocal hashed
        hashed += count
        if progress is not None:
            progress(hashed, total)

    for relative in both:
        record = expected[relative]
        full = os.path.join(path, relative)
        if "symlink" in record:
            compared += 1
            if not os.path.islink(full) or os.readlink(full) != record["symlink"]:
                checksum.append(relative)
            continue
        info = os.lstat(full)
        if not stat.S_ISREG(info.st_mode):
            # Never hashed: a FIFO would block the reader, a link is not what was written.
            checksum.append(f"{relative}: not a regular file any more")
            continue
        if info.st_size != record["size"]:
            size.append(f"{relative}: {record['size']} B in manifest, {info.st_size} B on disk")
            continue
        actual = copying.sha256_file(full, advance)
        if record.get("sha256") is None:
            if info.st_mtime_ns != record.get("mtime_ns"):
                modified.append(f"{relative}: rewritten since the snapshot (mtime changed)")
                continue
            record["sha256"] = actual
            sealed += 1
        else:
            compared += 1
            if actual != record["sha256"]:
                checksum.append(f"{relative}: sha256 {actual[:12]}… ≠ {record['sha256'][:12]}…")
    if seal and sealed:
        temporary = manifest_path + ".tmp"
        write_manifest(temporary, manifest)
        os.replace(temporary, manifest_path)
    return VerifyResult(
        path=path,
        missing=tuple(missing),
        extra=tuple(extra),
        size=tuple(size),
        checksum=tuple(checksum),
        modified=tuple(modified),
        sealed=sealed,
        checked=len(expected),
        compared=compared,
    )
