"""The on-disk layouts ckptd knows: how a root entry's name says "checkpoint of step N".

Pure name matching (no I/O): discovery lists a root once and asks this module which names are
checkpoints, of which series, at which step. What "complete" means per layout lives in
discovery, which has the files at hand.

| layout     | names (root entries)                                          | series id           |
|------------|---------------------------------------------------------------|---------------------|
| hf         | `checkpoint-<step>/`                                          | `hf`                |
| pt         | `mid_epoch_<e>_<step>.pt`, `checkpoint_epoch_<e>.pt`,         | its name's pattern  |
|            | `<prefix>_<step>.pt` (also `.pth`)                            | (`model_{step}.pt`) |
| lightning  | `[<prefix>-]epoch=<e>-step=<s>*.ckpt` (file or folder; a      | `lightning`         |
|            | folder may drop `.ckpt`, as NeMo's do), `-v<n>` a re-save     |                     |
| deepspeed  | `global_step<step>/`                                          | `deepspeed`         |
| megatron   | `iter_<7+ digits>/`                                           | `megatron`          |
| orbax      | `<step>/`, `step_<step>/`; in flight                          | `orbax`             |
|            | `<name>.orbax-checkpoint-tmp/` (`-<timestamp>` after it       |                     |
|            | before orbax 0.12)                                            |                     |
| dcp        | a folder whose name ends in digits (holding `*.distcp`)       | `dcp`               |
| tf         | `<stem>-<n>.index` + `<stem>-<n>.data-*` (+ `.meta`); in      | `tf`                |
|            | flight the folder `<stem>-<n>_temp/`                          |                     |

A save in flight in a framework's temporary name (`NameMatch.temporary`: Orbax's
`3.orbax-checkpoint-tmp/`, TensorFlow's `ckpt-3_temp/`) is a checkpoint of its own at the step
it will have, never complete: the finished checkpoint, once renamed or merged, has another
name, so the two are never one checkpoint (a crashed save's leftover beside a later good save
of the same step must go alone).

Lightning names the second file of one step (a second run into the same folder)
`epoch=0-step=3-v1.ckpt`: `NameMatch.version` orders equal steps (no suffix is version 0). A
name ending in `-last` (NeMo's `...-step=9-last/`, a full copy the resume picks) is no series
member, like Lightning's `last.ckpt`.

The pt layout is the one exception to "one series per layout": a folder of `model_100.pt`,
`mid_epoch_2_1500.pt` and `checkpoint_epoch_3.pt` holds three different rotations, so each
naming pattern found is its own series (ordering an epoch number among step numbers would be
nonsense). `best.pt` and `last.pt` carry no number and are never series members.

A custom pattern such as `"ckpt-{step}"`, `"mid_epoch_{epoch}_{step}.pt"` or
`"checkpoint_epoch_{epoch}.pt"` compiles to a regular expression: `{step}` and `{epoch}` match
digits, `*` matches anything, everything else matches itself. A series is ordered by `{step}`,
or by `{epoch}` where the pattern has no step (the checkpoint's `step` is then its epoch).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, NamedTuple

from daemon.errors import UsageError

LAYOUTS: Final = ("hf", "pt", "lightning", "deepspeed", "megatron", "orbax", "dcp", "tf")

# Tracker files at the top of a root, per layout: they name the newest checkpoint.
DEEPSPEED_TRACKER: Final = "latest"
MEGATRON_TRACKER: Final = "latest_checkpointed_iteration.txt"
TF_TRACKER: Final = "checkpoint"

_NO_METRICS: Mapping[str, float] = MappingProxyType({})


class NameMatch(NamedTuple):
    """Given a root entry's name that is (part of) a checkpoint: what its name says.

    `checkpoint` is the checkpoint's name (the entry's name, or the common stem of a multi-file
    TensorFlow checkpoint); `metrics` are numbers carried in the name (Lightning's
    `epoch=3-step=1200-val_loss=0.31.ckpt`); `version` orders names of one step (Lightning's
    `-v1`); `temporary` marks a framework's temporary name of a save in flight.
    """

    series: str
    step: int
    epoch: int | None
    checkpoint: str
    metrics: Mapping[str, float] = _NO_METRICS
    version: int = 0
    temporary: bool = False


# --- built-in layouts ---------------------------------------------------------------------------

_HF = re.compile(r"checkpoint-(\d+)")
_PT_MID_EPOCH = re.compile(r"mid_epoch_(\d+)_(\d+)\.pth?")
_PT_EPOCH = re.compile(r"checkpoint_epoch_(\d+)\.pth?")
_PT_STEP = re.compile(r"(.+)_(\d+)\.(pth?)")
_LIGHTNING = re.compile(
    r"(?:(?P<prefix>.*?)-)?epoch=(?P<epoch>\d+)-step=(?P<step>\d+)(?P<rest>.*?)"
    r"(?:-v(?P<version>\d+))?(?P<suffix>\.ckpt)?"
)
_LIGHTNING_METRIC = re.compile(r"-?([A-Za-z_][\w/]*)=(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
_DEEPSPEED = re.compile(r"global_step(\d+)")
_MEGATRON = re.compile(r"iter_(\d{7,})")  # `iter_{:07d}`: eight digits from 10,000,000
# orbax 0.12 writes `<name>.orbax-checkpoint-tmp`; earlier versions added `-<timestamp>`.
_ORBAX = re.compile(r"(?:step_)?(\d+)(?P<temporary>\.orbax-checkpoint-tmp(?:-\d+)?)?")
_DCP = re.compile(r"(?:.*?\D)?(\d+)")
_TF = re.compile(r"(.+-(\d+))\.(?:index|meta|data-\d+-of-\d+)")
_TF_TEMPORARY = re.compile(r".+-(\d+)_temp")  # `sharded_suffix = "_temp/part"` (functional_saver)


def _match_hf(name: str, is_dir: bool) -> NameMatch | None:
    if is_dir and (found := _HF.fullmatch(name)):
        return NameMatch("hf", int(found.group(1)), None, name)
    return None


def _match_pt(name: str, is_dir: bool) -> NameMatch | None:
    if is_dir or not name.endswith((".pt", ".pth")):
        return None
    if found := _PT_MID_EPOCH.fullmatch(name):
        return NameMatch(
            "mid_epoch_{epoch}_{step}" + name[name.rindex(".") :],
            int(found.group(2)),
            int(found.group(1)),
            name,
        )
    if found := _PT_EPOCH.fullmatch(name):
        epoch = int(found.group(1))
        return NameMatch("checkpoint_epoch_{epoch}" + name[name.rindex(".") :], epoch, epoch, name)
    if found := _PT_STEP.fullmatch(name):
        prefix = found.group(1)
        return NameMatch(f"{prefix}_{{step}}.{found.group(3)}", int(found.group(2)), None, name)
    return None


def _match_lightning(name: str, is_dir: bool) -> NameMatch | None:
    found = _LIGHTNING.fullmatch(name)
    if found is None or (found.group("suffix") is None and not is_dir):
        return None
    rest = found.group("rest")
    if rest.endswith("-last"):
        return None  # NeMo's `<name>-last`: a copy of the newest, no series member
    metrics = {
        key: float(value)
        for part in (found.group("prefix") or "", rest)
        for key, value in _LIGHTNING_METRIC.findall(part)
    }
    return NameMatch(
        "lightning",
        int(found.group("step")),
        int(found.group("epoch")),
        name,
        MappingProxyType(metrics) if metrics else _NO_METRICS,
        version=int(found.group("version") or 0),
    )


def _match_deepspeed(name: str, is_dir: bool) -> NameMatch | None:
    if is_dir and (found := _DEEPSPEED.fullmatch(name)):
        return NameMatch("deepspeed", int(found.group(1)), None, name)
    return None


def _match_megatron(name: str, is_dir: bool) -> NameMatch | None:
    if is_dir and (found := _MEGATRON.fullmatch(name)):
        return NameMatch("megatron", int(found.group(1)), None, name)
    return None


def _match_orbax(name: str, is_dir: bool) -> NameMatch | None:
    if is_dir and (found := _ORBAX.fullmatch(name)):
        temporary = found.group("temporary") is not None
        return NameMatch("orbax", int(found.group(1)), None, name, temporary=temporary)
    return None


def _match_dcp(name: str, is_dir: bool) -> NameMatch | None:
    if is_dir and not name.startswith(".") and (found := _DCP.fullmatch(name)):
        return NameMatch("dcp", int(found.group(1)), None, name)
    return None


def _match_tf(name: str, is_dir: bool) -> NameMatch | None:
    if not is_dir:
        found = _TF.fullmatch(name)
        return NameMatch("tf", int(found.group(2)), None, found.group(1)) if found else None
    if found := _TF_TEMPORARY.fullmatch(name):
        return NameMatch("tf", int(found.group(1)), None, name, temporary=True)
    return None


MATCHERS: Final[Mapping[str, Callable[[str, bool], NameMatch | None]]] = MappingProxyType(
    {
        "hf": _match_hf,
        "pt": _match_pt,
        "lightning": _match_lightning,
        "deepspeed": _match_deepspeed,
        "megatron": _match_megatron,
        "orbax": _match_orbax,
        "dcp": _match_dcp,
        "tf": _match_tf,
    }
)


def match_builtin(layout: str, name: str, is_dir: bool) -> NameMatch | None:
    """Given a layout, a root entry's name and whether it is a folder, return what the name says
    under that layout, or None when the entry is not (part of) one of its checkpoints."""
    try:
        matcher = MATCHERS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}") from None
    return matcher(name, is_dir)


# The order auto-detection breaks ties in: the most specific names first.
_DETECTION_ORDER: Final = ("hf", "deepspeed", "megatron", "lightning", "tf", "pt", "orbax")
_TRACKER_OF: Final = {
    DEEPSPEED_TRACKER: "deepspeed",
    MEGATRON_TRACKER: "megatron",
    TF_TRACKER: "tf",
}


DCP_CANDIDATE: Final = "dcp?"
"""`first_layout`'s answer for a numbered folder no other layout claims (maybe dcp)."""


