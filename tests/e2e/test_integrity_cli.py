"""Issue 12 as a user meets it: `ckptd verify`, `last-good`, `hold`, `release`, `holds`, and what
`plan`, `prune` and `status` make of corrupt and held checkpoints. The installed CLI, as a
subprocess, on real folders of real Hugging Face checkpoints (saved by transformers itself:
tests/fixtures/integrity/trees/hf), broken the way a full disk breaks them."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.configs import rotation, write_config
from tests.layouts_fixtures import age

HF_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "integrity" / "trees" / "hf"
REAL_CHECKPOINT = HF_FIXTURE / "checkpoint-10"
# The policy keeps only the newest checkpoint (a rotation of one), so any checkpoint the plan
# keeps beyond it is kept for a reason of issue 12 (tests/configs.py writes the config).
ROTATION_OF_ONE: dict[str, Any] = {
    "policy": rotation(1, cadence=100),
    "settle_seconds": 1,
    "min_keep": 0,
    "max_delete_fraction": 1.0,
    "grace": "0s",
}


def real_hf_run(root: Path, steps: list[int]) -> None:
    """Given a folder and steps, fill it with copies of a real HF Trainer checkpoint, settled:
    one save an hour, the newest an hour ago."""
    now = time.time()
    for index, step in enumerate(steps):
        folder = root / f"checkpoint-{step}"
        shutil.copytree(REAL_CHECKPOINT, folder)
        age(folder, 3600.0 * (len(steps) - index), now=now)


def cut_short(path: Path, keep: float = 0.3) -> None:
    """Given a file, cut it to a part of its size as a full disk does, keeping its mtime."""
    status = path.stat()
    os.truncate(path, int(status.st_size * keep))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def disk_filled_during_a_save(root: Path, *steps: int) -> None:
    for step in steps:
        cut_short(root / f"checkpoint-{step}" / "model.safetensors")
        cut_short(root / f"checkpoint-{step}" / "optimizer.pt")


def run(
    command: list[str], env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The CLI's environment with its own user state folder (a bare ROOT keeps state there)."""
    environment = dict(cli_env)
    environment["XDG_STATE_HOME"] = str(tmp_path / "user-state")
    return environment


def history_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def _fixture_present() -> None:
    if not REAL_CHECKPOINT.is_dir():
        pytest.skip("the real HF checkpoint fixture is not in this checkout")


# --- verify ---------------------------------------------------------------------------------------


