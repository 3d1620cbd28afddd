"""Object-storage roots end to end: the real CLI (and `ckptd run`) as subprocesses against a
real S3-compatible server (moto) on 127.0.0.1, on recorded Hugging Face, DCP and Orbax trees.

The oracle is the same tree on a local disk: `plan --json` of the `s3://` root must equal the
local root's plan, and `prune -y` must leave exactly the checkpoints a local prune leaves.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.configs import rotation, write_config
from tests.fixtures.frameworks.materialize import load_tree, materialize
from tests.s3server import S3Bucket, make_client

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.s3server import s3_bucket as s3_bucket
from tests.s3server import s3_endpoint as s3_endpoint

TREES = (
    "hf-trainer-complete",
    "hf-trainer-in-flight",
    "dcp-checkpoint-complete",
    "orbax-complete",
    "tf-complete",
    "deepspeed-complete",
    "megatron-complete",
)
SECRET = "sEcReT-0123456789-do-not-print"
JOURNAL = ".ckptd-journal/"


def upload_tree(tmp_path: Path, bucket: S3Bucket, tree: str) -> tuple[Path, str]:
    """Given a recorded tree, lay it out locally and upload the same files under `tree/`;
    return the local root folder and the root's URL."""
    local = tmp_path / "local" / tree
    materialize(tree, local)
    client = make_client(bucket.endpoint)
    for path in sorted(local.rglob("*")):
        if path.is_file() and not path.is_symlink():
            key = f"{tree}/{path.relative_to(local).as_posix()}"
            client.put_object(Bucket=bucket.name, Key=key, Body=path.read_bytes())
    root = load_tree(tree)["root"]
    return local / root, bucket.url(f"{tree}/{root}")


def config_for(
    tmp_path: Path,
    bucket: S3Bucket,
    roots: list[str],
    *,
    grace: str = "0s",
    secret: str = "testing-secret",
) -> Path:
    """Given root paths (local folders and s3:// URLs), write one config for all of them: the
    same policy everywhere (keep the newest), storage_options on the remote ones, polled every
    second, integrity checks off (they read whole files; object storage has none)."""
    options = {"endpoint_url": bucket.endpoint, "key": "testing-key", "secret": secret}
    entries = [
        {"path": root, "storage_options": options, "poll_interval": "1s"}
        if root.startswith("s3://")
        else root
        for root in roots
    ]
    return write_config(
        tmp_path / "config.yaml",
        entries,
        settle_seconds=0,
        min_keep=1,
        policy=rotation(1, cadence=1),
        grace=grace,
        verify={"checks": False},
    )


def ckptd(
    command: list[str], env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def keys(bucket: S3Bucket, prefix: str) -> set[str]:
    client = make_client(bucket.endpoint)
    found: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name, Prefix=prefix):
        found.update(str(item["Key"])[len(prefix) :] for item in page.get("Contents", ()))
    return found


def top_names(names: set[str]) -> set[str]:
    return {name.split("/", 1)[0] for name in names if not name.startswith(".ckptd")}


def without_root(document: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key != "root"}


@pytest.mark.parametrize("tree", TREES)
def test_plan_of_the_s3_root_equals_the_plan_of_the_same_tree_on_disk(
    tmp_path: Path,
    s3_bucket: S3Bucket,
    tree: str,
    ckptd_command: list[str],
    cli_env: dict[str, str],
) -> None:
    local, url = upload_tree(tmp_path, s3_bucket, tree)
    config = config_for(tmp_path, s3_bucket, [str(local), url])
    documents = json.loads(
        ckptd(ckptd_command, cli_env, "plan", "--json", "--config", str(config)).stdout
    )
    here, there = documents
    assert there["root"] == url
    assert here["checkpoints"], "the recorded tree has checkpoints"
    assert any(entry["action"] == "delete" for entry in here["checkpoints"])
    assert without_root(there) == without_root(here)


@pytest.mark.parametrize("tree", TREES)
def test_prune_y_leaves_exactly_what_a_local_prune_leaves(
    tmp_path: Path,
    s3_bucket: S3Bucket,
    tree: str,
    ckptd_command: list[str],
    cli_env: dict[str, str],
) -> None:
    local, url = upload_tree(tmp_path, s3_bucket, tree)
    prefix = url.removeprefix(f"s3://{s3_bucket.name}/") + "/"
    before = keys(s3_bucket, prefix)
    config = config_for(tmp_path, s3_bucket, [str(local), url])
    planned = json.loads(
        ckptd(ckptd_command, cli_env, "plan", "--json", "--config", str(config)).stdout
    )
    doomed = {e["name"] for e in planned[1]["checkpoints"] if e["action"] == "delete"}
    assert doomed
    done = ckptd(ckptd_command, cli_env, "prune", "-y", "--json", "--config", str(config))
    results = json.loads(done.stdout)
    survivors_here = {p.name for p in local.iterdir() if p.name != ".ckptd-trash"}
    after = keys(s3_bucket, prefix) - {".ckptd-lease"}  # the root's lease, given back
    assert top_names(after) == survivors_here
    assert sorted(results[1]["result"]["deleted"]) == sorted(doomed)
    # Nothing of the survivors was touched; nothing of the deleted is left; no journal left.
    assert after == {key for key in before if key.split("/", 1)[0] in survivors_here}
    assert not any(key.startswith(JOURNAL) for key in after)
    assert results[1]["result"]["bytes_freed"] > 0


