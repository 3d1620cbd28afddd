"""What an integrity check says about one checkpoint, and the size signature it is valid for.

`IntegrityResult.status` is one of:

- `ok`: every file ckptd knows the format of was read where it tells something (headers,
  indexes, central directories; every byte in a deep check) and nothing was wrong;
- `corrupt`: at least one `problems` entry: damage a framework's loader would trip over
  (a truncated file, a header that does not parse, a shard named by an index that is missing);
- `unknown`: nothing wrong was found but the check could not vouch for the checkpoint: no file of
  a known format in it, a file unreadable for ckptd (permissions), a file changed while it was
  read (a save still going on), or the check was stopped. `skipped` says why.

The `signature` is every entry of the checkpoint as (path, kind, size, mtime in ns): a result
is valid exactly while the signature is unchanged (a complete checkpoint never changes, so it is
checked once). `digest` is its short stable form for a cache on disk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple

Status = Literal["ok", "corrupt", "unknown"]

OK: Final = "ok"
CORRUPT: Final = "corrupt"
UNKNOWN: Final = "unknown"


class SignatureEntry(NamedTuple):
    """One entry of a checkpoint: its path relative to the checkpoint (`/`-separated), its kind
    (`file`, `dir`, `symlink`, `other`), its size and mtime in nanoseconds."""

    path: str
    kind: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Signature:
    """Given a checkpoint's entries at one moment, sorted by path: what a result is valid for."""

    entries: tuple[SignatureEntry, ...] = ()

    @property
    def digest(self) -> str:
        """Return a short stable hash of the entries (for a cache kept on disk)."""
        hasher = hashlib.blake2b(digest_size=16)
        for entry in self.entries:
            hasher.update(f"{entry.path}\0{entry.kind}\0{entry.size}\0{entry.mtime_ns}\n".encode())
        return hasher.hexdigest()

    @property
    def total_bytes(self) -> int:
        """Return the sum of the sizes of the regular files."""
        return sum(entry.size for entry in self.entries if entry.kind == "file")


@dataclass(frozen=True, slots=True)
class IntegrityResult:
    """Given one check of one checkpoint: its verdict and what it rests on.

    `problems` each name the file and what is wrong with it; `skipped` each name what could not
    be checked and why (they make an otherwise clean result "unknown"); `deferred` the files the
    cheap check left to the deep one for their size (they do not); `checked_files` are the paths
    (relative to the checkpoint) whose format was checked. `deep` says whether every byte with a
    checksum was read; `stopped` that a stop was requested before the end; `changed` that the
    checkpoint changed while it was checked. `bytes_read` counts the deep pass's bytes.
    """

    checkpoint: str
    layout: str
    status: Status
    problems: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    deferred: tuple[str, ...] = ()
    checked_files: tuple[str, ...] = ()
    signature: Signature = field(default_factory=Signature)
    deep: bool = False
    stopped: bool = False
    changed: bool = False
    bytes_read: int = 0

    @property
    def cacheable(self) -> bool:
        """Return whether this result may be reused while its signature holds: not stopped,
        nothing changed during the check, and the checkpoint was there."""
        return not self.stopped and not self.changed and bool(self.signature.entries)
