"""Checkpoint discovery: which entries of a root are checkpoints, of which series, complete or not.

One module scans; it decides nothing. See DESIGN.md, "Checkpoint discovery", and
`daemon/discovery/layouts.py` for the names of each layout. What this module adds:

Complete when (besides "nothing written for `settle_seconds`", which applies to all):
- hf: `trainer_state.json` inside (the Trainer writes it last);
- orbax: no `.orbax-checkpoint-tmp` in the name, and `commit_success.txt` or
  `_CHECKPOINT_METADATA` inside;
- dcp: `.metadata` inside (a folder without any `*.distcp` is not a checkpoint at all);
- deepspeed: `latest` names it or a later step; megatron: its iteration is at most the one in
  `latest_checkpointed_iteration.txt` (a tracker that does not hold a number, such as
  `release`, says nothing, and settle time alone decides);
- tf: the `.index` file exists and the `checkpoint` file lists it or a later step;
- pt, lightning, custom patterns: settle time only.

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

Speed: a rescan lists the root once and walks only checkpoints the cache does not know (see
`daemon/discovery/sizecache.py` for what proves a cached checkpoint unchanged); each name is matched
once (a memo in the cache); the walk itself is `daemon/discovery/walker.py`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat as stat_module
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from itertools import pairwise
from operator import itemgetter
from types import MappingProxyType
from typing import Any

from daemon.config import RootConfig
from daemon.discovery.layouts import (
    DCP_CANDIDATE,
    DEEPSPEED_TRACKER,
    MEGATRON_TRACKER,
    ORBAX_TMP_MARK,
    TF_TRACKER,
    NameMatch,
    Pattern,
    choose_layout,
    compile_pattern,
    first_layout,
    match_builtin,
)
from daemon.discovery.sizecache import CacheEntry, Identity, SizeCache, WalkResult
from daemon.discovery.walker import (
    DISTCP_MARKER,
    fingerprint_markers_of,
    scandir_of,
    walk_checkpoint,
    walk_many,
)
from daemon.errors import UsageError
from daemon.fsio import LOCAL, FileSystem
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
_S_IFMT = 0o170000
_S_IFDIR = 0o040000

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


# A checkpoint found in the listing: [its match, its members as (name, inode, is_dir)].
_Candidate = list[Any]


@dataclass(slots=True)
class _Trackers:
    tracked: dict[str, list[str]] = field(default_factory=dict)
    deepspeed_step: int | None = None
    megatron_step: int | None = None
    tf_listed: set[str] | None = None
    tf_newest_step: int | None = None

    def add(self, checkpoint: str, tracker: str) -> None:
        labels = self.tracked.setdefault(checkpoint, [])
        if tracker not in labels:
            labels.append(tracker)


# Layouts whose completeness is settled once a cached (final) walk exists: no tracker involved.
_STATIC_LAYOUTS = frozenset({"hf", "orbax", "dcp", "pt", "lightning", "custom"})


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
    root_path = os.path.normpath(os.path.abspath(root.path))
    listing = _list_root(fs, root_path)
    patterns = _patterns_of(root)
    rows = listing.rows
    beside_pins = listing.beside_pins
    beside_metrics = listing.beside_metrics
    tracker_files = listing.tracker_files
    symlinks = listing.symlinks

    layout, matched = _match_rows(fs, root, root_path, rows, patterns, tracker_files, cache)
    pattern_hits: dict[str, int] = dict.fromkeys((pattern.source for pattern in patterns), 0)
    if patterns:
        for match, _ in matched:
            pattern_hits[match.series] += 1
    # Checkpoint name -> [match, members]. Only TensorFlow (and file checkpoints with a
    # metrics sidecar) have several members; every other entry is its own checkpoint.
    grouped: dict[str, _Candidate] | None = None
    if layout == "tf" or beside_metrics:
        grouped = {}
        for match, member in matched:
            candidate = grouped.get(match.checkpoint)
            if candidate is None:
                grouped[match.checkpoint] = [match, [member]]
            else:
                candidate[1].append(member)
        for checkpoint_name, (sidecar, inode) in beside_metrics.items():
            candidate = grouped.get(checkpoint_name)
            if candidate is not None and not candidate[1][0][2]:
                candidate[1].append((sidecar, inode, False))
        for candidate in grouped.values():
            candidate[1].sort()
        found: list[tuple[NameMatch, Any]] = [
            (match, tuple(members)) for match, members in grouped.values()
        ]
    else:
        found = matched  # each (match, row): a one-row identity

    settle_ns = int(settle_seconds * 1e9)
    now_ns = int(now * 1e9)
    cached = cache.entries(root_path) if cache is not None else {}
    hits = walked = 0
    # (series, step, name, match, identity, walk, cache entry): sorted below
    results: list[tuple[str, int, str, NameMatch, Identity, WalkResult, CacheEntry | None]] = []
    append = results.append
    single = grouped is None
    misses: list[tuple[NameMatch, Identity]] = []
    for match, identity in found:
        checkpoint_name = match.checkpoint
        entry = cached.get(checkpoint_name)
        if entry is not None and (
            entry.identity[0] == identity and len(entry.identity) == 1
            if single
            else entry.identity == identity
        ):
            identity = entry.identity
            hits += 1
            append((match.series, match.step, checkpoint_name, match, identity, entry.walk, entry))
            continue
        misses.append((match, (identity,) if single else identity))
    want_distcp = layout == "dcp"
    walks = walk_many(fs, root_path, [identity for _, identity in misses], want_distcp)
    walked = len(misses)
    for (match, identity), found_walk in zip(misses, walks, strict=True):
        if found_walk is None:  # vanished between listing and walk: not there any more
            continue
        checkpoint_name = match.checkpoint
        entry = None
        if cache is not None and _is_final(found_walk, layout, checkpoint_name, now_ns, settle_ns):
            entry = cache.store(root_path, checkpoint_name, identity, found_walk)
        append((match.series, match.step, checkpoint_name, match, identity, found_walk, entry))
    if cache is not None:
        cache.hits += hits
        cache.misses += walked
    if layout == "dcp":  # a numbered folder without any *.distcp is not a dcp checkpoint
        results = [result for result in results if DISTCP_MARKER in result[5].markers]

    if layout == "pt" or any(pattern.has_epoch and pattern.has_step for pattern in patterns):
        _order_epochs_first(results)
    series = _series_order(patterns, layout, results)
    if len(series) > 1:
        order = {series_id: index for index, series_id in enumerate(series)}
        results.sort(key=lambda result: (order[result[0]], result[1], result[2]))
    else:
        results.sort(key=_STEP)
        _sort_equal_steps_by_name(results)

    # Prove current what matters most: the newest of each series, and what the caller names.
    recheck: set[int] = set()
    if cache is not None:
        seen_series: dict[str, int] = {}
        wanted = RECHECK_NEWEST * len(series)
        for index in range(len(results) - 1, -1, -1):
            series_id = results[index][0]
            if seen_series.get(series_id, 0) < RECHECK_NEWEST:
                seen_series[series_id] = seen_series.get(series_id, 0) + 1
                recheck.add(index)
                wanted -= 1
                if not wanted:
                    break
        if verify is True:
            recheck = set(range(len(results)))
        elif verify:
            names = set(verify)
            recheck.update(index for index, result in enumerate(results) if result[2] in names)
    for index in sorted(recheck):
        series_id, step, name, match, identity, walk, entry = results[index]
        if entry is None:
            continue  # walked just now
        if _fingerprint(fs, root_path, identity, walk.markers) == walk.fingerprint:
            continue
        assert cache is not None
        cache.forget(root_path, name)
        fresh = walk_checkpoint(fs, root_path, identity, want_distcp)
        walked += 1
        if fresh is None:
            results[index] = (series_id, step, name, match, identity, walk, None)
            continue
        new_entry = None
        if _is_final(fresh, layout, name, now_ns, settle_ns):
            new_entry = cache.store(root_path, name, identity, fresh)
        results[index] = (series_id, step, name, match, identity, fresh, new_entry)

    trackers = _read_trackers(fs, root_path, layout, tracker_files)
    # Read trainer_state.json / sidecars where needed (once per checkpoint: cached after).

    def read_state(index: int) -> WalkResult:
        result = results[index]
        walk = result[5]
        if walk.state_read or not (walk.markers & _STATE_MARKERS or len(result[4]) > 1):
            return walk
        walk = _with_state(fs, root_path, result[4], walk)
        entry = result[6]
        if entry is not None and cache is not None:
            entry = cache.store(root_path, result[2], result[4], walk)
        results[index] = (*result[:5], walk, entry)
        return walk

    # The hf checkpoints whose best_model_checkpoint counts: newest first, down to the newest
    # settled one with a sound trainer_state.json. A save in progress (or one cut off by a
    # preemption) may hold a half-written one that names no best; reading only that one would
    # drop the protection of the best model.
    hf_state_indexes: list[int] = []
    if layout == "hf":
        for index in range(len(results) - 1, -1, -1):
            if "trainer_state.json" not in results[index][5].markers:
                continue
            hf_state_indexes.append(index)
            walk = read_state(index)
            settled = walk.error is None and now_ns - walk.mtime_ns >= settle_ns
            if settled and not walk.state_unreadable:
                break
    if want_metrics:
        for index in range(len(results)):
            read_state(index)
    for index in hf_state_indexes:
        best = results[index][5].best_model_checkpoint
        if best:
            best_name = os.path.basename(best.rstrip("/"))
            if any(result[2] == best_name for result in results):
                trackers.add(best_name, f"{results[index][2]}/trainer_state.json")
    if symlinks:
        owner = {member[0]: result[2] for result in results for member in result[4]}
        _resolve_symlinks(fs, root_path, symlinks, owner, trackers)

    tracked = trackers.tracked
    protect = _protect_matcher(root.protect)
    static = layout in _STATIC_LAYOUTS
    checkpoints: list[Checkpoint] = []
    keep_pin = (".keep",)
    for _, step, name, match, identity, walk, entry in results:
        if entry is not None and static:
            reason = None  # final walk: marker present and settled, for good
        else:
            reason = _incomplete_reason(layout, match, walk, trackers)
            if reason is None and now_ns - walk.mtime_ns < settle_ns:
                age_seconds = max(0, now_ns - walk.mtime_ns) // 1_000_000_000
                reason = f"settling: last write {age_seconds} s ago"
        tracked_by = tuple(tracked[name]) if name in tracked else ()
        pinned_by: tuple[str, ...] = (
            keep_pin if ".keep" in walk.markers or name in beside_pins else ()
        )
        if protect is not None:
            pinned_by += tuple(f"protect:{glob}" for glob in protect(name))
        if entry is not None:
            built_key = entry.built_key
            if (
                built_key is not None
                and built_key[0] is match
                and built_key[1] == reason
                and built_key[2] == tracked_by
                and built_key[3] == pinned_by
                and built_key[4] == layout
                and built_key[5] == step
            ):
                checkpoints.append(entry.built)  # type: ignore[arg-type]
                continue
        metrics = walk.metrics
        if match.metrics:
            metrics = (
                MappingProxyType({**match.metrics, **walk.metrics}) if metrics else match.metrics
            )
        checkpoint = Checkpoint(
            name=name,
            step=step,
            entries=tuple(member[0] for member in identity) if len(identity) > 1 else (),
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
            slimmed=SLIM_MARKER in walk.markers,
        )
        if entry is not None:
            entry.built = checkpoint
            entry.built_key = (match, reason, tracked_by, pinned_by, layout, step)
        checkpoints.append(checkpoint)

    if cache is not None:
        cache.retain(root_path, {result[2] for result in results})

    warnings: list[str] = []
    for pattern in patterns:
        if pattern_hits[pattern.source] == 0:
            warnings.append(f"pattern {pattern.source!r} matched nothing in {root_path}")
    if not patterns and not checkpoints:
        if layout == "custom":
            warnings.append(f"no checkpoints found in {root_path}: no entry fits a known layout")
        else:
            warnings.append(f"no {layout} checkpoints found in {root_path}")
    return ScanResult(
        root=root_path,
        layout=layout,
        checkpoints=tuple(checkpoints),
        series=series,
        warnings=tuple(warnings),
        cache_hits=hits,
        walked=walked,
    )


_STEP = itemgetter(1)
_TRACKER_NAMES = frozenset({DEEPSPEED_TRACKER, MEGATRON_TRACKER, TF_TRACKER})
_STATE_MARKERS = frozenset({"trainer_state.json", "metrics.json"})


def _order_epochs_first(results: list[Any]) -> None:
    """Given the results, renumber in place the steps of each series whose names carry both an
    epoch and a step (`mid_epoch_<e>_<step>.pt`) when the step restarts each epoch: some later
    epoch has a smaller step, so the number is a position in the epoch, not a global step.
    Ordered by that number alone, the newest saves would sort below older epochs and a
    rotation would delete them. The step becomes `epoch * 10^digits + step`, which orders by
    epoch first; a global step is left as it is."""
    members: dict[str, list[int]] = {}
    for index, result in enumerate(results):
        series_id = result[0]
        if "{epoch}" in series_id and "{step}" in series_id:
            members.setdefault(series_id, []).append(index)
    for indexes in members.values():
        pairs = sorted((results[index][3].epoch, results[index][1]) for index in indexes)
        if all(earlier[1] <= later[1] for earlier, later in pairwise(pairs)):
            continue
        stride = 10 ** len(str(max(step for _, step in pairs)))
        for index in indexes:
            result = results[index]
            results[index] = (result[0], result[3].epoch * stride + result[1], *result[2:])


def _sort_equal_steps_by_name(results: list[Any]) -> None:
    """Given results sorted by step, order each run of equal steps by name (rare: Lightning's
    `-v1` copies), in one pass: cheaper than a (step, name) key for 10,000 checkpoints."""
    index = 1
    count = len(results)
    while index < count:
        if results[index][1] != results[index - 1][1]:
            index += 1
            continue
        start = index - 1
        while index < count and results[index][1] == results[start][1]:
            index += 1
        results[start:index] = sorted(results[start:index], key=itemgetter(2))


# --- the root ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Listing:
    """One listing of a root, sorted by what each entry can be."""

    rows: list[tuple[str, int, bool]] = field(default_factory=list)  # (name, inode, is_dir)
    symlinks: list[str] = field(default_factory=list)
    beside_pins: set[str] = field(default_factory=set)  # "<name>" of each "<name>.keep"
    beside_metrics: dict[str, tuple[str, int]] = field(default_factory=dict)
    tracker_files: set[str] = field(default_factory=set)


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
                else:
                    append((name, inode, False))
    except FileNotFoundError:
        raise UsageError(f"{root_path}: root does not exist") from None
    except NotADirectoryError:
        raise UsageError(f"{root_path}: root is not a folder") from None
    except OSError as error:
        raise UsageError(f"{root_path}: root cannot be read ({error.strerror})") from None
    return listing


def _match_rows(
    fs: FileSystem,
    root: RootConfig,
    root_path: str,
    rows: list[tuple[str, int, bool]],
    patterns: list[Pattern],
    tracker_files: set[str],
    cache: SizeCache | None,
) -> tuple[str, list[tuple[NameMatch, tuple[str, int, bool]]]]:
    """Given the root's candidate entries, return the layout and each entry that is (part of)
    a checkpoint with its match. Each name is matched once per cache lifetime (name memo)."""
    if patterns:
        signature: tuple[str, ...] = ("patterns", *(pattern.source for pattern in patterns))
    else:
        signature = ("layout", root.layout)
    memo: dict[Any, Any] = cache.name_memo(root_path, signature) if cache is not None else {}
    matched: list[tuple[NameMatch, tuple[str, int, bool]]] = []
    if patterns or root.layout != "auto":
        for row in rows:
            hit = memo.get(row[0])
            if hit is None or hit[0] is not row[2]:
                hit = memo[row[0]] = (
                    row[2],
                    _match_patterns(patterns, row[0], row[2], root.layout),
                )
            if hit[1] is not None:
                matched.append((hit[1], row))
        layout: str = root.layout
        if layout == "auto":
            # Completeness rules come from the layout the matched entries follow.
            found_counts: dict[str, int] = {}
            numbered: list[str] = []
            for _, row in matched:
                first = first_layout(row[0], row[2])
                if first[0] is not None:
                    found_counts[first[0]] = found_counts.get(first[0], 0) + 1
                    if first[0] in ("orbax", DCP_CANDIDATE):
                        numbered.append(row[0])
            detected = choose_layout(found_counts, tracker_files)
            layout = _settle_numbered_layout(fs, root_path, detected, numbered) or "custom"
        if cache is not None:
            cache.trim_name_memo(root_path, signature, len(rows))
        return layout, matched

    # memo: name -> (is_dir, first layout, match); a name seen before costs one dict lookup.
    get = memo.get
    pairs: list[tuple[tuple[bool, str | None, NameMatch | None], tuple[str, int, bool]]] = []
    for row in rows:
        hit = get(row[0])
        if hit is None or hit[0] is not row[2]:
            hit = memo[row[0]] = (row[2], *first_layout(row[0], row[2]))
        if hit[1] is not None:
            pairs.append((hit, row))
    if cache is not None:
        cache.trim_name_memo(root_path, signature, len(rows))
    counts: Counter[str] = Counter([hit[1] for hit, _ in pairs if hit[1] is not None])
    detected = choose_layout(counts, tracker_files)
    numbered = [row[0] for hit, row in pairs if hit[1] in ("orbax", DCP_CANDIDATE)]
    layout = _settle_numbered_layout(fs, root_path, detected, numbered) or "custom"
    matched = [(hit[2], row) for hit, row in pairs if hit[1] == layout]  # type: ignore[misc]
    if len(matched) < len(pairs) and layout != "custom":
        for hit, row in pairs:
            if hit[1] != layout and (other := match_builtin(layout, row[0], row[2])):
                matched.append((other, row))
    return layout, matched


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


def _settle_numbered_layout(
    fs: FileSystem, root_path: str, detected: str | None, numbered: list[str]
) -> str | None:
    """Given the name-based guess and the numbered folders, tell dcp from orbax by looking into
    the highest-numbered few (a dcp checkpoint holds `*.distcp` files)."""
    if detected not in (None, "orbax") or not numbered:
        return detected

    def number(name: str) -> int:
        digits = re.findall(r"\d+", name)
        return int(digits[-1]) if digits else -1

    for name in sorted(numbered, key=number, reverse=True)[:3]:
        try:
            with closing(scandir_of(fs)(f"{root_path}/{name}")) as entries:
                if any(entry.name.endswith(".distcp") for entry in entries):
                    return "dcp"
        except OSError:
            continue
    return detected


def _patterns_of(root: RootConfig) -> list[Pattern]:
    sources = ([root.pattern] if root.pattern else []) + [series.pattern for series in root.series]
    patterns: list[Pattern] = []
    for source in sources:
        if all(pattern.source != source for pattern in patterns):
            patterns.append(compile_pattern(source))
    return patterns


def _series_order(
    patterns: list[Pattern], layout: str, results: list[tuple[Any, ...]]
) -> tuple[str, ...]:
    """Given the patterns, layout and found checkpoints, return the series ids in order: the
    patterns' order as configured, else the layout's one series (pt: each found pattern)."""
    if patterns:
        return tuple(pattern.source for pattern in patterns)
    if layout in ("pt", "custom"):
        return tuple(sorted({result[0] for result in results}))
    return (layout,)


def _protect_matcher(globs: list[str]) -> Any:
    if not globs:
        return None
    compiled = [(glob, re.compile(fnmatch.translate(glob))) for glob in globs]

    def matching(name: str) -> list[str]:
        return [glob for glob, regex in compiled if regex.match(name)]

    return matching


# --- trackers ------------------------------------------------------------------------------------


def _read_small(fs: FileSystem, path: str, limit: int = 1 << 16) -> str | None:
    try:
        return fs.read_bytes(path, limit).decode("utf-8", errors="replace")
    except OSError:
        return None


def _read_trackers(
    fs: FileSystem,
    root_path: str,
    layout: str,
    tracker_files: set[str],
) -> _Trackers:
    trackers = _Trackers()
    if DEEPSPEED_TRACKER in tracker_files and layout == "deepspeed":
        text = _read_small(fs, f"{root_path}/{DEEPSPEED_TRACKER}")
        if text is not None and (name := text.strip()):
            found = re.fullmatch(r"global_step(\d+)", name)
            if found:
                trackers.deepspeed_step = int(found.group(1))
            trackers.add(name, DEEPSPEED_TRACKER)
    if MEGATRON_TRACKER in tracker_files and layout == "megatron":
        text = _read_small(fs, f"{root_path}/{MEGATRON_TRACKER}")
        if text is not None and text.strip().isdigit():
            iteration = int(text.strip())
            trackers.megatron_step = iteration
            trackers.add(f"iter_{iteration:07d}", MEGATRON_TRACKER)
    if TF_TRACKER in tracker_files and layout == "tf":
        text = _read_small(fs, f"{root_path}/{TF_TRACKER}")
        if text is not None:
            listed: set[str] = set()
            for key, value in re.findall(r'^\s*(\w+)\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.M):
                name = os.path.basename(value.rstrip("/"))
                listed.add(name)
                if key == "model_checkpoint_path":
                    trackers.add(name, TF_TRACKER)
            trackers.tf_listed = listed
            steps = [
                int(found.group(1))
                for name in listed
                if (found := re.search(r"-(\d+)$", name)) is not None
            ]
            trackers.tf_newest_step = max(steps) if steps else None
    return trackers


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
                try:
                    root_status = fs.stat(root_path)
                except OSError:
                    continue
                root_identity = (root_status.st_dev, root_status.st_ino)
            first_entry = _entry_through_other_path(fs, root_identity, absolute)
            if first_entry is None:
                continue
            first = first_entry
        else:
            first = relative.split(os.sep, 1)[0]
        if first in owner:
            trackers.add(owner[first], link)


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


# --- completeness --------------------------------------------------------------------------------


def _incomplete_reason(
    layout: str, match: NameMatch, walk: WalkResult, trackers: _Trackers
) -> str | None:
    if walk.error is not None:
        return walk.error
    markers = walk.markers
    if layout == "hf":
        return None if "trainer_state.json" in markers else "no trainer_state.json"
    if layout == "orbax":
        if ORBAX_TMP_MARK in match.checkpoint:
            return "orbax temporary folder (save in progress or interrupted)"
        if "commit_success.txt" in markers or "_CHECKPOINT_METADATA" in markers:
            return None
        return "no commit_success.txt or _CHECKPOINT_METADATA"
    if layout == "dcp":
        return None if ".metadata" in markers else "no .metadata"
    if layout == "deepspeed":
        if trackers.deepspeed_step is None:
            return f"no readable '{DEEPSPEED_TRACKER}' file"
        if match.step > trackers.deepspeed_step:
            return f"newer than '{DEEPSPEED_TRACKER}' (global_step{trackers.deepspeed_step})"
        return None
    if layout == "megatron":
        if trackers.megatron_step is not None and match.step > trackers.megatron_step:
            return f"newer than {MEGATRON_TRACKER} ({trackers.megatron_step})"
        return None
    if layout == "tf":
        if "index" not in markers:
            return f"no {match.checkpoint}.index"
        if trackers.tf_listed is None:
            return f"no readable '{TF_TRACKER}' file"
        if match.checkpoint in trackers.tf_listed:
            return None
        if trackers.tf_newest_step is not None and match.step < trackers.tf_newest_step:
            return None
        return f"not listed in '{TF_TRACKER}'"
    return None


def _is_final(walk: WalkResult, layout: str, name: str, now_ns: int, settle_ns: int) -> bool:
    """Given a walk, return whether it can never change while the checkpoint is untouched."""
    if walk.error is not None or now_ns - walk.mtime_ns < settle_ns:
        return False
    markers = walk.markers
    if layout == "hf":
        return "trainer_state.json" in markers
    if layout == "orbax":
        return ORBAX_TMP_MARK not in name and (
            "commit_success.txt" in markers or "_CHECKPOINT_METADATA" in markers
        )
    if layout == "dcp":
        return ".metadata" in markers
    return True


# --- walking -------------------------------------------------------------------------------------


def _fingerprint(
    fs: FileSystem,
    root_path: str,
    members: Sequence[tuple[str, int, bool]],
    markers: frozenset[str],
) -> tuple[int, ...]:
    """Given a checkpoint's members, return their stat proof now (empty if any vanished)."""
    numbers: list[int] = []
    try:
        for name, _, is_dir in members:
            status = fs.lstat(f"{root_path}/{name}")
            numbers += (status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size)
            if is_dir:
                marker = fingerprint_markers_of(markers)
                if marker is not None:
                    inner = fs.lstat(f"{root_path}/{name}/{marker}")
                    numbers += (inner.st_ino, inner.st_mtime_ns, inner.st_size)
    except OSError:
        return ()
    return tuple(numbers)


