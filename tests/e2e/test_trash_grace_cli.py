"""Deleted checkpoints wait out the trash grace: the prune's question and result say when their
space comes back and that `ckptd trash purge` frees it now; `status` and `trash list` show what
waits; the permanent `trash purge` asks first, as the undoable prune does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from daemon.pruning import trash
from tests.configs import write_config
from tests.e2e.terminal import on_terminal
from tests.layouts_fixtures import write_file

OLD = time.time() - 3 * 3600
# "at 2026-12-05 20:03 UTC": a local time with its zone named.
AT_LOCAL_TIME = r"at \d{4}-\d\d-\d\d \d\d:\d\d [A-Z+\-0-9]+"


def make_hf_root(root: Path, steps: range) -> None:
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        write_file(folder / "model.safetensors", 1000)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for path in (*folder.iterdir(), folder):
            os.utime(path, (OLD, OLD))


def six_hour_grace(tmp_path: Path, cli_env: dict[str, str]) -> Path:
    root = tmp_path / "run"
    make_hf_root(root, range(100, 6100, 100))
    config = write_config(tmp_path / "ckptd.yaml", [root], root_settings={"trash": {"grace": "6h"}})
    cli_env["CKPTD_CONFIG"] = str(config)
    return root


def words(text: str) -> str:
    return " ".join(text.split())


def run(
    command: list[str], arguments: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_the_question_and_the_result_say_when_the_space_comes_back(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = six_hour_grace(tmp_path, cli_env)
    code, output = on_terminal([*ckptd_command, "prune", str(root)], cli_env, answer="y")
    assert code == 0, output
    said = words(output)
    question = said[: said.index("[y/N]")]
    assert "delete 28 checkpoints? They wait 6h in the trash" in question
    assert re.search(r"are freed when the grace ends, " + AT_LOCAL_TIME, question), question
    assert "or at once with `ckptd trash purge`" in question
    result = said[said.index("[y/N]") :]
    assert "deleted 28" in result and "freed 0 B" in result
    assert re.search(r"wait in the trash: freed when the 6h grace ends, " + AT_LOCAL_TIME, result)
    assert "or at once with `ckptd trash purge`" in result
    assert len(trash.list_trash(str(root))) == 28


def test_status_and_trash_list_show_what_waits_in_the_trash(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = six_hour_grace(tmp_path, cli_env)
    pruned = run(ckptd_command, ["prune", "-y"], cli_env)
    assert pruned.returncode == 0, pruned.stderr
    assert "`ckptd trash purge`" in pruned.stdout
    waiting = sum(item.bytes for item in trash.list_trash(str(root)))
    assert waiting > 28 * 1000
    status = run(ckptd_command, ["status", "--json"], cli_env)
    assert status.returncode == 0, status.stderr
    in_trash = json.loads(status.stdout)["roots"][0]["trash"]
    assert in_trash == {"checkpoints": 28, "bytes": waiting, "grace_seconds": 21600.0}
    human = run(ckptd_command, ["status"], cli_env)
    assert re.search(
        r"trash\s+.*in 28 checkpoints, freed as each one's 6h grace ends", human.stdout
    )
    listed = run(ckptd_command, ["trash", "list"], cli_env)
    assert listed.returncode == 0, listed.stderr
    assert f"total: 28 checkpoints, {waiting / 1000:.1f} KB" in listed.stdout
    assert re.search(r"^checkpoint-100\s+in 5h 59m|^checkpoint-100\s+in 6h", listed.stdout, re.M)
    # --json writes times as every --json document does: UTC ISO 8601.
    items = json.loads(run(ckptd_command, ["trash", "list", "--json"], cli_env).stdout)
    utc = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"
    assert all(re.fullmatch(utc, item["deleted_at"]) for item in items)
    assert all(re.fullmatch(utc, item["expires_at"]) for item in items)


def test_trash_purge_asks_before_it_removes_for_good(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    root = six_hour_grace(tmp_path, cli_env)
    assert run(ckptd_command, ["prune", "-y"], cli_env).returncode == 0
    code, output = on_terminal([*ckptd_command, "trash", "purge"], cli_env, answer="n")
    assert code == 0, output
    assert "remove 28 checkpoints" in output and "cannot be undone" in output
    assert "nothing removed" in output
    assert len(trash.list_trash(str(root))) == 28
    code, output = on_terminal([*ckptd_command, "trash", "purge"], cli_env, answer="y")
    assert code == 0, output
    assert "removed 28 from the trash" in words(output)
    assert trash.list_trash(str(root)) == []
