"""contrib/grafana/ckptd.json: every query names only metrics the daemon exports, with labels
those metrics have; every panel has a query; the metrics of the issue are all on it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana" / "ckptd.json"
METRIC = re.compile(r"\bckptd_[a-z0-9_]+")
# `name{label="..", other=~".."}`: the label names inside one selector.
SELECTOR = re.compile(r"\b(ckptd_[a-z0-9_]+)\{([^}]*)\}")
GROUPING = re.compile(r"\bby \(([^)]*)\)")


def exported() -> dict[str, set[str]]:
    """Every sample name the daemon's registry can expose, with its labels."""
    names: dict[str, set[str]] = {}
    for family in Metrics().registry.collect():
        labels = set(family.samples[0].labels) if family.samples else set()
        # A labelled metric has no sample until used: its label names are on the collector.
        labels |= _label_names(family.name)
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",),
        }[family.type]
        for suffix in suffixes:
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def _label_names(family: str) -> set[str]:
    metrics = Metrics()
    for value in vars(metrics).values():
        if getattr(value, "_name", None) in (family, family + "_total"):
            return set(value._labelnames)
    return set()


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"${variable['name']}", variable["query"]["query"]


def load() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def test_every_query_names_only_exported_metrics_and_their_labels() -> None:
    names = exported()
    problems = []
    for where, expr in queries(load()):
        used = METRIC.findall(expr)
        if not used:
            problems.append(f"{where}: no ckptd metric in {expr!r}")
        problems += [f"{where}: {name} is not exported" for name in used if name not in names]
        for name, matchers in SELECTOR.findall(expr):
            for matcher in filter(None, (m.strip() for m in matchers.split(","))):
                label = re.split(r"=~|!~|!=|=", matcher)[0].strip()
                if label not in names.get(name, set()):
                    problems.append(f"{where}: {name} has no label {label!r}")
        for grouping in GROUPING.findall(expr):
            for label in (part.strip() for part in grouping.split(",")):
                if not any(label in names.get(name, set()) for name in used):
                    problems.append(f"{where}: no metric of {expr!r} has label {label!r}")
        if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
            problems.append(f"{where}: unbalanced {expr!r}")
    assert problems == []


def test_every_panel_has_a_query_and_the_dashboard_covers_the_metrics() -> None:
    dashboard = load()
    graphs = [p for p in panels(dashboard["panels"]) if p["type"] != "row"]
    assert graphs and all(p.get("targets") for p in graphs)
    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    used = {name for _, expr in queries(dashboard) for name in METRIC.findall(expr)}
    for required in (
        "ckptd_checkpoints",
        "ckptd_checkpoint_bytes",
        "ckptd_trash_bytes",
        "ckptd_incomplete_checkpoints",
        "ckptd_deleted_bytes_total",
        "ckptd_deleted_checkpoints_total",
        "ckptd_vetoes_total",
        "ckptd_refusals_total",
        "ckptd_last_prune_success_timestamp_seconds",
        "ckptd_last_snapshot_success_timestamp_seconds",
        "ckptd_last_disk_check_timestamp_seconds",
        "ckptd_filesystem_used_ratio",
        "ckptd_filesystem_free_bytes",
        "ckptd_prune_duration_seconds_bucket",
    ):
        assert required in used, required


def test_the_checker_catches_a_metric_the_daemon_does_not_export() -> None:
    names = exported()
    assert "ckptd_checkpoints" in names and "ckptd_deleted_bytes_total" in names
    assert "ckptd_deleted_bytes" not in names  # a counter is exposed with _total
    assert names["ckptd_checkpoints"] == {"root", "tier"}
    assert "ckptd_prune_duration_seconds_bucket" in names
    assert "ckptd_checkpoints_total" not in names
