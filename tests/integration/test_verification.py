"""daemon/verification.py and daemon/usertest.py on real folders: which checkpoints a plan
looks at, what it makes of their verdicts, the prune's checks of new checkpoints, and the
user's own test as a real process (priority, timeout, last lines)."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, DefaultsConfig, RootConfig, VerifyConfig
from daemon.history.log import HistoryLog, read_records
from daemon.integrity.check import check_checkpoint
from daemon.planner import plan_root_full
from daemon.pruning.pipeline import prune_root
from daemon.usertest import record_user_test, run_daily_user_tests, run_user_test
from daemon.verification import (
    UNKNOWN_RUN,
    VerificationState,
    assess,
    last_good_protection,
    newest_sound,
)
from policies.model import Checkpoint
from tests import layouts_fixtures as fixtures
from tests.configs import make_config, rotation, write_config
from tests.layouts_fixtures import age, hf_checkpoint

REAL_CHECKPOINT = (
    Path(__file__).resolve().parents[1]
    / "fixtures"
    / "integrity"
    / "trees"
    / "hf"
    / "checkpoint-10"
)


def real_run(root: Path, steps: list[int]) -> None:
    now = time.time()
    for index, step in enumerate(steps):
        shutil.copytree(REAL_CHECKPOINT, root / f"checkpoint-{step}")
        age(root / f"checkpoint-{step}", 3600.0 * (len(steps) - index), now=now)


def truncate(root: Path, step: int) -> None:
    path = root / f"checkpoint-{step}" / "model.safetensors"
    status = path.stat()
    os.truncate(path, status.st_size // 3)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


# Only the newest checkpoint is kept (a rotation of one): any other checkpoint the plan keeps is
# kept for a reason of verification (tests/configs.py builds the config).
ROTATION_OF_ONE: dict[str, Any] = {
    "policy": rotation(1, cadence=100),
    "settle_seconds": 1,
    "min_keep": 0,
    "max_delete_fraction": 1.0,
}


def checks_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from daemon import verification

    made: list[str] = []
    real = verification.check_checkpoint

    def counting(root: str, name: str, layout: str, **options: object):  # type: ignore[no-untyped-def]
        made.append(name)
        return real(root, name, layout, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(verification, "check_checkpoint", counting)
    return made


# --- which checkpoints a plan looks at ------------------------------------------------------------


def test_a_plan_checks_the_newest_down_to_the_first_that_passes_and_then_remembers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    real_run(root, [100, 200, 300, 400, 500])
    truncate(root, 500)
    truncate(root, 400)
    made = checks_made(monkeypatch)
    config = make_config([root], state_dir=tmp_path / "state", **ROTATION_OF_ONE)
    state = VerificationState()
    planned = plan_root_full(config, config.roots[0], now=time.time(), verification=state)
    assert made == ["checkpoint-500", "checkpoint-400", "checkpoint-300"]
    assert planned.assessment.status_of("checkpoint-300") == "passed"
    assert planned.assessment.status_of("checkpoint-100") == "unchecked"
    made.clear()
    plan_root_full(config, config.roots[0], now=time.time(), verification=state)
    assert made == []  # remembered while the signatures hold


def test_the_prune_checks_every_new_checkpoint_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    real_run(root, [100, 200, 300])
    truncate(root, 100)  # old and corrupt: a plan alone would never look at it
    made = checks_made(monkeypatch)
    config = make_config([root], state_dir=tmp_path / "state", **ROTATION_OF_ONE)
    config = config.model_copy(update={"defaults": DefaultsConfig(settle_seconds=1)})
    (tmp_path / "state").mkdir()
    history = HistoryLog(str(tmp_path / "history.jsonl"))
    prune_root(config, config.roots[0], now=time.time(), dry_run=False, history=history)
    assert sorted(made) == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    records = read_records(str(tmp_path / "history.jsonl"))
    assert [r["checkpoint"] for r in records if r["event"] == "integrity_corrupt"] == [
        "checkpoint-100"
    ]
    # Kept in state_dir: a second prune (a new process, say) checks nothing again.
    made.clear()
    prune_root(config, config.roots[0], now=time.time(), dry_run=False, history=history)
    history.close()
    assert made == []
    records = read_records(str(tmp_path / "history.jsonl"))
    assert sum(1 for r in records if r["event"] == "integrity_corrupt") == 1
    assert (tmp_path / "state" / "integrity-cache.json").exists()


def test_a_format_ckptd_cannot_check_stops_the_walk_after_a_few(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "run"
    for step in range(100, 3001, 100):  # raw arrays: no file of a format ckptd checks
        (root / f"run-{step}").mkdir(parents=True)
        (root / f"run-{step}" / "weights.npy").write_bytes(b"\x93NUMPY" + bytes(100))
        age(root / f"run-{step}")
    made = checks_made(monkeypatch)
    config = Config(roots=[RootConfig(path=str(root), pattern="run-{step}")])
    planned = plan_root_full(config, config.roots[0], now=time.time(), verification=None)
    assert made == [f"run-{step}" for step in range(3000, 3000 - 100 * UNKNOWN_RUN, -100)]
    assert not planned.assessment.corrupt()
    assert all(c.complete for c in planned.scan.checkpoints)
    assert "last-good" not in {r for d in planned.plan.decisions for r in d.reasons}


def test_a_remembered_corrupt_result_is_checked_against_the_signature(tmp_path: Path) -> None:
    root = tmp_path / "run"
    real_run(root, [100, 200, 300])
    truncate(root, 100)
    state = VerificationState()
    checkpoints = [
        Checkpoint(name=f"checkpoint-{s}", step=s, layout="hf", series="hf")
        for s in (100, 200, 300)
    ]
    assess(str(root), checkpoints, state, check_new=True)
    assert assess(str(root), checkpoints, state).status_of("checkpoint-100") == "corrupt"
    # Saved again under its name (a restarted run): the old verdict is about other bytes.
    shutil.rmtree(root / "checkpoint-100")
    shutil.copytree(REAL_CHECKPOINT, root / "checkpoint-100")
    assert assess(str(root), checkpoints, state).status_of("checkpoint-100") == "passed"


def test_last_good_is_kept_only_while_a_newer_one_is_in_doubt() -> None:
    from daemon.verification import Assessment, Verdict

    def checkpoint(step: int, *, complete: bool = True, reason: str | None = None) -> Checkpoint:
        return Checkpoint(f"c-{step}", step, complete=complete, incomplete_reason=reason)

    passed, corrupt, unchecked = Verdict("passed"), Verdict("corrupt"), Verdict("unchecked")
    sound = [checkpoint(1), checkpoint(2)]
    verdicts = Assessment({"c-2": passed, "c-1": passed})
    assert last_good_protection(sound, verdicts) == set()
    broken = [checkpoint(1), checkpoint(2), checkpoint(3, complete=False, reason="corrupt: x")]
    assert last_good_protection(broken, Assessment({"c-3": corrupt, "c-2": passed})) == {"c-2"}
    doubtful = [checkpoint(1), checkpoint(2), checkpoint(3)]
    assert last_good_protection(doubtful, Assessment({"c-3": unchecked, "c-2": passed})) == {"c-2"}
    saving = [checkpoint(1), checkpoint(2), checkpoint(3, complete=False, reason="settling")]
    assert last_good_protection(saving, Assessment({"c-2": passed})) == set()
    assert newest_sound(broken) == broken[1]


def test_a_slimmed_checkpoint_is_never_the_last_good_one() -> None:
    from dataclasses import replace

    from daemon.verification import Assessment, Verdict

    passed, corrupt = Verdict("passed"), Verdict("corrupt")
    one, two = Checkpoint("c-1", 1), Checkpoint("c-2", 2, slimmed=True)
    three = Checkpoint("c-3", 3, complete=False, incomplete_reason="corrupt: x")
    # c-2 lost its optimizer to a slim: a resume from it starts afresh, so c-1 is the one.
    verdicts = Assessment({"c-3": corrupt, "c-2": passed, "c-1": passed})
    assert last_good_protection([one, two, three], verdicts) == {"c-1"}
    assert newest_sound([one, two, three]) == one
    assert newest_sound([replace(one, slimmed=True), two]) is None


def test_checks_off_plans_as_before(tmp_path: Path) -> None:
    root = tmp_path / "run"
    real_run(root, [100, 200])
    truncate(root, 200)
    config = make_config(
        [root], state_dir=tmp_path / "state", verify={"checks": False}, **ROTATION_OF_ONE
    )
    planned = plan_root_full(config, config.roots[0], now=time.time())
    assert all(c.complete for c in planned.scan.checkpoints)
    assert [d.checkpoint.name for d in planned.plan.deleted] == ["checkpoint-100"]


def test_well_formed_fixtures_pass_the_checks(tmp_path: Path) -> None:
    """The fixtures every helper's tests use must not look corrupt (tests/layouts_fixtures)."""
    hf_checkpoint(tmp_path, 100, sharded=True)
    hf_checkpoint(tmp_path, 200)
    fixtures.dcp_checkpoint(tmp_path, "step_1")
    fixtures.dcp_checkpoint(tmp_path, "step_2", collectives=False)
    fixtures.orbax_checkpoint(tmp_path, 3)
    fixtures.deepspeed_checkpoint(tmp_path, 4)
    fixtures.megatron_checkpoint(tmp_path, 5)
    fixtures.tf_checkpoint(tmp_path, 6, shards=2)
    fixtures.lightning_checkpoint(tmp_path, 0, 7, as_folder=True)
    fixtures.pt_file(tmp_path, "model_8.pt", 100)
    made = [
        ("checkpoint-100", "hf"),
        ("checkpoint-200", "hf"),
        ("step_1", "dcp"),
        ("step_2", "dcp"),
        ("3", "orbax"),
        ("global_step4", "deepspeed"),
        ("iter_0000005", "megatron"),
        ("ckpt-6", "tf"),
        ("epoch=0-step=7.ckpt", "lightning"),
        ("model_8.pt", "pt"),
    ]
    for name, layout in made:
        for deep in (False, True):
            result = check_checkpoint(str(tmp_path), name, layout, deep=deep)
            assert result.status == "ok", (name, deep, result.problems, result.skipped)


