"""What a person types on a standby node, as the real CLI: two configs (`node_name` node-a and
node-b) share one folder (`shared: true`); node A prunes it with `ckptd prune -y` (its trash
fills, grace 1 h), then holds its lease through the code `prune_root` takes it with. Node B's
`ckptd trash purge` and `ckptd trash restore` are refused like a prune there (exit 3, naming
node-a and its expiry) and nothing in the trash moves; once A's lease has expired, B's purge
works and gives the lease back. `ckptd plan` on B says that node-a applies the plan (`--json`:
`standby`). A root that is not shared is unchanged. One `s3://` root: the same refusal."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.clock import utc_iso
from daemon.config import Config
from daemon.history.log import NULL_HISTORY
from daemon.lease import LEASE_NAME, PosixLease
from daemon.pruning import leasing
from daemon.pruning.leasing import LEASES
from tests.configs import make_config, rotation, write_config
from tests.s3server import S3Bucket

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.s3server import s3_bucket as s3_bucket
from tests.s3server import s3_endpoint as s3_endpoint

EXIT_REFUSED = 3
TRASHED = ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]


def make_root(root: Path, count: int = 6) -> None:
    """Given a folder, fill it with `count` settled Hugging Face checkpoints."""
    old = time.time() - 7200
    for step in range(1, count + 1):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.bin").write_bytes(b"m" * 100)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        for path in (*folder.iterdir(), folder):
            os.utime(path, (old, old))


def settings(
    node: str, state: Path, duration: float, skew: float, shared: bool | None
) -> dict[str, Any]:
    """Given a node, return the config keywords both forms of its config use (`shared` None:
    not written, as for object storage, always shared)."""
    lease = {"duration": duration, "skew": skew}
    return {
        "layout": "hf",
        "root_settings": {"lease": lease} if shared is None else {"shared": shared, "lease": lease},
        "node_name": node,
        "state_dir": state,
        "policy": rotation(2),
        "min_keep": 1,
        "max_delete_fraction": 1.0,
        "grace": "1h",
        "settle_seconds": 0,
        "verify": {"checks": False},
    }


class Node:
    """One node's config of the shared root: its file (for the CLI) and the same in-process."""

    def __init__(
        self,
        tmp_path: Path,
        root: Path | dict[str, Any],
        name: str,
        *,
        duration: float = 60.0,
        skew: float = 5.0,
        shared: bool | None = True,
        keep: int = 2,
    ) -> None:
        self.name = name
        keywords = settings(name, tmp_path / f"state-{name}", duration, skew, shared)
        keywords["policy"] = rotation(keep, cadence=1)
        self.file = write_config(tmp_path / f"{name}.yaml", [root], **keywords)
        self.config: Config = make_config([root], **keywords)

    def take_lease(self) -> float:
        """Take the root's lease as `prune_root` does (this test process standing in for the
        node's daemon); return its expiry."""
        check = leasing.check(
            self.config, self.config.roots[0], dry_run=False, history=NULL_HISTORY
        )
        assert check.refusal is None, check.refusal
        held = LEASES.held(leasing.lease_key(self.config.roots[0]))
        assert held is not None
        return held.expires


