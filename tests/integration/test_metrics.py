"""Prometheus metrics: `ckptd run` as a subprocess serving /metrics on a real port, read with a
real HTTP request and parsed with prometheus_client's own parser; the textfile written
atomically; refusals and vetoes counted by reason with real prunes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import load_config
from daemon.history.log import read_records
from daemon.metrics import Metrics, Monitor, refusal_reason, veto_reason, write_atomically
from daemon.pruning.pipeline import prune_root
from daemon.pruning.trash import root_lock
from daemon.state import read_state
from tests.configs import write_config
from tests.layouts_fixtures import well_formed_bytes

OLD = time.time() - 3600
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def make_checkpoint(root: Path, step: int, *, mtime: float | None = OLD) -> Path:
    """A complete Hugging Face checkpoint folder, written long ago unless `mtime` is None."""
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt"):
        (folder / name).write_bytes(well_formed_bytes(name, 1000 + step, random=True))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if mtime is not None:
        for path in [*folder.iterdir(), folder]:
            os.utime(path, (mtime, mtime))
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def parse(text: str) -> Samples:
    """Given exposition text, return every sample by (name, labels) as prometheus_client reads
    it (the parser is the library's: a malformed line fails here)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(port: int) -> Samples | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            return parse(response.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# The daemon's config besides its root and `metrics:` (tests/configs.py writes it).
DAEMON: dict[str, Any] = {
    "timezone": "UTC",
    "log": {"level": "info", "format": "json"},
    "policy": {"keep_last": 5, "tier2_count": 4, "tier3_interval": 100},
    "settle_seconds": 0.5,
    "min_keep": 3,
    "max_delete_fraction": 0.95,
    "grace": "0s",
    "layout": "hf",
    "disk": {"interval": "1s"},
}


class Daemon:
    """`ckptd run --config FILE` as a subprocess, stopped with SIGTERM."""

    def __init__(self, command: list[str], config: Path, env: dict[str, str], log: Path) -> None:
        self.log = log.open("w")
        repository = str(Path(__file__).resolve().parents[2])
        env = dict(env)
        env["PYTHONPATH"] = os.pathsep.join([repository, env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [*command, "run", "--config", str(config)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=config.parent,
        )

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            self.log.close()


@pytest.fixture
def served(
    tmp_path: Path, ckptd_command: list[str], cli_env: dict[str, str]
) -> Iterator[tuple[Path, Path, int, Daemon, dict[str, object]]]:
    """A root of 40 old checkpoints, its plan before the daemon ran, and the daemon serving
    metrics on a free port."""
    root, state = tmp_path / "run", tmp_path / "state"
    root.mkdir()
    (tmp_path / "textfile").mkdir()
    for step in range(10, 410, 10):
        make_checkpoint(root, step)
    port = free_port()
    textfile = tmp_path / "textfile" / "ckptd.prom"
    config = write_config(
        tmp_path / "config.yaml",
        [root],
        state_dir=state,
        metrics={"listen": f"127.0.0.1:{port}", "textfile": textfile},
        **DAEMON,
    )
    plan_before = json.loads(
        subprocess.run(
            [*ckptd_command, "plan", "--config", str(config), "--json"],
            env=cli_env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    daemon = Daemon(ckptd_command, config, cli_env, tmp_path / "daemon.log")
    try:
        yield root, config, port, daemon, plan_before
    finally:
        if daemon.process.poll() is None:
            daemon.stop()


def pruned_once(port: int, root: Path) -> Callable[[], bool]:
    def check() -> bool:
        samples = scrape(port)
        return bool(
            samples and value(samples, "ckptd_last_prune_success_timestamp_seconds", root=str(root))
        )

    return check


@pytest.mark.slow
def test_metrics_endpoint_of_the_running_daemon(
    served: tuple[Path, Path, int, Daemon, dict[str, object]],
    ckptd_command: list[str],
    cli_env: dict[str, str],
    tmp_path: Path,
) -> None:
    root, config, port, daemon, plan_before = served
    assert wait_until(pruned_once(port, root), 30), (tmp_path / "daemon.log").read_text()[-3000:]
    samples = scrape(port)
    assert samples is not None
    key = str(root)

    # What the start-up prune deleted, as the plan before it said.
    checkpoints = plan_before["checkpoints"]
    assert isinstance(checkpoints, list)
    deleted = [c for c in checkpoints if c["action"] == "delete"]
    assert deleted, "the fixture must give the policy something to delete"
    assert value(samples, "ckptd_deleted_checkpoints_total", root=key) == len(deleted)
    assert value(samples, "ckptd_deleted_bytes_total", root=key) == sum(c["bytes"] for c in deleted)
    # Freed bytes are what the filesystem got back (allocated blocks, issue 10), as the history
    # records them; the files' lengths, which the plan shows, are beside them there.
    history = read_records(str(tmp_path / "state" / "history.jsonl"))
    deletes = [record for record in history if record["event"] == "delete"]
    assert sum(r["bytes_logical"] for r in deletes) == sum(c["bytes"] for c in deleted)
    freed = sum(r["bytes_freed"] for r in deletes)
    assert freed > 0 and value(samples, "ckptd_freed_bytes_total", root=key) == freed

    # What is left, by tier, is what `ckptd plan --json` shows now.
    plan_after = json.loads(
        subprocess.run(
            [*ckptd_command, "plan", "--config", str(config), "--json"],
            env=cli_env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    by_tier = Counter(str(c["tier"] or "none") for c in plan_after["checkpoints"])
    bytes_by_tier = Counter()
    for c in plan_after["checkpoints"]:
        bytes_by_tier[str(c["tier"] or "none")] += c["bytes"]
    for tier in ("1", "2", "3", "none"):
        assert value(samples, "ckptd_checkpoints", root=key, tier=tier) == by_tier[tier], tier
        assert value(samples, "ckptd_checkpoint_bytes", root=key, tier=tier) == bytes_by_tier[tier]
    assert value(samples, "ckptd_incomplete_checkpoints", root=key) == 0
    assert value(samples, "ckptd_trash_bytes", root=key) == 0
    assert value(samples, "ckptd_prune_duration_seconds_count") == 1
    assert value(samples, "ckptd_root_refused", root=key) == 0
    now = time.time()
    last = value(samples, "ckptd_last_prune_success_timestamp_seconds", root=key)
    assert last is not None and now - 60 < last <= now

    # The filesystem figures are those of the root's filesystem.
    statvfs = os.statvfs(root)
    ratios = {
        dict(labels)["mount"]: sample
        for (name, labels), sample in samples.items()
        if name == "ckptd_filesystem_used_ratio"
    }
    assert len(ratios) == 1 and 0 < next(iter(ratios.values())) < 1
    size = next(s for (n, _), s in samples.items() if n == "ckptd_filesystem_size_bytes")
    assert size == statvfs.f_blocks * statvfs.f_frsize
    # Free space moves (other processes write): within 2% of the size of what statvfs says.
    free = next(s for (n, _), s in samples.items() if n == "ckptd_filesystem_free_bytes")
    assert abs(free - statvfs.f_bavail * statvfs.f_frsize) < 0.02 * size

    # The disk check (every second here) stamps its time.
    assert wait_until(
        lambda: bool(value(scrape(port) or {}, "ckptd_last_disk_check_timestamp_seconds")), 10
    )

    # A new checkpoint is pruned after it settles: the counter goes up by what that deleted.
    before = value(samples, "ckptd_deleted_checkpoints_total", root=key) or 0
    make_checkpoint(root, 1000, mtime=None)
    assert wait_until(
        lambda: (
            (value(scrape(port) or {}, "ckptd_deleted_checkpoints_total", root=key) or 0) > before
        ),
        20,
    )
    later = scrape(port)
    assert later is not None
    assert value(later, "ckptd_prune_duration_seconds_count") == 2
    assert not [
        name for (name, labels) in later if any(v.startswith("checkpoint-") for _, v in labels)
    ]

    # The textfile holds the same metrics, and no temporary file is left beside it.
    textfile = tmp_path / "textfile" / "ckptd.prom"
    from_file = parse(textfile.read_text())
    assert value(from_file, "ckptd_deleted_checkpoints_total", root=key) == value(
        later, "ckptd_deleted_checkpoints_total", root=key
    )
    assert [p.name for p in textfile.parent.iterdir()] == ["ckptd.prom"]
    assert textfile.stat().st_mode & 0o777 == 0o644

    assert daemon.stop() == 0
    assert scrape(port) is None, "the endpoint outlived the daemon"


@pytest.mark.slow
def test_a_veto_is_counted_by_reason_not_by_name(
    served: tuple[Path, Path, int, Daemon, dict[str, object]],
) -> None:
    root, _config, port, daemon, _plan = served
    # After the start-up prune, hold a tier-1 checkpoint that is no tier-3 representative (not a
    # multiple of 100): 40 newer saves push it to tier 3, where the policy deletes it.
    assert wait_until(pruned_once(port, root), 30)
    survivors = sorted(int(p.name.split("-")[1]) for p in root.iterdir() if p.name[:5] == "check")
    held = next(step for step in reversed(survivors) if step % 100)
    with (root / f"checkpoint-{held}" / "config.json").open("rb"):
        for step in range(1000, 1400, 10):
            make_checkpoint(root, step)
        assert wait_until(
            lambda: bool(
                value(scrape(port) or {}, "ckptd_vetoes_total", root=str(root), reason="in_use")
            ),
            20,
        )
    assert (root / f"checkpoint-{held}").is_dir()
    samples = scrape(port) or {}
    reasons = {dict(labels)["reason"] for (name, labels) in samples if name == "ckptd_vetoes_total"}
    assert reasons <= {"in_use", "tracked", "pinned", "newest", "incomplete", "min_keep", "other"}
    assert daemon.stop() == 0


def test_a_refused_prune_is_counted_and_recorded_for_ckptd_check(tmp_path: Path) -> None:
    """A real prune refused because another prune holds the root's lock: the refusal counter
    by reason, the refused gauge, and state.json's `refused` (since when, why)."""
    root, state = tmp_path / "run", tmp_path / "state"
    root.mkdir()
    for step in range(10, 110, 10):
        make_checkpoint(root, step)
    config_file = write_config(
        tmp_path / "config.yaml", [root], state_dir=state, metrics={"textfile": None}, **DAEMON
    )
    config = load_config(str(config_file))
    clock = [1_000_000.0]
    monitor = Monitor(config, clock=lambda: clock[0])
    monitor.start()
    with root_lock(str(root)) as acquired:
        assert acquired
        report = prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert report.refused
    monitor.pruned(report)
    samples = parse(monitor.metrics.text().decode())
    assert value(samples, "ckptd_refusals_total", root=str(root), reason="locked") == 1
    assert value(samples, "ckptd_root_refused", root=str(root)) == 1
    assert read_state(str(state))["refused"][str(root)]["since"] == "1970-01-12T13:46:40+00:00"
    # Refused again later: `since` stays the first refusal's time.
    clock[0] += 7200
    monitor.pruned(report)
    assert read_state(str(state))["refused"][str(root)]["since"] == "1970-01-12T13:46:40+00:00"
    # A prune that goes through clears it and stamps the success.
    report = prune_root(config, config.roots[0], now=time.time(), dry_run=False)
    assert not report.refused and report.deleted
    monitor.pruned(report)
    saved = read_state(str(state))
    assert saved["refused"] == {}
    assert saved["prune_success"] == {str(root): "1970-01-12T15:46:40+00:00"}
    samples = parse(monitor.metrics.text().decode())
    assert value(samples, "ckptd_root_refused", root=str(root)) == 0
    assert value(samples, "ckptd_last_prune_success_timestamp_seconds", root=str(root)) == clock[0]
    # A new monitor (the daemon restarted) starts from the recorded success.
    again = Monitor(config, clock=lambda: clock[0])
    again.start()
    samples = parse(again.metrics.text().decode())
    assert value(samples, "ckptd_last_prune_success_timestamp_seconds", root=str(root)) == clock[0]


def test_reasons_are_a_small_fixed_set() -> None:
    assert veto_reason("in-use:pid 7 (python train.py), tracked") == "in_use"
    assert veto_reason("min_keep:3") == "min_keep"
    assert veto_reason("outside-root:'../x'") == "outside_root"
    assert veto_reason("changed-since-confirmed") == "other"
    assert refusal_reason("the newest checkpoint checkpoint-9 is still settling (x)") == "settling"
    assert (
        refusal_reason("the trainer pid 5 (python) holds the newest checkpoint checkpoint-9 (...)")
        == "trainer_holds_newest"
    )
    assert refusal_reason("the plan deletes 9 of 10 ..., more than max_delete_fraction 90%") == (
        "max_delete_fraction"
    )
    assert refusal_reason("something new") == "other"


def test_the_textfile_is_replaced_atomically(tmp_path: Path) -> None:
    """A reader polling the file while it is rewritten sees one whole version or the other,
    never an empty or half-written file: each write is a new inode renamed over the old."""
    path = tmp_path / "ckptd.prom"
    versions = [(f"# version {n}\n" + "x" * 400_000 + f"\nend {n}\n").encode() for n in range(2)]
    write_atomically(str(path), versions[0])
    stop = threading.Event()
    torn: list[int] = []

    def read() -> None:
        while not stop.is_set():
            data = path.read_bytes()
            if data not in versions:
                torn.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    inodes = set()
    try:
        for n in range(100):
            write_atomically(str(path), versions[n % 2])
            inodes.add(path.stat().st_ino)
    finally:
        stop.set()
        reader.join()
    assert torn == []
    assert len(inodes) > 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckptd.prom"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_metrics_use_their_own_registry_and_base_units() -> None:
    from prometheus_client import REGISTRY

    metrics = Metrics()
    names = {family.name for family in metrics.registry.collect()}
    assert all(name.startswith("ckptd_") for name in names)
    assert not any(name.startswith("ckptd_") for name in {f.name for f in REGISTRY.collect()})
    for family in metrics.registry.collect():
        # No checkpoint name or step as a label: only these.
        for sample in family.samples:
            assert set(sample.labels) <= {"root", "tier", "reason", "mount", "version", "le"}
        assert not family.name.endswith(("_milliseconds", "_percent", "_megabytes"))


def test_a_reload_moves_the_endpoint_and_stop_closes_it(tmp_path: Path) -> None:
    """metrics.listen changed by a reload: the old port stops answering, the new one serves;
    removed from the config: nothing serves; a root removed from the config loses its series."""
    root, state = tmp_path / "run", tmp_path / "state"
    root.mkdir()
    make_checkpoint(root, 10)
    first, second = free_port(), free_port()
    for name, roots, metrics in (
        ("a.yaml", [root], {"listen": f"127.0.0.1:{first}", "textfile": None}),
        ("b.yaml", [root], {"listen": f"127.0.0.1:{second}", "textfile": None}),
        ("c.yaml", [], {"textfile": None}),
    ):
        write_config(tmp_path / name, roots, state_dir=state, metrics=metrics, **DAEMON)
    monitor = Monitor(load_config(str(tmp_path / "a.yaml")), clock=time.time)
    monitor.start()
    try:
        report = prune_root(monitor.config, monitor.config.roots[0], now=time.time(), dry_run=False)
        monitor.pruned(report)
        assert value(scrape(first) or {}, "ckptd_checkpoints", root=str(root), tier="1") == 1
        monitor.apply(load_config(str(tmp_path / "b.yaml")))
        assert scrape(first) is None
        assert value(scrape(second) or {}, "ckptd_checkpoints", root=str(root), tier="1") == 1
        monitor.apply(load_config(str(tmp_path / "c.yaml")))
        assert scrape(second) is None
        samples = parse(monitor.metrics.text().decode())
        assert not [name for (name, labels) in samples if "root" in dict(labels)]
    finally:
        monitor.close()
