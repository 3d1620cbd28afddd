"""The safety guard: invariants no plan can override, and real processes holding real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.pruning import pipeline
from daemon.safety import facts as proc_facts
from daemon.safety import guard
from daemon.safety.facts import Facts, Holder, ProcessIdentity
from daemon.safety.guard import RootRefused, SafetySettings
from policies.model import Checkpoint, Decision, Plan, PolicySpec
from tests.configs import make_config
from tests.layouts_fixtures import hf_checkpoint, hf_run

NOW = 1_800_000_000.0
LENIENT = SafetySettings(min_keep=0, max_delete_fraction=1.0, force=False)


def make_root(root: Path, steps: list[int]) -> None:
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.bin").write_bytes(b"w" * 4096)
        (folder / "trainer_state.json").write_text("{}")


def delete_all_plan(root: Path, steps: list[int], **overrides: dict[str, object]) -> Plan:
    """A deliberately broken plan: it deletes every checkpoint it is given."""
    decisions = []
    for step in steps:
        fields: dict[str, object] = {
            "name": f"checkpoint-{step}",
            "step": step,
            "mtime": NOW - 3600,
        }
        fields.update(overrides.get(f"checkpoint-{step}", {}))
        decisions.append(Decision(Checkpoint(**fields), keep=False, reasons=("tier3:every-1000",)))  # type: ignore[arg-type]
    return Plan(root=str(root), decisions=tuple(decisions))


def empty_facts(root: Path) -> Facts:
    return Facts(root_path=str(root), now=NOW)


def by_name(plan: Plan) -> dict[str, Decision]:
    return {decision.checkpoint.name: decision for decision in plan.decisions}


# --- the broken plan ---------------------------------------------------------------------------


def test_a_plan_deleting_everything_keeps_newest_incomplete_tracked_pinned(tmp_path: Path) -> None:
    steps = list(range(100, 1100, 100))
    plan = delete_all_plan(
        tmp_path,
        steps,
        **{
            "checkpoint-1000": {"complete": False, "incomplete_reason": "no trainer_state.json"},
            "checkpoint-300": {"tracked_by": ("latest",)},
            "checkpoint-200": {"pinned_by": (".keep",)},
        },
    )
    guarded = guard.guard(plan, empty_facts(tmp_path), SafetySettings(min_keep=0, force=True))
    decisions = by_name(guarded)
    # The newest *complete* one is 900: 1000 is incomplete.
    assert decisions["checkpoint-900"].keep and "newest" in decisions["checkpoint-900"].reasons
    assert decisions["checkpoint-1000"].keep
    assert "incomplete" in decisions["checkpoint-1000"].reasons
    assert decisions["checkpoint-300"].keep and "tracked" in decisions["checkpoint-300"].reasons
    assert decisions["checkpoint-200"].keep and "pinned" in decisions["checkpoint-200"].reasons
    deleted = {d.checkpoint.name for d in guarded.deleted}
    assert deleted == {f"checkpoint-{s}" for s in (100, 400, 500, 600, 700, 800)}


def test_min_keep_holds_back_the_newest_deletions(tmp_path: Path) -> None:
    steps = list(range(100, 1100, 100))
    plan = delete_all_plan(tmp_path, steps)
    guarded = guard.guard(plan, empty_facts(tmp_path), SafetySettings(min_keep=4, force=True))
    kept = sorted(d.checkpoint.step for d in guarded.kept)
    assert kept == [700, 800, 900, 1000]
    assert "min_keep:4" in by_name(guarded)["checkpoint-800"].reasons


def test_min_keep_holds_in_every_series_of_a_root(tmp_path: Path) -> None:
    """A root with a mid-epoch rotation and epoch checkpoints: a plan that empties the rotation
    leaves it min_keep checkpoints even though the other series alone has plenty."""
    epochs = [
        Decision(
            Checkpoint(name=f"checkpoint_epoch_{n}.pt", step=n, series="epoch", mtime=NOW - 3600),
            keep=True,
            reasons=("tier1",),
        )
        for n in range(1, 11)
    ]
    rotation = [
        Decision(
            Checkpoint(name=f"mid_epoch_10_{s}.pt", step=s, series="mid", mtime=NOW - 3600),
            keep=False,
            reasons=("tier1",),
        )
        for s in range(100, 600, 100)
    ]
    plan = Plan(root=str(tmp_path), decisions=tuple(epochs + rotation))
    guarded = guard.guard(plan, empty_facts(tmp_path), SafetySettings(min_keep=2, force=True))
    kept_mid = sorted(d.checkpoint.step for d in guarded.kept if d.checkpoint.series == "mid")
    assert kept_mid == [400, 500]
    assert "newest" in by_name(guarded)["mid_epoch_10_500.pt"].reasons
    assert "min_keep:2" in by_name(guarded)["mid_epoch_10_400.pt"].reasons


def test_more_than_max_delete_fraction_refuses_the_root_unless_forced(tmp_path: Path) -> None:
    steps = list(range(100, 1100, 100))
    plan = delete_all_plan(tmp_path, steps)
    settings = SafetySettings(min_keep=1, max_delete_fraction=0.5)
    with pytest.raises(RootRefused, match="deletes 9 of 10") as refused:
        guard.guard(plan, empty_facts(tmp_path), settings)
    assert refused.value.exit_code == 3
    forced = guard.guard(
        plan, empty_facts(tmp_path), SafetySettings(min_keep=1, max_delete_fraction=0.5, force=True)
    )
    assert len(forced.deleted) == 9
    # Exactly at the limit is allowed: 5 of 10 at 0.5.
    half = Plan(
        root=plan.root,
        decisions=tuple(
            d if d.checkpoint.step <= 500 else Decision(d.checkpoint, True, ("tier1",))
            for d in plan.decisions
        ),
    )
    assert len(guard.guard(half, empty_facts(tmp_path), settings).deleted) == 5


@pytest.mark.parametrize("bad", ["../outside", "a/b", "..", ".", ".ckptd-trash", ""])
def test_entries_not_directly_inside_the_root_are_never_deleted(tmp_path: Path, bad: str) -> None:
    plan = delete_all_plan(tmp_path, [100, 200, 300])
    broken = Decision(Checkpoint(name="checkpoint-100", step=100, entries=(bad,)), False, ("x",))
    plan = Plan(root=plan.root, decisions=(broken, *plan.decisions[1:]))
    guarded = guard.guard(plan, empty_facts(tmp_path), LENIENT)
    decision = by_name(guarded)["checkpoint-100"]
    assert decision.keep
    assert any(reason.startswith("outside-root:") for reason in decision.reasons)


def test_a_settling_newest_save_is_kept_and_does_not_stop_older_deletions(tmp_path: Path) -> None:
    """Issue 9, point 3: a save that is merely settling is incomplete (never deleted, not the
    newest complete one) but does not refuse the root; only the trainer holding it does."""
    for reason in ("settling: written 3 s ago", "no trainer_state.json"):
        plan = delete_all_plan(
            tmp_path,
            [100, 200, 300],
            **{"checkpoint-300": {"complete": False, "incomplete_reason": reason}},
        )
        guarded = guard.guard(plan, empty_facts(tmp_path), LENIENT)
        assert by_name(guarded)["checkpoint-300"].reasons[0] == "incomplete"
        assert by_name(guarded)["checkpoint-200"].reasons[0] == "newest"  # newest complete
        assert [d.checkpoint.name for d in guarded.deleted] == ["checkpoint-100"]


def test_only_an_abandoned_save_quiet_for_abandoned_after_may_go(tmp_path: Path) -> None:
    """Issue 9, point 2: a save flagged abandoned goes (reason abandoned-save) once nothing was
    written in it for `abandoned_after`; any other incomplete checkpoint is kept, and min_keep
    does not hold back a crashed save (it is nothing to resume from)."""
    plan = delete_all_plan(
        tmp_path,
        [100, 200, 300, 400, 450, 500],
        **{
            "checkpoint-400": {"complete": False, "abandoned": True, "mtime": NOW - 7200},
            # Flagged, but written to a minute ago (as of the facts): not quiet long enough.
            "checkpoint-500": {"complete": False, "abandoned": True, "mtime": NOW - 60},
            # Old, but not flagged by the planner.
            "checkpoint-450": {"complete": False, "mtime": NOW - 7200},
        },
    )
    settings = SafetySettings(min_keep=10, max_delete_fraction=1.0, abandoned_after=3600)
    guarded = guard.guard(plan, empty_facts(tmp_path), settings)
    assert [d.checkpoint.name for d in guarded.deleted] == ["checkpoint-400"]
    assert by_name(guarded)["checkpoint-450"].reasons[0] == "incomplete"
    assert by_name(guarded)["checkpoint-500"].reasons[0] == "incomplete"
    assert by_name(guarded)["checkpoint-300"].reasons[0] == "newest"
    assert by_name(guarded)["checkpoint-100"].reasons[0] == "min_keep:10"


# --- real processes ----------------------------------------------------------------------------

HOLDERS = {
    "open": "handle = open(sys.argv[1], 'rb')",
    # libc mmap, then close the descriptor: only the map holds the file (Python's mmap module
    # would keep a duplicate descriptor open and hide what this test is about).
    "mmap": (
        "import ctypes, os; libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p; "
        "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, "
        "ctypes.c_int, ctypes.c_long]; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "address = libc.mmap(None, 4096, 1, 1, fd, 0); os.close(fd); "
        "assert address not in (None, ctypes.c_void_p(-1).value)"
    ),
    "cwd": "import os; os.chdir(os.path.dirname(sys.argv[1]))",
}


def spawn_holder(how: str, path: Path) -> subprocess.Popen[bytes]:
    """Start a real process that holds `path` (open file, map or cwd) and wait until it does."""
    code = f"import sys, time; {HOLDERS[how]}; print('ready', flush=True); time.sleep(60)"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, cwd="/"
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == b"ready"
    return process


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


@pytest.mark.parametrize("how", ["open", "mmap", "cwd"])
def test_the_trainer_holding_the_newest_refuses_the_root(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], how: str
) -> None:
    steps = [100, 200, 300, 400]
    make_root(tmp_path, steps)
    trainer = spawn_holder(how, tmp_path / "checkpoint-400" / "model.bin")
    processes.append(trainer)
    facts = proc_facts.gather_facts(str(tmp_path), now=NOW)
    assert ProcessIdentity(trainer.pid, facts.holders["checkpoint-400"][0].create_time) in (
        facts.trainers
    )
    with pytest.raises(RootRefused) as refused:
        guard.guard(delete_all_plan(tmp_path, steps), facts, LENIENT)
    assert f"pid {trainer.pid}" in refused.value.reason
    assert "python" in refused.value.reason  # the command line is named
    assert refused.value.holders[0].how == how
    # Once the trainer is gone the same plan goes through (the newest is still kept).
    trainer.kill()
    trainer.wait()
    guarded = guard.guard(
        delete_all_plan(tmp_path, steps), proc_facts.gather_facts(str(tmp_path), now=NOW), LENIENT
    )
    assert [d.checkpoint.step for d in guarded.kept] == [400]


@pytest.mark.parametrize("how", ["open", "mmap", "cwd"])
def test_any_process_holding_an_older_checkpoint_vetoes_it(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], how: str
) -> None:
    steps = [100, 200, 300, 400]
    make_root(tmp_path, steps)
    reader = spawn_holder(how, tmp_path / "checkpoint-200" / "model.bin")
    processes.append(reader)
    guarded = guard.guard(
        delete_all_plan(tmp_path, steps), proc_facts.gather_facts(str(tmp_path), now=NOW), LENIENT
    )
    decision = by_name(guarded)["checkpoint-200"]
    assert decision.keep
    assert any(reason.startswith(f"in-use:pid {reader.pid} (") for reason in decision.reasons)
    assert {d.checkpoint.name for d in guarded.deleted} == {"checkpoint-100", "checkpoint-300"}
    # The last-moment re-check sees the same process, and only for that checkpoint.
    assert [h.pid for h in proc_facts.holders_of(str(tmp_path), ["checkpoint-200"])] == [reader.pid]
    assert proc_facts.holders_of(str(tmp_path), ["checkpoint-100"]) == ()


def test_pid_file_names_the_trainer_and_others_only_veto(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    steps = [100, 200, 300]
    root = tmp_path / "root"
    make_root(root, steps)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x").write_text("x")
    trainer = spawn_holder("open", tmp_path / "elsewhere" / "x")
    viewer = spawn_holder("open", root / "checkpoint-300" / "model.bin")
    processes.extend([trainer, viewer])
    pid_file = tmp_path / "train.pid"
    pid_file.write_text(f"{trainer.pid}\n")
    facts = proc_facts.gather_facts(str(root), now=NOW, trainer_pid_file=str(pid_file))
    assert {identity.pid for identity in facts.trainers} == {trainer.pid}
    # A viewer of the newest is not the trainer: no refusal, and the newest is kept anyway.
    guarded = guard.guard(delete_all_plan(root, steps), facts, LENIENT)
    assert by_name(guarded)["checkpoint-300"].keep
    # The same viewer named as trainer by its command line refuses the root.
    pattern = r"python.*-c .*handle = open"
    by_cmdline = proc_facts.gather_facts(str(root), now=NOW, trainer_cmdline=pattern)
    assert viewer.pid in {identity.pid for identity in by_cmdline.trainers}
    with pytest.raises(RootRefused, match=f"pid {viewer.pid}"):
        guard.guard(delete_all_plan(root, steps), by_cmdline, LENIENT)


def test_a_reused_pid_is_not_the_trainer(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    (tmp_path / "f").write_text("x")
    process = spawn_holder("open", tmp_path / "f")
    processes.append(process)
    pid_file = tmp_path / "train.pid"
    pid_file.write_text(str(process.pid))
    real = proc_facts.find_trainers([], pid_file=str(pid_file), cmdline_pattern=None)
    (identity,) = real
    # The trainer we knew started at another time: the process now behind that PID is not it.
    remembered = identity.create_time - 30.0
    assert (
        proc_facts.find_trainers(
            [], pid_file=str(pid_file), cmdline_pattern=None, pid_file_create_time=remembered
        )
        == frozenset()
    )
    # And a holder with the right PID but another create time is not identified as trainer.
    facts = Facts(root_path=str(tmp_path), now=NOW, trainers=real)
    impostor = Holder(process.pid, identity.create_time + 5.0, "other", "open", "/x")
    assert not facts.is_trainer(impostor)
    assert facts.is_trainer(Holder(process.pid, identity.create_time, "x", "open", "/x"))
    # A PID file naming a dead process names no trainer.
    process.kill()
    process.wait()
    assert proc_facts.find_trainers([], pid_file=str(pid_file), cmdline_pattern=None) == frozenset()


def test_gathering_facts_is_one_cheap_pass(tmp_path: Path) -> None:
    make_root(tmp_path, [100])
    started = time.perf_counter()
    for _ in range(5):
        proc_facts.gather_facts(str(tmp_path), now=NOW)
    assert (time.perf_counter() - started) / 5 < 0.5


UNINSPECTABLE_PROBE = """
import json, sys
from daemon.safety import facts as proc_facts
from daemon.safety import guard
facts = proc_facts.gather_facts(sys.argv[1], now=0.0)
print(json.dumps([[h.pid, h.how] for h in facts.everywhere]))
"""


def _interpreter_for_other_users() -> tuple[str, str]:
    """An interpreter and PYTHONPATH an unprivileged user can run ckptd's safety module with."""
    import psutil

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = str(Path(psutil.__file__).resolve().parents[1])
    repository = str(Path(__file__).resolve().parents[2])
    path = f"{repository}:{site_packages}"
    candidates = (
        os.path.realpath(sys.executable),
        f"/usr/bin/{version}",
        f"/usr/local/bin/{version}",
    )
    for candidate in candidates:
        try:
            check = subprocess.run(
                [candidate, "-c", "import psutil, daemon.safety.facts"],
                env={"PYTHONPATH": path},
                user=65534,
                group=65534,
                capture_output=True,
            )
        except OSError:
            continue
        if check.returncode == 0:
            return candidate, path
    pytest.skip("no Python interpreter that user nobody may run with psutil and ckptd")