def test_verify_finds_what_a_full_disk_truncated_and_records_it_once(
    tmp_path: Path, ckptd_command: list[str], env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    real_hf_run(root, [100, 200, 300])
    clean = run(ckptd_command, env, "verify", str(root))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "3 checked: 0 corrupt" in clean.stdout

    disk_filled_during_a_save(root, 300)
    broken = run(ckptd_command, env, "verify", str(root), "--json")
    assert broken.returncode == 1, broken.stderr
    document = json.loads(broken.stdout)
    statuses = {item["name"]: item["status"] for item in document["checkpoints"]}
    assert statuses == {"checkpoint-100": "ok", "checkpoint-200": "ok", "checkpoint-300": "corrupt"}
    (item,) = [item for item in document["checkpoints"] if item["status"] == "corrupt"]
    assert any(problem.startswith("model.safetensors:") for problem in item["problems"])
    assert any(problem.startswith("optimizer.pt:") for problem in item["problems"])
    # The checkpoints already checked were remembered for their (unchanged) signature.
    assert [i["remembered"] for i in document["checkpoints"]] == [True, True, False]

    history = tmp_path / "user-state" / "ckptd" / "history.jsonl"
    again = run(ckptd_command, env, "verify", str(root))
    assert again.returncode == 1
    assert "checkpoint-300  corrupt" in again.stdout.replace("corrupt  ", "corrupt ")
    records = [r for r in history_of(history) if r["event"] == "integrity_corrupt"]
    assert len(records) == 1, records  # found once, recorded once
    assert records[0]["checkpoint"] == "checkpoint-300" and records[0]["deep"] is False


def test_verify_deep_reads_every_checksum_and_reports_progress(
    tmp_path: Path, ckptd_command: list[str], env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    real_hf_run(root, [100, 200])
    # A flipped byte inside the optimizer state: headers intact, only a checksum can tell.
    optimizer = root / "checkpoint-200" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    with zipfile.ZipFile(optimizer) as archive:
        member = archive.getinfo("optimizer/data/1")
    names, extra = struct.unpack_from("<HH", data, member.header_offset + 26)
    data[member.header_offset + 30 + names + extra + member.file_size // 2] ^= 0xFF
    status = optimizer.stat()
    optimizer.write_bytes(bytes(data))
    os.utime(optimizer, ns=(status.st_atime_ns, status.st_mtime_ns))

    cheap = run(ckptd_command, env, "verify", str(root))
    assert cheap.returncode == 0, cheap.stdout
    deep = run(ckptd_command, env, "verify", str(root), "--deep", "--json")
    assert deep.returncode == 1, deep.stdout + deep.stderr
    document = json.loads(deep.stdout)
    by_name = {item["name"]: item for item in document["checkpoints"]}
    assert by_name["checkpoint-100"]["status"] == "ok" and by_name["checkpoint-100"]["deep"]
    assert by_name["checkpoint-200"]["status"] == "corrupt"
    assert "CRC" in by_name["checkpoint-200"]["problems"][0]
    assert by_name["checkpoint-100"]["bytes_read"] > 15_000  # every zip member's bytes
    # Progress without a terminal: one line per checkpoint with the bytes verified.
    assert "checkpoint-100: " in deep.stderr and "verified" in deep.stderr


def test_verify_checks_the_trackers_of_a_root(
    tmp_path: Path, ckptd_command: list[str], env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    real_hf_run(root, [100])
    (root / "latest").write_text("global_step900\n")  # DeepSpeed's tracker, naming nothing
    result = run(ckptd_command, env, "verify", str(root), "--json")
    assert result.returncode == 1
    problems = json.loads(result.stdout)["trackers"]["problems"]
    assert problems and problems[0].startswith("latest:")


# --- plan, prune, status, last-good: the disk-full story ------------------------------------------


def test_after_a_full_disk_the_last_good_checkpoint_survives_the_prune_and_is_named(
    tmp_path: Path, ckptd_command: list[str], env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    real_hf_run(root, [100, 200, 300, 400, 500])
    disk_filled_during_a_save(root, 400, 500)
    config = write_config(tmp_path / "config.yaml", [root], **ROTATION_OF_ONE)

    plan = run(ckptd_command, env, "plan", "--config", str(config), "--json")
    assert plan.returncode == 0, plan.stderr
    decisions = {c["name"]: c for c in json.loads(plan.stdout)["checkpoints"]}
    assert decisions["checkpoint-300"]["action"] == "keep"
    assert decisions["checkpoint-300"]["reasons"] == ["tier1", "newest", "last-good"]
    for name in ("checkpoint-400", "checkpoint-500"):
        assert decisions[name]["action"] == "keep"
        assert decisions[name]["reasons"][0].startswith("incomplete:corrupt: ")
    assert (
        decisions["checkpoint-100"]["action"] == decisions["checkpoint-200"]["action"] == "delete"
    )
    human = run(ckptd_command, env, "plan", "--config", str(config))
    assert "checkpoint-500 is corrupt: " in human.stdout
    assert "incomplete or corrupt" in human.stdout

    pruned = run(ckptd_command, env, "prune", "--config", str(config), "-y")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))
    assert left == ["checkpoint-300", "checkpoint-400", "checkpoint-500"]
    records = history_of(tmp_path / "state" / "history.jsonl")
    corrupt = sorted(r["checkpoint"] for r in records if r["event"] == "integrity_corrupt")
    assert corrupt == ["checkpoint-400", "checkpoint-500"]

    named = run(ckptd_command, env, "last-good", str(root), "--config", str(config))
    assert named.returncode == 0, named.stderr
    assert named.stdout == f"{root / 'checkpoint-300'}\n"
    document = json.loads(
        run(ckptd_command, env, "last-good", str(root), "--config", str(config), "--json").stdout
    )
    assert document["path"] == str(root / "checkpoint-300")
    assert document["integrity"] == "passed"
    assert document["corrupt"] == ["checkpoint-400", "checkpoint-500"]

    status = run(ckptd_command, env, "status", "--config", str(config), "--json")
    (root_status,) = json.loads(status.stdout)["roots"]
    assert sorted(root_status["corrupt"]) == ["checkpoint-400", "checkpoint-500"]
    assert root_status["last_good"] == "checkpoint-300"
    assert root_status["incomplete"] == []

    # A second prune records nothing new: each checkpoint is checked (and recorded) once.
    run(ckptd_command, env, "prune", "--config", str(config), "-y")
    again = history_of(tmp_path / "state" / "history.jsonl")
    assert sum(1 for r in again if r["event"] == "integrity_corrupt") == 2


def test_a_corrupt_checkpoint_runs_the_alert_command(
    tmp_path: Path, ckptd_command: list[str], env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    real_hf_run(root, [100, 200])
    disk_filled_during_a_save(root, 200)
    alerted = tmp_path / "alerted.json"
    script = tmp_path / "alert.py"
    script.write_text(
        "import json, os, sys\n"
        "keys = ('CKPTD_LEVEL', 'CKPTD_ROOT', 'CKPTD_CHECKPOINT', 'CKPTD_PROBLEMS')\n"
        f"json.dump({{k: os.environ.get(k) for k in keys}}, open({str(alerted)!r}, 'w'))\n"
    )
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        disk={"alert": f"{sys.executable} {script}"},
        **ROTATION_OF_ONE,
    )
    pruned = run(ckptd_command, env, "prune", "--config", str(config), "-y")
    assert pruned.returncode == 0, pruned.stderr
    told = json.loads(alerted.read_text())
    assert told["CKPTD_LEVEL"] == "corrupt"
    assert told["CKPTD_ROOT"] == str(root) and told["CKPTD_CHECKPOINT"] == "checkpoint-200"
    assert "model.safetensors" in told["CKPTD_PROBLEMS"]
    records = history_of(tmp_path / "state" / "history.jsonl")
    (alert,) = [r for r in records if r["event"] == "alert"]
    assert alert["level"] == "corrupt" and alert["exit_code"] == 0


def test_last_good_fails_with_a_message_when_nothing_is_sound(
    tmp_path: Path, ckptd_command: list[str], env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    empty = run(ckptd_command, env, "last-good", str(root))
    assert empty.returncode == 1 and empty.stdout == ""
    assert "no complete checkpoint that is not corrupt" in empty.stderr
    real_hf_run(root, [100])
    disk_filled_during_a_save(root, 100)
    broken = run(ckptd_command, env, "last-good", str(root), "--json")
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["path"] is None


# --- the user's own test --------------------------------------------------------------------------


def test_verify_test_runs_the_users_command_and_a_failure_makes_the_checkpoint_corrupt(
    tmp_path: Path, ckptd_command: list[str], env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    real_hf_run(root, [100, 200])
    test_script = tmp_path / "test_model.py"
    test_script.write_text(
        "import os, sys\n"
        "path = sys.argv[sys.argv.index('--model') + 1]\n"
        "print('loading', path)\n"
        "print('nice', os.getpriority(os.PRIO_PROCESS, 0))\n"
        "sys.exit(0 if os.path.exists(os.path.join(path, 'ok')) else 3)\n"
    )
    (root / "checkpoint-200" / "ok").write_text("")
    age(root / "checkpoint-200")
    command = f"{sys.executable} {test_script} --model {{path}}"
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        verify={"command": command, "timeout": 60},
        **ROTATION_OF_ONE,
    )

    passed = run(ckptd_command, env, "verify", "--config", str(config), "--test", "--json")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    test = json.loads(passed.stdout)["test"]
    assert test["verdict"] == "verified" and test["checkpoint"] == "checkpoint-200"
    assert test["last_lines"] == [f"loading {root / 'checkpoint-200'}", "nice 19"]

    (root / "checkpoint-200" / "ok").unlink()
    age(root / "checkpoint-200")
    failed = run(ckptd_command, env, "verify", "--config", str(config), "--test")
    assert failed.returncode == 1
    records = history_of(tmp_path / "state" / "history.jsonl")
    tests = [r for r in records if r["event"] == "user_test"]
    assert [t["verdict"] for t in tests] == ["verified", "failed"]
    assert tests[1]["exit_code"] == 3 and tests[1]["last_lines"][0].startswith("loading ")
    assert tests[1]["command"][-1] == str(root / "checkpoint-200")
    # Failed is corrupt: checkpoint-200 is no longer the last good one, nor the newest.
    named = run(ckptd_command, env, "last-good", str(root), "--config", str(config))
    assert named.stdout.strip() == str(root / "checkpoint-100")
    plan = json.loads(run(ckptd_command, env, "plan", "--config", str(config), "--json").stdout)
    reasons = {c["name"]: c["reasons"] for c in plan["checkpoints"]}
    assert reasons["checkpoint-200"] == ["incomplete:corrupt: the user's test failed (exit 3)"]
    assert "last-good" in reasons["checkpoint-100"]


def test_a_verify_command_with_an_unknown_placeholder_is_a_config_error(
    tmp_path: Path, ckptd_command: list[str], env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        verify={"command": "test.py --model {model}"},
        **ROTATION_OF_ONE,
    )
    result = run(ckptd_command, env, "check-config", str(config))
    assert result.returncode == 2
    assert "unknown placeholder {model}" in result.stderr + result.stdout


# --- holds ----------------------------------------------------------------------------------------


def test_hold_release_and_holds_through_the_cli(
    tmp_path: Path, ckptd_command: list[str], env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    real_hf_run(root, [100, 200, 300])
    config = write_config(
        tmp_path / "config.yaml", [root], timezone="Europe/Berlin", **ROTATION_OF_ONE
    )
    options = ("--config", str(config))

    missing = run(ckptd_command, env, "hold", str(root), "checkpoint-999", "--for", "6h",
                  "--by", "eval-sweep", *options)  # fmt: skip
    assert missing.returncode == 2 and "no checkpoint named 'checkpoint-999'" in missing.stderr
    far = (datetime.now() + timedelta(days=400)).strftime("%Y-%m-%dT%H:%M")
    too_far = run(ckptd_command, env, "hold", str(root), "checkpoint-100", "--until", far,
                  "--by", "eval-sweep", *options)  # fmt: skip
    assert too_far.returncode == 2 and "--force" in too_far.stderr
    assert not (root / ".ckptd-holds").exists()

    held = run(ckptd_command, env, "hold", str(root), "checkpoint-100", "--until",
               "2099-12-24T00:00", "--by", "eval-sweep", "--reason", "eval v3", "--force",
               *options)  # fmt: skip
    assert held.returncode == 0, held.stderr
    assert "until 2099-12-24T00:00+01:00" in held.stdout  # the config's zone
    also = run(ckptd_command, env, "hold", str(root), "checkpoint-100", "--for", "6h",
               "--by", "alice", *options)  # fmt: skip
    assert also.returncode == 0, also.stderr

    listed = json.loads(run(ckptd_command, env, "holds", *options, "--json").stdout)
    assert [(h["holder"], h["state"], h["given"]) for h in listed["holds"]] == [
        ("alice", "active", "6h"),
        ("eval-sweep", "active", "2099-12-24T00:00"),
    ]
    assert listed["holds"][1]["until"] == "2099-12-24T00:00:00+01:00"
    table = run(ckptd_command, env, "holds", str(root), *options)
    assert "eval-sweep" in table.stdout and "2099-12-24 00:00+01:00" in table.stdout

    plan = json.loads(run(ckptd_command, env, "plan", *options, "--json").stdout)
    decisions = {c["name"]: c for c in plan["checkpoints"]}
    assert decisions["checkpoint-100"]["action"] == "keep"
    assert "held:eval-sweep until 2099-12-24T00:00+01:00" in decisions["checkpoint-100"]["reasons"]
    assert any(r.startswith("held:alice until ") for r in decisions["checkpoint-100"]["reasons"])
    assert decisions["checkpoint-200"]["action"] == "delete"

    pruned = run(ckptd_command, env, "prune", *options, "-y")
    assert pruned.returncode == 0, pruned.stderr
    assert (root / "checkpoint-100").is_dir() and not (root / "checkpoint-200").exists()

    released = run(ckptd_command, env, "release", str(root), "checkpoint-100", "--by", "alice",
                   *options)  # fmt: skip
    assert released.returncode == 0 and "released checkpoint-100" in released.stdout
    twice = run(ckptd_command, env, "release", str(root), "checkpoint-100", "--by", "alice",
                *options)  # fmt: skip
    assert twice.returncode == 1 and "alice holds nothing on checkpoint-100" in twice.stderr
    left = json.loads(run(ckptd_command, env, "holds", *options, "--json").stdout)
    assert [h["holder"] for h in left["holds"]] == ["eval-sweep"]


def test_an_expired_hand_written_hold_is_removed_by_the_next_prune_and_recorded(
    tmp_path: Path, ckptd_command: list[str], env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    real_hf_run(root, [100, 200, 300])
    config = write_config(tmp_path / "config.yaml", [root], **ROTATION_OF_ONE)
    # Written by hand as daemon/holds.py documents: one JSON file per holder.
    folder = root / ".ckptd-holds" / "checkpoint-100"
    folder.mkdir(parents=True)
    (folder / "nightly.json").write_text('{"until": "2000-01-01T00:00:00+00:00", "reason": "x"}')
    (folder / ".nightly.json.tmp").write_text("half written")  # ignored: a write in progress
    listed = json.loads(run(ckptd_command, env, "holds", str(root), "--json").stdout)
    assert [(h["holder"], h["state"]) for h in listed["holds"]] == [("nightly", "expired")]

    pruned = run(ckptd_command, env, "prune", "--config", str(config), "-y")
    assert pruned.returncode == 0, pruned.stderr
    assert not (folder / "nightly.json").exists()
    assert not (root / "checkpoint-100").exists()  # the expired hold no longer keeps it
    records = history_of(tmp_path / "state" / "history.jsonl")
    (expired,) = [r for r in records if r["event"] == "hold_expired"]
    assert expired == {
        "time": expired["time"],
        "event": "hold_expired",
        "root": str(root),
        "checkpoint": "checkpoint-100",
        "holder": "nightly",
        "until": "2000-01-01T00:00:00+00:00",
        "reason": "x",
    }
    # A hold file nobody can read keeps its checkpoint all the same, and is reported.
    broken = root / ".ckptd-holds" / "checkpoint-300"
    broken.mkdir(parents=True)
    (broken / "bob.json").write_text("{not json")
    plan = run(ckptd_command, env, "plan", "--config", str(config))
    assert "unreadable hold .ckptd-holds/checkpoint-300/bob.json" in plan.stdout
    assert "held:bob (unreadable hold:" in plan.stdout
