"""Bytes on disk with and without slimming (issue 11), from a real Hugging Face checkpoint's
file sizes, through the real prune path.

The recorded checkpoint (bench/data/hf-gpt2-small-checkpoint.json: GPT-2 small after one AdamW
step, written by transformers' Trainer; bench/record_hf_checkpoint.py records it again) gives
each file's share of a checkpoint. Each run is laid out at 3.6 GB per checkpoint scaled down
100,000 times (each file keeps its share), pruned by `prune_root` with the balanced preset,
once without and once with `slim: {after: tier1}`, and what is left on disk (the files'
lengths) is scaled back up:

- 170 checkpoints at a 100-step cadence (steps 100 ... 17,000: the 614 GB disk);
- a year at a 100-step cadence (100,000 steps: 1,000 checkpoints).

    PYTHONPATH=. python bench/bench_slim.py [--size 3.6GB]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from daemon.config import (  # noqa: E402
    Config,
    DefaultsConfig,
    PolicyConfig,
    RootConfig,
    SlimConfig,
    TrashConfig,
    VerifyConfig,
    parse_size,
)
from daemon.pruning import pipeline  # noqa: E402
from daemon.render import format_bytes  # noqa: E402
from daemon.slimming import HF_RESUME_FILES, SLIM_RECORD  # noqa: E402
from policies.forecast import forecast  # noqa: E402
from policies.model import PRESETS, SlimSpec  # noqa: E402

RECORDED = REPOSITORY / "bench" / "data" / "hf-gpt2-small-checkpoint.json"
SCALE = 100_000
NOW = 1_800_000_000.0


def recorded_files() -> dict[str, int]:
    document = json.loads(RECORDED.read_text())
    files: dict[str, int] = document["files"]
    return files


def lay_out(root: Path, saves: int, files: dict[str, int], size: int) -> None:
    """Given a root, lay out `saves` checkpoints at a 100-step cadence, each `size` bytes
    scaled down SCALE times, its files in the recorded proportions."""
    total = sum(files.values())
    scaled = {name: max(1, round(length * size / total / SCALE)) for name, length in files.items()}
    for index in range(1, saves + 1):
        folder = root / f"checkpoint-{index * 100}"
        folder.mkdir(parents=True)
        for name, length in scaled.items():
            # JSON files are read by discovery (trainer_state.json): JSON, padded with spaces.
            data = b"{}".ljust(length) if name.endswith(".json") else b"\0" * length
            (folder / name).write_bytes(data)
        stamp = NOW - 86_400 * 365 + index * 60
        for path in [*folder.iterdir(), folder]:
            os.utime(path, (stamp, stamp))


def on_disk(root: Path) -> int:
    """Given a pruned root, return the files' lengths left in its checkpoints, scaled up (the
    `.ckptd-slim.json` records at their real size: they do not grow with the checkpoint)."""
    total = 0
    for folder in root.iterdir():
        if folder.name.startswith("checkpoint-"):
            for path in folder.iterdir():
                length = path.stat().st_size
                total += length if path.name == SLIM_RECORD else length * SCALE
    return total


def prune(root: Path, slim: bool) -> tuple[pipeline.PruneReport, float]:
    policy = PolicyConfig(preset="balanced", slim=SlimConfig(after="tier1") if slim else None)
    root_config = RootConfig(path=str(root), policy=policy)
    config = Config(
        roots=[root_config],
        defaults=DefaultsConfig(settle_seconds=0, min_keep=0, trash=TrashConfig(grace=0)),
        state_dir=str(root.parent / "state"),
        # The laid-out files are zeros in the recorded sizes, not real archives: what is
        # measured here is bytes, so the integrity checks (which would call them corrupt) are off.
        verify=VerifyConfig(checks=False),
    )
    started = time.perf_counter()
    report = pipeline.prune_root(config, root_config, now=NOW, dry_run=False, force=True)
    return report, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="3.6GB", help="one checkpoint's size (default 3.6GB)")
    args = parser.parse_args()
    size = parse_size(args.size)
    files = recorded_files()
    total = sum(files.values())
    resume = sum(
        length
        for name, length in files.items()
        if any(fnmatch.fnmatchcase(name, glob) for glob in HF_RESUME_FILES)
    )
    fraction = resume / total
    print(
        f"recorded checkpoint: {RECORDED.name}: {format_bytes(total)}, resume state "
        f"{format_bytes(resume)} ({fraction:.1%}: optimizer.pt is "
        f"{files['optimizer.pt'] / files['model.safetensors']:.2f}x model.safetensors)"
    )
    print(
        f"at {format_bytes(size)} per checkpoint a slimmed one keeps "
        f"{format_bytes(size * (1 - fraction))}\n"
    )
    rows = []
    for label, saves in (
        ("170 checkpoints (the 614 GB disk)", 170),
        ("1 year, 100,000 steps", 1000),
    ):
        figures = []
        for slim in (False, True):
            with tempfile.TemporaryDirectory(prefix="ckptd-bench-slim-") as base:
                root = Path(base) / "run"
                lay_out(root, saves, files, size)
                report, seconds = prune(root, slim)
                assert not report.failed and report.refused is None, report.errors
                kept = len(report.plan.kept)
                figures.append((kept, len(report.slims.slimmed), on_disk(root), seconds))
        spec = PRESETS["balanced"]
        expected = forecast(saves * 100, 100, size, spec, 0.0)
        with_slim = forecast(
            saves * 100, 100, size, replace(spec, slim=SlimSpec("tier1")), fraction
        )
        assert figures[0][0] == expected.kept and figures[1][1] == with_slim.slimmed
        rows.append((label, saves, figures, with_slim.bytes_with_slim))
    print(
        f"{'run, 100-step cadence':<36}{'without ckptd':>16}{'balanced':>22}{'balanced + slim':>30}"
    )
    for label, saves, figures, forecast_bytes in rows:
        (kept, _, plain, _), (_, slimmed, slim_bytes, seconds) = figures
        print(
            f"{label:<36}{format_bytes(saves * size):>16}"
            f"{f'{kept} kept, {format_bytes(plain)}':>22}"
            f"{f'{slimmed} slimmed, {format_bytes(slim_bytes)}':>30}"
        )
        note = f"(forecast {format_bytes(forecast_bytes)}, {seconds:.1f} s)"
        print(f"{'':<74}{note:>30}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