def test_an_empty_zip_named_pt_is_judged_not_crashed_on(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.pt").write_bytes(b"PK\x05\x06" + bytes(18))
    result = check_checkpoint(str(tmp_path), "c", "pt")  # raised ValueError before
    assert result.status in ("ok", "unknown", "corrupt")


# --- the user's test ------------------------------------------------------------------------------

IO_CLASS = (
    "import ctypes, os, platform\n"
    "numbers = {'x86_64': 252, 'aarch64': 31}\n"
    "libc = ctypes.CDLL(None)\n"
    "value = libc.syscall(numbers[platform.machine()], 1, 0)\n"
    "print('io class', value >> 13)\n"
)


def test_the_users_test_runs_niced_in_the_idle_io_class_in_the_root(tmp_path: Path) -> None:
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("the test reads ioprio with a system call number known for x86_64/aarch64")
    root = tmp_path / "run"
    real_run(root, [100])
    script = tmp_path / "probe.py"
    script.write_text(
        IO_CLASS + "import sys\n"
        "print('nice', os.getpriority(os.PRIO_PROCESS, 0))\n"
        "print('cwd', os.getcwd())\n"
        "print('env', os.environ['CKPTD_CHECKPOINT'])\n"
        "print('args', sys.argv[1:])\n"
    )
    config = make_config(
        [root],
        state_dir=tmp_path / "state",
        verify={"command": f"{sys.executable} {script} {{name}} {{step}} '{{path}}'"},
        **ROTATION_OF_ONE,
    )
    checkpoint = Checkpoint("checkpoint-100", 100, layout="hf")
    result = run_user_test(config, str(root), checkpoint)
    assert result.verdict == "verified" and result.exit_code == 0, result
    assert result.last_lines == (
        "io class 3",
        "nice 19",
        f"cwd {root}",
        f"env {root / 'checkpoint-100'}",
        f"args ['checkpoint-100', '100', '{root / 'checkpoint-100'}']",
    )


def test_a_test_past_its_timeout_is_killed_with_its_children_and_fails(tmp_path: Path) -> None:
    root = tmp_path / "run"
    real_run(root, [100])
    marker = tmp_path / "child-alive"
    script = tmp_path / "slow.py"
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w')\n")
    script.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(child)!r}])\n"
        "for n in range(100):\n"
        "    print('epoch', n, flush=True)\n"
        "    time.sleep(0.1)\n"
    )
    config = make_config(
        [root],
        state_dir=tmp_path / "state",
        verify={"command": f"{sys.executable} {script}"},
        **ROTATION_OF_ONE,
    )
    started = time.monotonic()
    config = config.model_copy(
        update={"verify": VerifyConfig(command=config.verify.command, timeout=1)}
    )
    result = run_user_test(config, str(root), Checkpoint("checkpoint-100", 100, layout="hf"))
    assert time.monotonic() - started < 8
    assert result.verdict == "failed" and result.exit_code is None
    assert result.error == "timed out after 1 s"
    assert result.last_lines and result.last_lines[-1].startswith("epoch ")
    time.sleep(3.5)
    assert not marker.exists(), "the test's child outlived the timeout"