def _with_state(
    fs: FileSystem, root_path: str, members: Sequence[tuple[str, int, bool]], walk: WalkResult
) -> WalkResult:
    """Given a walk whose trainer_state.json / sidecars were not read yet, return it with its
    metrics and best_model_checkpoint filled in."""
    metrics, best, unreadable = _read_metrics(fs, root_path, members, set(walk.markers))
    return replace(
        walk,
        metrics=metrics,
        best_model_checkpoint=best,
        state_read=True,
        state_unreadable=unreadable,
    )


def _read_metrics(
    fs: FileSystem, root_path: str, members: Sequence[tuple[str, int, bool]], markers: set[str]
) -> tuple[Mapping[str, float], str | None, bool]:
    """Given a checkpoint's members and markers, return its metrics, best_model_checkpoint and
    whether its trainer_state.json was there but unreadable."""
    metrics: dict[str, float] = {}
    best: str | None = None
    unreadable = False
    folder = next((name for name, _, is_dir in members if is_dir), None)
    if folder is not None and "trainer_state.json" in markers:
        state = _load_json(fs, f"{root_path}/{folder}/trainer_state.json", _TRAINER_STATE_LIMIT)
        if isinstance(state, dict):
            metrics.update(_trainer_state_metrics(state))
            candidate = state.get("best_model_checkpoint")
            best = candidate if isinstance(candidate, str) and candidate else None
        else:
            unreadable = True
    sidecars = (
        [f"{folder}/metrics.json"] if folder is not None and "metrics.json" in markers else []
    )
    sidecars += [name for name, _, _ in members if name.endswith(_METRICS_SUFFIX)]
    for sidecar in sidecars:
        document = _load_json(fs, f"{root_path}/{sidecar}", _SIDECAR_LIMIT)
        if isinstance(document, dict):
            metrics.update(_numbers(document))
    return (MappingProxyType(metrics) if metrics else _NO_METRICS), best, unreadable


def _load_json(fs: FileSystem, path: str, limit: int) -> object:
    try:
        return json.loads(fs.read_bytes(path, limit))
    except (OSError, ValueError):
        return None  # unreadable or half-written: no metrics rather than a failed scan


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
