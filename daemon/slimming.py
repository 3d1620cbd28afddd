"""What a checkpoint's resume state is, per layout, and what slimming left behind (issue 11).

The policy says *which* kept checkpoints to slim (policies/slim.py); this module says *what*
slimming one moves out, from the frameworks' own file names, and never by loading a file:

| layout    | resume state (paths inside the checkpoint folder)                                  |
|-----------|-------------------------------------------------------------------------------------|
| hf        | `optimizer.pt`, `optimizer.bin`, `optimizer_<n>.bin`, `optimizer_<n>/` (FSDP),      |
|           | `rank*-of-*-optimizer.pt`, `scheduler.pt`, `scaler.pt`, `rng_state*.pth`, and a     |
|           | DeepSpeed `global_step*/` folder when the weights are saved beside it (else only    |
|           | its `*optim_states.pt`, by the DeepSpeed rule)                                      |
| deepspeed | `*optim_states.pt`, when `mp_rank_*_model_states.pt` holds the weights (ZeRO 0-2);  |
|           | ZeRO-3 (`zero_pp_rank_*_model_states.pt`) keeps its weights in the optimizer shards |
| megatron  | `mp_rank_*/distrib_optim.pt` (the distributed optimizer, legacy format)             |
| orbax     | the item folders named in `slim.drop` (e.g. `opt_state`): only the user knows them  |

Not slimmable, said so in `plan` rather than guessed: PyTorch and Lightning single files and
TensorFlow's `.data-*` (the optimizer inside the same file as the weights), DCP shards and
Megatron's `torch_dist` format (optimizer and weights in the same `.distcp` files), Megatron's
`model_optim_rng.pt`. `slim.drop` globs replace the layout's names for a series. Completion
markers (`trainer_state.json`, `.metadata`, `commit_success.txt`, ...), `.keep` and ckptd's
own files are never moved, so a slimmed checkpoint stays complete to discovery.

A slimmed checkpoint holds `.ckptd-slim.json`, written after every file has moved out: what
left, its sizes, when, and the trash item holding it. `is_slimmed(root, name)` is how other
parts (`ckptd last-good`) tell a weights-only checkpoint from a resumable one.

Every path inside a root is hostile: folders are opened relative to their parent's descriptor
with `O_NOFOLLOW`, entries are `lstat`ed, never followed.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import stat as stat_module
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from daemon.config import RootConfig
from daemon.discovery.scan import scan
from policies.model import Checkpoint, Decision, Plan, PolicySpec, SlimTarget
from policies.slim import slim_blockers, unslim

SLIM_RECORD = ".ckptd-slim.json"
# What a `.keep` made by `ckptd trash restore` says (daemon/pruning/trash.py writes the same).
PIN_TEXT = b"restored from the ckptd trash; delete this file to unpin\n"
RECORD_LIMIT = 1 << 20
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# Never moved out, whatever a glob says: what makes a checkpoint complete to discovery (and to
# its framework), pins, and ckptd's own files.
PROTECTED = frozenset(
    {
        "trainer_state.json",
        "commit_success.txt",
        "_CHECKPOINT_METADATA",
        ".metadata",
        "metadata.json",
        "latest",
        ".keep",
        SLIM_RECORD,
    }
)

HF_RESUME_FILES = (
    "optimizer.pt",
    "optimizer.bin",
    "optimizer_[0-9]*.bin",
    "rank*-of-*-optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
)
HF_RESUME_FOLDERS = ("optimizer_[0-9]*",)
HF_DEEPSPEED_FOLDERS = "global_step*"
# Weights saved at the top of an HF checkpoint (save_model / save_pretrained names).
HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin", "pytorch_model_fsdp_*")
DEEPSPEED_OPTIMIZER = "*optim_states.pt"
DEEPSPEED_WEIGHTS = "mp_rank_*_model_states.pt"
DEEPSPEED_ZERO3 = "zero_pp_rank_*_model_states.pt"
MEGATRON_RANKS = "mp_rank_*"
MEGATRON_OPTIMIZER = "distrib_optim.pt"

NOT_SLIMMABLE = {
    "pt": "the optimizer is inside the same file as the weights: not slimmable without "
    "loading it (ckptd never does)",
    "lightning": "Lightning keeps the optimizer inside the same .ckpt as the weights: not "
    "slimmable without loading it (ckptd never does)",
    "tf": "the optimizer's slots are inside the same .data-* files as the weights: not "
    "slimmable without loading them (ckptd never does)",
    "dcp": "torch.distributed.checkpoint keeps the optimizer in the same .distcp shards as "
    "the weights: not slimmable without loading them (ckptd never does)",
    "orbax": "Orbax items are named by the training code: name the optimizer's item folders "
    "in slim.drop (e.g. [opt_state]); ckptd does not guess",
    "custom": "a custom layout: name its resume-state files in slim.drop",
}


@dataclass(frozen=True, slots=True)
class Selection:
    """Given one checkpoint: the paths inside it that are its resume state (`/`-separated,
    relative to the checkpoint folder; a folder stands for everything in it), or why none."""

    paths: tuple[str, ...] = ()
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class SlimmedFile:
    """Given one path a slim moved out: its size (allocated bytes freed, file sizes)."""

    path: str
    bytes_freed: int
    bytes_logical: int


@dataclass(frozen=True, slots=True)
class SlimRecord:
    """Given a checkpoint's `.ckptd-slim.json`: what left it, when, and where it went."""

    checkpoint: str
    slimmed_at: float
    files: tuple[SlimmedFile, ...]
    trash_item: str | None = None

    @property
    def bytes_freed(self) -> int:
        return sum(entry.bytes_freed for entry in self.files)

    @property
    def bytes_logical(self) -> int:
        return sum(entry.bytes_logical for entry in self.files)

    def to_json(self) -> dict[str, object]:
        """Given the record, return the JSON document written into the checkpoint."""
        return {
            "version": 1,
            "checkpoint": self.checkpoint,
            "slimmed_at": self.slimmed_at,
            "trash_item": self.trash_item,
            "bytes_freed": self.bytes_freed,
            "bytes_logical": self.bytes_logical,
            "files": [
                {"path": f.path, "bytes": f.bytes_freed, "bytes_logical": f.bytes_logical}
                for f in self.files
            ],
            "note": "resume state (optimizer, scheduler, RNG) moved out by ckptd; the weights "
            "and metadata are here. `ckptd trash restore` puts them back while in the trash.",
        }

    @classmethod
    def from_json(cls, document: object) -> SlimRecord | None:
        """Given a parsed `.ckptd-slim.json`, return the record (None when malformed)."""
        if not isinstance(document, dict):
            return None
        files = []
        for entry in document.get("files") or ():
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                return None
            files.append(
                SlimmedFile(
                    entry["path"], _count(entry.get("bytes")), _count(entry.get("bytes_logical"))
                )
            )
        slimmed_at = document.get("slimmed_at")
        item = document.get("trash_item")
        return cls(
            checkpoint=str(document.get("checkpoint", "")),
            slimmed_at=float(slimmed_at) if isinstance(slimmed_at, int | float) else 0.0,
            files=tuple(files),
            trash_item=item if isinstance(item, str) else None,
        )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- descriptors ---------------------------------------------------------------------------------


