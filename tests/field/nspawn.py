"""A real systemd in a container: a cached Debian root (mmdebstrap), booted by systemd-nspawn.

`booted_container(...)` copies the cached root, boots it with `systemd-nspawn -b` and yields a
`Container` whose `sh()` runs a shell command inside (nsenter into the container's namespaces,
a clean environment). Every problem of the machine (not root, no apt, no network to build the
root, a kernel that cannot boot systemd in a container) ends in `pytest.skip` with the reason.

Why these nspawn options: `--register=no` needs no systemd-machined on the host, and
`--keep-unit` asks for no scope unit from the host's systemd (there may be none: the test VM
runs another PID 1). On the development VM (cgroup v1 with a v2 `unified` mount beside it, the
hybrid layout) systemd 252 boots so without further settings. The container shares the host's
network, but nothing in it uses it: ckptd and its dependencies are installed from wheels the
host prepared.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
SUITE = "bookworm"  # Python 3.11 and systemd 252, as the machine
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "procps",
    "util-linux",
)
CACHE = Path(os.environ.get("CKPTD_CONTAINER_CACHE", "/var/cache/ckptd-tests"))
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_SECONDS = 120


def _run(command: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, check=False
    )


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def require_tools() -> None:
    """Install mmdebstrap and systemd-container with apt-get where missing; skip if impossible."""
    if os.geteuid() != 0:
        pytest.skip("booting systemd in a container needs root")
    if shutil.which("mmdebstrap") and shutil.which("systemd-nspawn") and shutil.which("nsenter"):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("mmdebstrap or systemd-nspawn is missing and there is no apt-get to install it")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "mmdebstrap", "systemd-container", "util-linux"],
    ):
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=900, env=environment, check=False
        )
        if result.returncode != 0:
            pytest.skip(
                f"cannot install the container tools ({' '.join(command)}):\n"
                f"{_tail(result.stdout + result.stderr)}"
            )


def cached_root() -> Path:
    """Return the Debian root for the containers, built once per package list and reused."""
    key = hashlib.sha256(f"{SUITE} {platform.machine()} {' '.join(PACKAGES)}".encode()).hexdigest()
    root = CACHE / f"rootfs-{key[:16]}"
    if (root / "usr" / "lib" / "systemd" / "systemd").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    building = CACHE / f"{root.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    result = _run(
        [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(building),
        ],
        timeout=1200,
    )
    if result.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        pytest.skip(f"mmdebstrap could not build a {SUITE} root:\n{_tail(result.stderr)}")
    # The machine ID is made from the container's UUID at each boot.
    (building / "etc" / "machine-id").write_text("")
    building.rename(root)
    return root


def build_wheels(destination: Path) -> None:
    """Put a wheel of this checkout and of each dependency (for the container's Python) there."""
    destination.mkdir(parents=True, exist_ok=True)
    source = destination.parent / "ckptd-source"
    shutil.copytree(
        REPOSITORY,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = _run([*pip, "wheel", "--no-deps", "-w", str(destination), str(source)])
    shutil.rmtree(source, ignore_errors=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build ckptd's wheel:\n{_tail(built.stderr)}")
    wheel = next(destination.glob("ckptd-*.whl"))
    # The container's Python is Debian 12's 3.11, whatever Python runs the tests.
    arch = platform.machine()
    platforms = [
        f"manylinux{tag}_{arch}" for tag in ("_2_28", "_2_17", "2014", "_2_12", "2010", "_2_5", "1")
    ]
    downloaded = _run(
        [
            *pip,
            "download",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            *[option for name in platforms for option in ("--platform", name)],
            "-d",
            str(destination),
            str(wheel),
        ]
    )
    if downloaded.returncode != 0:
        pytest.skip(f"cannot download ckptd's dependencies as wheels:\n{_tail(downloaded.stderr)}")


@dataclass
class Container:
    """A booted container: its directory on the host and its init's PID (on the host)."""

    directory: Path
    leader: int
    console: Path

    def sh(
        self, script: str, *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Given a shell script, run it as root inside the container; return what it printed."""
        command = [
            "nsenter",
            f"--target={self.leader}",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--",
            "env",
            "-i",
            f"PATH={CONTAINER_PATH}",
            "LANG=C.UTF-8",
            "SYSTEMD_PAGER=",
            "SYSTEMD_COLORS=0",
            "/bin/bash",
            "-euo",
            "pipefail",
            "-c",
            script,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the container, exit {result.returncode}:\n$ {script}\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """Given a unit and property names, return `systemctl show` values."""
        arguments = " ".join(f"-p {name}" for name in properties)
        text = self.sh(f"systemctl show {arguments} {unit}").stdout
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def journal(
        self, unit: str, *, after_usec: int = 0, priority: str = ""
    ) -> list[dict[str, Any]]:
        """Given a unit, return its journal entries (JSON) written after the given time."""
        option = f"-p {priority}" if priority else ""
        text = self.sh(f"journalctl -u {unit} {option} -o json --no-pager", timeout=60).stdout
        entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        return [entry for entry in entries if int(entry["__REALTIME_TIMESTAMP"]) > after_usec]

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Given a path inside the container, write `text` there (as root)."""
        target = self.directory / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)


def _leader(nspawn: subprocess.Popen[bytes], deadline: float) -> int:
    while time.monotonic() < deadline and nspawn.poll() is None:
        with_init = [
            child.pid
            for child in psutil.Process(nspawn.pid).children()
            if child.name() in ("systemd", "init")
        ]
        if with_init:
            return with_init[0]
        time.sleep(0.1)
    return 0


@contextmanager
def booted_container(work: Path, root: Path, name: str) -> Iterator[Container]:
    """Given a work folder, the cached root and a machine name: a booted copy, removed after."""
    directory = work / "root"
    copied = _run(["cp", "-a", "--reflink=auto", str(root), str(directory)])
    assert copied.returncode == 0, copied.stderr
    console = work / "console.log"
    with console.open("wb") as output:
        nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                f"--directory={directory}",
                f"--machine={name}",
                "--register=no",
                "--keep-unit",
                "--console=read-only",
                "--boot",
            ],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + BOOT_SECONDS
        leader = _leader(nspawn, deadline)
        if not leader:
            pytest.skip(f"systemd-nspawn did not boot the container:\n{_tail(console.read_text())}")
        container = Container(directory, leader, console)
        state = ""
        while time.monotonic() < deadline:
            state = container.sh("systemctl is-system-running || true", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.5)
        else:
            pytest.skip(
                f"systemd in the container did not finish booting ({state!r}):\n"
                f"{_tail(console.read_text())}"
            )
        yield container
    finally:
        if nspawn.poll() is None:
            nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to halt
            try:
                nspawn.wait(60)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
        # nspawn leaves this folder behind when /run is not a tmpfs.
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{name}", ignore_errors=True)
