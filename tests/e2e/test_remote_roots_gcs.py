"""gs:// roots end to end: the real CLI as a subprocess against fake-gcs-server on 127.0.0.1,
on the recorded Hugging Face tree; the oracle is the same tree on a local disk."""

from __future__ import annotations

import json
from pathlib import Path

from tests.configs import rotation, write_config
from tests.e2e.test_remote_roots_cli import ckptd, top_names, without_root
from tests.fixtures.frameworks.materialize import load_tree, materialize
from tests.gcsserver import GCSBucket, make_client

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.gcsserver import gcs_bucket as gcs_bucket
from tests.gcsserver import gcs_endpoint as gcs_endpoint

TREE = "hf-trainer-complete"


def upload_tree(tmp_path: Path, bucket: GCSBucket) -> tuple[Path, str]:
    """Lay the recorded tree out locally and upload the same files under `TREE/`; return the
    local root folder and the root's gs:// URL."""
    local = tmp_path / "local" / TREE
    materialize(TREE, local)
    target = make_client(bucket.endpoint).bucket(bucket.name)
    for path in sorted(local.rglob("*")):
        if path.is_file() and not path.is_symlink():
            key = f"{TREE}/{path.relative_to(local).as_posix()}"
            target.blob(key).upload_from_string(path.read_bytes())
    root = load_tree(TREE)["root"]
    return local / root, bucket.url(f"{TREE}/{root}")


def keys(bucket: GCSBucket, prefix: str) -> set[str]:
    listing = make_client(bucket.endpoint).list_blobs(bucket.name, prefix=prefix)
    return {str(blob.name)[len(prefix) :] for blob in listing}


def config_for(tmp_path: Path, bucket: GCSBucket, roots: list[str]) -> Path:
    entries = [
        {"path": root, "storage_options": bucket.options, "poll_interval": "1s"}
        if root.startswith("gs://")
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


def test_plan_and_prune_of_a_gs_root_equal_the_same_tree_on_disk(
    tmp_path: Path,
    gcs_bucket: GCSBucket,
    ckptd_command: list[str],
    cli_env: dict[str, str],
) -> None:
    local, url = upload_tree(tmp_path, gcs_bucket)
    prefix = url.removeprefix(f"gs://{gcs_bucket.name}/") + "/"
    before = keys(gcs_bucket, prefix)
    config = config_for(tmp_path, gcs_bucket, [str(local), url])
    here, there = json.loads(
        ckptd(ckptd_command, cli_env, "plan", "--json", "--config", str(config)).stdout
    )
    assert there["root"] == url
    assert any(entry["action"] == "delete" for entry in here["checkpoints"])
    assert without_root(there) == without_root(here)
    doomed = {e["name"] for e in there["checkpoints"] if e["action"] == "delete"}

    done = ckptd(ckptd_command, cli_env, "prune", "-y", "--json", "--config", str(config))
    results = json.loads(done.stdout)
    survivors_here = {p.name for p in local.iterdir() if p.name != ".ckptd-trash"}
    after = keys(gcs_bucket, prefix) - {".ckptd-lease"}
    assert top_names(after) == survivors_here
    assert sorted(results[1]["result"]["deleted"]) == sorted(doomed)
    assert after == {key for key in before if key.split("/", 1)[0] in survivors_here}
    assert not any(key.startswith(".ckptd-journal/") for key in after)
    assert results[1]["result"]["bytes_freed"] > 0