@contextlib.contextmanager
def open_folder(name: str, parent: int | None = None) -> Iterator[int]:
    """Given a folder's name (relative to the `parent` descriptor, or a path), yield it opened
    without following a symlink anywhere at its last component."""
    descriptor = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def open_checkpoint(root: str | int, name: str) -> contextlib.AbstractContextManager[int]:
    """Given a root (a path, or its open descriptor) and a checkpoint folder's name, return a
    context opening that folder (never through a symlink)."""
    if isinstance(root, int):
        return open_folder(name, root)
    return open_folder(os.path.join(root, name))


def _entries(descriptor: int) -> list[tuple[str, os.stat_result]]:
    """Given an open folder, return its entries with their `lstat`, names sorted."""
    found = []
    for name in sorted(os.listdir(descriptor)):
        try:
            found.append((name, os.lstat(name, dir_fd=descriptor)))
        except FileNotFoundError:
            continue
    return found


def _is_dir(status: os.stat_result) -> bool:
    return stat_module.S_ISDIR(status.st_mode)


def _is_file(status: os.stat_result) -> bool:
    return stat_module.S_ISREG(status.st_mode)


def _matches(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


# --- what is resume state ------------------------------------------------------------------------


def resume_state(
    root: str | int, checkpoint: Checkpoint, drop: Sequence[str] | None = None
) -> Selection:
    """Given a root (a path or an open descriptor), one of its checkpoints and the series'
    `slim.drop` globs (None: the layout's own names), return its resume state or why none.

    Only a checkpoint that is one folder directly in the root can be slimmed.
    """
    if len(checkpoint.members) != 1:
        return Selection(problem=NOT_SLIMMABLE["tf"] if checkpoint.layout == "tf" else None)
    try:
        with open_checkpoint(root, checkpoint.members[0]) as folder:
            if drop is not None:
                return _by_globs(folder, drop)
            return _by_layout(folder, checkpoint.layout)
    except OSError as error:
        if error.errno in (errno.ENOTDIR, errno.ELOOP):
            return Selection(problem=NOT_SLIMMABLE.get(checkpoint.layout, NOT_SLIMMABLE["pt"]))
        return Selection(problem=f"unreadable: {error.strerror or error}")


def _by_layout(folder: int, layout: str) -> Selection:
    if layout == "hf":
        return _hugging_face(folder)
    if layout == "deepspeed":
        return _deepspeed(folder, "")
    if layout == "megatron":
        return _megatron(folder)
    if layout == "lightning":
        return Selection(
            problem="a Lightning checkpoint folder: name its resume state in slim.drop "
            "(e.g. checkpoint/*optim_states.pt)"
        )
    return Selection(problem=NOT_SLIMMABLE.get(layout, NOT_SLIMMABLE["custom"]))


def _hugging_face(folder: int) -> Selection:
    entries = _entries(folder)
    paths = [
        name
        for name, status in entries
        if (_is_file(status) and _matches(name, HF_RESUME_FILES))
        or (_is_dir(status) and _matches(name, HF_RESUME_FOLDERS))
    ]
    weights_beside = any(_matches(name, HF_WEIGHTS) for name, _ in entries)
    problems = []
    for name, status in entries:
        if not (_is_dir(status) and fnmatch.fnmatchcase(name, HF_DEEPSPEED_FOLDERS)):
            continue
        if weights_beside:
            paths.append(name)  # the weights are saved beside it: all of it is resume state
            continue
        with open_folder(name, folder) as inner:
            found = _deepspeed(inner, f"{name}/")
        paths.extend(found.paths)
        if found.problem:
            problems.append(f"{name}: {found.problem}")
    if problems:
        # Half a resume state moved out helps nobody and confuses a resume: all or nothing.
        return Selection(problem="; ".join(problems))
    if not paths:
        return Selection(problem="no resume state found (optimizer.pt, scheduler.pt, ...)")
    return Selection(tuple(sorted(paths)))


def _deepspeed(folder: int, prefix: str) -> Selection:
    entries = [(name, status) for name, status in _entries(folder) if _is_file(status)]
    names = [name for name, _ in entries]
    if any(fnmatch.fnmatchcase(name, DEEPSPEED_ZERO3) for name in names):
        return Selection(
            problem="ZeRO-3: the weights live only in the optimizer shards (zero_to_fp32.py "
            "needs them): not slimmable"
        )
    optimizer = [name for name in names if fnmatch.fnmatchcase(name, DEEPSPEED_OPTIMIZER)]
    if not optimizer:
        return Selection(problem=f"no {DEEPSPEED_OPTIMIZER} found")
    if not any(fnmatch.fnmatchcase(name, DEEPSPEED_WEIGHTS) for name in names):
        return Selection(
            problem=f"no {DEEPSPEED_WEIGHTS}: the weights may live only in the optimizer shards"
        )
    return Selection(tuple(prefix + name for name in optimizer))


def _megatron(folder: int) -> Selection:
    entries = _entries(folder)
    paths = []
    for name, status in entries:
        if not (_is_dir(status) and fnmatch.fnmatchcase(name, MEGATRON_RANKS)):
            continue
        with open_folder(name, folder) as rank, contextlib.suppress(FileNotFoundError):
            if _is_file(os.lstat(MEGATRON_OPTIMIZER, dir_fd=rank)):
                paths.append(f"{name}/{MEGATRON_OPTIMIZER}")
    if paths:
        return Selection(tuple(paths))
    if any(name.endswith(".distcp") for name, _ in entries):
        return Selection(
            problem="Megatron's torch_dist format keeps the optimizer in the same .distcp "
            "shards as the weights: not slimmable without loading them (ckptd never does)"
        )
    return Selection(
        problem="the optimizer is inside model_optim_rng.pt with the weights (no distributed "
        "optimizer): not slimmable without loading it (ckptd never does)"
    )


def _by_globs(folder: int, globs: Sequence[str]) -> Selection:
    """Given an open checkpoint folder and `slim.drop` globs (`/`-separated, each part an
    fnmatch pattern), return what they match; a folder matched covers what is under it."""
    found: set[str] = set()
    for glob in globs:
        found.update(_glob(folder, glob.split("/"), ""))
    # A path under a folder that is dropped whole is moved with it.
    paths = sorted(p for p in found if not any(p.startswith(other + "/") for other in found))
    if not paths:
        return Selection(problem=f"slim.drop ({', '.join(globs)}) matched nothing")
    return Selection(tuple(paths))


def _glob(folder: int, parts: list[str], prefix: str) -> list[str]:
    matched = []
    head, rest = parts[0], parts[1:]
    for name, status in _entries(folder):
        if not fnmatch.fnmatchcase(name, head) or name in PROTECTED:
            continue
        if not rest:
            if not name.startswith(".ckptd-"):
                matched.append(prefix + name)
            continue
        if _is_dir(status):  # never through a symlink
            with open_folder(name, folder) as inner:
                matched.extend(_glob(inner, rest, f"{prefix}{name}/"))
    return matched


# --- sizes ---------------------------------------------------------------------------------------


def measure(folder: int, paths: Iterable[str]) -> list[SlimmedFile]:
    """Given an open checkpoint folder and paths inside it, return each path with the bytes
    moving it out frees (allocated; a file with links outside the paths frees nothing; each
    inode once) and its files' sizes."""
    seen: dict[tuple[int, int], list[int]] = {}  # inode -> [links, seen, allocated]
    logical: dict[str, int] = {}
    owner: dict[tuple[int, int], str] = {}
    for path in paths:
        logical[path] = 0
        for status in _statuses(folder, path):
            if _is_dir(status):
                continue
            key = (status.st_dev, status.st_ino)
            logical[path] += status.st_size
            if key in seen:
                seen[key][1] += 1
                continue
            seen[key] = [status.st_nlink, 1, status.st_blocks * 512]
            owner[key] = path
    freed = dict.fromkeys(logical, 0)
    for key, (links, count, allocated) in seen.items():
        if count >= links:
            freed[owner[key]] += allocated
    return [SlimmedFile(path, freed[path], logical[path]) for path in logical]


def _statuses(folder: int, path: str) -> Iterator[os.stat_result]:
    """Given an open folder and a path inside it, yield the lstat of it and all below it."""
    *parents, name = path.split("/")
    with contextlib.ExitStack() as stack:
        parent = folder
        for part in parents:
            parent = stack.enter_context(open_folder(part, parent))
        try:
            status = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return
        yield status
        if _is_dir(status):
            with open_folder(name, parent) as inner:
                yield from _tree(inner)


def _tree(folder: int) -> Iterator[os.stat_result]:
    for name, status in _entries(folder):
        yield status
        if _is_dir(status):
            with contextlib.suppress(OSError), open_folder(name, folder) as inner:
                yield from _tree(inner)


# --- what slimming left behind -------------------------------------------------------------------


def read_record(root: str | int, name: str) -> SlimRecord | None:
    """Given a root (path or descriptor) and a checkpoint name, return its `.ckptd-slim.json`
    (None: not slimmed, or the record is not a plain readable file)."""
    try:
        with open_checkpoint(root, name) as folder:
            descriptor = os.open(SLIM_RECORD, _READ_FLAGS, dir_fd=folder)
            try:
                if not _is_file(os.fstat(descriptor)):
                    return None
                data = os.read(descriptor, RECORD_LIMIT)
            finally:
                os.close(descriptor)
    except OSError:
        return None
    try:
        return SlimRecord.from_json(json.loads(data))
    except ValueError:
        return None


def is_slimmed(root: str | int, name: str) -> bool:
    """Given a root and a checkpoint name, return whether ckptd slimmed it (its resume state
    moved out: a resume from it would start a fresh optimizer). For `ckptd last-good`."""
    try:
        with open_checkpoint(root, name) as folder:
            return _is_file(os.lstat(SLIM_RECORD, dir_fd=folder))
    except OSError:
        return False


# --- the plan's slims ----------------------------------------------------------------------------


def resolve(plan: Plan, specs: Mapping[str, PolicySpec]) -> Plan:
    """Given a plan and each series' policy, return it with what each slim moves out found
    (`plan.slim_targets`); a checkpoint with nothing to move out is kept whole, and says why
    (`not-slimmable:<why>`), as is one a protection added after the policy names (a hold,
    `last-good`: `slim-vetoed:held`). Call it after those protections."""
    if not plan.slimmed:
        return plan
    targets: dict[str, SlimTarget] = {}
    decisions: list[Decision] = []
    try:
        root = os.open(plan.root, _DIRECTORY_FLAGS)
    except OSError as error:
        why = f"not-slimmable:root unreadable: {error.strerror or error}"
        return replace(plan, decisions=tuple(unslim(d, why) for d in plan.decisions))
    try:
        for decision in plan.decisions:
            if not decision.slim:
                decisions.append(decision)
                continue
            blockers = slim_blockers(decision)
            if blockers:
                # Protections added after the policy (a hold, `last-good`) keep it whole.
                decisions.append(unslim(decision, "slim-vetoed:" + ", ".join(blockers)))
                continue
            target, problem = _target(root, decision.checkpoint, specs)
            if target is None:
                why = f"not-slimmable:{problem or 'nothing to slim'}"
                decisions.append(unslim(decision, why))
            else:
                targets[decision.checkpoint.name] = target
                decisions.append(decision)
    finally:
        os.close(root)
    return replace(plan, decisions=tuple(decisions), slim_targets=targets)


def _target(
    root: int, checkpoint: Checkpoint, specs: Mapping[str, PolicySpec]
) -> tuple[SlimTarget | None, str | None]:
    spec = specs.get(checkpoint.series) or specs.get("default")
    drop = spec.slim.drop if spec is not None and spec.slim is not None else None
    selection = resume_state(root, checkpoint, drop)
    if not selection.paths:
        layout_problem = NOT_SLIMMABLE.get(checkpoint.layout, NOT_SLIMMABLE["custom"])
        return None, selection.problem or layout_problem
    try:
        with open_folder(checkpoint.name, root) as folder:
            sizes = measure(folder, selection.paths)
    except OSError as error:
        return None, f"unreadable: {error.strerror or error}"
    return (
        SlimTarget(
            paths=selection.paths,
            bytes_freed=sum(entry.bytes_freed for entry in sizes),
            bytes_logical=sum(entry.bytes_logical for entry in sizes),
        ),
        None,
    )


# --- the share slimming frees, measured ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeasuredFraction:
    """Given a root measured: the share of a checkpoint its resume state is (None: unknown,
    and why), and which checkpoint says so."""

    fraction: float | None
    problem: str | None = None
    source: str = ""


def measure_slim_fraction(
    root_path: str, *, now: float, settle_seconds: float = 60.0
) -> MeasuredFraction:
    """Given a root, return the share of a checkpoint slimming moves out, from its own files:
    the newest slimmed checkpoint's record (what left, against what stayed), else the newest
    complete checkpoint's resume state by the layout's names (file sizes, not allocation: a
    sparse or half-copied file says nothing of the next one)."""
    root = RootConfig(path=os.path.realpath(root_path))
    result = scan(root, now=now, settle_seconds=settle_seconds)
    complete = sorted((c for c in result.checkpoints if c.complete), key=lambda c: c.step)
    if not complete:
        return MeasuredFraction(None, f"no complete checkpoint in {result.root}")
    for checkpoint in reversed(complete):
        record = read_record(result.root, checkpoint.name) if checkpoint.slimmed else None
        if record is not None and record.bytes_logical + checkpoint.size_bytes > 0:
            whole = record.bytes_logical + checkpoint.size_bytes
            return MeasuredFraction(
                record.bytes_logical / whole, source=f"{checkpoint.name} (slimmed)"
            )
    newest = complete[-1]
    selection = resume_state(result.root, newest)
    if not selection.paths or newest.size_bytes <= 0:
        layout_problem = NOT_SLIMMABLE.get(newest.layout, NOT_SLIMMABLE["custom"])
        return MeasuredFraction(None, f"{newest.name}: {selection.problem or layout_problem}")
    with open_checkpoint(result.root, newest.name) as folder:
        logical = sum(entry.bytes_logical for entry in measure(folder, selection.paths))
    return MeasuredFraction(logical / newest.size_bytes, source=newest.name)
