"""The history file's format is a contract: every writer in `daemon/` keeps its golden shape.

Each scenario below runs the real code that writes a kind of record (the prune pipeline, the
deleter, the trash, `ckptd trash restore`, the disk check, the daily snapshot) into a real
history file, and every record it writes must have the fields, in the order and of the JSON
types, of one golden line in tests/history_golden.py. Together the scenarios write every event
name there is.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from daemon import cli, usertest
from daemon.config import (
    Config,
    DefaultsConfig,
    DiskConfig,
    PolicyConfig,
    RootConfig,
    SlimConfig,
    TrashConfig,
    VerifyConfig,
)
from daemon.disk import pressure
from daemon.history.events import (
    EVENTS,
    EmptiedTrash,
    EscalationStep,
    HistoryEvent,
    Pruned,
    StepFailed,
)
from daemon.history.log import HistoryLog, read_records
from daemon.pruning import deleter, pipeline, trash
from daemon.pruning.deleter import ApplyResult
from daemon.pruning.pipeline import PruneReport
from daemon.safety import facts as proc_facts
from daemon.snapshots import daily
from daemon.verification import VerificationState
from policies.model import Checkpoint, Decision, Plan
from tests.configs import DAILY, make_config
from tests.history_golden import EVENT_NAMES, GOLDEN, golden_record, matching_shape
from tests.layouts_fixtures import age, well_formed_bytes
from tests.sizes import tree_blocks

NOW = 1_800_000_000.0
FILE = b"w" * 2000
SNAPSHOT_NOW = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)

written_events: set[str] = set()


def assert_golden_shapes(path: str | Path) -> list[dict[str, Any]]:
    """Given a history file, assert each record has a golden shape; return the records."""
    records = read_records(str(path))
    for record in records:
        assert matching_shape(record) is not None, f"no golden shape for {record}"
        written_events.add(str(record["event"]))
    return records


@pytest.fixture
def history(tmp_path: Path) -> Iterator[HistoryLog]:
    log = HistoryLog(str(tmp_path / "history.jsonl"))
    yield log
    log.close()


# --- each event class writes exactly its golden line ------------------------------------------


def _typed(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def event_from(record: dict[str, Any]) -> HistoryEvent:
    """Given a golden record, return the event that should write it (lists given as tuples,
    as the writers pass them)."""
    fields = {key: _typed(value) for key, value in record.items() if key not in ("time", "event")}
    kind = EVENTS[record["event"]]
    if issubclass(kind, EscalationStep):
        common = {key: fields.pop(key) for key in ("mount", "root", "used_percent", "free_bytes")}
        outcome: EmptiedTrash | Pruned | StepFailed
        if "error" in fields:
            outcome = StepFailed(**fields)
        elif "deleted" in fields:
            outcome = Pruned(**fields)
        else:
            outcome = EmptiedTrash(**fields)
        return kind(outcome=outcome, **common)
    return kind(**fields)


@pytest.mark.parametrize("shape", sorted(GOLDEN))
def test_each_event_writes_exactly_its_golden_line(shape: str, tmp_path: Path) -> None:
    event = event_from(golden_record(shape))
    with HistoryLog(str(tmp_path / "history.jsonl")) as history:
        history.record(event, time=0.0)
    assert (tmp_path / "history.jsonl").read_text() == GOLDEN[shape] + "\n"


def test_there_is_one_event_class_per_event_name() -> None:
    assert set(EVENTS) == set(EVENT_NAMES)
    assert all(kind.event == name for name, kind in EVENTS.items())


# --- the prune pipeline, the deleter, the trash ---------------------------------------------------


def keep_newest(count: int):  # type: ignore[no-untyped-def]
    """A stand-in planner: keep the newest `count` checkpoint folders, delete the others."""

    def plan_root(config: Config, root: RootConfig, **_options: object) -> tuple[Any, Plan]:
        folders = sorted(
            (p for p in Path(root.path).iterdir() if p.name.startswith("checkpoint-")),
            key=lambda p: int(p.name.split("-")[1]),
        )
        checkpoints = [
            Checkpoint(
                name=p.name,
                step=int(p.name.split("-")[1]),
                size_bytes=len(FILE),
                freeable_bytes=len(FILE),
                mtime=NOW - 3600,
            )
            for p in folders
        ]
        keep_from = len(checkpoints) - count
        decisions = tuple(
            Decision(c, i >= keep_from, ("tier1",) if i >= keep_from else ("tier3:every-1000",), 3)
            for i, c in enumerate(checkpoints)
        )
        return None, Plan(root=root.path, decisions=decisions)

    return plan_root


def make_root(folder: Path, count: int = 10) -> Path:
    for step in range(100, 100 * (count + 1), 100):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "model.bin").write_bytes(FILE)
    return folder


def test_a_prune_writes_deletes_guard_vetoes_and_its_run_in_their_shapes(
    tmp_path: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_root(tmp_path / "run")
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(1))
    config = make_config([root], grace=0, min_keep=3)
    pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=True, history=history)
    records = assert_golden_shapes(history.path)
    events = [r["event"] for r in records]
    assert events == ["veto"] * 2 + ["delete"] * 7 + ["prune_run"] * 2
    assert records[0]["reason"] == "min_keep:3" and "pid" not in records[0]
    assert records[2]["why"] == ["tier3:every-1000"] and records[2]["tier"] == 3


def test_a_prune_that_slims_writes_slims_and_its_run_in_their_shapes(
    tmp_path: Path, history: HistoryLog
) -> None:
    root = tmp_path / "run"
    for step in range(100, 1100, 100):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.pt"):
            # Well-formed: the integrity checks (on by default) read their headers.
            (folder / name).write_bytes(well_formed_bytes(name, len(FILE)))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for path in [*folder.iterdir(), folder]:
            os.utime(path, (NOW - 3600, NOW - 3600))
    policy = PolicyConfig(keep_last=3, tier2_count=4, cadence=100, slim=SlimConfig(after="tier1"))
    config = Config(
        defaults=DefaultsConfig(settle_seconds=60, min_keep=1),
        roots=[RootConfig(path=str(root), policy=policy, trash=TrashConfig(grace=0))],
    )
    pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    records = assert_golden_shapes(history.path)
    assert [r["event"] for r in records] == ["delete"] * 5 + ["slim"] * 2 + ["prune_run"]
    assert records[5]["files"] == ["optimizer.pt"] and records[5]["bytes_freed"] > 0
    assert records[-1]["slimmed"] == 2


def test_refusals_write_prune_refused_in_both_shapes(
    tmp_path: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    root = make_root(tmp_path / "run")
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(4))
    config = make_config([root], grace=0, min_keep=1, max_delete_fraction=0.5)
    pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    (root / trash.TRASH_DIRECTORY).mkdir(exist_ok=True)
    holder = os.open(root / trash.TRASH_DIRECTORY / pipeline.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    finally:
        os.close(holder)
    fraction, busy = assert_golden_shapes(history.path)
    assert fraction["event"] == busy["event"] == "prune_refused"
    assert fraction["dry_run"] is False and "max_delete_fraction" in fraction["reason"]
    assert "dry_run" not in busy and busy["pids"] == [] and busy["cmdlines"] == []


def test_a_purge_past_the_grace_writes_trash_purge(
    tmp_path: Path, history: HistoryLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_root(tmp_path / "run")
    monkeypatch.setattr(pipeline, "plan_root", keep_newest(8))
    config = make_config([root], grace=3600, min_keep=1)
    allocated = tree_blocks(root / "checkpoint-100")
    pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    pipeline.prune_root(config, config.roots[0], now=NOW + 3601, dry_run=False, history=history)
    purges = [r for r in assert_golden_shapes(history.path) if r["event"] == "trash_purge"]
    assert [r["checkpoint"] for r in purges] == ["checkpoint-100", "checkpoint-200"]
    assert purges[0]["deleted_at"] == NOW and purges[0]["bytes_freed"] == allocated
    assert purges[0]["bytes_logical"] == len(FILE)


def test_a_holder_seen_at_the_last_moment_writes_an_in_use_veto(
    tmp_path: Path, history: HistoryLog
) -> None:
    root = make_root(tmp_path / "run", count=2)
    holder = proc_facts.Holder(
        pid=4242, create_time=1.0, cmdline="python train.py", how="open", path="model.bin"
    )

    def held(root_path: str, _entries: object) -> proc_facts.Facts:
        return proc_facts.Facts(root_path=root_path, now=NOW, holders={"checkpoint-100": (holder,)})

    plan = keep_newest(0)(make_config([root], grace=0, min_keep=1), RootConfig(path=str(root)))[1]
    deleter.apply(plan, str(root), dry_run=False, now=NOW, history=history, holders_check=held)
    veto, delete = assert_golden_shapes(history.path)
    assert veto["event"] == "veto" and veto["pid"] == 4242
    assert veto["cmdline"] == "python train.py" and veto["reason"].startswith("in-use:pid 4242")
    assert delete["event"] == "delete" and delete["checkpoint"] == "checkpoint-200"


def test_trash_restore_from_the_cli_writes_trash_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_root(tmp_path / "run", count=1)
    trash.move_to_trash(str(root), "checkpoint-100", ["checkpoint-100"], now=NOW)
    monkeypatch.setenv("CKPTD_CONFIG", str(tmp_path / "no-such-config.yaml"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert cli.main(["trash", "restore", "checkpoint-100", "--root", str(root)]) == 0
    capsys.readouterr()
    (record,) = assert_golden_shapes(tmp_path / "state" / "ckptd" / "history.jsonl")
    assert record["event"] == "trash_restore" and record["checkpoint"] == "checkpoint-100"
    assert record["root"] == str(root)


# --- the disk check -----------------------------------------------------------------------------


def usage_of(*percents: float) -> Callable[[str], pressure.Usage]:
    """A filesystem whose use is each of `percents` in turn (the last one from then on)."""
    remaining = list(percents)
    total = 100 << 20

    def usage(_path: str) -> pressure.Usage:
        percent = remaining.pop(0) if len(remaining) > 1 else remaining[0]
        used = int(total * percent / 100)
        return pressure.Usage(total, used, total - used, float(percent))

    return usage


def prune_deleting(
    config: Config, root: RootConfig, **_keywords: object
) -> PruneReport:  # the escalation's prune: one checkpoint deleted
    applied = ApplyResult(deleted=("c",))
    return PruneReport(root=root.path, plan=Plan(root.path, ()), dry_run=False, applied=applied)


def prune_failing(config: Config, root: RootConfig, **_keywords: object) -> PruneReport:
    raise OSError(5, "Input/output error")


@pytest.fixture
def disk_root(tmp_path: Path) -> Iterator[Path]:
    pressure._warned_at.clear()
    root = tmp_path / "run"
    root.mkdir()
    yield root
    pressure._warned_at.clear()


def test_the_disk_check_writes_its_records_in_their_shapes(
    disk_root: Path, tmp_path: Path, history: HistoryLog
) -> None:
    ladder = {"warn_percent": 50, "critical_percent": 60, "emergency": {"preset": "aggressive"}}

    def config(**disk: Any) -> Config:
        return make_config([disk_root], disk={**ladder, **disk})

    empty = lambda *_args, **_keywords: 1000  # noqa: E731 - the trash emptied: 1000 B
    pressure.check_disks(
        config(), now=1.0, history=history, prune=prune_deleting, usage=usage_of(55)
    )
    pressure.check_disks(
        config(alert=f"{sys.executable} -c pass"),
        now=2.0,
        history=history,
        prune=prune_deleting,
        empty_trash=empty,
        usage=usage_of(90, 80, 70, 40),
    )
    pressure.check_disks(
        config(alert="/nonexistent/alert-command --now"),
        now=3.0,
        history=history,
        prune=prune_failing,
        empty_trash=empty,
        usage=usage_of(95),
    )
    records = assert_golden_shapes(history.path)
    assert [r["event"] for r in records] == [
        "disk_warn",
        "disk_critical",
        "disk_trash_emptied",
        "disk_prune",
        "emergency_prune",
        "alert",
        "disk_recovered",
        "disk_critical",
        "disk_trash_emptied",
        "disk_prune",
        "emergency_prune",
        "alert",
    ]
    assert records[3]["deleted"] == 1 and records[3]["refused"] is None
    assert records[5]["exit_code"] == 0 and "error" not in records[5]
    assert records[9]["error"] == "OSError: [Errno 5] Input/output error"
    assert "No such file" in records[11]["error"] and "exit_code" not in records[11]


# --- the daily snapshot -------------------------------------------------------------------------


def hf_checkpoint(root: Path, step: int) -> None:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for index in range(2):
        shard = f"shard-{index}.safetensors"
        (folder / shard).write_bytes(well_formed_bytes(shard, 4096, random=True))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    moment = SNAPSHOT_NOW.timestamp() - 3600
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (moment, moment))


def test_the_daily_snapshot_writes_its_records_in_their_shapes(
    tmp_path: Path, history: HistoryLog, tmpfs: Callable[[int], Path]
) -> None:
    root = tmp_path / "run-a"
    hf_checkpoint(root, 100)
    hf_checkpoint(root, 200)
    snaps = tmp_path / "snaps"
    (snaps / "2026-05-28").mkdir(parents=True)

    def run(config: Config, **options: Any) -> daily.SnapshotReport:
        return daily.run_daily_snapshot(
            config, now=SNAPSHOT_NOW, history=history, force=True, **options
        )

    assert run(make_config([root], snapshots={"dir": None}, **DAILY)).status == "skipped"
    assert (
        run(make_config([tmp_path / "gone"], snapshots={"dir": snaps}, **DAILY)).status == "skipped"
    )
    too_big = make_config([root], snapshots={"dir": snaps}, **DAILY).model_copy(
        update={"disk": DiskConfig(critical_percent=0.001)}
    )
    assert run(too_big, method="copy").status == "skipped"
    assert (
        run(
            make_config([root], snapshots={"dir": tmpfs(4 << 20)}, **DAILY), method="hardlink"
        ).status
        == "failed"
    )

    stop = threading.Event()

    def shutdown_requested(item: daily.FileItem) -> None:
        stop.set()

    stopped = run(
        make_config([root], snapshots={"dir": snaps}, **DAILY),
        method="copy",
        stop=stop,
        between_files=shutdown_requested,
    )
    assert stopped.status == "stopped"

    def source_vanishes(item: daily.FileItem) -> None:
        if item.kind == "file" and (root / "checkpoint-200").exists():
            trash_folder = root / ".ckptd-trash"
            trash_folder.mkdir(exist_ok=True)
            os.rename(root / "checkpoint-200", trash_folder / "checkpoint-200")

    vanished = run(
        make_config([root], snapshots={"dir": snaps}, **DAILY),
        method="copy",
        between_files=source_vanishes,
    )
    assert vanished.status == "failed"
    assert (
        run(make_config([root], snapshots={"dir": snaps, "keep": 1}, **DAILY), method="copy").status
        == "done"
    )
    records = assert_golden_shapes(history.path)
    assert [r["event"] for r in records] == [
        "snapshot_skipped",
        "snapshot_skipped",
        "snapshot_skipped",
        "snapshot_failed",
        "snapshot_failed",
        "snapshot_failed",
        "snapshot",
        "snapshot_removed",
    ]
    assert "errors" in records[1] and "bytes_to_write" in records[2]
    assert records[3]["method"] == "hardlink" and "checkpoints" not in records[3]
    assert records[4] == {**records[4], "reason": "stopped (shutting down)"}
    assert "method" not in records[4] and records[5]["method"] == "copy"
    assert records[7]["removed"] == "2026-05-28" and records[7]["keep"] == 1


# --- integrity, the user's test, holds ------------------------------------------------------


def test_integrity_user_tests_and_holds_write_their_records_in_their_shapes(
    tmp_path: Path, history: HistoryLog
) -> None:
    real = Path(__file__).resolve().parents[1] / "fixtures" / "integrity" / "trees" / "hf"
    root = tmp_path / "run"
    for step in (100, 200):
        shutil.copytree(real / "checkpoint-10", root / f"checkpoint-{step}")
        age(root / f"checkpoint-{step}")
    weights = root / "checkpoint-200" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    age(root / "checkpoint-200")
    hold = root / ".ckptd-holds" / "checkpoint-100" / "eval-sweep.json"
    hold.parent.mkdir(parents=True)
    hold.write_text('{"until": "2000-01-01T00:00:00+00:00", "reason": "eval sweep v3"}')
    script = tmp_path / "test_model.py"
    script.write_text("import sys\nprint('loading', sys.argv[1])\nsys.exit(3)\n")
    config = Config(
        state_dir=str(tmp_path / "state"),
        roots=[RootConfig(path=str(root))],
        verify=VerifyConfig(command=f"{sys.executable} {script} {{path}}", timeout=30),
    )
    pipeline.prune_root(config, config.roots[0], now=NOW, dry_run=False, history=history)
    state = VerificationState()
    checkpoint = Checkpoint("checkpoint-100", 100, layout="hf")
    result = usertest.run_user_test(config, str(root), checkpoint)
    usertest.record_user_test(config, result, state, history)
    timed_out = config.model_copy(
        update={
            "verify": VerifyConfig(
                command=f"{sys.executable} -c 'import time; time.sleep(30)'", timeout=0.5
            )
        }
    )
    result = usertest.run_user_test(timed_out, str(root), checkpoint)
    usertest.record_user_test(timed_out, result, state, history)
    records = assert_golden_shapes(history.path)
    events = [r["event"] for r in records]
    # The prune deleted nothing: no prune_run row (counted in the next one's quiet_runs).
    assert events == ["hold_expired", "integrity_corrupt", "user_test", "user_test"]
    assert records[1]["checkpoint"] == "checkpoint-200" and records[1]["deep"] is False
    assert matching_shape(records[2]) == "user_test" and records[2]["exit_code"] == 3
    assert records[3]["exit_code"] is None and records[3]["error"] == "timed out after 0.5 s"


def test_the_scenarios_write_every_event_name_there_is() -> None:
    """Runs last in this module (pytest keeps file order): the scenarios above covered every
    event name the golden file lists."""
    if len(written_events) < 5:
        pytest.skip("run with the scenarios above (this file as a whole)")
    assert written_events == set(EVENT_NAMES)
