"""`policies/` is pure: no I/O, no clock, nothing from `daemon` (DESIGN.md, Layout). So is the
snapshot schedule (`daemon/snapshots/schedule.py`): dates and zones are values it is given.

Checked twice: statically (every module's imports and calls, parsed with `ast`) and at run time
(plan, forecast and the schedule under an `open`, `os.stat`, `os.scandir` and clock that raise).
"""

from __future__ import annotations

import ast
import builtins
import os
import time
from pathlib import Path
from types import MappingProxyType

import pytest

import policies
from daemon.safety.facts import Facts, Holder, ProcessIdentity
from daemon.safety.guard import RootRefused, SafetySettings, guard
from daemon.snapshots import schedule
from policies import PRESETS, Checkpoint, KeepBest, PolicySpec, plan
from policies.forecast import forecast
from policies.model import Decision, Plan

POLICIES_DIR = Path(policies.__file__).resolve().parent
FORBIDDEN_MODULES = {
    "os",
    "pathlib",
    "shutil",
    "subprocess",
    "io",
    "socket",
    "time",
    "datetime",
    "daemon",
    "importlib",
    "tempfile",
    "glob",
    "sys",
}
FORBIDDEN_CALLS = {"open", "__import__", "eval", "exec", "input", "print"}
# Methods that read the clock: `datetime.now()`, `date.today()`, `datetime.utcnow()`.
FORBIDDEN_METHODS = {"now", "today", "utcnow"}
# The schedule works on dates (`datetime` is its subject); the zone is given to it, never read
# (`zoneinfo` reads the zone database, `tzlocal` the machine's settings).
SCHEDULE_FORBIDDEN_MODULES = (FORBIDDEN_MODULES - {"datetime"}) | {"zoneinfo", "tzlocal", "psutil"}
SCHEDULE_MODULE = Path(schedule.__file__).resolve()


def policy_modules() -> list[Path]:
    return sorted(POLICIES_DIR.rglob("*.py"))


def impurities(
    source: str, filename: str, forbidden_modules: set[str] = FORBIDDEN_MODULES
) -> list[str]:
    """Given a module's source, return each forbidden import or call as `file:line what`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in FORBIDDEN_CALLS:
                found.append(f"{filename}:{node.lineno} calls {node.func.id}()")
            continue
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in FORBIDDEN_METHODS:
                found.append(f"{filename}:{node.lineno} calls .{node.func.attr}()")
            elif node.func.attr == "astimezone" and not (node.args or node.keywords):
                # Without a zone it converts to the machine's: a read of its settings.
                found.append(f"{filename}:{node.lineno} calls .astimezone() without a zone")
            continue
        else:
            continue
        for module in modules:
            if module.split(".")[0] in forbidden_modules:
                found.append(f"{filename}:{node.lineno} imports {module}")
    return found


def test_the_package_has_the_modules_we_check() -> None:
    names = {path.name for path in policy_modules()}
    assert {"__init__.py", "model.py", "tiered.py", "forecast.py"} <= names


@pytest.mark.parametrize("path", policy_modules(), ids=lambda path: path.name)
def test_no_module_imports_io_clock_or_daemon_nor_calls_open(path: Path) -> None:
    assert impurities(path.read_text(), path.name) == []


def test_the_snapshot_schedule_imports_no_io_clock_or_zone_database() -> None:
    source = SCHEDULE_MODULE.read_text()
    assert impurities(source, SCHEDULE_MODULE.name, SCHEDULE_FORBIDDEN_MODULES) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os", ["m.py:1 imports os"]),
        ("from os.path import join", ["m.py:1 imports os.path"]),
        ("import datetime as dt", ["m.py:1 imports datetime"]),
        ("from daemon.config import parse_size", ["m.py:1 imports daemon.config"]),
        ("def f():\n    return open('x')", ["m.py:2 calls open()"]),
        ("from . import model\nimport math", []),
        (
            "from datetime import datetime\nx = datetime.now()",
            ["m.py:1 imports datetime", "m.py:2 calls .now()"],
        ),
        ("x = date.today()", ["m.py:1 calls .today()"]),
        ("x = day.isoformat()", []),
        ("x = moment.astimezone()", ["m.py:1 calls .astimezone() without a zone"]),
        ("x = moment.astimezone(zone)", []),
    ],
)
def test_the_static_check_catches_what_it_should(source: str, expected: list[str]) -> None:
    assert impurities(source, "m.py") == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from zoneinfo import ZoneInfo", ["m.py:1 imports zoneinfo"]),
        ("import tzlocal", ["m.py:1 imports tzlocal"]),
        ("from daemon.clock import zone_for", ["m.py:1 imports daemon.clock"]),
        ("from datetime import date, tzinfo", []),
    ],
)
def test_the_schedules_static_check_allows_dates_but_not_zone_lookups(
    source: str, expected: list[str]
) -> None:
    assert impurities(source, "m.py", SCHEDULE_FORBIDDEN_MODULES) == expected


@pytest.fixture
def no_io_no_clock(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every file access and clock read raise, and record any attempt."""
    attempts: list[str] = []

    def refuse(name: str) -> object:
        def refused(*args: object, **kwargs: object) -> object:
            attempts.append(name)
            raise AssertionError(f"policies called {name}")

        return refused

    for module, name in [
        (builtins, "open"),
        (os, "stat"),
        (os, "lstat"),
        (os, "scandir"),
        (os, "listdir"),
        (os, "open"),
        (os, "readlink"),
        (time, "time"),
        (time, "time_ns"),
        (time, "monotonic"),
        (time, "perf_counter"),
    ]:
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    return attempts


