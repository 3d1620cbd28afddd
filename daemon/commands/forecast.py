"""`ckptd forecast --steps N --every N --size SIZE [policy options] [--json]`.

How many checkpoints, and how many bytes, a run leaves behind after N steps with and without the
retention policy: the arithmetic behind choosing a preset before the disk fills.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

from rich.console import Console
from rich.table import Table

from daemon.config import parse_size
from daemon.errors import UsageError
from daemon.render import format_bytes, make_console
from daemon.slimming import measure_slim_fraction
from policies.forecast import Forecast, forecast
from policies.model import PRESETS, PolicySpec, SlimSpec


def policy_from_arguments(args: argparse.Namespace) -> tuple[str, list[str], PolicySpec]:
    """Given the parsed policy options, return the preset's name, the knobs given on the command
    line, and the PolicySpec: the preset (balanced by default) with each knob overriding it."""
    preset = args.preset or "balanced"
    spec = PRESETS[preset]
    overrides: dict[str, Any] = {}
    if args.keep_last is not None:
        if args.keep_last < 1:
            raise UsageError(f"--keep-last must be at least 1, not {args.keep_last}")
        overrides["keep_last"] = args.keep_last
    if args.tier2_count is not None:
        if args.tier2_count < 0:
            raise UsageError(f"--tier2-count must not be negative, not {args.tier2_count}")
        overrides["tier2_count"] = args.tier2_count
    if args.tier3_interval is not None:
        overrides["tier3_interval"] = parse_tier3_interval(args.tier3_interval)
    if args.cadence is not None:
        if args.cadence < 1:
            raise UsageError(f"--cadence must be at least 1, not {args.cadence}")
        overrides["cadence"] = args.cadence
    return preset, sorted(overrides), replace(spec, **overrides)


def parse_tier3_interval(text: str) -> int | None:
    """Given the --tier3-interval text, return the interval, or None for 'none'."""
    if text.strip().lower() in {"none", "null"}:
        return None
    try:
        interval = int(text)
    except ValueError:
        raise UsageError(
            f"--tier3-interval takes a number of steps or 'none', not {text!r}"
        ) from None
    if interval < 1:
        raise UsageError(f"--tier3-interval must be at least 1 (or 'none'), not {interval}")
    return interval


def slim_fraction_from_arguments(args: argparse.Namespace) -> float | None:
    """Given the parsed forecast arguments, return the slim fraction asked for (None: no slim
    row): `--slim-fraction F`, or measured in `--slim-from ROOT`."""
    if args.slim_fraction is not None and args.slim_from is not None:
        raise UsageError("give --slim-fraction or --slim-from, not both")
    if args.slim_fraction is not None:
        if not 0.0 <= args.slim_fraction <= 1.0:
            raise UsageError(f"--slim-fraction must be between 0 and 1, not {args.slim_fraction}")
        return float(args.slim_fraction)
    if args.slim_from is None:
        return None
    measured = measure_slim_fraction(args.slim_from, now=time.time())
    if measured.fraction is None:
        raise UsageError(f"--slim-from {args.slim_from}: {measured.problem}")
    return measured.fraction


def main(args: argparse.Namespace) -> int:
    """Given parsed `forecast` arguments, print the forecast and return the exit code."""
    if args.steps < 0:
        raise UsageError(f"--steps must not be negative, not {args.steps}")
    if args.every < 1:
        raise UsageError(f"--every must be at least 1, not {args.every}")
    try:
        size_bytes = parse_size(args.size)
    except ValueError as error:
        raise UsageError(f"--size: {error}") from None
    preset, overridden, spec = policy_from_arguments(args)
    fraction = slim_fraction_from_arguments(args)
    if fraction is not None:
        spec = replace(spec, slim=SlimSpec(args.slim_after))
    try:
        result = forecast(args.steps, args.every, size_bytes, spec, fraction or 0.0)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.json:
        json.dump(forecast_to_json(result, preset, overridden), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_forecast(make_console(), result, preset, overridden)
    return 0


def forecast_to_json(result: Forecast, preset: str, overridden: list[str]) -> dict[str, Any]:
    """Given a forecast, return `forecast --json`'s document."""
    spec = result.spec
    return {
        "steps": result.steps,
        "every": result.every,
        "size_bytes": result.size_bytes,
        "policy": {
            "preset": preset,
            "overridden": overridden,
            "keep_last": spec.keep_last,
            "tier2_count": spec.tier2_count,
            "tier3_interval": spec.tier3_interval,
            "cadence": result.cadence,
        },
        "without_policy": {"checkpoints": result.saves, "bytes": result.bytes_without_policy},
        "with_policy": {
            "checkpoints": result.kept,
            "bytes": result.bytes_with_policy,
            "by_tier": dict(zip(("tier1", "tier2", "tier3"), result.kept_by_tier, strict=True)),
        },
        "saved": {"checkpoints": result.deleted, "bytes": result.bytes_saved},
        **({"with_slim": _slim_json(result)} if spec.slim is not None else {}),
    }