# Runs the real CLI's `main` with one change: each DeleteObjects request announces itself on
# stdout and waits for a line on stdin, so the test can kill -9 it at a chosen request.
PAUSED_CLI = textwrap.dedent(
    """
    import sys
    from daemon.storage.s3 import S3Store
    original = S3Store.delete_batch
    def paused(self, keys):
        # Not the journal's own objects, nor the lease's conditional-write probe.
        if not any("/.ckptd-journal/" in key or "/.ckptd-lease" in key for key in keys):
            print("batch", len(keys), flush=True)
            sys.stdin.readline()
        return original(self, keys)
    S3Store.delete_batch = paused
    from daemon.cli import main
    sys.argv = ["ckptd", *sys.argv[1:]]
    sys.exit(main())
    """
)


def original_objects(bucket: S3Bucket, prefix: str) -> dict[str, set[str]]:
    by_checkpoint: dict[str, set[str]] = {}
    for key in keys(bucket, prefix):
        if not key.startswith(".ckptd"):
            name, _, rest = key.partition("/")
            by_checkpoint.setdefault(name, set()).add(rest)
    return by_checkpoint


@pytest.mark.parametrize("kill_at", [1, 2])
def test_kill_9_during_a_prune_then_a_rerun_finishes_the_journal(
    tmp_path: Path,
    s3_bucket: S3Bucket,
    kill_at: int,
    ckptd_command: list[str],
    cli_env: dict[str, str],
) -> None:
    _local, url = upload_tree(tmp_path, s3_bucket, "hf-trainer-complete")
    prefix = url.removeprefix(f"s3://{s3_bucket.name}/") + "/"
    before = original_objects(s3_bucket, prefix)
    config = config_for(tmp_path, s3_bucket, [url])
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CLI, "prune", "-y", "--config", str(config)],
        env=cli_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        for batch in range(1, kill_at + 1):
            line = child.stdout.readline()
            while line and not line.startswith("batch"):
                line = child.stdout.readline()
            assert line.startswith("batch"), child.stderr.read() if child.stderr else ""
            if batch < kill_at:
                child.stdin.write("go\n")
                child.stdin.flush()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    midway = keys(s3_bucket, prefix)
    assert any(key.startswith(JOURNAL) for key in midway), "killed after the journal was written"
    assert_no_marked_checkpoint_misses_objects(s3_bucket, prefix, before)
    ckptd(ckptd_command, cli_env, "prune", "-y", "--config", str(config))
    after = keys(s3_bucket, prefix)
    assert not any(key.startswith(JOURNAL) for key in after), "the journal was finished"
    assert top_names(after) == {"checkpoint-4"}
    assert_no_marked_checkpoint_misses_objects(s3_bucket, prefix, before)
    assert original_objects(s3_bucket, prefix)["checkpoint-4"] == before["checkpoint-4"]


def assert_no_marked_checkpoint_misses_objects(
    bucket: S3Bucket, prefix: str, before: dict[str, set[str]]
) -> None:
    """A checkpoint whose marker object is there still has every object it had."""
    for name, objects in original_objects(bucket, prefix).items():
        if "trainer_state.json" in objects:
            assert objects == before[name], f"{name} has its marker but lost objects"


