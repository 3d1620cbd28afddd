"""Azure Blob Storage on 127.0.0.1 for the az:// tests: Azurite, Microsoft's storage emulator.

Why Azurite: it is the emulator Microsoft ships for Blob Storage, installs from the npm registry
(`npm install azurite`, pure JavaScript on Node.js), and implements what ckptd relies on: List
Blobs pagination by delimiter, conditional Put Blob and Delete Blob (`If-None-Match: *`,
`If-Match`), Blob Batch deletes, blocks staged but not committed. It is installed once into
~/.cache/ckptd-azurite (or $CKPTD_AZURITE_CACHE) and started by the session fixture on a free
port with its data in a temporary folder; the tests are skipped, with the reason, when node or
npm is missing or the install fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Azurite's well-known development account (documented by Microsoft; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclass(frozen=True)
class AzureContainer:
    """A fresh container on the emulator: its account URL, name and the storage_options."""

    account_url: str
    name: str

    @property
    def options(self) -> dict[str, object]:
        return {
            "account_name": ACCOUNT,
            "account_key": ACCOUNT_KEY,
            "account_url": self.account_url,
        }

    def url(self, prefix: str = "") -> str:
        return f"az://{self.name}/{prefix}".rstrip("/")

    def client(self) -> Any:
        """Return a plain ContainerClient (the tests' independent view)."""
        return make_service(self.account_url).get_container_client(self.name)


def make_service(account_url: str, **settings: Any) -> Any:
    from azure.storage.blob import BlobServiceClient

    credential = {"account_name": ACCOUNT, "account_key": ACCOUNT_KEY}
    return BlobServiceClient(account_url, credential=credential, **settings)


def install_azurite() -> tuple[Path | None, str]:
    """Install Azurite from npm into the cache folder once; return its azurite-blob program,
    or None and why not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None, "node and npm are needed to run Azurite (the Azure Storage emulator)"
    cache = Path(os.environ.get("CKPTD_AZURITE_CACHE", Path.home() / ".cache" / "ckptd-azurite"))
    program = cache / "node_modules" / ".bin" / "azurite-blob"
    if program.exists():
        return program, ""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["npm", "install", "--prefix", str(cache), "--no-audit", "--no-fund", "azurite"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, "npm install azurite took more than 10 minutes"
    if done.returncode != 0 or not program.exists():
        return None, f"npm install azurite failed: {(done.stderr or done.stdout)[-1500:]}"
    return program, ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Azurite:
    """The emulator process: started on a free port, asked whether it answers, stopped."""

    def __init__(self, program: Path, location: Path) -> None:
        self.port = free_port()
        self.account_url = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.log = (location / "azurite.log").open("w")
        self.process = subprocess.Popen(
            [
                str(program),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--location",
                str(location),
                "--skipApiVersionCheck",
                "--loose",
                "--silent",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> str | None:
        """Return None once the emulator answers, else why it did not start."""
        deadline = time.monotonic() + timeout
        # No retries: the SDK's backoff would wait for seconds on a port not yet listening.
        service = make_service(self.account_url, retry_total=0)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"azurite-blob exited with {self.process.returncode}"
            with contextlib.suppress(Exception):
                list(service.list_containers())
                return None
            time.sleep(0.2)
        self.stop()
        return f"Azurite at {self.account_url} did not answer within {timeout} s"

    def stop(self) -> None:
        if self.process.poll() is None:
            # Its own session: the node process and anything it started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


_shared: list[Azurite] = []


@pytest.fixture(scope="session")
def azurite_url() -> Iterator[str]:
    """The emulator's account URL for the whole session (skipped, with why, without it)."""
    try:
        import azure.storage.blob  # noqa: F401
    except ImportError as error:
        pytest.skip(f"azure-storage-blob is not installed (pip install -e '.[azure]'): {error}")
    if _shared:
        yield _shared[0].account_url
        return
    program, why = install_azurite()
    if program is None:
        pytest.skip(why)
    with tempfile.TemporaryDirectory(prefix="ckptd-azurite-") as location:
        server = Azurite(program, Path(location))
        problem = server.wait_ready()
        if problem is not None:
            server.stop()
            pytest.skip(problem)
        _shared.append(server)
        try:
            yield server.account_url
        finally:
            _shared.clear()
            server.stop()


@pytest.fixture
def az_container(azurite_url: str) -> AzureContainer:
    """A new, empty container for one test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    make_service(azurite_url).create_container(name)
    return AzureContainer(account_url=azurite_url, name=name)
