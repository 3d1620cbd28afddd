"""The daemon's deep integrity pass (issue 12): each new checkpoint's checksums, in the background.

`ckptd run` (the real CLI, a subprocess) on a root of four sound checkpoints; while it runs, a
trainer saves checkpoint-500 with one flipped byte inside a zip member of its `optimizer.pt`: the
header, the central directory and every size are intact, so the cheap check passes, and only the
CRC-32 of that member tells. The deep pass finds it, records `integrity_corrupt` with `deep:
true`, and from then on the plan keeps checkpoint-500 as corrupt (checkpoint-400 is the newest).
The four found at start-up are checked cheaply only. With `verify.deep: false` nothing reads
the checksums.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.config import Config, VerifyConfig
from daemon.history.log import NULL_HISTORY
from daemon.integrity.cache import IntegrityCache
from daemon.integrity.check import check_checkpoint
from daemon.service.deeppass import DeepPass
from tests.layouts_fixtures import well_formed_bytes

pytestmark = pytest.mark.slow

STEPS = (100, 200, 300, 400)
BROKEN = "checkpoint-300"


def write_checkpoint(root: Path, step: int, *, age: float = 3600.0, flip: bool = False) -> None:
    """Given a folder and a step, write a complete Hugging Face checkpoint (trainer_state.json
    last), its torch files well-formed with random payloads (so a flipped byte changes a CRC),
    dated `age` seconds ago; `flip` breaks one byte only a CRC can tell."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    for name, size in (("model.safetensors", 8192), ("optimizer.pt", 256 * 1024)):
        (folder / name).write_bytes(well_formed_bytes(name, size, random=True))
    if flip:
        flip_a_payload_byte(folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if age:
        # Backdated before the daemon starts; a save made while it runs is left as written (a
        # change of times after its marker would be a change the checks rightly redo).
        stamp = time.time() - age
        for path in (*folder.iterdir(), folder):
            os.utime(path, (stamp, stamp))


def write_run(root: Path) -> None:
    """Given a folder, write four complete checkpoints, settled an hour ago."""
    for step in STEPS:
        write_checkpoint(root, step)


def flip_a_payload_byte(path: Path) -> None:
    """Given a torch.save zip, flip one byte in the middle of its stored payload, keeping the
    file's size and times: only a CRC can tell."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def write_config(tmp_path: Path, root: Path, *, deep: bool) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"history_file: {tmp_path / 'history.jsonl'}\n"
        "snapshots: {enabled: false}\n"
        f"verify: {{checks: true, deep: {'true' if deep else 'false'}}}\n"
        "defaults: {settle_seconds: 0, min_keep: 0}\n"
        "roots:\n"
        f"  - path: {root}\n"
        "    policy: {keep_last: 10}\n"
    )
    return config


def records(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def run_daemon_until(
    command: list[str],
    env: dict[str, str],
    config: Path,
    condition: Callable[[], bool],
    meanwhile: Callable[[], None] = lambda: None,
) -> bool:
    """Given the CLI and a config, run `ckptd run`; once its start-up prune saved the integrity
    cache, call `meanwhile` (a trainer saving), then wait until `condition` holds (or 60 s),
    stop it with SIGTERM, check it exits 0; return whether the condition held."""
    cache = config.parent / "state" / "integrity-cache.json"
    daemon = subprocess.Popen(
        [*command, "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(cache.exists, 60), "no start-up prune"
        meanwhile()
        held = wait_until(condition, 60)
        daemon.send_signal(signal.SIGTERM)
        _, errors = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, errors[-2000:]
        return held
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_the_fixture_break_is_one_only_the_deep_pass_sees(tmp_path: Path) -> None:
    write_run(tmp_path)
    flip_a_payload_byte(tmp_path / BROKEN / "optimizer.pt")
    assert check_checkpoint(tmp_path, BROKEN, "hf").status == "ok"
    deep = check_checkpoint(tmp_path, BROKEN, "hf", deep=True)
    assert deep.status == "corrupt" and "optimizer.pt" in deep.problems[0], deep.problems


def test_the_daemon_deep_checks_each_new_checkpoint_and_plans_a_corrupt_one_as_corrupt(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    write_run(root)
    config = write_config(tmp_path, root, deep=True)

    def corrupt_recorded() -> bool:
        return any(r["event"] == "integrity_corrupt" for r in records(tmp_path))

    def trainer_saves_a_broken_one() -> None:
        write_checkpoint(root, 500, age=0, flip=True)

    assert run_daemon_until(
        ckptd_command, cli_env, config, corrupt_recorded, meanwhile=trainer_saves_a_broken_one
    )
    found = [r for r in records(tmp_path) if r["event"] == "integrity_corrupt"]
    assert [(r["checkpoint"], r["deep"]) for r in found] == [("checkpoint-500", True)]
    problems = found[0]["problems"]
    assert isinstance(problems, list) and "optimizer.pt" in problems[0]
    # The start-up backlog was checked cheaply only; the new one deeply.
    cache = json.loads((tmp_path / "state" / "integrity-cache.json").read_text())["roots"]
    entries = next(iter(cache.values()))
    assert {name: entry["deep"] for name, entry in entries.items()} == {
        "checkpoint-100": False,
        "checkpoint-200": False,
        "checkpoint-300": False,
        "checkpoint-400": False,
        "checkpoint-500": True,
    }
    # Remembered for the checkpoint as it is: the plan keeps it as corrupt, never the newest.
    planned = subprocess.run(
        [*ckptd_command, "plan", "--config", str(config), "--json"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert planned.returncode == 0, planned.stderr
    rows = {row["name"]: row for row in json.loads(planned.stdout)["checkpoints"]}
    assert any("corrupt" in reason for reason in rows["checkpoint-500"]["reasons"])
    assert "newest" in rows["checkpoint-400"]["reasons"]
    sound = [name for name in rows if name != "checkpoint-500"]
    assert all(not any("corrupt" in r for r in rows[name]["reasons"]) for name in sound)


def test_verify_deep_false_reads_no_checksums(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = tmp_path / "run"
    write_run(root)
    config = write_config(tmp_path, root, deep=False)
    cache = tmp_path / "state" / "integrity-cache.json"

    def checked_cheaply() -> bool:
        remembered = json.loads(cache.read_text())["roots"] if cache.exists() else {}
        return any("checkpoint-500" in entries for entries in remembered.values())

    def trainer_saves_a_broken_one() -> None:
        write_checkpoint(root, 500, age=0, flip=True)

    assert run_daemon_until(
        ckptd_command, cli_env, config, checked_cheaply, meanwhile=trainer_saves_a_broken_one
    )
    time.sleep(1.0)  # a deep pass, were one running, would have finished this tiny one
    assert not [r for r in records(tmp_path) if r["event"] == "integrity_corrupt"]
    entries = next(iter(json.loads(cache.read_text())["roots"].values()))
    assert entries["checkpoint-500"]["status"] == "ok" and not entries["checkpoint-500"]["deep"]


def test_only_a_passed_cheap_check_is_offered(tmp_path: Path) -> None:
    write_run(tmp_path)
    config = Config(verify=VerifyConfig(deep=True))
    deep_pass = DeepPass(IntegrityCache(), config=lambda: config, history=lambda: NULL_HISTORY)
    cheap = check_checkpoint(tmp_path, "checkpoint-100", "hf")
    assert cheap.status == "ok"
    assert deep_pass.offer(str(tmp_path), cheap)
    assert not deep_pass.offer(str(tmp_path), cheap)  # queued once
    deep = check_checkpoint(tmp_path, "checkpoint-200", "hf", deep=True)
    assert not deep_pass.offer(str(tmp_path), deep)
    (tmp_path / "checkpoint-400" / "model.safetensors").write_bytes(b"\xff" * 64)
    broken = check_checkpoint(tmp_path, "checkpoint-400", "hf")
    assert broken.status == "corrupt" and not deep_pass.offer(str(tmp_path), broken)
    off = Config(verify=VerifyConfig(deep=False))
    assert not DeepPass(IntegrityCache(), config=lambda: off, history=lambda: NULL_HISTORY).offer(
        str(tmp_path), check_checkpoint(tmp_path, "checkpoint-300", "hf")
    )
