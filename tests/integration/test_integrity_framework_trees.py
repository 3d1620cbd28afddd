"""No false positive on the recorded real-framework trees (`tests/fixtures/frameworks/trees/`).

Those trees record every file a framework wrote, with the bytes of the small structural ones
(indexes, metadata, trackers) and only the size of payload files. They are laid out here with
sparse payloads of the recorded size; a safetensors file whose header was recorded gets that
header back (padded to its recorded size), so its check is a real one. A problem may then only
be about a payload file whose bytes were not recorded (a `.pt` of zeros is rightly not a
torch.save file); everything else, the checks of `.metadata`, `.index`, OCDBT manifests, JSON
and trackers included, must pass.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.integrity.check import check_checkpoint
from daemon.integrity.trackers import check_root_trackers

FRAMEWORKS = Path(__file__).resolve().parents[1] / "fixtures" / "frameworks"

if not (FRAMEWORKS / "materialize.py").exists():
    pytest.skip("the recorded framework trees are not in this checkout", allow_module_level=True)

sys.path.insert(0, str(FRAMEWORKS))
import materialize  # noqa: E402


def _restore_safetensors(path: Path, header: dict[str, Any], size: int) -> bool:
    """Given a sparse file and its recorded header, write the header back; return whether the
    header fits the recorded size (then the file is a real safetensors file again)."""
    data_bytes = max(
        (info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"),
        default=0,
    )
    raw = json.dumps(header, separators=(",", ":")).encode()
    room = size - 8 - data_bytes
    if room < len(raw):
        return False
    with open(path, "r+b") as handle:
        handle.write(struct.pack("<Q", room) + raw.ljust(room, b" "))
    return True


def _lay_out(document: dict[str, Any], destination: Path) -> set[str]:
    """Given a recorded tree, lay it out; return the paths whose bytes are real."""
    materialize.materialize(document, destination, sparse=True)
    real: set[str] = set()
    for entry in document["entries"]:
        if entry["type"] != "file":
            continue
        recorded = "content" in entry or "content_b64" in entry
        restored = "safetensors_header" in entry and _restore_safetensors(
            destination / entry["path"], entry["safetensors_header"], int(entry["size"])
        )
        if recorded or restored:
            real.add(entry["path"])
    return real


def _name_of(members: list[str]) -> str:
    if len(members) == 1:
        return members[0]
    stems = {member.split(".", 1)[0] for member in members}
    assert len(stems) == 1, members
    return stems.pop()


TREES = materialize.tree_names()


@pytest.mark.parametrize("tree", TREES)
def test_no_complete_checkpoint_of_a_recorded_tree_is_flagged(tree: str, tmp_path: Path) -> None:
    document = materialize.load_tree(tree)
    real = _lay_out(document, tmp_path)
    root_relative = document["root"]
    root = tmp_path / root_relative
    layout = document["expect"]["layout"]
    checked = 0
    for checkpoint in document["expect"]["checkpoints"]:
        if not checkpoint["complete"]:
            continue
        name = _name_of(checkpoint["members"])
        result = check_checkpoint(root, name, layout)
        base = f"{root_relative}/{name}/" if (root / name).is_dir() else f"{root_relative}/"
        for problem in result.problems:
            path = base + problem.split(": ", 1)[0]
            assert path not in real, f"{tree}/{name}: {problem}"
            assert (tmp_path / path).exists(), f"{tree}/{name}: {problem}"
        if not result.problems:
            assert result.status == "ok", (tree, name, result.skipped)
        checked += 1
    assert checked > 0
    trackers = check_root_trackers(root)
    assert trackers.problems == (), trackers.problems


def test_the_structural_files_of_the_recorded_trees_were_really_checked(tmp_path: Path) -> None:
    # The trees whose structure is all recorded come out "ok" outright.
    outright = {"tf-complete": "ckpt-3", "orbax-complete": "3", "dcp-step-complete": "step_3"}
    for tree, name in outright.items():
        if tree not in TREES:
            continue
        document = materialize.load_tree(tree)
        _lay_out(document, tmp_path / tree)
        result = check_checkpoint(
            tmp_path / tree / document["root"], name, document["expect"]["layout"]
        )
        assert result.status == "ok", (tree, result.problems, result.skipped)
        assert len(result.checked_files) >= 2
