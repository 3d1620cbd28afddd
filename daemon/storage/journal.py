"""Deleting checkpoints from object storage as safely as the local rename into the trash.

Object storage cannot rename a prefix, so a deletion is made safe by its order and a journal:

1. a journal object `<root>/.ckptd-journal/<run-id>.json` lists every checkpoint of the run
   with all its keys; it is written before anything is deleted, so from then on the deletion
   is decided and a crash (kill -9, lost node, lost lease) is finished by the next run
   (`finish_pending`);
2. the marker objects of the checkpoints go first (the framework's resume then already treats
   each one as incomplete, never as a half-deleted complete checkpoint);
3. then the rest, in batches (S3 DeleteObjects: at most 1,000 keys a request);
4. the journal is removed when every key is gone; after a failure it stays and the next run
   retries (deleting an absent key succeeds on S3, so finishing twice is harmless).

The trash grace becomes a deferred-deletion list: `<root>/.ckptd-trash/deferred-<run-id>.json`
names the checkpoints, their keys and the time they fall due. The objects stay until then;
`restore` cancels an entry; `purge_due` deletes what fell due through the journal above. Every
update of a list is conditional on the ETag read (`If-Match`), so a `restore` racing the purge
either cancels the deletion or finds the checkpoint already committed to it, never half.

Journal and list contents are checked before use: every key must lie inside the checkpoint it
names, inside the root, outside ckptd's own prefixes. (Whoever can write to the root's prefix
can usually delete there too; the check keeps a corrupt or planted file from widening that.)
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from daemon.storage.base import DeleteFailure, ObjectInfo, ObjectStore
from daemon.storage.url import StorageUrl

JOURNAL_FOLDER = ".ckptd-journal"
TRASH_FOLDER = ".ckptd-trash"
DEFERRED_PREFIX = "deferred-"
OWN_PREFIX = ".ckptd"
FORMAT_VERSION = 1
# A journal of a very large run (100,000 keys) is a few MiB; anything larger is not ours.
JOURNAL_LIMIT = 64 << 20
# Delete requests in flight at once within a phase (markers, then the rest): S3 serves them
# in parallel, and a run of 100,000 objects is 100 requests.
DEFAULT_PARALLEL = 4
VERSIONED_NOTE = (
    "the bucket keeps old versions (versioning or soft delete): the deleted objects stay"
    " billed until a lifecycle rule expires them"
)


class JournalError(ValueError):
    """A journal or deferred list that is not well-formed or reaches outside its checkpoint."""


@dataclass(frozen=True)
class CheckpointObjects:
    """One checkpoint to delete: its name in the root, its marker keys, every object of it
    (markers included), and its key prefix ("…/name/") or None for a checkpoint that is one
    or more top-level objects (`ckpt-100.index` + `ckpt-100.data-*`)."""

    name: str
    markers: tuple[str, ...]
    objects: tuple[ObjectInfo, ...]
    prefix: str | None

    @property
    def size(self) -> int:
        return sum(item.size for item in self.objects)


@dataclass(frozen=True)
class DeletionOutcome:
    """What became of one checkpoint: keys deleted, bytes listed, bytes honestly freed (0 in
    a versioned bucket), and the keys that failed (its marker failing stops the rest)."""

    name: str
    deleted: int
    bytes_listed: int
    bytes_freed: int
    failures: tuple[DeleteFailure, ...]

    @property
    def complete(self) -> bool:
        return not self.failures


@dataclass
class RunOutcome:
    """One journalled run: its id, per-checkpoint outcomes, whether the bucket is versioned,
    whether it stopped early (lease lost) and whether its journal is gone (all done)."""

    run_id: str
    outcomes: list[DeletionOutcome] = field(default_factory=list)
    versioned: bool = False
    stopped: bool = False
    journal_removed: bool = False

    @property
    def note(self) -> str:
        return VERSIONED_NOTE if self.versioned else ""


@dataclass(frozen=True)
class DeferredItem:
    """One checkpoint waiting in the deferred-deletion list until `due` (epoch seconds)."""

    name: str
    due: float
    run_id: str
    size: int
    list_key: str
    # The root entries it is made of: its prefix's name, or its top-level objects' names.
    members: tuple[str, ...] = ()


def _members_of(root: StorageUrl, checkpoint: CheckpointObjects) -> tuple[str, ...]:
    if checkpoint.prefix is not None:
        return (checkpoint.name,)
    top = root.directory()
    return tuple(dict.fromkeys(item.key[len(top) :] for item in checkpoint.objects))


def new_run_id(now: float | None = None) -> str:
    """Return a unique, time-ordered id for one run (UTC time, host, pid, random)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40]
    return f"{stamp}-{host}-{os.getpid()}-{secrets.token_hex(4)}"