def test_plan_and_forecast_run_without_io_or_clock(no_io_no_clock: list[str]) -> None:
    checkpoints = [
        Checkpoint(
            name=f"checkpoint-{step}",
            step=step,
            complete=step != 17000,
            pinned_by=(".keep",) if step == 500 else (),
            tracked_by=("latest",) if step == 16900 else (),
            metrics={"eval_loss": 1000 / step},
        )
        for step in range(100, 17001, 100)
    ]
    spec = PolicySpec(keep_best=KeepBest(2, "eval_loss"))

    result = plan(checkpoints, {"default": spec}, root="/data/run")
    outlook = forecast(100_000, 100, 3_600_000_000, PRESETS["conservative"])

    assert no_io_no_clock == []
    assert len(result.decisions) == 170
    assert outlook.saves == 1000
    # The guard itself works: the same calls outside policies/ are refused and recorded.
    with pytest.raises(AssertionError, match=r"builtins\.open"):
        open(os.devnull)  # noqa: SIM115
    assert no_io_no_clock == ["builtins.open"]


# --- the safety guard: Plan + Facts -> Plan, pure too ----------------------------------------

GUARD_PATH = Path(__file__).resolve().parents[2] / "daemon" / "safety" / "guard.py"
# What the guard may import: values and types, nothing that reads the machine. From daemon's
# I/O modules only the names listed (a constant, the Facts value types).
GUARD_IMPORTS: dict[str, set[str] | None] = {
    "__future__": None,
    "collections.abc": None,
    "dataclasses": None,
    "typing": None,
    "policies.model": None,
    "policies.slim": None,  # pure like all of policies/ (checked above): which slims to refuse
    "daemon.errors": None,
    "daemon.fsio": {"TRASH_DIRECTORY"},
    "daemon.safety.facts": {"Facts", "Holder"},
}


