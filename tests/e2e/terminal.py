"""Running the real CLI as people see it: on a terminal of a given size, or piped at a given
$COLUMNS, with its output as plain text (no colours, no escape sequences)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def plain(text: str) -> str:
    """Given terminal output, return it without escape sequences and with plain newlines."""
    return ESCAPES.sub("", text).replace("\r\n", "\n").replace("\r", "\n")


def on_terminal(
    command: list[str],
    env: dict[str, str],
    *,
    columns: int = 80,
    answer: str | None = None,
    timeout: float = 120,
) -> tuple[int, str]:
    """Given the CLI and its arguments, run it on a pseudo-terminal `columns` wide (and answer
    its `[y/N]` question with `answer`); return its exit code and what it printed."""
    environment = {key: value for key, value in env.items() if key not in ("COLUMNS", "LINES")}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        command,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=environment,
        start_new_session=True,
    )
    os.close(follower)
    output = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
                if answer is not None and not answered and b"[y/N]" in output:
                    os.write(leader, answer.encode() + b"\n")
                    answered = True
            elif process.poll() is not None:
                break
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
    return process.returncode, plain(output.decode(errors="replace"))


def piped(
    command: list[str], env: dict[str, str], *, columns: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Given the CLI and its arguments, run it with its output piped (no terminal), $COLUMNS set
    to `columns` (None: unset); return the finished process."""
    environment = {key: value for key, value in env.items() if key not in ("COLUMNS", "LINES")}
    if columns is not None:
        environment["COLUMNS"] = str(columns)
    return subprocess.run(
        command,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