def test_a_command_that_cannot_start_is_an_error_not_a_verdict(tmp_path: Path) -> None:
    root = tmp_path / "run"
    real_run(root, [100])
    config = make_config(
        [root],
        state_dir=tmp_path / "state",
        verify={"command": "/nonexistent/test --model {path}"},
        **ROTATION_OF_ONE,
    )
    state = VerificationState()
    with HistoryLog(str(tmp_path / "history.jsonl")) as history:
        result = run_user_test(config, str(root), Checkpoint("checkpoint-100", 100, layout="hf"))
        record_user_test(config, result, state, history)
    assert result.verdict == "error" and "No such file" in (result.error or "")
    (record,) = read_records(str(tmp_path / "history.jsonl"))
    assert record["event"] == "user_test" and record["verdict"] == "error"
    assert state.tests.failures(str(root)) == set()


def test_the_daily_run_tests_each_newest_checkpoint_once(tmp_path: Path) -> None:
    root = tmp_path / "run"
    real_run(root, [100, 200])
    counter = tmp_path / "runs"
    script = tmp_path / "count.py"
    script.write_text(f"open({str(counter)!r}, 'a').write('x')\n")
    state_dir = tmp_path / "state"
    config = make_config(
        [root],
        state_dir=state_dir,
        verify={"command": f"{sys.executable} {script} {{path}}"},
        **ROTATION_OF_ONE,
    )
    with HistoryLog(str(tmp_path / "history.jsonl")) as history:
        first = run_daily_user_tests(config, now=time.time(), history=history)
        second = run_daily_user_tests(config, now=time.time(), history=history)
    assert first[0].result is not None and first[0].result.checkpoint == "checkpoint-200"
    assert second[0].result is None and second[0].skipped == "checkpoint-200 was tested already"
    assert counter.read_text() == "x"
    assert (state_dir / "user-tests.json").exists()