def guard_impurities(source: str, filename: str) -> list[str]:
    """Given the guard's source, return every import outside GUARD_IMPORTS and every forbidden
    call, as `file:line what`."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{node.lineno}" if isinstance(node, ast.stmt | ast.expr) else ""
        if isinstance(node, ast.Import):
            found += [f"{where} imports {alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module not in GUARD_IMPORTS or node.level != 0:
                found.append(f"{where} imports {module}")
                continue
            allowed = GUARD_IMPORTS[module]
            found += [
                f"{where} imports {module}.{alias.name}"
                for alias in node.names
                if allowed is not None and alias.name not in allowed
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in FORBIDDEN_CALLS
        ):
            found.append(f"{where} calls {node.func.id}()")
    return found


def test_the_guard_imports_only_values_and_calls_nothing_impure() -> None:
    assert guard_impurities(GUARD_PATH.read_text(), "guard.py") == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os", ["g.py:1 imports os"]),
        ("import time", ["g.py:1 imports time"]),
        ("from os import stat", ["g.py:1 imports os"]),
        (
            "from daemon.safety.facts import gather_facts",
            ["g.py:1 imports daemon.safety.facts.gather_facts"],
        ),
        ("from daemon.fsio import LOCAL", ["g.py:1 imports daemon.fsio.LOCAL"]),
        ("import psutil", ["g.py:1 imports psutil"]),
        ("def f():\n    return open('x')", ["g.py:2 calls open()"]),
        ("from daemon.safety.facts import Facts\nfrom policies.model import Plan", []),
    ],
)
def test_the_guard_check_catches_what_it_should(source: str, expected: list[str]) -> None:
    assert sorted(guard_impurities(source, "g.py")) == sorted(expected)


def test_the_guard_runs_without_io_or_clock(no_io_no_clock: list[str]) -> None:
    """Every branch of the guard (each veto reason, min_keep, both refusals) under an `open`,
    `os.stat`, `os.readlink` and clock that raise: Plan + Facts -> Plan, nothing else."""

    def checkpoint(step: int, **fields: object) -> Checkpoint:
        return Checkpoint(name=f"checkpoint-{step}", step=step, **fields)  # type: ignore[arg-type]

    reader = Holder(pid=4242, create_time=1.0, cmdline="python eval.py", how="open", path="/r/x")
    trainer = Holder(pid=77, create_time=2.0, cmdline="python train.py", how="open", path="/r/y")
    checkpoints = [
        checkpoint(1),
        checkpoint(2, tracked_by=("latest",)),
        checkpoint(3, pinned_by=(".keep",)),
        checkpoint(4),  # held by a reader
        Checkpoint(name="../escape", step=5),
        checkpoint(6, complete=False, incomplete_reason="no trainer_state.json"),
        checkpoint(7),
        checkpoint(8),  # the newest complete
        checkpoint(9, complete=False, abandoned=True, mtime=900.0),  # a crashed save
        checkpoint(10, complete=False, abandoned=True, mtime=990.0),  # quiet 10 s only
    ]
    plan = Plan(root="/r", decisions=tuple(Decision(c, False, ("old",)) for c in checkpoints))
    facts = Facts(
        root_path="/r",
        now=1_000.0,
        holders=MappingProxyType({"checkpoint-4": (reader,)}),
        trainers=frozenset({ProcessIdentity(77, 2.0)}),
    )
    settings = SafetySettings(min_keep=6, max_delete_fraction=1.0, abandoned_after=60)

    guarded = guard(plan, facts, settings)

    reasons = {d.checkpoint.step: d.reasons[0] for d in guarded.decisions if d.keep}
    assert reasons == {
        2: "tracked",
        3: "pinned",
        4: "in-use:pid 4242 (python eval.py)",
        5: "outside-root:'../escape'",
        6: "incomplete",
        7: "min_keep:6",
        8: "newest",
        10: "incomplete",
    }
    assert [d.checkpoint.step for d in guarded.deleted] == [1, 9]
    held = Facts(
        root_path="/r",
        now=1_000.0,
        holders=MappingProxyType({"checkpoint-8": (trainer,)}),
        trainers=facts.trainers,
    )
    with pytest.raises(RootRefused, match="holds the newest checkpoint checkpoint-8"):
        guard(plan, held, settings)
    with pytest.raises(RootRefused, match="max_delete_fraction"):
        guard(plan, facts, SafetySettings(min_keep=1, max_delete_fraction=0.1))
    assert no_io_no_clock == []


def test_the_snapshot_schedule_runs_without_io_or_clock(no_io_no_clock: list[str]) -> None:
    from datetime import UTC, date, datetime, timedelta, timezone

    # A zone given as a value (no zone database read): CET with no DST rules is enough here.
    zone = timezone(timedelta(hours=1), "CET")
    now = datetime(2026, 6, 1, 2, 30, tzinfo=UTC)
    taken = schedule.snapshot_dates(["2026-05-30", "2026-05-31", ".tmp-2026-06-01-42", "x"])

    assert schedule.snapshot_due(now, "03:00", zone, taken) == date(2026, 6, 1)
    assert schedule.next_snapshot_time(now, "04:00", zone, taken) == datetime(
        2026, 6, 1, 3, 0, tzinfo=UTC
    )
    assert schedule.dates_to_remove(taken, 1) == [date(2026, 5, 30)]
    assert schedule.temporary_owner(schedule.temporary_name("2026-06-01", 42)) == 42
    assert no_io_no_clock == []