def test_trash_grace_defers_the_deletion_and_restore_cancels_it(
    tmp_path: Path, s3_bucket: S3Bucket, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    _local, url = upload_tree(tmp_path, s3_bucket, "hf-trainer-complete")
    prefix = url.removeprefix(f"s3://{s3_bucket.name}/") + "/"
    before = keys(s3_bucket, prefix)
    config = config_for(tmp_path, s3_bucket, [url], grace="1h")
    args = ("--config", str(config))
    ckptd(ckptd_command, cli_env, "prune", "-y", *args)
    # Deferred: every object is still there, but the checkpoints left the root's plan.
    assert {k for k in keys(s3_bucket, prefix) if not k.startswith(".ckptd")} == before
    plan = json.loads(ckptd(ckptd_command, cli_env, "plan", "--json", *args).stdout)
    assert [e["name"] for e in plan["checkpoints"]] == ["checkpoint-4"]
    listed = json.loads(ckptd(ckptd_command, cli_env, "trash", "list", "--json", *args).stdout)
    assert sorted(row["name"] for row in listed) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert all(row["root"] == url for row in listed)
    status = json.loads(ckptd(ckptd_command, cli_env, "status", "--json", *args).stdout)
    assert status["roots"][0]["trash"]["checkpoints"] == 3
    ckptd(ckptd_command, cli_env, "trash", "restore", "checkpoint-2", *args)
    plan = json.loads(ckptd(ckptd_command, cli_env, "plan", "--json", *args).stdout)
    assert [e["name"] for e in plan["checkpoints"]] == ["checkpoint-2", "checkpoint-4"]
    # A later prune does not delete what waits in the trash before its grace ends.
    ckptd(ckptd_command, cli_env, "trash", "purge", "-y", *args)
    assert top_names(keys(s3_bucket, prefix)) == {"checkpoint-2", "checkpoint-4"}
    history = (tmp_path / "state" / "history.jsonl").read_text()
    assert '"event":"trash_restore"' in history.replace(" ", "")


def test_the_secret_in_storage_options_is_never_printed(
    tmp_path: Path, s3_bucket: S3Bucket, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    _local, url = upload_tree(tmp_path, s3_bucket, "hf-trainer-complete")
    config = config_for(tmp_path, s3_bucket, [url], secret=SECRET, grace="1h")
    args = ("--config", str(config))
    outputs = [ckptd(ckptd_command, cli_env, "check-config", str(config))]
    outputs += [
        ckptd(ckptd_command, cli_env, *command, *args)
        for command in (
            ("plan",),
            ("plan", "--json"),
            ("status",),
            ("status", "--json"),
            ("prune", "-y"),
            ("trash", "list"),
            ("history",),
        )
    ]
    assert "storage_options: endpoint_url, key, secret (values not shown)" in outputs[0].stdout
    # A config error about storage_options does not show its value either.
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"roots:\n  - path: {url}\n    storage_options: 'secret={SECRET}'\n"
        f"  - path: s3://{s3_bucket.name}/other\n    storage_options: {{sekret: '{SECRET}'}}\n"
    )
    refused = ckptd(ckptd_command, cli_env, "check-config", str(bad), check=False)
    assert refused.returncode == 2
    assert "sekret" in refused.stderr
    outputs.append(refused)
    history = (tmp_path / "state" / "history.jsonl").read_text()
    for done in outputs:
        assert SECRET not in done.stdout + done.stderr
    assert SECRET not in history


def test_gs_and_az_roots_are_implemented(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("roots:\n  - path: gs://bucket/run\n  - path: az://container/run\n")
    done = ckptd(ckptd_command, cli_env, "check-config", str(config), check=False)
    assert done.returncode == 0, done.stderr
    assert "Google's application default credentials" in done.stdout
    assert "the AZURE_STORAGE_* environment variables" in done.stdout


def test_ckptd_run_polls_the_s3_root_and_prunes_new_checkpoints(
    tmp_path: Path, s3_bucket: S3Bucket, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    client = make_client(s3_bucket.endpoint)

    def save(step: int) -> None:
        for name, body in (("model.safetensors", b"m" * 100), ("trainer_state.json", b"{}")):
            key = f"run/checkpoint-{step}/{name}"
            client.put_object(Bucket=s3_bucket.name, Key=key, Body=body)

    for step in (1, 2):
        save(step)
    config = config_for(tmp_path, s3_bucket, [s3_bucket.url("run")], secret=SECRET)
    log = tmp_path / "daemon.log"
    with log.open("w") as output:
        daemon = subprocess.Popen(
            [*ckptd_command, "run", "--config", str(config)],
            env=cli_env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: top_names(keys(s3_bucket, "run/")) == {"checkpoint-2"}, log)
            save(3)  # a new checkpoint: the next poll finds it complete and prunes
            wait_for(lambda: top_names(keys(s3_bucket, "run/")) == {"checkpoint-3"}, log)
            # `ckptd check` finds the root's last successful prune under its URL.
            check = ckptd(ckptd_command, cli_env, "check", "--json", "--config", str(config))
            assert "no successful prune" not in check.stdout
            state = json.loads((tmp_path / "state" / "state.json").read_text())
            assert s3_bucket.url("run") in state["prune_success"]
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    text = log.read_text()
    assert SECRET not in text
    assert SECRET not in (tmp_path / "state" / "history.jsonl").read_text()


def wait_for(condition: Any, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out; daemon log:\n{log.read_text()[-3000:]}")


def test_last_good_names_the_object_and_local_only_commands_say_why(
    tmp_path: Path, s3_bucket: S3Bucket, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    _local, url = upload_tree(tmp_path, s3_bucket, "hf-trainer-complete")
    config = config_for(tmp_path, s3_bucket, [url])
    args = ("--config", str(config))
    good = ckptd(ckptd_command, cli_env, "last-good", url, *args)
    assert good.stdout.strip() == f"{url}/checkpoint-4"
    held = ckptd(
        ckptd_command,
        cli_env,
        "hold",
        url,
        "checkpoint-2",
        "--by",
        "me",
        "--for",
        "1h",
        *args,
        check=False,
    )
    assert held.returncode == 2
    assert "hold needs a local folder" in held.stderr
    verified = ckptd(ckptd_command, cli_env, "verify", *args)
    assert f"{url}: skipped: verify needs a local folder" in verified.stderr