def test_uninspectable_processes_count_as_holding_only_when_they_could_reach_the_root(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the probe as another user")
    base = Path("/tmp") / f"ckptd-safety-{os.getpid()}"
    root = base / "root"
    make_root(root, [100])
    os.chmod(base, 0o755)
    os.chmod(root, 0o755)
    try:
        # A root-owned and another user's process, holding nothing there: the unprivileged
        # probe (uid 65534) cannot look inside either.
        (tmp_path / "f").write_text("x")
        os.chmod(tmp_path, 0o755)
        os.chmod(tmp_path / "f", 0o644)
        root_process = spawn_holder("open", tmp_path / "f")
        interpreter, path = _interpreter_for_other_users()
        other_user = subprocess.Popen(
            [interpreter, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE,
            user=1001,
            group=1001,
            cwd="/",
        )
        processes.extend([root_process, other_user])
        assert other_user.stdout is not None and other_user.stdout.readline() == b"ready\n"

        def probe() -> set[int]:
            result = subprocess.run(
                [interpreter, "-c", UNINSPECTABLE_PROBE, str(root)],
                capture_output=True,
                text=True,
                env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
                user=65534,
                group=65534,
                check=True,
            )
            return {int(pid) for pid, _how in json.loads(result.stdout)}

        # The root is o+x: anyone could hold a file in it, so both count; kernel threads never.
        counted = probe()
        assert {root_process.pid, other_user.pid} <= counted
        assert 2 not in counted  # kthreadd
        # A root only its owner (root) may enter: uid 1001 cannot hold anything in it.
        os.chmod(root, 0o700)
        counted = probe()
        assert root_process.pid in counted
        assert other_user.pid not in counted
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)


def test_a_process_holding_an_abandoned_save_keeps_it(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    make_root(tmp_path, [100, 200])
    crashed = tmp_path / "checkpoint-300"
    crashed.mkdir()
    (crashed / "model.bin").write_bytes(b"w" * 4096)
    reader = spawn_holder("open", crashed / "model.bin")
    processes.append(reader)
    plan = delete_all_plan(
        tmp_path,
        [100, 200, 300],
        **{"checkpoint-300": {"complete": False, "abandoned": True, "mtime": NOW - 7200}},
    )
    settings = SafetySettings(min_keep=0, max_delete_fraction=1.0, abandoned_after=3600)
    facts = proc_facts.gather_facts(str(tmp_path), now=NOW)
    # The reader holds something above the newest complete checkpoint: as the trainer (it is
    # the only process holding anything) it refuses the root; named as another process, it
    # vetoes the abandoned save only.
    with pytest.raises(RootRefused, match="checkpoint-300"):
        guard.guard(plan, facts, settings)
    as_reader = Facts(
        root_path=facts.root_path, now=NOW, holders=facts.holders, trainers=frozenset()
    )
    guarded = guard.guard(plan, as_reader, settings)
    decision = by_name(guarded)["checkpoint-300"]
    assert decision.keep
    assert any(reason.startswith(f"in-use:pid {reader.pid} (") for reason in decision.reasons)
    assert [d.checkpoint.name for d in guarded.deleted] == ["checkpoint-100"]


def test_min_keep_counts_only_complete_survivors() -> None:
    # Three crashed saves (no trainer_state.json, never resumable) are kept as incomplete;
    # they must not stand in for the min_keep checkpoints a resume can fall back on.
    complete = [Checkpoint(name=f"checkpoint-{s}", step=s) for s in (100, 200, 300, 400, 500)]
    broken = [
        Checkpoint(name=f"checkpoint-{s}", step=s, complete=False, incomplete_reason="no state")
        for s in (150, 250, 350)
    ]
    decisions = [
        Decision(c, c.step == 500, ("tier1",) if c.step == 500 else ("tier3",)) for c in complete
    ]
    decisions += [Decision(c, True, ("incomplete",)) for c in broken]
    plan = Plan(root="/r", decisions=tuple(decisions))
    facts = proc_facts.Facts(root_path="/r", now=1e9)
    guarded = guard.guard(plan, facts, guard.SafetySettings(min_keep=3, force=True))
    kept_complete = sorted(d.checkpoint.step for d in guarded.kept if d.checkpoint.complete)
    assert kept_complete == [300, 400, 500]


def test_a_save_in_progress_refuses_the_root_even_below_a_crashed_higher_step(
    tmp_path: Path,
) -> None:
    # A run crashed while saving checkpoint-5000 (left incomplete) and was restarted from
    # checkpoint-900; it is writing checkpoint-1000 now. The stale 5000 has the highest step,
    # but the checkpoint being written is 1000: the root must be refused while the trainer holds
    # it. Once it lets go, the save that is merely settling only keeps itself (issue 9, point 3).
    root = tmp_path / "run"
    hf_run(root, range(100, 1000, 100))
    hf_checkpoint(root, 5000, complete=False)
    hf_checkpoint(root, 1000, complete=False, age_seconds=None)  # being written now
    config = make_config([root], grace=0)
    spec = PolicySpec(keep_last=2, tier2_count=0, tier3_interval=None)
    written = next(path for path in (root / "checkpoint-1000").iterdir() if path.is_file())
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; f = open(sys.argv[1], 'ab'); sys.stdin.read()",
            str(written),
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 5
        while not proc_facts.holders_of(str(root), ["checkpoint-1000"]):
            assert time.monotonic() < deadline, "the trainer never opened its file"
            time.sleep(0.02)
        report = pipeline.prune_root(
            config, config.roots[0], now=time.time(), dry_run=False, policy_override=spec
        )
    finally:
        trainer.communicate("", timeout=5)
    assert report.refused is not None and "checkpoint-1000" in report.refused
    assert report.deleted == ()
    assert len([p for p in root.iterdir() if p.name.startswith("checkpoint-")]) == 11
    report = pipeline.prune_root(
        config, config.roots[0], now=time.time(), dry_run=False, policy_override=spec
    )
    assert report.refused is None
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))
    # keep_last 2, raised to min_keep 3: 700-900, and the save in flight; the crashed 5000,
    # quiet for an hour (abandoned_after) and held by nobody, went as an abandoned save.
    assert names == [f"checkpoint-{step}" for step in (1000, 700, 800, 900)]
    why = {d.checkpoint.name: d.reasons for d in report.plan.deleted}
    assert why["checkpoint-5000"] == ("abandoned-save",)