def first_layout(name: str, is_dir: bool) -> tuple[str | None, NameMatch | None]:
    """Given a root entry, return the first layout (in detection order) whose names it fits and
    that layout's match; `(DCP_CANDIDATE, match)` for a numbered folder none claims; else
    `(None, None)`."""
    for layout in _DETECTION_ORDER:
        found = MATCHERS[layout](name, is_dir)
        if found is not None:
            return layout, found
    if is_dir:
        found = _match_dcp(name, is_dir)
        if found is not None:
            return DCP_CANDIDATE, found
    return None, None


def choose_layout(counts: Mapping[str, int], tracker_names: Iterable[str]) -> str | None:
    """Given how many root entries fit each layout and the tracker files present, return the
    layout most entries follow (ties: the most specific), or None when none fits. A tracker
    file (`latest`, ...) counts as one more entry of its layout."""
    totals = {layout: counts.get(layout, 0) for layout in _DETECTION_ORDER}
    for tracker in tracker_names:
        if tracker in _TRACKER_OF:
            totals[_TRACKER_OF[tracker]] += 1
    best = max(_DETECTION_ORDER, key=lambda layout: totals[layout])  # the first wins a tie
    return best if totals[best] else None


# --- custom patterns ----------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(step|epoch)\}|\*|\{[^}]*\}")


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled custom pattern; its `source` string is the series id."""

    source: str
    regex: re.Pattern[str]
    has_step: bool
    has_epoch: bool

    def match(self, name: str) -> NameMatch | None:
        """Given a root entry's name, return what it says under this pattern, or None."""
        found = self.regex.fullmatch(name)
        if found is None:
            return None
        epoch = int(found.group("epoch")) if self.has_epoch else None
        step = int(found.group("step")) if self.has_step else epoch
        assert step is not None  # compile_pattern requires a placeholder
        return NameMatch(self.source, step, epoch, name)


def compile_pattern(source: str) -> Pattern:
    """Given a pattern such as `"ckpt-{step}"`, return it compiled; UsageError when it has no
    `{step}` or `{epoch}`, repeats one, or uses an unknown placeholder."""
    parts: list[str] = []
    seen: set[str] = set()
    position = 0
    for found in _PLACEHOLDER.finditer(source):
        parts.append(re.escape(source[position : found.start()]))
        token = found.group(0)
        if token == "*":
            parts.append(".*")
        elif found.group(1) is not None:
            placeholder = found.group(1)
            if placeholder in seen:
                raise UsageError(f"pattern {source!r}: {{{placeholder}}} appears twice")
            seen.add(placeholder)
            parts.append(f"(?P<{placeholder}>\\d+)")
        else:
            raise UsageError(
                f"pattern {source!r}: unknown placeholder {token} (use {{step}} or {{epoch}})"
            )
        position = found.end()
    parts.append(re.escape(source[position:]))
    if not seen:
        raise UsageError(f"pattern {source!r} has no {{step}} or {{epoch}} placeholder")
    return Pattern(source, re.compile("".join(parts)), "step" in seen, "epoch" in seen)
