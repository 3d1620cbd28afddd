"""Checking a snapshot against its MANIFEST.json: files missing or extra, sizes, checksums, and
shared (linked) files rewritten in place since. The first check of a linked file records its
checksum ("seals" it), so later checks compare against it.
"""

from __future__ import annotations

import errno
import json
import os
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
    sealed: int = 0  # checksums recorded by this verify
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.size or self.checksum or self.modified)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def resolve_snapshot(directory: str, which: str) -> str:
    """Given the snapshots folder and a DATE or "latest", return the snapshot's path."""
    if which == "latest":
        dates = existing_snapshot_dates(directory)
        if not dates:
            raise FileNotFoundError(errno.ENOENT, "no snapshot yet", directory)
        return os.path.join(directory, dates[-1].isoformat())
    path = os.path.join(directory, which)
    if not DATE_NAME.match(which) or not os.path.isdir(path):
        raise FileNotFoundError(errno.ENOENT, "no snapshot for that date", path)
    return path


def verify_snapshot(path: str, *, seal: bool = True) -> VerifyResult:
    """Given a snapshot folder, return how it differs from its MANIFEST.json.

    Shared (linked) files recorded without a checksum are hashed now and, with `seal`, their
    checksum is written into the manifest so later verifies compare against it.
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
    sealed = 0
    for relative in sorted(set(expected) & present):
        record = expected[relative]
        full = os.path.join(path, relative)
        if "symlink" in record:
            if not os.path.islink(full) or os.readlink(full) != record["symlink"]:
                checksum.append(relative)
            continue
        info = os.lstat(full)
        if info.st_size != record["size"]:
            size.append(f"{relative}: {record['size']} B in manifest, {info.st_size} B on disk")
            continue
        actual = copying.sha256_file(full)
        if record.get("sha256") is None:
            if info.st_mtime_ns != record.get("mtime_ns"):
                modified.append(f"{relative}: rewritten since the snapshot (mtime changed)")
                continue
            record["sha256"] = actual
            sealed += 1
        elif actual != record["sha256"]:
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
    )