def journal_key(root: StorageUrl, run_id: str) -> str:
    """Given a root and a run id, return the key of that run's journal."""
    return root.key(JOURNAL_FOLDER, f"{run_id}.json")


def deferred_key(root: StorageUrl, run_id: str) -> str:
    """Given a root and a run id, return the key of that run's deferred-deletion list."""
    return root.key(TRASH_FOLDER, f"{DEFERRED_PREFIX}{run_id}.json")


# --- encoding and validation -------------------------------------------------------------


def _base(root: StorageUrl, checkpoint_name: str, is_prefix: bool) -> str:
    return f"{root.directory()}{checkpoint_name}/" if is_prefix else root.directory()


def _check_name(name: object) -> str:
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or name in (".", "..")
        or name.startswith(OWN_PREFIX)
    ):
        raise JournalError(f"not a checkpoint name: {name!r}")
    return name


def _check_relative(relative: str, name: str, is_prefix: bool) -> None:
    """Given a key relative to its checkpoint's base, raise JournalError unless it lies inside
    that checkpoint: no empty, '.' or '..' segment; a top-level object starts with the name."""
    segments = relative.split("/")
    inside = is_prefix or (len(segments) == 1 and relative.startswith(name))
    if not inside or any(segment in ("", ".", "..") for segment in segments):
        raise JournalError(f"{relative!r} is not inside checkpoint {name!r}")


def _relative(key: str, base: str, name: str, is_prefix: bool) -> str:
    if not key.startswith(base):
        raise JournalError(f"key {key!r} is not inside checkpoint {name!r}")
    relative = key[len(base) :]
    _check_relative(relative, name, is_prefix)
    return relative


def _encode_checkpoint(root: StorageUrl, checkpoint: CheckpointObjects) -> dict[str, object]:
    """Given a checkpoint, return its journal entry (keys relative to it, each checked)."""
    name = _check_name(checkpoint.name)
    is_prefix = checkpoint.prefix is not None
    base = _base(root, name, is_prefix)
    if is_prefix and checkpoint.prefix != base:
        raise JournalError(f"prefix {checkpoint.prefix!r} does not belong to {name!r}")
    objects = [[_relative(i.key, base, name, is_prefix), i.size] for i in checkpoint.objects]
    keys = {item.key for item in checkpoint.objects}
    if not set(checkpoint.markers) <= keys:
        raise JournalError(f"a marker of {name!r} is not among its objects")
    markers = [marker[len(base) :] for marker in checkpoint.markers]
    return {"name": name, "prefix": is_prefix, "markers": markers, "objects": objects}


def encode_checkpoint(root: StorageUrl, checkpoint: CheckpointObjects) -> dict[str, object]:
    """Given a checkpoint, return its journal entry; JournalError when it cannot be one."""
    return _encode_checkpoint(root, checkpoint)


def _encode(run_id: str, root: StorageUrl, checkpoints: Sequence[CheckpointObjects]) -> bytes:
    document = {
        "version": FORMAT_VERSION,
        "run_id": run_id,
        "root": str(root),
        "created": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "checkpoints": [_encode_checkpoint(root, checkpoint) for checkpoint in checkpoints],
    }
    return json.dumps(document, separators=(",", ":")).encode()


def _decode_checkpoint(raw: object, root: StorageUrl) -> CheckpointObjects:
    if not isinstance(raw, dict):
        raise JournalError("a checkpoint entry is not an object")
    name = _check_name(raw.get("name"))
    is_prefix = raw.get("prefix") is True
    base = _base(root, name, is_prefix)
    objects = tuple(
        _decode_object(item, base, name, is_prefix) for item in raw.get("objects") or ()
    )
    keys = {item.key for item in objects}
    markers = tuple(base + str(marker) for marker in raw.get("markers") or ())
    if not set(markers) <= keys:
        raise JournalError(f"a marker of {name!r} is not among its objects")
    return CheckpointObjects(
        name=name, markers=markers, objects=objects, prefix=base if is_prefix else None
    )