def ckptd(
    command: list[str], env: dict[str, str], node: Node, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run `ckptd ARGS --config <node's config>` as the person on that node would."""
    return subprocess.run(
        [*command, *args, "--config", str(node.file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def trash_tree(root: Path) -> list[tuple[str, int]]:
    """Given a root, return every path in its trash (never following a symlink) with its size:
    what must not change when a purge or restore is refused."""
    found = []
    for folder, dirs, files in os.walk(root / ".ckptd-trash"):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            found.append((str(path.relative_to(root)), path.lstat().st_size))
    return sorted(found)


def checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))


@pytest.fixture(autouse=True)
def fresh_leases() -> Iterator[None]:
    """Each test gives back the leases it took in this process."""
    yield
    LEASES.release_all()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "shared-root"
    make_root(folder)
    return folder


def pruned_by_a(
    command: list[str], env: dict[str, str], node_a: Node, root: Path
) -> list[tuple[str, int]]:
    """Node A prunes the shared folder with the real CLI (its lease taken and given back):
    four checkpoints wait in the trash. Return the trash as it is then."""
    done = ckptd(command, env, node_a, "prune", "-y")
    assert done.returncode == 0, done.stdout + done.stderr
    assert checkpoints(root) == ["checkpoint-5", "checkpoint-6"]
    listed = json.loads(ckptd(command, env, node_a, "trash", "list", "--json").stdout)
    assert sorted(row["name"] for row in listed) == TRASHED
    assert PosixLease(str(root)).holder() is None  # `ckptd prune` gave its lease back
    return trash_tree(root)


def test_trash_purge_and_restore_on_a_standby_node_are_refused_and_change_nothing(
    tmp_path: Path, root: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    node_a, node_b = Node(tmp_path, root, "node-a"), Node(tmp_path, root, "node-b")
    before = pruned_by_a(ckptd_command, cli_env, node_a, root)
    expires = node_a.take_lease()
    until = utc_iso(expires, timespec="seconds")
    lease_before = (root / LEASE_NAME).read_bytes()

    purge = ckptd(ckptd_command, cli_env, node_b, "trash", "purge", "-y")
    assert purge.returncode == EXIT_REFUSED, purge.stdout + purge.stderr
    assert f"ckptd trash: refused for safety: {os.path.realpath(root)}: " in purge.stderr
    assert f"node-a pid {os.getpid()} until {until}" in purge.stderr
    assert "nothing changed" in purge.stderr

    restore = ckptd(ckptd_command, cli_env, node_b, "trash", "restore", "checkpoint-3")
    assert restore.returncode == EXIT_REFUSED, restore.stdout + restore.stderr
    assert f"node-a pid {os.getpid()} until {until}" in restore.stderr
    assert "restored" not in restore.stdout

    # Nothing in the trash moved; nothing came back into the root; A's lease is untouched.
    assert trash_tree(root) == before
    assert checkpoints(root) == ["checkpoint-5", "checkpoint-6"]
    assert (root / LEASE_NAME).read_bytes() == lease_before

    # The holder node itself is not standby: its plan says nothing of the kind.
    plan_a = ckptd(ckptd_command, cli_env, node_a, "plan")
    assert plan_a.returncode == 0 and "standby" not in plan_a.stdout
    assert (
        json.loads(ckptd(ckptd_command, cli_env, node_a, "plan", "--json").stdout)["standby"]
        is None
    )


def test_plan_on_a_standby_node_names_the_holder_and_takes_no_lease(
    tmp_path: Path, root: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    node_a, node_b = Node(tmp_path, root, "node-a"), Node(tmp_path, root, "node-b")
    plan = ckptd(ckptd_command, cli_env, node_b, "plan", "--json")
    assert json.loads(plan.stdout)["standby"] is None  # nobody holds the lease yet
    expires = node_a.take_lease()
    until = utc_iso(expires, timespec="seconds")
    lease_before = (root / LEASE_NAME).read_bytes()

    plan = ckptd(ckptd_command, cli_env, node_b, "plan")
    assert plan.returncode == 0, plan.stderr
    line = (
        f"this node is standby: node-a (pid {os.getpid()}) holds the lease until {until};"
        " it prunes this root"
    )
    assert line in " ".join(plan.stdout.split()), plan.stdout
    document = json.loads(ckptd(ckptd_command, cli_env, node_b, "plan", "--json").stdout)
    assert document["standby"] == {
        "holder": {"host": "node-a", "pid": os.getpid()},
        "expires": until,
    }
    assert [c["name"] for c in document["checkpoints"] if c["action"] == "delete"] == TRASHED
    # Read only: the lease file is A's, byte for byte; nothing was deleted.
    assert (root / LEASE_NAME).read_bytes() == lease_before
    assert len(checkpoints(root)) == 6


def test_once_the_holders_lease_expired_the_standby_node_purges_and_gives_the_lease_back(
    tmp_path: Path, root: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    node_a = Node(tmp_path, root, "node-a", duration=4.0, skew=1.0)
    node_b = Node(tmp_path, root, "node-b", duration=4.0, skew=1.0)
    before = pruned_by_a(ckptd_command, cli_env, node_a, root)
    expires = node_a.take_lease()  # then never renewed: node A went away
    refused = ckptd(ckptd_command, cli_env, node_b, "trash", "purge", "-y")
    assert time.time() < expires + 1.0, "the machine was too slow to see the refusal"
    assert refused.returncode == EXIT_REFUSED, refused.stdout + refused.stderr
    assert trash_tree(root) == before
    # Past expiry and skew, B takes the lease over as a prune would, purges, gives it back.
    time.sleep(max(0.0, expires + 1.0 - time.time()) + 0.3)
    purge = ckptd(ckptd_command, cli_env, node_b, "trash", "purge", "-y", "--json")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    result = json.loads(purge.stdout)[os.path.realpath(root)]
    assert sorted(result["removed"]) == TRASHED
    listed = json.loads(ckptd(ckptd_command, cli_env, node_b, "trash", "list", "--json").stdout)
    assert listed == []
    written = PosixLease(str(root)).written()
    assert written is not None and written.host == "node-b" and written.expires == 0.0
    assert PosixLease(str(root)).holder() is None  # released when the command ended


def test_restore_on_the_node_that_may_prune_takes_the_lease_and_gives_it_back(
    tmp_path: Path, root: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    node_a, node_b = Node(tmp_path, root, "node-a"), Node(tmp_path, root, "node-b")
    pruned_by_a(ckptd_command, cli_env, node_a, root)
    restore = ckptd(ckptd_command, cli_env, node_b, "trash", "restore", "checkpoint-3")
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert "checkpoint-3" in checkpoints(root)
    written = PosixLease(str(root)).written()
    assert written is not None and written.host == "node-b"  # taken for the restore...
    assert PosixLease(str(root)).holder() is None  # ...and given back


def test_a_root_that_is_not_shared_is_purged_whatever_its_lease_file_says(
    tmp_path: Path, root: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    node_a = Node(tmp_path, root, "node-a", shared=False)
    node_b = Node(tmp_path, root, "node-b", shared=False)
    pruned_by_a(ckptd_command, cli_env, node_a, root)
    stray = PosixLease(str(root), 60.0, 5.0, host="node-a")
    assert stray.acquire(time.time())  # says nothing about a root that is not shared
    lease_before = (root / LEASE_NAME).read_bytes()
    plan = json.loads(ckptd(ckptd_command, cli_env, node_b, "plan", "--json").stdout)
    assert plan["standby"] is None
    purge = ckptd(ckptd_command, cli_env, node_b, "trash", "purge", "-y", "--json")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert sorted(json.loads(purge.stdout)[os.path.realpath(root)]["removed"]) == TRASHED
    assert (root / LEASE_NAME).read_bytes() == lease_before  # not taken, not released


# --- an s3:// root ------------------------------------------------------------------------


def test_trash_purge_of_an_s3_root_on_a_standby_node_is_refused(
    tmp_path: Path, s3_bucket: S3Bucket, ckptd_command: list[str], cli_env: dict[str, str]
) -> None:
    from tests.e2e.test_remote_roots_cli import upload_tree

    _local, url = upload_tree(tmp_path, s3_bucket, "hf-trainer-complete")
    entry = {"path": url, "storage_options": s3_bucket.options}
    node_a = Node(tmp_path, entry, "node-a", shared=None, keep=1)
    node_b = Node(tmp_path, entry, "node-b", shared=None, keep=1)
    done = ckptd(ckptd_command, cli_env, node_a, "prune", "-y")
    assert done.returncode == 0, done.stdout + done.stderr
    listed = ckptd(ckptd_command, cli_env, node_b, "trash", "list", "--json").stdout
    assert len(json.loads(listed)) == 3  # deferred deletions, their objects still there
    expires = node_a.take_lease()

    purge = ckptd(ckptd_command, cli_env, node_b, "trash", "purge", "-y")
    assert purge.returncode == EXIT_REFUSED, purge.stdout + purge.stderr
    assert f"ckptd trash: refused for safety: {url}: " in purge.stderr
    assert f"node-a pid {os.getpid()} until {utc_iso(expires, timespec='seconds')}" in (
        purge.stderr
    )
    assert ckptd(ckptd_command, cli_env, node_b, "trash", "list", "--json").stdout == listed
    plan = json.loads(ckptd(ckptd_command, cli_env, node_b, "plan", "--json").stdout)
    assert plan["standby"]["holder"] == {"host": "node-a", "pid": os.getpid()}
