"""Discovery on checkpoint trees that real ML frameworks wrote (issue 9, point 2).

Each tree under `tests/fixtures/frameworks/trees/` was recorded by `generate.py` from real saves
(or, marked `source: derived ...`, from the framework's source code), and carries what ckptd
should say about it (`expect`). This module imports no framework: the trees are laid out on disk
by `materialize` (file contents shrunk) and scanned with the auto-detected layout.

- `complete` trees: every checkpoint is found with its step, complete, with exactly its root
  entries; the layout is auto-detected right; nothing else is counted as a checkpoint.
- `in-flight` / `crashed` trees: the save in progress (or cut off) is found as an INCOMPLETE
  checkpoint at its step (so the daemon can show and clean it), never as a complete one; the
  finished saves beside it are as above.

`now` is far past every mtime: settle time never hides a wrong answer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from daemon.config import RootConfig
from daemon.discovery.scan import scan
from tests.fixtures.frameworks.materialize import load_tree, materialize, tree_names

NAMES = tree_names()
LATER = 10 * 24 * 3600.0


def _scan_tree(name: str, tmp_path: Path) -> tuple[dict[str, Any], Any]:
    tree = load_tree(name)
    materialize(tree, tmp_path / "tree")
    root = tmp_path / "tree" / tree["root"]
    result = scan(RootConfig(path=str(root)), now=time.time() + LATER, settle_seconds=60)
    return tree, result


def test_trees_were_recorded() -> None:
    assert NAMES, "no recorded trees: run tests/fixtures/frameworks/generate.py"
    for name in NAMES:
        tree = load_tree(name)
        assert tree["name"] == name
        assert tree["scenario"] in ("complete", "in-flight", "crashed")
        assert tree["source"] == "real" or tree["source"].startswith("derived from ")
        assert tree["expect"]["checkpoints"], name


@pytest.mark.parametrize("name", NAMES)
def test_materialized_tree_matches_its_record(name: str, tmp_path: Path) -> None:
    tree = load_tree(name)
    materialize(tree, tmp_path, max_file_bytes=64)
    for entry in tree["entries"]:
        path = tmp_path / entry["path"]
        if entry["type"] == "symlink":
            assert path.is_symlink(), entry["path"]
        elif entry["type"] == "dir":
            assert path.is_dir() and not path.is_symlink(), entry["path"]
        else:
            assert path.is_file() and not path.is_symlink(), entry["path"]
            if "content" in entry or "content_b64" in entry:
                assert path.stat().st_size == entry["size"], entry["path"]


@pytest.mark.parametrize("name", NAMES)
def test_discovery_sees_what_the_framework_wrote(name: str, tmp_path: Path) -> None:
    tree, result = _scan_tree(name, tmp_path)
    expect = tree["expect"]
    found = [
        (
            checkpoint.name,
            checkpoint.step,
            checkpoint.complete,
            checkpoint.members,
            checkpoint.incomplete_reason,
        )
        for checkpoint in result.checkpoints
    ]
    problems: list[str] = []
    if result.layout != expect["layout"]:
        problems.append(f"layout {result.layout!r}, expected {expect['layout']!r}")
    claimed: set[int] = set()
    for wanted in expect["checkpoints"]:
        step, complete, members = wanted["step"], wanted["complete"], set(wanted["members"])
        candidates = [
            index
            for index, (_, found_step, _, found_members, _) in enumerate(found)
            if found_step == step and members <= set(found_members) and index not in claimed
        ]
        if not candidates:
            problems.append(
                f"step {step} ({'complete' if complete else 'incomplete'}, entries "
                f"{sorted(members)}) not found"
            )
            continue
        index = candidates[0]
        claimed.add(index)
        checkpoint_name, _, found_complete, found_members, reason = found[index]
        if complete and set(found_members) != members:
            problems.append(
                f"{checkpoint_name}: entries {sorted(found_members)}, expected {sorted(members)}"
            )
        if found_complete != complete:
            state = "complete" if found_complete else f"incomplete ({reason})"
            problems.append(
                f"{checkpoint_name} (step {step}) reported {state}, expected "
                f"{'complete' if complete else 'incomplete'}"
            )
    incomplete_steps = {
        wanted["step"] for wanted in expect["checkpoints"] if not wanted["complete"]
    }
    for index, (checkpoint_name, step, found_complete, _, reason) in enumerate(found):
        if index in claimed:
            continue
        if found_complete and step in incomplete_steps:
            problems.append(
                f"{checkpoint_name}: the save in progress at step {step} counted as complete"
            )
        elif found_complete:
            problems.append(
                f"{checkpoint_name} (step {step}) counted as a complete checkpoint but is none"
            )
        elif step not in incomplete_steps:
            problems.append(
                f"{checkpoint_name} (step {step}) counted as a checkpoint ({reason}) but is none"
            )
    assert not problems, (
        f"{name} ({tree['scenario']}, layout {result.layout}):\n  "
        + ("\n  ".join(problems))
        + f"\n  found: {[(n, s, c) for n, s, c, _, _ in found]}"
    )
