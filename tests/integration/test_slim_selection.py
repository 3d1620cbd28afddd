"""What slimming moves out of a checkpoint, per layout, on real folders (issue 11); and the
plan and the guard around it: `ckptd plan` shows SLIM, the guard turns a slim down like a
deletion (newest, tracked, pinned, held, in use)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from daemon import slimming
from daemon.planner import plan_root
from daemon.render import plan_to_json, summary_line
from daemon.safety import facts as proc_facts
from daemon.safety import guard
from daemon.slimming import SLIM_RECORD, Selection, resume_state
from policies.model import Checkpoint, Decision, Plan
from tests.configs import make_config
from tests.layouts_fixtures import well_formed_bytes

NOW = 1_800_000_000.0
LENIENT = guard.SafetySettings(min_keep=0, max_delete_fraction=1.0)


def write(path: Path, size: int = 512) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".json"):
        # Discovery reads trainer_state.json: it must be JSON (padding is whitespace).
        path.write_bytes(b"{}".ljust(size))
    else:
        # Well-formed where the name says a format: the integrity checks read its header.
        path.write_bytes(well_formed_bytes(path.name, size))
    return path


def checkpoint(root: Path, name: str, layout: str) -> Checkpoint:
    return Checkpoint(name=name, step=1, layout=layout)


HF_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
]


def hf_checkpoint(root: Path, name: str = "checkpoint-100", extra: tuple[str, ...] = ()) -> Path:
    folder = root / name
    for file in (*HF_FILES, *extra):
        write(folder / file)
    return folder


def select(root: Path, name: str, layout: str, drop: list[str] | None = None) -> Selection:
    return resume_state(str(root), checkpoint(root, name, layout), drop)


# --- per layout ---------------------------------------------------------------------------------


def test_hugging_face_resume_state_is_optimizer_scheduler_scaler_and_rng(tmp_path: Path) -> None:
    hf_checkpoint(tmp_path, extra=("scaler.pt", "rng_state_1.pth", "tokenizer.json"))
    assert select(tmp_path, "checkpoint-100", "hf") == Selection(
        ("optimizer.pt", "rng_state.pth", "rng_state_1.pth", "scaler.pt", "scheduler.pt")
    )


def test_hugging_face_fsdp_optimizer_files_and_folders(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-100"
    for file in ("trainer_state.json", "optimizer_0/__0_0.distcp", "optimizer_1.bin"):
        write(folder / file)
    write(folder / "pytorch_model_fsdp_0" / "__0_0.distcp")
    assert select(tmp_path, "checkpoint-100", "hf").paths == ("optimizer_0", "optimizer_1.bin")


def test_hugging_face_deepspeed_folder_goes_whole_when_the_weights_are_beside_it(
    tmp_path: Path,
) -> None:
    folder = hf_checkpoint(tmp_path)
    (folder / "optimizer.pt").unlink()
    write(folder / "global_step100" / "mp_rank_00_model_states.pt")
    write(folder / "global_step100" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    selection = select(tmp_path, "checkpoint-100", "hf")
    assert selection.paths == ("global_step100", "rng_state.pth", "scheduler.pt")


def test_hugging_face_deepspeed_without_weights_beside_keeps_the_model_states(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "checkpoint-100"
    write(folder / "trainer_state.json")
    write(folder / "global_step100" / "mp_rank_00_model_states.pt")
    write(folder / "global_step100" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert select(tmp_path, "checkpoint-100", "hf").paths == (
        "global_step100/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    # ZeRO-3 keeps the weights in the optimizer shards: nothing at all is moved.
    write(folder / "global_step100" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    zero3 = select(tmp_path, "checkpoint-100", "hf")
    assert zero3.paths == () and zero3.problem is not None and "ZeRO-3" in zero3.problem


def test_deepspeed_optimizer_shards(tmp_path: Path) -> None:
    folder = tmp_path / "global_step3"
    write(folder / "mp_rank_00_model_states.pt")
    write(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    write(folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert select(tmp_path, "global_step3", "deepspeed").paths == (
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    )
    (folder / "mp_rank_00_model_states.pt").unlink()
    assert "weights may live only" in str(select(tmp_path, "global_step3", "deepspeed").problem)


def test_megatron_distributed_optimizer_per_rank(tmp_path: Path) -> None:
    folder = tmp_path / "iter_0000100"
    for rank in ("mp_rank_00", "mp_rank_01"):
        write(folder / rank / "model_optim_rng.pt")
        write(folder / rank / "distrib_optim.pt")
    assert select(tmp_path, "iter_0000100", "megatron").paths == (
        "mp_rank_00/distrib_optim.pt",
        "mp_rank_01/distrib_optim.pt",
    )


@pytest.mark.parametrize(
    ("files", "said"),
    [
        (["mp_rank_00/model_optim_rng.pt"], "model_optim_rng.pt"),
        (["__0_0.distcp", ".metadata", "common.pt"], "torch_dist"),
    ],
)
def test_megatron_without_a_distributed_optimizer_is_not_slimmable(
    tmp_path: Path, files: list[str], said: str
) -> None:
    for file in files:
        write(tmp_path / "iter_0000100" / file)
    selection = select(tmp_path, "iter_0000100", "megatron")
    assert selection.paths == () and said in str(selection.problem)


def test_orbax_needs_the_item_folders_named(tmp_path: Path) -> None:
    for file in ("_CHECKPOINT_METADATA", "default/_METADATA", "opt_state/_METADATA"):
        write(tmp_path / "100" / file)
    assert "slim.drop" in str(select(tmp_path, "100", "orbax").problem)
    assert select(tmp_path, "100", "orbax", ["opt_state"]).paths == ("opt_state",)


@pytest.mark.parametrize(
    ("name", "layout", "said"),
    [
        ("model_100.pt", "pt", "inside the same file"),
        ("epoch=0-step=100.ckpt", "lightning", "inside the same .ckpt"),
    ],
)
def test_single_files_are_never_slimmable_and_say_why(
    tmp_path: Path, name: str, layout: str, said: str
) -> None:
    write(tmp_path / name)
    selection = select(tmp_path, name, layout)
    assert selection.paths == () and said in str(selection.problem)


def test_dcp_shards_are_not_slimmable(tmp_path: Path) -> None:
    write(tmp_path / "checkpoint-100" / "__0_0.distcp")
    write(tmp_path / "checkpoint-100" / ".metadata")
    assert "same .distcp shards" in str(select(tmp_path, "checkpoint-100", "dcp").problem)


# --- slim.drop ----------------------------------------------------------------------------------


def test_drop_globs_replace_the_layout_names_and_never_take_markers(tmp_path: Path) -> None:
    folder = hf_checkpoint(tmp_path)
    write(folder / "mp_rank_00" / "distrib_optim.pt")
    write(folder / ".keep")
    selection = select(
        tmp_path, "checkpoint-100", "hf", ["optimizer.pt", "*.json", "mp_rank_*/distrib_*", ".*"]
    )
    # trainer_state.json (the completion marker), .keep and ckptd's files never go.
    assert selection.paths == (
        "config.json",
        "generation_config.json",
        "mp_rank_00/distrib_optim.pt",
        "optimizer.pt",
    )


def test_drop_globs_never_go_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "distrib_optim.pt")
    folder = hf_checkpoint(tmp_path / "root")
    (folder / "mp_rank_00").symlink_to(outside)
    selection = select(tmp_path / "root", "checkpoint-100", "hf", ["mp_rank_*/distrib_optim.pt"])
    assert selection.paths == () and "matched nothing" in str(selection.problem)
    # A symlinked checkpoint folder is not opened either.
    (tmp_path / "root" / "checkpoint-200").symlink_to(folder)
    assert select(tmp_path / "root", "checkpoint-200", "hf").paths == ()


def test_a_folder_dropped_whole_covers_what_is_under_it(tmp_path: Path) -> None:
    folder = tmp_path / "100"
    write(folder / "_CHECKPOINT_METADATA")
    write(folder / "opt_state" / "d" / "abc")
    assert select(tmp_path, "100", "orbax", ["opt_state", "opt_state/d"]).paths == ("opt_state",)


# --- sizes and records --------------------------------------------------------------------------


def test_measure_counts_allocated_bytes_and_nothing_for_files_linked_elsewhere(
    tmp_path: Path,
) -> None:
    folder = hf_checkpoint(tmp_path)
    write(folder / "optimizer.pt", 20_000)
    os.link(folder / "scheduler.pt", tmp_path / "snapshot-of-scheduler.pt")
    with slimming.open_folder(str(folder)) as descriptor:
        sizes = {s.path: s for s in slimming.measure(descriptor, ["optimizer.pt", "scheduler.pt"])}
    assert sizes["optimizer.pt"].bytes_logical == 20_000
    assert sizes["optimizer.pt"].bytes_freed == (folder / "optimizer.pt").stat().st_blocks * 512
    assert sizes["scheduler.pt"].bytes_freed == 0 and sizes["scheduler.pt"].bytes_logical == 512


def test_is_slimmed_reads_the_record_and_never_follows_a_symlink(tmp_path: Path) -> None:
    folder = hf_checkpoint(tmp_path)
    assert not slimming.is_slimmed(str(tmp_path), "checkpoint-100")
    record = slimming.SlimRecord(
        "checkpoint-100", NOW, (slimming.SlimmedFile("optimizer.pt", 4096, 10),), "1800000000-0"
    )
    (folder / SLIM_RECORD).write_text(json.dumps(record.to_json()))
    assert slimming.is_slimmed(str(tmp_path), "checkpoint-100")
    assert slimming.read_record(str(tmp_path), "checkpoint-100") == record
    other = hf_checkpoint(tmp_path, "checkpoint-200")
    (other / SLIM_RECORD).symlink_to(folder / SLIM_RECORD)
    assert not slimming.is_slimmed(str(tmp_path), "checkpoint-200")
    assert slimming.read_record(str(tmp_path), "checkpoint-200") is None


# --- the plan and the guard ---------------------------------------------------------------------


def hf_root(root: Path, steps: range) -> None:
    for step in steps:
        folder = hf_checkpoint(root, f"checkpoint-{step}")
        write(folder / "optimizer.pt", 8192)
        stamp = NOW - 86400 + step
        for path in [*folder.iterdir(), folder]:
            os.utime(path, (stamp, stamp))


# Tier 2 and 3 slimmed from tier 1 on (tests/configs.py builds the config around it).
SLIM_POLICY = {"keep_last": 3, "tier2_count": 4, "slim": {"after": "tier1"}}


def test_plan_slims_tier_2_and_3_with_their_files(tmp_path: Path) -> None:
    root = tmp_path / "run"
    hf_root(root, range(100, 1100, 100))
    config = make_config(
        [root], state_dir=root.parent / "state", root_settings={"policy": SLIM_POLICY}
    )
    root_config = config.roots[0]
    _scan, plan = plan_root(config, root_config, now=NOW)
    slimmed = {d.checkpoint.name for d in plan.slimmed}
    assert slimmed == {"checkpoint-400", "checkpoint-600"}
    assert {d.checkpoint.name for d in plan.kept if not d.slim} >= {"checkpoint-1000"}
    document = plan_to_json(plan)
    entry = next(c for c in document["checkpoints"] if c["name"] == "checkpoint-400")
    assert entry["action"] == "slim"
    assert entry["files"] == ["optimizer.pt", "rng_state.pth", "scheduler.pt"]
    assert entry["bytes_freed"] == sum(
        (root / "checkpoint-400" / f).stat().st_blocks * 512 for f in entry["files"]
    )
    assert document["summary"]["slim"] == 2
    assert "slim 2 (frees" in summary_line(plan)


def test_plan_keeps_a_not_slimmable_checkpoint_whole_and_says_why(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in range(100, 1100, 100):
        write(root / f"model_{step}.pt")
        os.utime(root / f"model_{step}.pt", (NOW - 3600, NOW - 3600))
    config = make_config(
        [root], state_dir=root.parent / "state", root_settings={"policy": SLIM_POLICY}
    )
    root_config = config.roots[0]
    _scan, plan = plan_root(config, root_config, now=NOW)
    assert plan.slimmed == ()
    reasons = next(d for d in plan.decisions if d.checkpoint.step == 400).reasons
    assert any(r.startswith("not-slimmable:the optimizer is inside") for r in reasons), reasons


def test_a_slimmed_checkpoint_is_seen_as_slimmed_and_not_slimmed_again(tmp_path: Path) -> None:
    root = tmp_path / "run"
    hf_root(root, range(100, 1100, 100))
    (root / "checkpoint-400" / "optimizer.pt").unlink()
    write(root / "checkpoint-400" / SLIM_RECORD)
    config = make_config(
        [root], state_dir=root.parent / "state", root_settings={"policy": SLIM_POLICY}
    )
    root_config = config.roots[0]
    scan, plan = plan_root(config, root_config, now=NOW)
    by_name = {c.name: c for c in scan.checkpoints}
    assert by_name["checkpoint-400"].slimmed and by_name["checkpoint-400"].complete
    assert {d.checkpoint.name for d in plan.slimmed} == {"checkpoint-600"}
    entry = next(c for c in plan_to_json(plan)["checkpoints"] if c["name"] == "checkpoint-400")
    assert entry["action"] == "keep" and entry["slimmed"] is True


def slim_everything_plan(root: Path, steps: list[int]) -> Plan:
    """Every checkpoint kept and slimmed, whatever protects it (what the guard must fix)."""
    decisions = []
    for step in steps:
        name = f"checkpoint-{step}"
        marks: dict[str, object] = {}
        if step == 200:
            marks["pinned_by"] = (".keep",)
        if step == 300:
            marks["tracked_by"] = ("latest",)
        decision = Decision(
            Checkpoint(name=name, step=step, layout="hf", **marks),  # type: ignore[arg-type]
            True,
            ("tier3:every-100", "slim:after-tier1"),
            3,
            slim=True,
        )
        if step == 400:
            decision = replace(decision, reasons=(*decision.reasons, "held:alice until later"))
        decisions.append(decision)
    return Plan(root=str(root), decisions=tuple(decisions))


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    hf_root(tmp_path, range(100, 700, 100))
    code = "import sys, time; h = open(sys.argv[1]); print('ready', flush=True); time.sleep(60)"
    target = tmp_path / "checkpoint-500" / "model.safetensors"
    process = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
    yield process
    process.kill()
    process.wait()


def test_the_guard_turns_down_slims_of_protected_held_in_use_and_newest(
    tmp_path: Path, reader: subprocess.Popen[bytes]
) -> None:
    steps = [100, 200, 300, 400, 500, 600]
    plan = slim_everything_plan(tmp_path, steps)
    facts = proc_facts.gather_facts(str(tmp_path), now=NOW)
    guarded = guard.guard(plan, facts, LENIENT)
    by_step = {d.checkpoint.step: d for d in guarded.decisions}
    assert [step for step, d in by_step.items() if d.slim] == [100]
    expected = {200: "pinned", 300: "tracked", 400: "held", 600: "newest"}
    for step, why in expected.items():
        assert by_step[step].keep and f"slim-vetoed:{why}" in by_step[step].reasons, by_step[step]
    assert f"slim-vetoed:in-use:pid {reader.pid}" in by_step[500].reasons[-1]
    assert "slim:after-tier1" not in by_step[500].reasons
    assert {d.checkpoint.step for d in guard.vetoed(plan, guarded)} == {200, 300, 400, 500, 600}
    # Slims are no deletions: max_delete_fraction and min_keep do not count them.
    strict = guard.SafetySettings(min_keep=6, max_delete_fraction=0.01)
    assert guard.guard(plan, facts, strict).slimmed != ()


def test_resolve_keeps_whole_what_a_later_protection_names(tmp_path: Path) -> None:
    root = tmp_path / "run"
    hf_root(root, range(100, 1100, 100))
    config = make_config(
        [root], state_dir=root.parent / "state", root_settings={"policy": SLIM_POLICY}
    )
    root_config = config.roots[0]
    _scan, plan = plan_root(config, root_config, now=NOW)
    held = tuple(
        replace(d, reasons=(*d.reasons, "held:alice until 2026-06-01 12:00"))
        if d.checkpoint.name == "checkpoint-400"
        else d
        for d in plan.decisions
    )
    from daemon.planner import series_policies

    specs = series_policies(config, root_config, ("hf",))
    resolved = slimming.resolve(replace(plan, decisions=held, slim_targets={}), specs)
    by_name = {d.checkpoint.name: d for d in resolved.decisions}
    assert not by_name["checkpoint-400"].slim
    assert "slim-vetoed:held" in by_name["checkpoint-400"].reasons
    assert by_name["checkpoint-600"].slim and "checkpoint-600" in resolved.slim_targets
