"""Checkpoint discovery: which entries of a root are checkpoints, of which series, complete or not.

One module scans; it decides nothing. See DESIGN.md, "Checkpoint discovery", and
`daemon/discovery/layouts.py` for the names of each layout. What this module adds:

Complete when the layout's completion marker, written last, is there; settle time ("nothing
written for `settle_seconds`") only where no such marker exists:
- hf: `trainer_state.json` inside (the Trainer writes it last), readable where it was read,
  and no `checkpoint-is-incomplete.txt` (transformers' JIT checkpoint removes it after all);
- orbax: not a temporary name, and `commit_success.txt` or `_CHECKPOINT_METADATA` inside;
- dcp: `.metadata` inside, or `__0.metadata` (use_collectives=False: one per rank); a folder
  without any `*.distcp` is not a checkpoint at all;
- deepspeed: `latest` names it or a later step; megatron: its iteration is at most the one in
  `latest_checkpointed_iteration.txt` (a tracker that does not hold a number, such as
  `release`, says nothing, and settle time alone decides);
- tf: the `.index` file exists and the `checkpoint` file lists it or a later step;
- pt, lightning, custom patterns: settle time only.
Whatever the layout: never while a framework's temporary name says the save is in flight
(`3.orbax-checkpoint-tmp/`, `ckpt-3_temp/`: a checkpoint of its own at its step), nor while
NeMo's `<name>-unfinished` marker lies beside it, nor when something vanished or could not be
read during the walk.

Trackers protect what they name (`Checkpoint.tracked_by`):
- DeepSpeed `latest`, Megatron `latest_checkpointed_iteration.txt`;
- TensorFlow `checkpoint`: only `model_checkpoint_path`, the one TF resumes from. The other
  `all_model_checkpoint_paths` are TF's own retention list (every checkpoint when
  `max_to_keep=None`); protecting them all would make the root unprunable, and deleting one
  breaks no resume. They do count as complete.
- `best_model_checkpoint` in the `trainer_state.json` of the newest settled hf checkpoint (and
  of any newer one being saved);
- a symlink among the root's entries (Lightning's `last.ckpt`, a user's `latest -> ...`) that
  points at a checkpoint of the root. Symlinks are never checkpoints themselves, and a copy
  (Lightning's `last.ckpt` as a file) is simply not a series member.

Pins (`Checkpoint.pinned_by`): `.keep` inside a checkpoint folder or `<name>.keep` beside a
file checkpoint (`".keep"`); a `protect:` glob matching the name (`"protect:<glob>"`).

Metrics (for `keep_best`), kept simple: from `trainer_state.json` the numeric `eval_*` keys
of the newest `log_history` record with eval keys at the checkpoint's own step (an evaluation
of an earlier step scored other weights), plus `best_metric`; from a sidecar (`metrics.json`
inside a folder, `<name>.metrics.json` beside a file, which then belongs to the checkpoint and
is deleted with it) every numeric top-level key; from a Lightning name such as
`epoch=3-step=1200-val_loss=0.31.ckpt`, `val_loss`.

Order: a series whose names carry an epoch and a step (`mid_epoch_<e>_<step>.pt`) is ordered
by step, unless the step restarts each epoch (some later epoch has a smaller one): then by
epoch first, the step becoming `epoch * 10^digits + step`.

Sizes: `size_bytes` sums `st_size` of each inode once (directories not counted: their size is
filesystem bookkeeping); `freeable_bytes` skips files with more links than this checkpoint
holds (a snapshot shares them). Symlinks count as their own small size, never followed.
`mtime` is the newest mtime of anything inside, folders included (a rename into a folder
changes only the folder's mtime).

The phases of one scan (`_scan`), each a function passing named values to the next:
1. list the root once (`_Listing`: candidate rows, symlinks, pins, sidecars, trackers);
2. match names and choose the layout (`_Matching`), then group the rows of multi-entry
   checkpoints (`_Candidates`);
3. walk each checkpoint, or reuse its cached walk (`_Found`, one per checkpoint);
4. order them (series, step, name) and re-check the fingerprints that matter;
5. read the trackers (`_Trackers`: tracker files, best_model_checkpoint, symlinks);
6. build the `Checkpoint` values, with completeness, trackers and pins.

Hostile roots: the root's owner may swap any folder of it for a symlink (to another user's run,
to /etc) at any moment. The walk never follows one (`walker.py`); what the scan reads or lists
inside a folder itself (trainer_state.json, metrics.json, the folders layout detection looks
into) is reached relative to the root's descriptor, opened once per scan, the folder with
`O_DIRECTORY|O_NOFOLLOW` (`_read_in`, `_names_in`): a folder swapped since it was seen makes
its state unreadable, never read from outside. The configured root path itself is trusted (an
administrator may name it through a symlink).

Speed: a rescan lists the root once and walks only checkpoints the cache does not know (see
`daemon/discovery/sizecache.py` for what proves a cached checkpoint unchanged); each name is
matched once (a memo in the cache); the `_Found` record and the `Checkpoint` of an unchanged
cached checkpoint are reused, so a rescan of 10,000 checkpoints allocates almost nothing per
checkpoint; the walk itself is `daemon/discovery/walker.py`.
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import os
import re
import stat as stat_module
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from itertools import islice, pairwise
from operator import attrgetter
from types import MappingProxyType
from typing import Any, NamedTuple

from daemon.config import RootConfig
from daemon.discovery.layouts import (
    DCP_CANDIDATE,
    DEEPSPEED_TRACKER,
    MEGATRON_TRACKER,
    TF_TRACKER,
    NameMatch,
    Pattern,
    choose_layout,
    compile_pattern,
    first_layout,
    match_builtin,
)
from daemon.discovery.sizecache import CacheEntry, Identity, Member, SizeCache, WalkResult
from daemon.discovery.walker import (
    DCP_RANK0_METADATA,
    DISTCP_MARKER,
    HF_INCOMPLETE_MARKER,
    fingerprint_markers_of,
    scandir_of,
    walk_checkpoint,
    walk_many,
)
from daemon.errors import UsageError
from daemon.fsio import (
    LOCAL,
    At,
    Dir,
    FileSystem,
    LocalFileSystem,
    list_in,
    read_regular,
    read_regular_in,
)
from policies.collector import collector_paused
from policies.model import Checkpoint

# Newest checkpoints per series whose fingerprint is re-checked on every scan: a resumed trainer
# overwrites recent checkpoints in place, which the directory listing cannot see.
RECHECK_NEWEST = 2
_TRAINER_STATE_LIMIT = 256 << 20
_SIDECAR_LIMIT = 1 << 20
_KEEP_SUFFIX = ".keep"
# Written into a checkpoint folder after its resume state was moved out (daemon/slimming.py).
SLIM_MARKER = ".ckptd-slim.json"
_METRICS_SUFFIX = ".metrics.json"
# NeMo touches `<checkpoint without .ckpt/.nemo>-unfinished` beside a checkpoint before saving
# it and removes it once the save is finalized (nemo/lightning/pytorch/callbacks/
# model_checkpoint.py, UNFINISHED_CHECKPOINT_SUFFIX); its next start deletes what still has one.
_UNFINISHED_SUFFIX = "-unfinished"
_TRACKER_NAMES = frozenset({DEEPSPEED_TRACKER, MEGATRON_TRACKER, TF_TRACKER})
_STATE_MARKERS = frozenset({"trainer_state.json", "metrics.json"})
# Layouts whose completeness is settled once a cached (final) walk exists: no tracker involved.
_STATIC_LAYOUTS = frozenset({"hf", "orbax", "dcp", "pt", "lightning", "custom"})
# Layouts with no completion marker written last: only settle time says a save is over.
# (Megatron too when its tracker holds no number; see `_settles`.)
_SETTLE_LAYOUTS = frozenset({"pt", "lightning", "custom"})

_NO_METRICS: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ScanResult:
    """One scan of one root: its checkpoints (every series) and what the reader should know.

    `checkpoints` are ordered by series (in `series` order), then step, then name.
    `cache_hits`/`walked` say how many checkpoints came from the size cache and how many were
    walked this time (for `status` and the benchmarks).
    """

    root: str
    layout: str  # the detected or configured layout
    checkpoints: tuple[Checkpoint, ...]
    # Series ids found or configured, in config order (a checkpoint's `series` is one of them).
    series: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    cache_hits: int = 0
    walked: int = 0


# --- the values the phases pass on ---------------------------------------------------------------


class _RootFd:
    """The root of one scan opened once, on first need, for what the scan lists or reads inside
    its folders (`_names_in`, `_read_in`): everything there is reached relative to this
    descriptor, never by a path resolved again. The root itself is the configured, trusted
    path (it may be reached through a symlink, like the walk's `open_root`)."""

    __slots__ = ("_fd", "_fs", "_path")

    def __init__(self, fs: FileSystem, path: str) -> None:
        self._fs = fs
        self._path = path
        self._fd: int | None = None

    def descriptor(self) -> int | None:
        """Return the root's descriptor, or None for a FileSystem read by path (object
        storage: no symlinks, nothing to race). OSError when the root cannot be opened."""
        if not isinstance(self._fs, LocalFileSystem):
            return None
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class _Scope:
    """Given one scan: the root, how to reach it (and its descriptor, opened when first
    needed), its cache (and a snapshot of the root's cached entries, taken once) and the
    clock, for every phase."""

    fs: FileSystem
    root_path: str
    cache: SizeCache | None
    cached: Mapping[str, CacheEntry]
    now_ns: int
    settle_ns: int
    root: _RootFd

    def settled(self, walk: WalkResult) -> bool:
        """Given a walk, return whether nothing in it was written for settle_seconds."""
        return self.now_ns - walk.mtime_ns >= self.settle_ns


@dataclass(slots=True)
class _Listing:
    """One listing of a root, sorted by what each entry can be."""

    rows: list[Member] = field(default_factory=list)  # candidates: (name, inode, is_dir)
    symlinks: list[str] = field(default_factory=list)
    beside_pins: set[str] = field(default_factory=set)  # "<name>" of each "<name>.keep"
    beside_metrics: dict[str, tuple[str, int]] = field(default_factory=dict)
    tracker_files: set[str] = field(default_factory=set)
    unfinished: set[str] = field(default_factory=set)  # "<stem>" of each "<stem>-unfinished"


class _NameHit(NamedTuple):
    """What one root entry's name means (the name memo's value): `layout` is the first layout
    whose names it fits (auto-detection only), `match` what the name says (None: nothing)."""

    is_dir: bool
    layout: str | None
    match: NameMatch | None


@dataclass(frozen=True, slots=True)
class _Matching:
    """Given the root's rows: the layout its checkpoints follow and, per row that is (part of)
    a checkpoint, what its name says, as `(match, row)` pairs."""

    layout: str
    pairs: list[tuple[NameMatch, Member]]


@dataclass(frozen=True, slots=True)
class _Candidates:
    """Given the matched rows: the checkpoints to walk or reuse, as `(match, members)` pairs.

    `single`: every checkpoint is one root entry and `members` is that row itself (no tuple
    built per checkpoint on a rescan); otherwise `members` is the checkpoint's `Identity`.
    """

    single: bool
    pairs: Sequence[tuple[NameMatch, Any]]


@dataclass(slots=True, eq=False)
class _Found:
    """One checkpoint of this scan with its walk. Never changed once made: a phase that learns
    more (a renumbered step, a fresh walk, the trainer state read) replaces it. Kept on the
    cache entry (`CacheEntry.found`) and reused by the next scan while its match is the same.

    `entry` is its cache entry when the walk is final and cached, None when walked just now and
    not final (or not cached at all).
    """

    series: str
    step: int
    name: str
    match: NameMatch
    identity: Identity
    walk: WalkResult
    entry: CacheEntry | None


def _found(
    match: NameMatch, identity: Identity, walk: WalkResult, entry: CacheEntry | None
) -> _Found:
    return _Found(match.series, match.step, match.checkpoint, match, identity, walk, entry)


@dataclass(frozen=True, slots=True)
class _Walked:
    """Given the candidates: every checkpoint found (in listing order), how many came from the
    cache and how many were walked."""

    found: list[_Found]
    hits: int
    walked: int


@dataclass(slots=True)
class _Trackers:
    """What the root's trackers say: checkpoint name -> the trackers naming it, and the steps
    the tracker files give (for completeness)."""

    tracked: dict[str, list[str]] = field(default_factory=dict)
    unfinished: set[str] = field(default_factory=set)  # NeMo's `-unfinished` marker stems
    deepspeed_step: int | None = None
    megatron_step: int | None = None
    tf_listed: set[str] | None = None
    tf_newest_step: int | None = None

    def add(self, checkpoint: str, tracker: str) -> None:
        labels = self.tracked.setdefault(checkpoint, [])
        if tracker not in labels:
            labels.append(tracker)


def scan(
    root: RootConfig,
    *,
    now: float,
    settle_seconds: float,
    fs: FileSystem = LOCAL,
    cache: SizeCache | None = None,
    verify: bool | Collection[str] = (),
    want_metrics: bool = False,
) -> ScanResult:
    """Given a configured root, return what is in it now. `now` is seconds since the epoch.

    `cache` remembers walks of complete checkpoints across scans; `verify` names checkpoints
    (or True: all) whose cached walk must be proven current by a stat before it is reused (the
    newest `RECHECK_NEWEST` of each series always are). `want_metrics` reads
    trainer_state.json and metrics sidecars of every checkpoint (for keep_best); otherwise
    only the trainer_state.json of the newest settled hf checkpoint (and of any newer one) is
    read (its best_model_checkpoint is a tracker). Raises UsageError when the root does not
    exist, is not a folder or cannot be listed.
    """
    with collector_paused():
        return _scan(root, now, settle_seconds, fs, cache, verify, want_metrics)


def _scan(
    root: RootConfig,
    now: float,
    settle_seconds: float,
    fs: FileSystem,
    cache: SizeCache | None,
    verify: bool | Collection[str],
    want_metrics: bool,
) -> ScanResult:
    """Given what `scan` was given, run the phases of the module docstring in order (with the
    root's descriptor, if one is opened, closed at the end)."""
    root_path = os.path.normpath(os.path.abspath(root.path))
    cached = cache.entries(root_path) if cache is not None else {}
    root_fd = _RootFd(fs, root_path)
    scope = _Scope(fs, root_path, cache, cached, int(now * 1e9), int(settle_seconds * 1e9), root_fd)
    try:
        return _run_phases(scope, root, verify, want_metrics)
    finally:
        root_fd.close()


def _run_phases(
    scope: _Scope, root: RootConfig, verify: bool | Collection[str], want_metrics: bool
) -> ScanResult:
    """Given a scan's scope and what `scan` was given, run the phases in order."""
    fs, root_path, cache = scope.fs, scope.root_path, scope.cache
    listing = _list_root(fs, root_path)
    patterns = _patterns_of(root)
    matching = _match_rows(scope, root, listing, patterns)
    layout = matching.layout
    walked = _walk_or_reuse(scope, layout, _group(matching, listing))
    found = walked.found
    if layout == "dcp":  # a numbered folder without any *.distcp is not a dcp checkpoint
        found = [record for record in found if DISTCP_MARKER in record.walk.markers]
    series = _order(found, patterns, layout)
    rewalked = _recheck(scope, layout, found, len(series), verify)
    trackers = _collect_trackers(scope, layout, listing, found, want_metrics)
    checkpoints = _build(scope, layout, found, trackers, listing.beside_pins, root.protect)
    if cache is not None:
        cache.retain(root_path, {record.name for record in found})
    return ScanResult(
        root=root_path,
        layout=layout,
        checkpoints=tuple(checkpoints),
        series=series,
        warnings=_warnings(root_path, matching, patterns, found_any=bool(checkpoints)),
        cache_hits=walked.hits,
        walked=walked.walked + rewalked,
    )


def _warnings(
    root_path: str, matching: _Matching, patterns: list[Pattern], *, found_any: bool
) -> tuple[str, ...]:
    """Given the matching and whether any checkpoint was found, return what the user should
    hear: patterns that matched nothing, or a root where nothing was found."""
    warnings: list[str] = []
    if patterns:
        hits = Counter(match.series for match, _ in matching.pairs)
        warnings += [
            f"pattern {pattern.source!r} matched nothing in {root_path}"
            for pattern in patterns
            if not hits[pattern.source]
        ]
    elif not found_any:
        if matching.layout == "custom":
            warnings.append(f"no checkpoints found in {root_path}: no entry fits a known layout")
        else:
            warnings.append(f"no {matching.layout} checkpoints found in {root_path}")
    return tuple(warnings)


# --- phase 1: the root ---------------------------------------------------------------------------


def _list_root(fs: FileSystem, root_path: str) -> _Listing:
    """Given a root, return its entries from one listing (no system call per entry: d_type and
    d_ino come with it)."""
    try:
        root_stat = fs.stat(root_path)
    except FileNotFoundError:
        raise UsageError(f"{root_path}: root does not exist") from None
    except OSError as error:
        raise UsageError(f"{root_path}: root cannot be read ({error.strerror})") from None
    if not stat_module.S_ISDIR(root_stat.st_mode):
        raise UsageError(f"{root_path}: root is not a folder")
    listing = _Listing()
    append = listing.rows.append
    try:
        with closing(scandir_of(fs)(root_path)) as entries:
            for entry in entries:
                name = entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        append((name, entry.inode(), True))
                        continue
                    if entry.is_symlink():
                        listing.symlinks.append(name)
                        continue
                    inode = entry.inode()
                except FileNotFoundError:
                    continue  # gone between listing and looking (filesystems without d_type)
                if name.endswith(_KEEP_SUFFIX):
                    listing.beside_pins.add(name[: -len(_KEEP_SUFFIX)])
                elif name.endswith(_METRICS_SUFFIX):
                    listing.beside_metrics[name[: -len(_METRICS_SUFFIX)]] = (name, inode)
                elif name in _TRACKER_NAMES:
                    listing.tracker_files.add(name)
                elif name.endswith(_UNFINISHED_SUFFIX):
                    listing.unfinished.add(name[: -len(_UNFINISHED_SUFFIX)])
                else:
                    append((name, inode, False))
    except FileNotFoundError:
        raise UsageError(f"{root_path}: root does not exist") from None
    except NotADirectoryError:
        raise UsageError(f"{root_path}: root is not a folder") from None
    except OSError as error:
        raise UsageError(f"{root_path}: root cannot be read ({error.strerror})") from None
    return listing


# --- phase 2: names -> layout, matches, candidates -----------------------------------------------


def _match_rows(
    scope: _Scope, root: RootConfig, listing: _Listing, patterns: list[Pattern]
) -> _Matching:
    """Given the root's listing, return the layout and each row that is (part of) a checkpoint
    with its match. Each name is matched once per cache lifetime (the name memo)."""
    if patterns:
        signature: tuple[str, ...] = ("patterns", *(pattern.source for pattern in patterns))
    else:
        signature = ("layout", root.layout)
    cache = scope.cache
    memo: dict[str, _NameHit] = (
        cache.name_memo(scope.root_path, signature) if cache is not None else {}
    )
    if patterns or root.layout != "auto":
        pairs = _match_configured(listing.rows, memo, patterns, root.layout)
        layout: str = root.layout
        if layout == "auto":  # patterns: completeness rules come from the layout they follow
            layout = _layout_of_pairs(scope, pairs, listing.tracker_files)
        matching = _Matching(layout, pairs)
    else:
        matching = _match_auto(scope, listing, memo)
    if cache is not None:
        cache.trim_name_memo(scope.root_path, signature, len(listing.rows))
    return matching


def _match_configured(
    rows: list[Member], memo: dict[str, _NameHit], patterns: list[Pattern], layout: str
) -> list[tuple[NameMatch, Member]]:
    """Given the rows, return `(match, row)` for each row the patterns (or else the configured
    layout) match."""
    pairs: list[tuple[NameMatch, Member]] = []
    get = memo.get
    for row in rows:
        name, _, is_dir = row
        hit = get(name)
        if hit is None or hit.is_dir is not is_dir:
            hit = memo[name] = _NameHit(
                is_dir, None, _match_patterns(patterns, name, is_dir, layout)
            )
        if hit.match is not None:
            pairs.append((hit.match, row))
    return pairs


def _layout_of_pairs(
    scope: _Scope, pairs: list[tuple[NameMatch, Member]], tracker_files: set[str]
) -> str:
    """Given the rows patterns matched under `layout: auto`, return the layout they follow."""
    hits = [(_NameHit(row[2], *first_layout(row[0], row[2])), row) for _, row in pairs]
    counts = Counter([hit.layout for hit, _ in hits if hit.layout is not None])
    return _look_inside(scope, choose_layout(counts, tracker_files), hits) or "custom"


def _match_auto(scope: _Scope, listing: _Listing, memo: dict[str, _NameHit]) -> _Matching:
    """Given the listing of a root with no layout configured, return the layout most entries
    follow and each row's match under it."""
    get = memo.get
    hits: list[tuple[_NameHit, Member]] = []
    layouts: list[str] = []
    for row in listing.rows:
        name, _, is_dir = row
        hit = get(name)
        if hit is None or hit.is_dir is not is_dir:
            hit = memo[name] = _NameHit(is_dir, *first_layout(name, is_dir))
        if hit.layout is not None:
            hits.append((hit, row))
            layouts.append(hit.layout)
    detected = choose_layout(Counter(layouts), listing.tracker_files)
    layout = _look_inside(scope, detected, hits) or "custom"
    pairs = [
        (hit.match, row) for hit, row in hits if hit.layout == layout and hit.match is not None
    ]
    if len(pairs) < len(hits) and layout != "custom":
        pairs += _rematch(hits, layout)
    return _Matching(layout, pairs)


def _rematch(hits: list[tuple[_NameHit, Member]], layout: str) -> list[tuple[NameMatch, Member]]:
    """Given rows first claimed by some layout, return those another layout claimed first that
    still fit the chosen one (`step_100/` is orbax's first, and dcp's too)."""
    return [
        (other, row)
        for hit, row in hits
        if hit.layout != layout and (other := match_builtin(layout, row[0], row[2])) is not None
    ]


def _match_patterns(
    patterns: list[Pattern], name: str, is_dir: bool, layout: str
) -> NameMatch | None:
    if not patterns:
        return match_builtin(layout, name, is_dir)
    for pattern in patterns:
        found = pattern.match(name)
        if found is not None:
            return found
    return None


_NUMBERED = frozenset({"orbax", DCP_CANDIDATE})
_LOOK_INTO = 3  # folders looked into to tell a layout that names alone cannot


def _look_inside(
    scope: _Scope, detected: str | None, hits: list[tuple[_NameHit, Member]]
) -> str | None:
    """Given the layout the names suggest and the rows some layout claims, return the layout,
    settled by looking into a few folders where names cannot tell: torch.distributed.checkpoint
    folders (`*.distcp` inside, no trainer_state.json) are named like Orbax's (`step_100/`) or
    like the Trainer's (`checkpoint-100/`)."""
    if detected == "hf":
        sample = [row for hit, row in islice(_claimed_by(hits, "hf"), _LOOK_INTO)]
        kinds = [_folder_kind(scope, row) for row in sample]
        return "dcp" if "dcp" in kinds and "hf" not in kinds else "hf"
    if detected not in (None, "orbax"):
        return detected
    numbered = [pair for pair in hits if pair[0].layout in _NUMBERED]
    highest = heapq.nlargest(_LOOK_INTO, numbered, key=_step_of_hit)
    if any(_folder_kind(scope, row) == "dcp" for _, row in highest):
        return "dcp"
    return detected


def _claimed_by(
    hits: list[tuple[_NameHit, Member]], layout: str
) -> Iterator[tuple[_NameHit, Member]]:
    return (pair for pair in hits if pair[0].layout == layout)


def _step_of_hit(pair: tuple[_NameHit, Member]) -> int:
    match = pair[0].match
    return match.step if match is not None else -1


def _folder_kind(scope: _Scope, row: Member) -> str | None:
    """Given a folder of the root, return "hf" (trainer_state.json inside), "dcp" (`*.distcp`,
    no trainer_state.json), "orbax" (its commit markers) or None, from its cached walk when the
    cache holds one for this very folder, else from one listing of it."""
    name, _, is_dir = row
    if not is_dir:
        return None
    entry = scope.cached.get(name)
    if entry is not None and entry.identity == (row,):
        markers: Collection[str] = entry.walk.markers
    else:
        markers = _top_markers(scope, name)
    if "trainer_state.json" in markers:
        return "hf"
    if DISTCP_MARKER in markers:
        return "dcp"
    if "commit_success.txt" in markers or "_CHECKPOINT_METADATA" in markers:
        return "orbax"
    return None


def _top_markers(scope: _Scope, name: str) -> set[str]:
    """Given a folder of the root, return the markers `_folder_kind` asks about found at its
    top (empty when it cannot be listed, or was swapped for a symlink: see `_names_in`)."""
    found: set[str] = set()
    try:
        names = _names_in(scope, name)
    except OSError:
        return found
    for entry_name in names:
        if entry_name.endswith(".distcp"):
            found.add(DISTCP_MARKER)
        elif entry_name in _KIND_MARKERS:
            found.add(entry_name)
    return found


_KIND_MARKERS = frozenset({"trainer_state.json", "commit_success.txt", "_CHECKPOINT_METADATA"})


def _patterns_of(root: RootConfig) -> list[Pattern]:
    sources = ([root.pattern] if root.pattern else []) + [series.pattern for series in root.series]
    patterns: list[Pattern] = []
    for source in sources:
        if all(pattern.source != source for pattern in patterns):
            patterns.append(compile_pattern(source))
    return patterns


def _group(matching: _Matching, listing: _Listing) -> _Candidates:
    """Given the matched rows, return the checkpoints they make up. Only TensorFlow (and file
    checkpoints with a metrics sidecar) have several members; every other row is one
    checkpoint, passed on as it is."""
    if matching.layout != "tf" and not listing.beside_metrics:
        return _Candidates(single=True, pairs=matching.pairs)
    first_match: dict[str, NameMatch] = {}
    members: dict[str, list[Member]] = {}
    for match, row in matching.pairs:
        rows = members.get(match.checkpoint)
        if rows is None:
            first_match[match.checkpoint] = match
            members[match.checkpoint] = [row]
        else:
            rows.append(row)
    for name, (sidecar, inode) in listing.beside_metrics.items():
        rows = members.get(name)
        if rows is not None and not _is_folder(rows[0]):  # a sidecar belongs beside a file
            rows.append((sidecar, inode, False))
    pairs = [(first_match[name], tuple(sorted(rows))) for name, rows in members.items()]
    return _Candidates(single=False, pairs=pairs)


def _is_folder(member: Member) -> bool:
    _, _, is_dir = member
    return is_dir


# --- phase 3: walk, or reuse the cache -----------------------------------------------------------


def _walk_or_reuse(scope: _Scope, layout: str, candidates: _Candidates) -> _Walked:
    """Given the candidates, return every checkpoint with its walk: the cached walk where the
    listing proves it current, a fresh walk of the others (one that vanished meanwhile is
    left out)."""
    cache = scope.cache
    found: list[_Found] = []
    if candidates.single:
        misses = _reuse_single(scope.cached, candidates.pairs, found)
    else:
        misses = _reuse_grouped(scope.cached, candidates.pairs, found)
    hits = len(found)
    walks = walk_many(
        scope.fs, scope.root_path, [identity for _, identity in misses], layout == "dcp"
    )
    for (match, identity), walk in zip(misses, walks, strict=True):
        if walk is not None:  # None: vanished between listing and walk, not there any more
            entry = _store_if_final(scope, layout, match, identity, walk)
            found.append(_found(match, identity, walk, entry))
    if cache is not None:
        cache.hits += hits
        cache.misses += len(misses)
    return _Walked(found, hits, len(misses))


def _reuse_single(
    cached: Mapping[str, CacheEntry],
    pairs: Sequence[tuple[NameMatch, Member]],
    found: list[_Found],
) -> list[tuple[NameMatch, Identity]]:
    """Given one-row checkpoints, append to `found` those the cache holds for the very row
    (the hot loop of a rescan: no object made per checkpoint) and return the others."""
    misses: list[tuple[NameMatch, Identity]] = []
    get = cached.get
    append = found.append
    for match, row in pairs:
        entry = get(match.checkpoint)
        if entry is not None:
            identity = entry.identity
            if len(identity) == 1 and identity[0] == row:
                record = entry.found
                if record is None or record.match is not match:
                    record = entry.found = _found(match, identity, entry.walk, entry)
                append(record)
                continue
        misses.append((match, (row,)))
    return misses


def _reuse_grouped(
    cached: Mapping[str, CacheEntry],
    pairs: Sequence[tuple[NameMatch, Identity]],
    found: list[_Found],
) -> list[tuple[NameMatch, Identity]]:
    """Given checkpoints with their identities, append to `found` those the cache holds for
    the very identity and return the others."""
    misses: list[tuple[NameMatch, Identity]] = []
    for match, identity in pairs:
        entry = cached.get(match.checkpoint)
        if entry is None or entry.identity != identity:
            misses.append((match, identity))
            continue
        record = entry.found
        if record is None or record.match is not match:
            record = entry.found = _found(match, entry.identity, entry.walk, entry)
        found.append(record)
    return misses


def _store_if_final(
    scope: _Scope, layout: str, match: NameMatch, identity: Identity, walk: WalkResult
) -> CacheEntry | None:
    """Given a fresh walk, cache it when it is final and return its entry (else None)."""
    if scope.cache is None or not _is_final(scope, walk, layout, match):
        return None
    return scope.cache.store(scope.root_path, match.checkpoint, identity, walk)


# --- phase 4: order, re-check --------------------------------------------------------------------


def _order(found: list[_Found], patterns: list[Pattern], layout: str) -> tuple[str, ...]:
    """Given the checkpoints found, sort them in place by series, step and name, and return
    the series ids in order."""
    if layout == "pt" or any(pattern.has_epoch and pattern.has_step for pattern in patterns):
        _order_epochs_first(found)
    series = _series_order(patterns, layout, found)
    if len(series) > 1:
        rank = {series_id: index for index, series_id in enumerate(series)}
        found.sort(key=lambda record: (rank[record.series], record.step, *_tie_break(record)))
    else:
        found.sort(key=_STEP)
        _sort_equal_steps(found)
    return series


_STEP = attrgetter("step")


def _series_order(patterns: list[Pattern], layout: str, found: list[_Found]) -> tuple[str, ...]:
    """Given the patterns, layout and found checkpoints, return the series ids in order: the
    patterns' order as configured, else the layout's one series (pt: each found pattern)."""
    if patterns:
        return tuple(pattern.source for pattern in patterns)
    if layout in ("pt", "custom"):
        return tuple(sorted({record.series for record in found}))
    return (layout,)


def _order_epochs_first(found: list[_Found]) -> None:
    """Given the checkpoints found, renumber in place the steps of each series whose names
    carry both an epoch and a step (`mid_epoch_<e>_<step>.pt`) when the step restarts each
    epoch: some later epoch has a smaller step, so the number is a position in the epoch, not
    a global step. Ordered by that number alone, the newest saves would sort below older
    epochs and a rotation would delete them. The step becomes `epoch * 10^digits + step`,
    which orders by epoch first; a global step is left as it is."""
    members: dict[str, list[int]] = {}
    for index, record in enumerate(found):
        if "{epoch}" in record.series and "{step}" in record.series:
            members.setdefault(record.series, []).append(index)
    for indexes in members.values():
        pairs = sorted((found[index].match.epoch or 0, found[index].step) for index in indexes)
        if all(earlier[1] <= later[1] for earlier, later in pairwise(pairs)):
            continue
        stride = 10 ** len(str(max(step for _, step in pairs)))
        for index in indexes:
            record = found[index]
            found[index] = replace(record, step=(record.match.epoch or 0) * stride + record.step)


def _sort_equal_steps(found: list[_Found]) -> None:
    """Given checkpoints sorted by step, order each run of equal steps by version, then name
    (rare: Lightning's `-v1` re-save of a step is the newer one, though its name sorts first),
    in one pass: cheaper than a (step, version, name) key for 10,000 checkpoints."""
    index = 1
    count = len(found)
    while index < count:
        if found[index].step != found[index - 1].step:
            index += 1
            continue
        start = index - 1
        while index < count and found[index].step == found[start].step:
            index += 1
        found[start:index] = sorted(found[start:index], key=_tie_break)


def _tie_break(record: _Found) -> tuple[int, str]:
    return record.match.version, record.name


def _recheck(
    scope: _Scope,
    layout: str,
    found: list[_Found],
    series_count: int,
    verify: bool | Collection[str],
) -> int:
    """Given the ordered checkpoints, prove current by a stat what matters most (the newest of
    each series, what the caller names); walk again, in place, those whose fingerprint
    changed. Return how many were walked."""
    cache = scope.cache
    if cache is None:
        return 0
    walked = 0
    for index in sorted(_recheck_indexes(found, series_count, verify)):
        record = found[index]
        if record.entry is None:
            continue  # walked just now
        walk = record.walk
        if _fingerprint(scope.fs, scope.root_path, record.identity, walk.markers) == (
            walk.fingerprint
        ):
            continue
        cache.forget(scope.root_path, record.name)
        fresh = walk_checkpoint(scope.fs, scope.root_path, record.identity, layout == "dcp")
        walked += 1
        if fresh is None:  # vanished: reported from the old walk this once, no longer cached
            found[index] = replace(record, entry=None)
            continue
        entry = _store_if_final(scope, layout, record.match, record.identity, fresh)
        found[index] = replace(record, walk=fresh, entry=entry)
    return walked


def _recheck_indexes(
    found: list[_Found], series_count: int, verify: bool | Collection[str]
) -> set[int]:
    """Given the ordered checkpoints, return the indexes of the newest `RECHECK_NEWEST` of each
    series and of those `verify` names (all of them for True)."""
    if verify is True:
        return set(range(len(found)))
    recheck: set[int] = set()
    seen: dict[str, int] = {}
    wanted = RECHECK_NEWEST * series_count
    for index in range(len(found) - 1, -1, -1):
        series_id = found[index].series
        if seen.get(series_id, 0) < RECHECK_NEWEST:
            seen[series_id] = seen.get(series_id, 0) + 1
            recheck.add(index)
            wanted -= 1
            if not wanted:
                break
    if verify:
        names = set(verify)
        recheck.update(index for index, record in enumerate(found) if record.name in names)
    return recheck


# --- phase 5: trackers ---------------------------------------------------------------------------


def _collect_trackers(
    scope: _Scope, layout: str, listing: _Listing, found: list[_Found], want_metrics: bool
) -> _Trackers:
    """Given the ordered checkpoints, return what the root's trackers say; read (in place) the
    trainer_state.json and sidecars needed for it, and all of them with `want_metrics`."""
    trackers = _read_trackers(scope.fs, scope.root_path, layout, listing.tracker_files)
    trackers.unfinished = listing.unfinished
    if layout == "hf":
        _track_best_models(scope, found, trackers)
    if want_metrics:
        for index in range(len(found)):
            _read_state(scope, found, index)
    if listing.symlinks:
        owner = {name: record.name for record in found for name, _, _ in record.identity}
        _resolve_symlinks(scope.fs, scope.root_path, listing.symlinks, owner, trackers)
    return trackers


def _track_best_models(scope: _Scope, found: list[_Found], trackers: _Trackers) -> None:
    """Given hf checkpoints, mark the best_model_checkpoint of the newest settled sound
    trainer_state.json (and of every newer one) as tracked. A save in progress (or one cut off
    by a preemption) may hold a half-written one that names no best; reading only that one
    would drop the protection of the best model."""
    indexes: list[int] = []
    for index in range(len(found) - 1, -1, -1):
        if "trainer_state.json" not in found[index].walk.markers:
            continue
        indexes.append(index)
        walk = _read_state(scope, found, index)
        if walk.error is None and scope.settled(walk) and not walk.state_unreadable:
            break
    for index in indexes:
        best = found[index].walk.best_model_checkpoint
        if best:
            best_name = os.path.basename(best.rstrip("/"))
            if any(record.name == best_name for record in found):
                trackers.add(best_name, f"{found[index].name}/trainer_state.json")


def _read_state(scope: _Scope, found: list[_Found], index: int) -> WalkResult:
    """Given a checkpoint, read its trainer_state.json / sidecars unless already read (once per
    checkpoint: the cache keeps what was read), replace it in place and return its walk."""
    record = found[index]
    walk = record.walk
    if walk.state_read or not (walk.markers & _STATE_MARKERS or len(record.identity) > 1):
        return walk
    walk = _with_state(scope, record.identity, walk)
    entry = record.entry
    if entry is not None and scope.cache is not None:
        if walk.state_unreadable:  # a trainer_state.json cut off: not final after all
            scope.cache.forget(scope.root_path, record.name)
            entry = None
        else:
            entry = scope.cache.store(scope.root_path, record.name, record.identity, walk)
    found[index] = replace(record, walk=walk, entry=entry)
    return walk


def _read_small(fs: FileSystem, path: str, limit: int = 1 << 16) -> str | None:
    try:
        return fs.read_bytes(path, limit).decode("utf-8", errors="replace")
    except OSError:
        return None


def _read_trackers(
    fs: FileSystem, root_path: str, layout: str, tracker_files: set[str]
) -> _Trackers:
    """Given the layout and the tracker files at the top of the root, return what the layout's
    own tracker file says."""
    trackers = _Trackers()
    reader = _TRACKER_READERS.get(layout)
    if reader is not None and reader.file_name in tracker_files:
        text = _read_small(fs, f"{root_path}/{reader.file_name}")
        if text is not None:
            reader.read(text, trackers)
    return trackers


def _read_deepspeed(text: str, trackers: _Trackers) -> None:
    name = text.strip()
    if not name:
        return
    found = re.fullmatch(r"global_step(\d+)", name)
    if found:
        trackers.deepspeed_step = int(found.group(1))
    trackers.add(name, DEEPSPEED_TRACKER)


def _read_megatron(text: str, trackers: _Trackers) -> None:
    if text.strip().isdigit():
        iteration = int(text.strip())
        trackers.megatron_step = iteration
        trackers.add(f"iter_{iteration:07d}", MEGATRON_TRACKER)


def _read_tf(text: str, trackers: _Trackers) -> None:
    listed: set[str] = set()
    for key, value in re.findall(r'^\s*(\w+)\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.M):
        name = os.path.basename(value.rstrip("/"))
        listed.add(name)
        if key == "model_checkpoint_path":
            trackers.add(name, TF_TRACKER)
    trackers.tf_listed = listed
    steps = [
        int(found.group(1)) for name in listed if (found := re.search(r"-(\d+)$", name)) is not None
    ]
    trackers.tf_newest_step = max(steps) if steps else None


class _TrackerReader(NamedTuple):
    file_name: str
    read: Callable[[str, _Trackers], None]


_TRACKER_READERS: Mapping[str, _TrackerReader] = MappingProxyType(
    {
        "deepspeed": _TrackerReader(DEEPSPEED_TRACKER, _read_deepspeed),
        "megatron": _TrackerReader(MEGATRON_TRACKER, _read_megatron),
        "tf": _TrackerReader(TF_TRACKER, _read_tf),
    }
)


def _resolve_symlinks(
    fs: FileSystem,
    root_path: str,
    symlinks: list[str],
    owner: Mapping[str, str],
    trackers: _Trackers,
) -> None:
    """Given the root's symlinks and which checkpoint each root entry belongs to, mark the
    checkpoints the symlinks point at as tracked by them."""
    root_identity: tuple[int, int] | None = None
    for link in symlinks:
        try:
            target = fs.readlink(f"{root_path}/{link}")
        except OSError:
            continue  # vanished, or not a symlink any more
        absolute = os.path.normpath(os.path.join(root_path, target))
        relative = os.path.relpath(absolute, root_path)
        if relative == ".":
            continue
        if relative.startswith(".."):
            # An absolute target may reach the root by another path (the root configured
            # through a symlinked mount, the link written with the real one, or the reverse).
            if root_identity is None:
                root_identity = _identity_of(fs, root_path)
                if root_identity is None:
                    continue
            first = _entry_through_other_path(fs, root_identity, absolute)
        else:
            first = relative.split(os.sep, 1)[0]
        if first is not None and first in owner:
            trackers.add(owner[first], link)


def _identity_of(fs: FileSystem, path: str) -> tuple[int, int] | None:
    try:
        status = fs.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _entry_through_other_path(
    fs: FileSystem, root_identity: tuple[int, int], absolute: str
) -> str | None:
    """Given the root's (device, inode) and an absolute path, return the root entry the path
    lies in when one of its parent folders is the root itself, else None."""
    parts = absolute.split(os.sep)
    for index in range(len(parts) - 1, 0, -1):
        try:
            status = fs.stat(os.sep.join(parts[:index]) or os.sep)
        except OSError:
            continue
        if (status.st_dev, status.st_ino) == root_identity:
            return parts[index]
    return None


def _protect_matcher(globs: list[str]) -> Callable[[str], list[str]] | None:
    if not globs:
        return None
    compiled = [(glob, re.compile(fnmatch.translate(glob))) for glob in globs]

    def matching(name: str) -> list[str]:
        return [glob for glob, regex in compiled if regex.match(name)]

    return matching


# --- phase 6: build ------------------------------------------------------------------------------

_KEEP_PIN = (".keep",)


def _build(
    scope: _Scope,
    layout: str,
    found: list[_Found],
    trackers: _Trackers,
    beside_pins: set[str],
    protect_globs: list[str],
) -> list[Checkpoint]:
    """Given the ordered checkpoints and what the trackers say, return their `Checkpoint`
    values; a cached checkpoint built last time under the same key is reused as it is."""
    tracked = trackers.tracked
    protect = _protect_matcher(protect_globs)
    static = layout in _STATIC_LAYOUTS and not trackers.unfinished
    checkpoints: list[Checkpoint] = []
    append = checkpoints.append
    for record in found:
        entry = record.entry
        name = record.name
        # A final walk of a static layout: complete for good (no NeMo marker in the root).
        reason = None if entry is not None and static else _reason(scope, layout, record, trackers)
        tracked_by = tuple(tracked[name]) if name in tracked else ()
        pinned_by: tuple[str, ...] = (
            _KEEP_PIN if ".keep" in record.walk.markers or name in beside_pins else ()
        )
        if protect is not None:
            pinned_by += tuple(f"protect:{glob}" for glob in protect(name))
        key = (record.match, reason, tracked_by, pinned_by, layout, record.step)
        if entry is not None and entry.built_key == key:
            append(entry.built)
            continue
        checkpoint = _checkpoint(layout, record, reason, tracked_by, pinned_by)
        if entry is not None:
            entry.built = checkpoint
            entry.built_key = key
        append(checkpoint)
    return checkpoints


def _reason(scope: _Scope, layout: str, record: _Found, trackers: _Trackers) -> str | None:
    """Given a checkpoint, return why it is not complete (None: complete). Settle time counts
    only where no completion marker is written last (`_settles`)."""
    walk = record.walk
    reason = _incomplete_reason(layout, record.match, walk, trackers)
    if reason is None and _settles(layout, trackers) and not scope.settled(walk):
        age_seconds = max(0, scope.now_ns - walk.mtime_ns) // 1_000_000_000
        reason = f"settling: last write {age_seconds} s ago"
    return reason


def _checkpoint(
    layout: str,
    record: _Found,
    reason: str | None,
    tracked_by: tuple[str, ...],
    pinned_by: tuple[str, ...],
) -> Checkpoint:
    match = record.match
    walk = record.walk
    metrics = walk.metrics
    if match.metrics:
        metrics = MappingProxyType({**match.metrics, **walk.metrics}) if metrics else match.metrics
    identity = record.identity
    return Checkpoint(
        name=record.name,
        step=record.step,
        entries=tuple(name for name, _, _ in identity) if len(identity) > 1 else (),
        series=match.series,
        layout=layout,
        epoch=match.epoch,
        complete=reason is None,
        incomplete_reason=reason,
        size_bytes=walk.size_bytes,
        freeable_bytes=walk.freeable_bytes,
        mtime=walk.mtime,
        tracked_by=tracked_by,
        pinned_by=pinned_by,
        metrics=metrics,
        version=match.version,
        slimmed=SLIM_MARKER in walk.markers,
    )


# --- completeness --------------------------------------------------------------------------------


def _settles(layout: str, trackers: _Trackers) -> bool:
    """Given the layout, return whether only settle time can tell its saves are over: a layout
    whose completion marker is written last (trainer_state.json, .metadata, commit_success.txt,
    the `latest`/`checkpoint`/Megatron tracker) is complete once the marker is there."""
    return layout in _SETTLE_LAYOUTS or (layout == "megatron" and trackers.megatron_step is None)


def _incomplete_reason(
    layout: str, match: NameMatch, walk: WalkResult, trackers: _Trackers
) -> str | None:
    """Given a checkpoint's match and walk and the trackers, return why its layout does not
    call it complete (settle time aside), or None."""
    if walk.error is not None:
        return walk.error
    if match.temporary:
        return _TEMPORARY_REASONS.get(layout, "temporary name (save in progress or interrupted)")
    if trackers.unfinished:
        marker = _unfinished_marker(match.checkpoint, trackers.unfinished)
        if marker is not None:
            return f"NeMo marker {marker} beside it (save in progress or interrupted)"
    reason_of = _REASONS.get(layout)
    return reason_of(match, walk, trackers) if reason_of is not None else None


_TEMPORARY_REASONS: Mapping[str, str] = MappingProxyType(
    {
        "orbax": "orbax temporary folder (save in progress or interrupted)",
        "tf": "TensorFlow temporary folder (save in progress or interrupted)",
    }
)


def _unfinished_marker(name: str, stems: set[str]) -> str | None:
    """Given a checkpoint's name and the stems of NeMo's `-unfinished` markers, return the
    marker's name when one belongs to it (`X.ckpt`, `X.nemo`, `X-EMA.ckpt` and folder `X` share
    `X-unfinished`: format_checkpoint_unfinished_marker_path), else None."""
    stem = name.removesuffix(".nemo").removesuffix(".ckpt").removesuffix("-EMA")
    return f"{stem}{_UNFINISHED_SUFFIX}" if stem in stems else None


def _hf_reason(match: NameMatch, walk: WalkResult, trackers: _Trackers) -> str | None:
    markers = walk.markers
    if HF_INCOMPLETE_MARKER in markers:
        # transformers' JIT checkpoint removes it only after trainer_state.json is written.
        return f"{HF_INCOMPLETE_MARKER} inside (save in progress or interrupted)"
    if "trainer_state.json" not in markers:
        return "no trainer_state.json"
    if walk.state_unreadable:  # read for the newest ones: a plain open("w") still being written
        return "trainer_state.json unreadable (being written, or cut off)"
    return None


def _orbax_reason(match: NameMatch, walk: WalkResult, trackers: _Trackers) -> str | None:
    if "commit_success.txt" in walk.markers or "_CHECKPOINT_METADATA" in walk.markers:
        return None
    return "no commit_success.txt or _CHECKPOINT_METADATA"


def _dcp_reason(match: NameMatch, walk: WalkResult, trackers: _Trackers) -> str | None:
    if ".metadata" in walk.markers or DCP_RANK0_METADATA in walk.markers:
        return None
    return "no .metadata"


def _deepspeed_reason(match: NameMatch, walk: WalkResult, trackers: _Trackers) -> str | None:
    if trackers.deepspeed_step is None:
        return f"no readable '{DEEPSPEED_TRACKER}' file"
    if match.step > trackers.deepspeed_step:
        return f"newer than '{DEEPSPEED_TRACKER}' (global_step{trackers.deepspeed_step})"
    return None


def _megatron_reason(match: NameMatch, walk: WalkResult, trackers: _Trackers) -> str | None:
    if trackers.megatron_step is not None and match.step > trackers.megatron_step:
        return f"newer than {MEGATRON_TRACKER} ({trackers.megatron_step})"
    return None


def _tf_reason(match: NameMatch, walk: WalkResult, trackers: _Trackers) -> str | None:
    if "index" not in walk.markers:
        return f"no {match.checkpoint}.index"
    if trackers.tf_listed is None:
        return f"no readable '{TF_TRACKER}' file"
    if match.checkpoint in trackers.tf_listed:
        return None
    if trackers.tf_newest_step is not None and match.step < trackers.tf_newest_step:
        return None
    return f"not listed in '{TF_TRACKER}'"


_REASONS: Mapping[str, Callable[[NameMatch, WalkResult, _Trackers], str | None]] = MappingProxyType(
    {
        "hf": _hf_reason,
        "orbax": _orbax_reason,
        "dcp": _dcp_reason,
        "deepspeed": _deepspeed_reason,
        "megatron": _megatron_reason,
        "tf": _tf_reason,
    }
)


def _is_final(scope: _Scope, walk: WalkResult, layout: str, match: NameMatch) -> bool:
    """Given a walk, return whether it can never change while the checkpoint is untouched:
    settled, and complete by its layout's marker (trackers are read again on every scan)."""
    if walk.error is not None or match.temporary or not scope.settled(walk):
        return False
    reason_of = _FINAL_REASONS.get(layout)
    return reason_of is None or reason_of(match, walk, _NO_TRACKERS) is None


# Layouts whose marker decides completeness (and so whether a walk is final) without trackers.
_FINAL_REASONS = {layout: _REASONS[layout] for layout in ("hf", "orbax", "dcp")}
_NO_TRACKERS = _Trackers()


# --- walking -------------------------------------------------------------------------------------


def _fingerprint(
    fs: FileSystem,
    root_path: str,
    members: Sequence[tuple[str, int, bool]],
    markers: frozenset[str],
) -> tuple[int, ...]:
    """Given a checkpoint's members, return their stat proof now (empty if any vanished).

    By path, on purpose: it only compares. A member swapped for a symlink changes the member's
    own lstat (inode, ctime), so the proof differs whatever the marker's stat through it says,
    and the checkpoint is walked again (relative to descriptors); a member that is no folder
    now is not looked into at all. Opening each member here would cost two system calls per
    re-checked checkpoint on every rescan."""
    numbers: list[int] = []
    try:
        for name, _, is_dir in members:
            status = fs.lstat(f"{root_path}/{name}")
            numbers += (status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size)
            if is_dir and stat_module.S_ISDIR(status.st_mode):
                marker = fingerprint_markers_of(markers)
                if marker is not None:
                    inner = fs.lstat(f"{root_path}/{name}/{marker}")
                    numbers += (inner.st_ino, inner.st_mtime_ns, inner.st_size)
    except OSError:
        return ()
    return tuple(numbers)


def _with_state(
    scope: _Scope, members: Sequence[tuple[str, int, bool]], walk: WalkResult
) -> WalkResult:
    """Given a walk whose trainer_state.json / sidecars were not read yet, return it with its
    metrics and best_model_checkpoint filled in."""
    metrics, best, unreadable = _read_metrics(scope, members, set(walk.markers))
    return replace(
        walk,
        metrics=metrics,
        best_model_checkpoint=best,
        state_read=True,
        state_unreadable=unreadable,
    )


def _read_metrics(
    scope: _Scope, members: Sequence[tuple[str, int, bool]], markers: set[str]
) -> tuple[Mapping[str, float], str | None, bool]:
    """Given a checkpoint's members and markers, return its metrics, best_model_checkpoint and
    whether its trainer_state.json was there but unreadable. Every file is read relative to
    the root's descriptor (`_read_in`): a checkpoint folder swapped for a symlink since the
    walk makes its trainer_state.json unreadable, never read from where the symlink points."""
    metrics: dict[str, float] = {}
    best: str | None = None
    unreadable = False
    folder = next((name for name, _, is_dir in members if is_dir), None)
    if folder is not None and "trainer_state.json" in markers:
        state = _load_json(scope, folder, "trainer_state.json", _TRAINER_STATE_LIMIT)
        if isinstance(state, dict):
            metrics.update(_trainer_state_metrics(state))
            candidate = state.get("best_model_checkpoint")
            best = candidate if isinstance(candidate, str) and candidate else None
        else:
            unreadable = True
    # (folder, name): `metrics.json` inside the folder, `<name>.metrics.json` beside a file.
    sidecars: list[tuple[str | None, str]] = (
        [(folder, "metrics.json")] if folder is not None and "metrics.json" in markers else []
    )
    sidecars += [(None, name) for name, _, _ in members if name.endswith(_METRICS_SUFFIX)]
    for sidecar_folder, sidecar in sidecars:
        document = _load_json(scope, sidecar_folder, sidecar, _SIDECAR_LIMIT)
        if isinstance(document, dict):
            metrics.update(_numbers(document))
    return (MappingProxyType(metrics) if metrics else _NO_METRICS), best, unreadable


def _load_json(scope: _Scope, folder: str | None, name: str, limit: int) -> object:
    """Given a file in a root's folder (None: at the root's top), return its JSON document, or
    None when it is unreadable, refused (see `_read_in`) or not JSON."""
    try:
        return json.loads(_read_in(scope, folder, name, limit))
    except (OSError, ValueError):
        return None  # unreadable or half-written: no metrics rather than a failed scan


# --- reading inside the root, relative to its descriptor -----------------------------------------


def _read_in(scope: _Scope, folder: str | None, name: str, limit: int) -> bytes:
    """Given a file's name in a folder of the root (None: at the root's top), return its first
    `limit` bytes, never read through a symlink anywhere below the root.

    The root's owner may swap the folder for a symlink (to another user's run, to /etc) after
    the walk saw it: read by path, only `name` itself would refuse a symlink. So the folder is
    opened relative to the root's descriptor with `O_DIRECTORY|O_NOFOLLOW` (ENOTDIR or ELOOP
    for a symlink), the file relative to it with `O_NOFOLLOW|O_NONBLOCK`, a regular file only, read
    up to `limit`. The real filesystem through `os` directly; a subclass (tests' misbehaving
    ones) through its `open_dir`/`read_at`; a FileSystem without descriptors by path.
    """
    fs = scope.fs
    root_fd = scope.root.descriptor()
    if root_fd is None:
        relative = name if folder is None else f"{folder}/{name}"
        return fs.read_bytes(f"{scope.root_path}/{relative}", limit)
    if type(fs) is LocalFileSystem:
        if folder is None:
            return read_regular(name, limit, dir_fd=root_fd)
        return read_regular_in(root_fd, folder, name, limit)
    if folder is None:
        return fs.read_at(At(root_fd, name, f"{scope.root_path}/{name}"), limit)
    folder_path = f"{scope.root_path}/{folder}"
    descriptor = fs.open_dir(At(root_fd, folder, folder_path))
    try:
        return fs.read_at(At(descriptor, name, f"{folder_path}/{name}"), limit)
    finally:
        os.close(descriptor)


def _names_in(scope: _Scope, folder: str) -> list[str]:
    """Given a folder of the root, return the names in it, listed through a descriptor opened
    relative to the root's with `O_DIRECTORY|O_NOFOLLOW`: a symlink swapped in for the folder
    is refused (OSError), never listed (see `_read_in`). OSError when it cannot be listed."""
    fs = scope.fs
    root_fd = scope.root.descriptor()
    path = f"{scope.root_path}/{folder}"
    if root_fd is None:
        return [entry.name for entry in fs.scandir(path)]
    if type(fs) is LocalFileSystem:
        return list_in(root_fd, folder)
    descriptor = fs.open_dir(At(root_fd, folder, path))
    try:
        return [entry.name for entry in fs.scandir_at(Dir(descriptor, path))]
    finally:
        os.close(descriptor)


def _numbers(document: Mapping[str, object]) -> dict[str, float]:
    return {
        str(key): float(value)
        for key, value in document.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _trainer_state_metrics(state: Mapping[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    history = state.get("log_history")
    step = state.get("global_step")
    if isinstance(history, list):
        for record in reversed(history):
            if not isinstance(record, dict) or not any(
                isinstance(key, str) and key.startswith("eval_") for key in record
            ):
                continue
            record_step = record.get("step")
            if isinstance(step, int) and isinstance(record_step, int) and record_step != step:
                # An evaluation at another step scored other weights: with eval_steps coarser
                # than save_steps, handing it on made keep_best keep a never-evaluated
                # checkpoint (ties go to the newer) and delete the one that scored.
                if record_step < step:
                    break
                continue
            metrics.update(
                (key, value) for key, value in _numbers(record).items() if key.startswith("eval_")
            )
            break
    best_metric = state.get("best_metric")
    if isinstance(best_metric, int | float) and not isinstance(best_metric, bool):
        metrics["best_metric"] = float(best_metric)
    return metrics
