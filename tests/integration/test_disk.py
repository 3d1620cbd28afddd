"""Disk checks on a real small tmpfs: warn, the critical escalation in order, the alert."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, RootConfig
from daemon.disk import pressure
from daemon.history.log import NULL_HISTORY, HistoryLog
from daemon.pruning.deleter import ApplyResult
from daemon.pruning.pipeline import PruneReport
from policies.model import Plan, PolicySpec
from tests.configs import make_config

MB = 1 << 20


class RecordingHistory(HistoryLog):
    def __init__(self) -> None:
        super().__init__("/nonexistent/history.jsonl")
        self.records: list[dict[str, Any]] = []

    def write(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **fields})

    def events(self) -> list[str]:
        """The disk check's own records (the trash module adds its `trash_purge` ones)."""
        return [record["event"] for record in self.records if record["event"] != "trash_purge"]

    def one(self, event: str) -> dict[str, Any]:
        (found,) = [record for record in self.records if record["event"] == event]
        return found


@pytest.fixture(autouse=True)
def fresh_warning_memory() -> Iterator[None]:
    pressure._warned_at.clear()
    yield
    pressure._warned_at.clear()


def fill(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def checkpoints(root: Path, count: int, size: int) -> None:
    for step in range(1, count + 1):
        fill(root / f"checkpoint-{step * 100}" / "model.safetensors", size)


class RecordingPrune:
    """A prune that deletes the oldest checkpoints the way pruning does (rename into the
    trash, then remove), keeping `keep_normal` normally and `keep_emergency` under the
    emergency policy; it records how it was called."""

    def __init__(self, keep_normal: int, keep_emergency: int) -> None:
        self.keep_normal = keep_normal
        self.keep_emergency = keep_emergency
        self.calls: list[tuple[str, PolicySpec | None]] = []

    def __call__(
        self,
        config: Config,
        root: RootConfig,
        *,
        now: float,
        dry_run: bool,
        history: HistoryLog | None,
        policy_override: PolicySpec | None = None,
    ) -> PruneReport:
        assert dry_run is False
        self.calls.append((root.path, policy_override))
        keep = self.keep_normal if policy_override is None else self.keep_emergency
        names = sorted(
            (n for n in os.listdir(root.path) if n.startswith("checkpoint-")),
            key=lambda n: int(n.split("-")[1]),
        )
        doomed = names[: max(0, len(names) - keep)]
        trash = Path(root.path) / ".ckptd-trash"
        trash.mkdir(exist_ok=True)
        for name in doomed:
            os.rename(Path(root.path) / name, trash / name)
            shutil.rmtree(trash / name)
        return PruneReport(
            root=root.path,
            plan=Plan(root.path, ()),
            dry_run=False,
            applied=ApplyResult(deleted=tuple(doomed)),
        )


def test_below_warn_records_nothing(tmpfs: Callable[[int], Path]) -> None:
    mount = tmpfs(16 * MB)
    checkpoints(mount / "run", 2, MB)
    history = RecordingHistory()
    prune = RecordingPrune(1, 1)
    report = pressure.check_disks(
        make_config([mount / "run"]), now=1.0, history=history, prune=prune
    )
    assert [check.level for check in report.filesystems] == ["ok"]
    assert report.status_line is None and history.records == [] and prune.calls == []
    check = report.filesystems[0]
    assert check.mount == str(mount) and 12 < check.before.percent < 14


def test_above_warn_records_a_warning_and_a_status_line(tmpfs: Callable[[int], Path]) -> None:
    mount = tmpfs(16 * MB)
    checkpoints(mount / "run", 10, MB)  # 62.5 %
    history = RecordingHistory()
    prune = RecordingPrune(1, 1)
    report = pressure.check_disks(
        make_config([mount / "run"], disk={"warn_percent": 50, "critical_percent": 90}),
        now=1.0,
        history=history,
        prune=prune,
    )
    assert report.worst == "warn"
    assert history.events() == ["disk_warn"]
    assert history.one("disk_warn")["mount"] == str(mount)
    assert report.status_line is not None and str(mount) in report.status_line
    assert prune.calls == []


def test_a_lasting_warning_is_recorded_once_an_hour(tmpfs: Callable[[int], Path]) -> None:
    mount = tmpfs(16 * MB)
    checkpoints(mount / "run", 10, MB)  # 62.5 %
    config = make_config([mount / "run"], disk={"warn_percent": 50, "critical_percent": 90})
    history = RecordingHistory()
    prune = RecordingPrune(1, 1)
    warnings = []
    for now in (1000.0, 1300.0, 4700.0, 5000.0):
        report = pressure.check_disks(config, now=now, history=history, prune=prune)
        assert report.status_line is not None  # STATUS= says it every time
        warnings.append(history.events().count("disk_warn"))
    assert warnings == [1, 1, 2, 2]
    for name in sorted(os.listdir(mount / "run"))[:6]:
        shutil.rmtree(mount / "run" / name)
    pressure.check_disks(config, now=5100.0, history=history, prune=prune)  # 25 %: ok, forgets
    fill(mount / "run" / "again.bin", 6 * MB)
    pressure.check_disks(config, now=5200.0, history=history, prune=prune)  # crossing again
    assert history.events().count("disk_warn") == 3


def test_critical_escalates_trash_then_prune_then_emergency_then_alert(
    tmpfs: Callable[[int], Path], tmp_path: Path
) -> None:
    mount = tmpfs(16 * MB)
    root = mount / "run"
    checkpoints(root, 12, MB)  # 12 MB
    fill(
        root / ".ckptd-trash" / "checkpoint-50@1780000000" / "model.safetensors", MB
    )  # 13 MB = 81 %
    alert_output = tmp_path / "alert.json"
    alert_script = tmp_path / "alert.py"
    alert_script.write_text(
        "import json, os, sys\n"
        "json.dump({k: v for k, v in os.environ.items() if k.startswith('CKPTD_')},"
        " open(sys.argv[1], 'w'))\n"
    )
    config = make_config(
        [root],
        disk={
            "warn_percent": 50,
            "critical_percent": 60,
            "emergency": {"preset": "aggressive"},
            "alert": f"{sys.executable} {alert_script} {alert_output}",
        },
    )
    history = RecordingHistory()
    prune = RecordingPrune(keep_normal=10, keep_emergency=4)
    report = pressure.check_disks(config, now=1.0, history=history, prune=prune)
    # 81 % -> trash 75 % -> prune to 10: 62.5 % -> emergency to 4: 25 %.
    assert history.events() == [
        "disk_critical",
        "disk_trash_emptied",
        "disk_prune",
        "emergency_prune",
        "alert",
        "disk_recovered",
    ]
    assert prune.calls == [
        (str(root), None),
        (str(root), config.disk.emergency.to_spec()),
    ]
    check = report.filesystems[0]
    assert check.level == "critical" and check.after.percent < 60
    assert check.alert_exit == 0
    environment = json.loads(alert_output.read_text())
    assert environment["CKPTD_ROOT"] == str(root)
    assert environment["CKPTD_MOUNT"] == str(mount)
    assert environment["CKPTD_LEVEL"] == "ok"
    assert int(environment["CKPTD_FREE_BYTES"]) == check.after.free
    assert float(environment["CKPTD_USED_PERCENT"]) == pytest.approx(check.after.percent, abs=0.1)
    emergency = history.one("emergency_prune")
    assert emergency["deleted"] == 6 and emergency["used_percent"] < 60
    assert len(os.listdir(root)) == 5  # 4 checkpoints and the (empty) trash


def test_emptying_the_trash_alone_can_resolve_it(tmpfs: Callable[[int], Path]) -> None:
    mount = tmpfs(16 * MB)
    root = mount / "run"
    checkpoints(root, 4, MB)
    fill(root / ".ckptd-trash" / "checkpoint-1@1780000000" / "model.safetensors", 8 * MB)  # 75 %
    history = RecordingHistory()
    prune = RecordingPrune(1, 1)
    report = pressure.check_disks(
        make_config([root], disk={"warn_percent": 50, "critical_percent": 70}),
        now=1.0,
        history=history,
        prune=prune,
    )
    assert history.events() == ["disk_critical", "disk_trash_emptied", "disk_recovered"]
    assert prune.calls == []
    assert report.filesystems[0].steps == ("disk_trash_emptied",)


def test_min_free_alone_makes_it_critical(tmpfs: Callable[[int], Path]) -> None:
    mount = tmpfs(16 * MB)
    root = mount / "run"
    checkpoints(root, 6, MB)  # 37.5 %: far below any percent threshold
    history = RecordingHistory()
    prune = RecordingPrune(keep_normal=3, keep_emergency=1)
    pressure.check_disks(
        make_config([root], disk={"min_free": 12 * MB}), now=1.0, history=history, prune=prune
    )
    assert history.events()[:3] == ["disk_critical", "disk_trash_emptied", "disk_prune"]
    assert history.events()[-1] == "disk_recovered"


def test_unresolved_pressure_alerts_and_a_broken_alert_is_recorded(
    tmpfs: Callable[[int], Path],
) -> None:
    mount = tmpfs(16 * MB)
    root = mount / "run"
    checkpoints(root, 3, MB)
    fill(mount / "not-ours.bin", 11 * MB)  # someone else's data: 87 %
    history = RecordingHistory()
    prune = RecordingPrune(keep_normal=3, keep_emergency=3)  # safety keeps everything
    report = pressure.check_disks(
        make_config(
            [root], disk={"critical_percent": 80, "alert": "/nonexistent/alert-command --now"}
        ),
        now=1.0,
        history=history,
        prune=prune,
    )
    assert history.events() == [
        "disk_critical",
        "disk_trash_emptied",
        "disk_prune",
        "emergency_prune",
        "alert",
    ]
    assert "error" in history.one("alert")
    assert report.filesystems[0].alert_exit is None
    assert report.worst == "critical"


def test_roots_are_grouped_by_filesystem(tmpfs: Callable[[int], Path], tmp_path: Path) -> None:
    mount = tmpfs(16 * MB)
    first, second = mount / "a", mount / "b"
    checkpoints(first, 1, MB)
    checkpoints(second, 1, MB)
    elsewhere = tmp_path / "c"
    elsewhere.mkdir()
    config = make_config([first, second, elsewhere, tmp_path / "missing"])
    report = pressure.check_disks(config, now=1.0, history=NULL_HISTORY, prune=RecordingPrune(1, 1))
    roots = sorted(check.roots for check in report.filesystems)
    assert roots == sorted([(str(first), str(second)), (str(elsewhere),)])
    assert len(report.errors) == 1 and "missing" in report.errors[0]