def _decode_object(item: object, base: str, name: str, is_prefix: bool) -> ObjectInfo:
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
        raise JournalError(f"not a [name, size] pair: {item!r}")
    _check_relative(item[0], name, is_prefix)
    size = item[1] if isinstance(item[1], int) and item[1] >= 0 else 0
    return ObjectInfo(key=base + item[0], size=size, mtime=0.0, etag="")


def _decode(data: bytes, root: StorageUrl) -> tuple[dict[str, object], list[CheckpointObjects]]:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise JournalError(f"not JSON: {error}") from None
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        raise JournalError("not a ckptd journal of a known version")
    raw = document.get("checkpoints")
    if not isinstance(raw, list):
        raise JournalError("no checkpoint list")
    return document, [_decode_checkpoint(item, root) for item in raw]


# --- the delete order --------------------------------------------------------------------


def write_journal(
    store: ObjectStore, root: StorageUrl, checkpoints: Sequence[CheckpointObjects], run_id: str
) -> str:
    """Given the checkpoints of one run, write its journal and return the journal's key.

    Nothing may be deleted before this returns: the journal is what lets a crash be finished.
    """
    key = journal_key(root, run_id)
    store.put(key, _encode(run_id, root, checkpoints))
    return key


def _batches(keys: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


def _delete_in_batches(
    store: ObjectStore,
    keys: Sequence[str],
    batch_size: int,
    keep_going: Callable[[], bool] | None,
    parallel: int,
) -> tuple[list[DeleteFailure], bool]:
    """Given keys, delete them in batches, at most `parallel` requests in flight; return the
    failures and whether it stopped early because `keep_going()` said so before a batch (the
    keys not sent count as failures)."""
    failures: list[DeleteFailure] = []
    batches = list(_batches(keys, batch_size))
    workers = max(1, min(parallel, len(batches)))
    with ThreadPoolExecutor(workers, thread_name_prefix="ckptd-delete") as pool:
        in_flight: deque[Future[list[DeleteFailure]]] = deque()
        for index, batch in enumerate(batches):
            if len(in_flight) >= workers:
                failures.extend(in_flight.popleft().result())
            if keep_going is not None and not keep_going():
                for future in in_flight:
                    failures.extend(future.result())
                unsent = keys[index * batch_size :]
                failures.extend(DeleteFailure(key, "Stopped", "lease lost") for key in unsent)
                return failures, True
            in_flight.append(pool.submit(store.delete_batch, batch))
        for future in in_flight:
            failures.extend(future.result())
    return failures, False


def execute(
    store: ObjectStore,
    checkpoints: Sequence[CheckpointObjects],
    *,
    versioned: bool,
    batch_size: int = 1000,
    keep_going: Callable[[], bool] | None = None,
    parallel: int = 1,
) -> tuple[list[DeletionOutcome], bool]:
    """Given journalled checkpoints, delete every marker first, then the rest of each
    checkpoint whose markers are gone, in batches; return the outcomes and whether it stopped
    early. A checkpoint whose marker could not be deleted keeps all its other objects.
    `parallel` batches may be in flight at once within each phase, never across the two."""
    markers = [key for checkpoint in checkpoints for key in checkpoint.markers]
    marker_failures, stopped = _delete_in_batches(store, markers, batch_size, keep_going, parallel)
    failed_by_key = {failure.key: failure for failure in marker_failures}
    go_on = [c for c in checkpoints if not any(m in failed_by_key for m in c.markers)]
    rest = [
        item.key
        for checkpoint in go_on
        for item in checkpoint.objects
        if item.key not in checkpoint.markers
    ]
    if not stopped:
        rest_failures, stopped = _delete_in_batches(store, rest, batch_size, keep_going, parallel)
        failed_by_key.update((failure.key, failure) for failure in rest_failures)
    else:
        failed_by_key.update((key, DeleteFailure(key, "Stopped", "lease lost")) for key in rest)
    return [_outcome(checkpoint, failed_by_key, versioned) for checkpoint in checkpoints], stopped


def _outcome(
    checkpoint: CheckpointObjects, failed: dict[str, DeleteFailure], versioned: bool
) -> DeletionOutcome:
    marker_failed = any(marker in failed for marker in checkpoint.markers)
    failures = tuple(failed[item.key] for item in checkpoint.objects if item.key in failed)
    gone = [] if marker_failed else [i for i in checkpoint.objects if i.key not in failed]
    return DeletionOutcome(
        name=checkpoint.name,
        deleted=len(gone),
        bytes_listed=checkpoint.size,
        bytes_freed=0 if versioned else sum(item.size for item in gone),
        failures=failures,
    )


def _finish(
    store: ObjectStore,
    run: RunOutcome,
    checkpoints: Sequence[CheckpointObjects],
    journal: str,
    batch_size: int,
    keep_going: Callable[[], bool] | None,
    parallel: int,
) -> RunOutcome:
    """Given a run whose journal is written, delete (markers first) and then remove the
    journal when every key is gone; return the run with its outcomes."""
    run.outcomes, run.stopped = execute(
        store,
        checkpoints,
        versioned=run.versioned,
        batch_size=batch_size,
        keep_going=keep_going,
        parallel=parallel,
    )
    if all(outcome.complete for outcome in run.outcomes):
        store.delete_batch([journal])
        run.journal_removed = True
    return run


def delete_checkpoints(
    store: ObjectStore,
    root: StorageUrl,
    checkpoints: Sequence[CheckpointObjects],
    *,
    run_id: str | None = None,
    batch_size: int = 1000,
    keep_going: Callable[[], bool] | None = None,
    versioned: bool | None = None,
    parallel: int = DEFAULT_PARALLEL,
) -> RunOutcome:
    """Given checkpoints chosen for deletion, delete them journalled, markers first; return
    what happened. `keep_going()` is asked before each request (the lease is still held);
    `versioned` None asks the bucket."""
    run = RunOutcome(run_id=run_id or new_run_id())
    if not checkpoints:
        return run
    run.versioned = store.versioning_enabled() if versioned is None else versioned
    key = write_journal(store, root, checkpoints, run.run_id)
    return _finish(store, run, checkpoints, key, batch_size, keep_going, parallel)


def pending_journals(store: ObjectStore, root: StorageUrl) -> list[str]:
    """Given a root, return the keys of journals left by runs that did not finish."""
    folder = root.key(JOURNAL_FOLDER) + "/"
    return sorted(
        folder + entry.name
        for entry in store.list_top(folder)
        if not entry.is_prefix and entry.name.endswith(".json")
    )


def finish_pending(
    store: ObjectStore,
    root: StorageUrl,
    *,
    batch_size: int = 1000,
    keep_going: Callable[[], bool] | None = None,
    parallel: int = DEFAULT_PARALLEL,
) -> list[RunOutcome]:
    """Given a root, finish every journalled run a crash left behind (markers again first);
    return one outcome per journal. A journal that fails validation is left in place and
    raised as JournalError after the others are finished."""
    runs: list[RunOutcome] = []
    invalid: list[str] = []
    for key in pending_journals(store, root):
        try:
            document, checkpoints = _decode(store.read_small(key, JOURNAL_LIMIT), root)
        except FileNotFoundError:
            continue  # finished meanwhile
        except JournalError as error:
            invalid.append(f"{key}: {error}")
            continue
        run = RunOutcome(
            run_id=str(document.get("run_id", key)), versioned=store.versioning_enabled()
        )
        runs.append(_finish(store, run, checkpoints, key, batch_size, keep_going, parallel))
    if invalid:
        raise JournalError("; ".join(invalid))
    return runs


# --- the deferred-deletion list (trash grace) --------------------------------------------


def defer(
    store: ObjectStore,
    root: StorageUrl,
    checkpoints: Sequence[CheckpointObjects],
    *,
    due: float,
    run_id: str | None = None,
) -> str:
    """Given checkpoints and the time their grace ends, list them for deletion then (the
    objects stay); return the list's key."""
    run = run_id or new_run_id()
    document = json.loads(_encode(run, root, checkpoints))
    document["due"] = due
    key = deferred_key(root, run)
    store.put(key, json.dumps(document, separators=(",", ":")).encode())
    return key


def _deferred_lists(store: ObjectStore, root: StorageUrl) -> list[str]:
    folder = root.key(TRASH_FOLDER) + "/"
    return sorted(
        folder + entry.name
        for entry in store.list_top(folder)
        if not entry.is_prefix
        and entry.name.startswith(DEFERRED_PREFIX)
        and entry.name.endswith(".json")
    )


def _read_list(
    store: ObjectStore, root: StorageUrl, key: str
) -> tuple[dict[str, object], list[CheckpointObjects], str] | None:
    found = store.read_with_etag(key, JOURNAL_LIMIT)
    if found is None:
        return None
    document, checkpoints = _decode(found[0], root)
    return document, checkpoints, found[1]


def _due_of(document: dict[str, object]) -> float:
    due = document.get("due")
    return float(due) if isinstance(due, int | float) else 0.0


def list_deferred(
    store: ObjectStore, root: StorageUrl, invalid: list[str] | None = None
) -> list[DeferredItem]:
    """Given a root, return every checkpoint waiting for deletion, soonest due first. A list
    that fails validation raises JournalError, or with `invalid` given is skipped and named
    there (`key: why`)."""
    items: list[DeferredItem] = []
    for key in _deferred_lists(store, root):
        try:
            read = _read_list(store, root, key)
        except JournalError as error:
            if invalid is None:
                raise
            invalid.append(f"{key}: {error}")
            continue
        if read is None:
            continue
        document, checkpoints, _etag = read
        items.extend(
            DeferredItem(
                name=checkpoint.name,
                due=_due_of(document),
                run_id=str(document.get("run_id", "")),
                size=checkpoint.size,
                list_key=key,
                members=_members_of(root, checkpoint),
            )
            for checkpoint in checkpoints
        )
    return sorted(items, key=lambda item: (item.due, item.name))


def restore(store: ObjectStore, root: StorageUrl, name: str, attempts: int = 5) -> bool:
    """Given a checkpoint name, cancel its deferred deletion; return whether it was waiting
    (False: not listed, or its deletion has already begun)."""
    for _ in range(attempts):
        raced = False
        for key in _deferred_lists(store, root):
            read = _read_list(store, root, key)
            if read is None:
                continue
            document, checkpoints, etag = read
            left = [checkpoint for checkpoint in checkpoints if checkpoint.name != name]
            if len(left) == len(checkpoints):
                continue
            if _rewrite_list(store, root, key, document, left, etag):
                return True
            raced = True  # the list changed under us: read it again
        if not raced:
            return False
    return False


def _rewrite_list(
    store: ObjectStore,
    root: StorageUrl,
    key: str,
    document: dict[str, object],
    left: list[CheckpointObjects],
    etag: str,
) -> bool:
    if not left:
        return store.delete_if_match(key, etag)
    document = dict(document, checkpoints=[_encode_checkpoint(root, c) for c in left])
    data = json.dumps(document, separators=(",", ":")).encode()
    return store.replace_if_match(key, data, etag)


def purge_due(
    store: ObjectStore,
    root: StorageUrl,
    now: float,
    *,
    everything: bool = False,
    batch_size: int = 1000,
    keep_going: Callable[[], bool] | None = None,
    parallel: int = DEFAULT_PARALLEL,
) -> list[RunOutcome]:
    """Given the time, delete (journalled, markers first) every deferred list that fell due,
    or every list when `everything` (disk pressure empties the trash first); return one
    outcome per list purged."""
    runs: list[RunOutcome] = []
    for key in _deferred_lists(store, root):
        read = _read_list(store, root, key)
        if read is None:
            continue
        document, checkpoints, etag = read
        if not everything and _due_of(document) > now:
            continue
        run_id = new_run_id(now)
        journal = write_journal(store, root, checkpoints, run_id)
        # Committing: the list goes only if nobody restored from it since we read it.
        if not store.delete_if_match(key, etag):
            store.delete_batch([journal])
            continue
        run = RunOutcome(run_id=run_id, versioned=store.versioning_enabled())
        runs.append(_finish(store, run, checkpoints, journal, batch_size, keep_going, parallel))
    return runs