def _slim_json(result: Forecast) -> dict[str, Any]:
    assert result.spec.slim is not None
    return {
        "after": result.spec.slim.after,
        "slim_fraction": result.slim_fraction,
        "checkpoints": result.kept,
        "slimmed": result.slimmed,
        "bytes": result.bytes_with_slim,
        "bytes_slimmed": result.bytes_slimmed,
    }


def print_forecast(console: Console, result: Forecast, preset: str, overridden: list[str]) -> None:
    """Given a forecast, print it for people: a table without / with / saved, and the tiers."""
    spec = result.spec
    console.print(
        f"After {result.steps:,} steps, saving every {result.every:,} steps, "
        f"{format_bytes(result.size_bytes)} per checkpoint:",
        soft_wrap=True,
    )
    table = Table(title=None, show_edge=False, pad_edge=False)
    table.add_column("")
    table.add_column("checkpoints", justify="right")
    table.add_column("size", justify="right")
    table.add_row("without policy", f"{result.saves:,}", format_bytes(result.bytes_without_policy))
    table.add_row("with policy", f"{result.kept:,}", format_bytes(result.bytes_with_policy))
    if spec.slim is not None:
        table.add_row(
            "with slim",
            f"{result.kept:,} ({result.slimmed:,} slimmed)",
            format_bytes(result.bytes_with_slim),
        )
    share = f" ({result.deleted / result.saves:.1%})" if result.saves else ""
    table.add_row("saved", f"{result.deleted:,}{share}", format_bytes(result.bytes_saved))
    console.print(table)
    tier1, tier2, tier3 = result.kept_by_tier
    tier3_rule = (
        f"one per {spec.tier3_interval:,} steps" if spec.tier3_interval else "nothing past tier 2"
    )
    origin = f"{preset} preset" + (", overridden: " + ", ".join(overridden) if overridden else "")
    console.print(
        f"Policy: keep_last {spec.keep_last}, tier2_count {spec.tier2_count}, "
        f"tier3_interval {spec.tier3_interval or 'none'} ({origin}).",
        soft_wrap=True,
    )
    if result.saves:
        console.print(
            f"Kept: {tier1:,} in tier 1 (all), {tier2:,} in tier 2 (every "
            f"{2 * result.cadence:,} steps), {tier3:,} in tier 3 ({tier3_rule}).",
            soft_wrap=True,
        )
    if spec.slim is not None:
        slimmed_tiers = "tiers 2 and 3" if spec.slim.after == "tier1" else "tier 3"
        console.print(
            f"Slim: {slimmed_tiers} keep their weights only, {result.slim_fraction:.0%} of "
            f"each checkpoint moved out (frees {format_bytes(result.bytes_slimmed)} more).",
            soft_wrap=True,
        )
