"""An S3-compatible server on 127.0.0.1 for the object-storage tests: moto's S3 backend.

Why moto: it installs from PyPI as pure Python in seconds (`moto[s3]` plus flask and
flask-cors, the two packages its server needs), implements the parts of S3 ckptd relies on —
ListObjectsV2 pagination at 1,000 keys, DeleteObjects with per-key errors, conditional
PutObject (`If-None-Match: *`, `If-Match`), conditional DeleteObject (`If-Match`), multipart
uploads, bucket versioning — and runs in a child process that the tests start and stop. MinIO
and Ceph are not on PyPI; a binary download is not possible here.

Run standalone (`python -m tests.s3server`) it prints its port on the first line and serves
until killed. The fixtures start it once per session on a free port and give each test a
fresh bucket.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
# Credentials moto accepts; explicit so no test ever reads the machine's real AWS profile.
TEST_KEY = "testing-key"
TEST_SECRET = "testing-secret"


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the test server: its endpoint, name and the storage_options to use."""

    endpoint: str
    name: str

    @property
    def options(self) -> dict[str, object]:
        return {"endpoint_url": self.endpoint, "key": TEST_KEY, "secret": TEST_SECRET}

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}".rstrip("/")


def serve() -> None:
    """Serve moto's S3 on 127.0.0.1 at a free port; print the port first, then block."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    application = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, application, threaded=True)
    print(server.server_port, flush=True)
    server.serve_forever()


def _exit_with_parent(parent: int) -> None:
    """End this server when the process that started it is gone (a killed test run)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


class S3Server:
    """The server process: started, asked for its port, stopped."""

    def __init__(self) -> None:
        environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.s3server"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        self.endpoint = ""

    def wait_ready(self, timeout: float = 30.0) -> str | None:
        """Return None once the server answers, else why it did not start."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            assert self.process.stderr is not None
            return f"moto server did not start: {self.process.stderr.read()[-2000:]}"
        self.endpoint = f"http://127.0.0.1:{line}"
        deadline = time.monotonic() + timeout
        client = make_client(self.endpoint)
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                client.list_buckets()
                return None
            time.sleep(0.1)
        self.stop()
        return f"moto server at {self.endpoint} did not answer within {timeout} s"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def make_client(endpoint: str) -> Any:
    """Given the endpoint, return a plain botocore S3 client (the tests' independent view)."""
    import botocore.session

    session = botocore.session.Session()
    return session.create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=TEST_KEY,
        aws_secret_access_key=TEST_SECRET,
        region_name="us-east-1",
    )


# One server for the whole session. Each test module imports the fixture, and pytest keeps a
# session fixture per module that defines it; the first one starts the server, the others
# share it, and the one that started it stops it when the session ends.
_shared: list[S3Server] = []


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The test server's endpoint URL for the whole session (skipped, with why, without moto)."""
    try:
        import moto  # noqa: F401
        import werkzeug  # noqa: F401
    except ImportError as error:
        pytest.skip(f"moto's S3 server is not installed (pip install -e '.[test]'): {error}")
    if _shared:
        yield _shared[0].endpoint
        return
    server = S3Server()
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
def s3_bucket(s3_endpoint: str) -> S3Bucket:
    """A new, empty bucket for one test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    make_client(s3_endpoint).create_bucket(Bucket=name)
    return S3Bucket(endpoint=s3_endpoint, name=name)


if __name__ == "__main__":
    serve()