# --- a restarted run: the live run's newest is the newest -------------------------------------


def restarted_plan(root: Path) -> Plan:
    """A broken plan deleting everything of a run restarted from step 1000 after it had reached
    3000: 1100 and 1200 are the live run's, 1300..3000 the abandoned branch's higher steps."""
    decisions = [
        Decision(
            Checkpoint(f"checkpoint-{step}", step, mtime=NOW - 7200 + step),
            keep=False,
            reasons=("tier3:every-1000",),
            branch="abandoned-after-1000" if 1000 < step <= 3000 and step % 100 == 0 else None,
        )
        for step in range(100, 3100, 100)
    ]
    live = [
        Decision(
            Checkpoint(f"checkpoint-{step}-r", step, mtime=NOW - 60 + step, version=1), False, ()
        )
        for step in (1100, 1200)
    ]
    return Plan(root=str(root), decisions=(*decisions, *live))


def test_after_a_restart_the_live_runs_newest_is_never_deleted(tmp_path: Path) -> None:
    guarded = by_name(guard.guard(restarted_plan(tmp_path), empty_facts(tmp_path), LENIENT))
    assert guarded["checkpoint-1200-r"].keep and "newest" in guarded["checkpoint-1200-r"].reasons
    assert not guarded["checkpoint-3000"].keep  # the abandoned branch's top is not the newest


def test_after_a_restart_the_trainer_holding_the_live_newest_refuses_the_root(
    tmp_path: Path,
) -> None:
    trainer = ProcessIdentity(4242, 1.0)
    holder = Holder(4242, 1.0, "python train.py", "open", "checkpoint-1200-r/optimizer.pt")
    facts = Facts(
        root_path=str(tmp_path),
        now=NOW,
        holders={"checkpoint-1200-r": (holder,)},
        trainers=frozenset({trainer}),
    )
    with pytest.raises(RootRefused, match="checkpoint-1200-r"):
        guard.guard(restarted_plan(tmp_path), facts, LENIENT)


def test_min_keep_after_a_restart_keeps_the_live_run_first(tmp_path: Path) -> None:
    settings = SafetySettings(min_keep=3, max_delete_fraction=1.0, force=True)
    guarded = guard.guard(restarted_plan(tmp_path), empty_facts(tmp_path), settings)
    assert {d.checkpoint.name for d in guarded.kept} == {
        "checkpoint-1200-r",
        "checkpoint-1100-r",
        "checkpoint-1000",
    }
