"""az:// roots end to end: the real CLI as a subprocess against Azurite (the Azure Storage
emulator) on 127.0.0.1, on a recorded Hugging Face tree. The oracle is the same tree on a local
disk, as in test_remote_roots_cli.py (whose helpers this reuses): `plan --json` of the az://
root equals the local plan, and `prune -y` leaves exactly the local prune's survivors."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.azurite import ACCOUNT_KEY, AzureContainer

# The emulator fixtures (imported under their own names, so pytest finds them here).
from tests.azurite import az_container as az_container
from tests.azurite import azurite_url as azurite_url
from tests.configs import rotation, write_config
from tests.e2e.test_remote_roots_cli import JOURNAL, ckptd, top_names, wait_for, without_root
from tests.fixtures.frameworks.materialize import load_tree, materialize

TREES = ("hf-trainer-complete", "hf-trainer-in-flight")


def upload_tree(tmp_path: Path, container: AzureContainer, tree: str) -> tuple[Path, str]:
    """Given a recorded tree, lay it out locally and upload the same files under `tree/`;
    return the local root folder and the root's URL."""
    local = tmp_path / "local" / tree
    materialize(tree, local)
    client = container.client()
    for path in sorted(local.rglob("*")):
        if path.is_file() and not path.is_symlink():
            key = f"{tree}/{path.relative_to(local).as_posix()}"
            client.upload_blob(key, path.read_bytes(), overwrite=True)
    root = load_tree(tree)["root"]
    return local / root, container.url(f"{tree}/{root}")


def config_for(tmp_path: Path, container: AzureContainer, roots: list[str]) -> Path:
    """Given root paths (local folders and az:// URLs), write one config for all of them with
    the same policy everywhere (keep the newest) and the emulator's storage_options."""
    entries = [
        {"path": root, "storage_options": container.options, "poll_interval": "1s"}
        if root.startswith("az://")
        else root
        for root in roots
    ]
    return write_config(
        tmp_path / "config.yaml",
        entries,
        settle_seconds=0,
        min_keep=1,
        policy=rotation(1, cadence=1),
        grace="0s",
        verify={"checks": False},
    )


def keys(container: AzureContainer, prefix: str) -> set[str]:
    client = container.client()
    return {str(item.name)[len(prefix) :] for item in client.list_blobs(name_starts_with=prefix)}


@pytest.mark.parametrize("tree", TREES)
def test_plan_of_the_az_root_equals_the_plan_of_the_same_tree_on_disk(
    tmp_path: Path,
    az_container: AzureContainer,
    tree: str,
    ckptd_command: list[str],
    cli_env: dict[str, str],
) -> None:
    local, url = upload_tree(tmp_path, az_container, tree)
    config = config_for(tmp_path, az_container, [str(local), url])
    done = ckptd(ckptd_command, cli_env, "plan", "--json", "--config", str(config))
    here, there = json.loads(done.stdout)
    assert there["root"] == url
    assert here["checkpoints"], "the recorded tree has checkpoints"
    assert any(entry["action"] == "delete" for entry in here["checkpoints"])
    assert without_root(there) == without_root(here)
    assert ACCOUNT_KEY not in done.stdout + done.stderr


def test_prune_y_leaves_exactly_what_a_local_prune_leaves(
    tmp_path: Path,
    az_container: AzureContainer,
    ckptd_command: list[str],
    cli_env: dict[str, str],
) -> None:
    local, url = upload_tree(tmp_path, az_container, "hf-trainer-complete")
    prefix = url.removeprefix(f"az://{az_container.name}/") + "/"
    before = keys(az_container, prefix)
    config = config_for(tmp_path, az_container, [str(local), url])
    planned = json.loads(
        ckptd(ckptd_command, cli_env, "plan", "--json", "--config", str(config)).stdout
    )
    doomed = {e["name"] for e in planned[1]["checkpoints"] if e["action"] == "delete"}
    assert doomed
    done = ckptd(ckptd_command, cli_env, "prune", "-y", "--json", "--config", str(config))
    results = json.loads(done.stdout)
    survivors_here = {p.name for p in local.iterdir() if p.name != ".ckptd-trash"}
    after = keys(az_container, prefix) - {".ckptd-lease"}  # the root's lease, given back
    assert top_names(after) == survivors_here
    assert sorted(results[1]["result"]["deleted"]) == sorted(doomed)
    # Nothing of the survivors was touched; nothing of the deleted is left; no journal left.
    assert after == {key for key in before if key.split("/", 1)[0] in survivors_here}
    assert not any(key.startswith(JOURNAL) for key in after)
    assert results[1]["result"]["bytes_freed"] > 0
    assert ACCOUNT_KEY not in done.stdout + done.stderr
    assert ACCOUNT_KEY not in (tmp_path / "state" / "history.jsonl").read_text()


def test_check_config_shows_the_option_names_only(
    tmp_path: Path, az_container: AzureContainer, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    config = config_for(tmp_path, az_container, [az_container.url("run")])
    done = ckptd(ckptd_command, cli_env, "check-config", str(config))
    assert "storage_options: account_key, account_name, account_url (values not shown)" in (
        done.stdout
    )
    assert ACCOUNT_KEY not in done.stdout + done.stderr


def test_ckptd_run_polls_the_az_root_and_prunes_new_checkpoints(
    tmp_path: Path, az_container: AzureContainer, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    client = az_container.client()

    def save(step: int) -> None:
        for name, body in (("model.safetensors", b"m" * 100), ("trainer_state.json", b"{}")):
            client.upload_blob(f"run/checkpoint-{step}/{name}", body, overwrite=True)

    for step in (1, 2):
        save(step)
    config = config_for(tmp_path, az_container, [az_container.url("run")])
    log = tmp_path / "daemon.log"
    with log.open("w") as output:
        daemon = subprocess.Popen(
            [*ckptd_command, "run", "--config", str(config)],
            env=cli_env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: top_names(keys(az_container, "run/")) == {"checkpoint-2"}, log)
            save(3)  # a new checkpoint: the next poll finds it complete and prunes
            wait_for(lambda: top_names(keys(az_container, "run/")) == {"checkpoint-3"}, log)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    assert ACCOUNT_KEY not in log.read_text()