def test_stop_ends_a_running_test(tmp_path: Path) -> None:
    root = tmp_path / "run"
    real_run(root, [100])
    config = make_config(
        [root],
        state_dir=tmp_path / "state",
        verify={"command": f"{sys.executable} -c 'import time; time.sleep(60)'"},
        **ROTATION_OF_ONE,
    )
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    result = run_user_test(config, str(root), Checkpoint("checkpoint-100", 100), stop=stop)
    assert time.monotonic() - started < 8
    assert result.verdict == "error" and result.error == "stopped (shutting down)"


# --- the daemon's daily job -----------------------------------------------------------------------


def test_the_daily_test_has_its_own_trigger_and_thread(tmp_path: Path) -> None:
    """`verify.at` local time, daily, only with a command; a test running for a long time does
    not hold up the prune, snapshot and disk jobs (they run on another executor)."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    from apscheduler.triggers.interval import IntervalTrigger

    from daemon.service.scheduler import Schedule, build_triggers

    berlin = ZoneInfo("Europe/Berlin")
    assert "verify" not in build_triggers(Config(timezone="Europe/Berlin"))
    configured = Config(
        timezone="Europe/Berlin", verify=VerifyConfig(command="t {path}", at="5:30")
    )
    trigger = build_triggers(configured)["verify"]
    first = trigger.get_next_fire_time(None, dt.datetime(2026, 3, 28, 12, 0, tzinfo=berlin))
    second = trigger.get_next_fire_time(first, first)
    assert first == dt.datetime(2026, 3, 29, 5, 30, tzinfo=berlin)  # the spring-forward day
    assert second == dt.datetime(2026, 3, 30, 5, 30, tzinfo=berlin)

    disk_runs: list[float] = []
    testing = threading.Event()

    def run_job(name: str) -> None:
        if name == "verify":
            testing.set()
            time.sleep(2.0)
        else:
            disk_runs.append(time.monotonic())

    schedule = Schedule(run_job)
    schedule.start(Config(snapshots={"enabled": False}))  # type: ignore[arg-type]
    try:
        schedule.apply(
            {"verify": IntervalTrigger(seconds=0.05), "disk": IntervalTrigger(seconds=0.1)}
        )
        assert testing.wait(5)
        started = time.monotonic()
        time.sleep(1.0)
        assert sum(1 for run in disk_runs if run > started) >= 3
    finally:
        schedule.shutdown()
        schedule.shutdown(wait=True)


def test_the_daemon_runs_the_users_test_daily_and_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from apscheduler.triggers.interval import IntervalTrigger

    from daemon.service import scheduler
    from daemon.service.lifecycle import serve

    root = tmp_path / "run"
    real_run(root, [100, 200])
    script = tmp_path / "test_model.py"
    script.write_text("import sys\nprint('tested', sys.argv[1])\n")
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        state_dir=state,
        disk={"interval": "1h"},
        verify={"command": f"{sys.executable} {script} {{path}}"},
    )
    # The daily time, brought forward: every half second.
    monkeypatch.setattr(scheduler, "verify_trigger", lambda *_: IntervalTrigger(seconds=0.5))
    stop, reload = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=lambda: serve(
            str(config), stop=stop, reload=reload, tick=0.05, configure_logs=False
        ),
        name="test-serve-verify",
    )
    thread.start()
    history = state / "history.jsonl"

    def tested() -> list[dict[str, object]]:
        if not history.exists():
            return []
        return [r for r in read_records(str(history)) if r["event"] == "user_test"]

    try:
        deadline = time.monotonic() + 20
        while not tested() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # more runs of the job: the checkpoint is tested once, not again
    finally:
        stop.set()
        thread.join(15)
    (record,) = tested()
    assert record["checkpoint"] == "checkpoint-200" and record["verdict"] == "verified"
    assert record["last_lines"] == [f"tested {root / 'checkpoint-200'}"]
    assert (state / "user-tests.json").exists()


def test_expired_holds_go_through_the_prunes_open_root_descriptor(tmp_path: Path) -> None:
    """The prune opens its root once (and checks it is the root it knows); expiring holds uses
    that descriptor, not the path, and leaves it open."""
    from daemon.verification import expire_and_record

    root = tmp_path / "run"
    real_run(root, [100])
    hold = root / ".ckptd-holds" / "checkpoint-100" / "eval.json"
    hold.parent.mkdir(parents=True)
    hold.write_text('{"until": "2000-01-01T00:00:00+00:00"}')
    descriptor = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        moved = tmp_path / "moved"
        root.rename(moved)  # the path no longer leads there: only the descriptor does
        with HistoryLog(str(tmp_path / "history.jsonl")) as history:
            (event,) = expire_and_record(
                str(root), now=time.time(), tz=None, history=history, opened=descriptor
            )
        assert event.holder == "eval" and event.root == str(root)
        assert not (moved / ".ckptd-holds" / "checkpoint-100" / "eval.json").exists()
        os.fstat(descriptor)  # still open
    finally:
        os.close(descriptor)
