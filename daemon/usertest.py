"""The user's own test of a checkpoint: `verify.command`, run daily and by `ckptd verify --test`.

`verify.command` (say `python3 test_model.py --model {path}`) is split like a shell would
(`shlex`), then each word gets `{path}` (the checkpoint's path), `{root}`, `{name}` and
`{step}` filled in, so a name with spaces stays one argument and nothing is ever run through a
shell. The command runs in the root's folder, with `CKPTD_CHECKPOINT`, `CKPTD_ROOT`,
`CKPTD_NAME` and `CKPTD_STEP` in its environment, stdin closed, in its own session, at the
lowest CPU priority (nice 19) and in the idle I/O class, so a trainer on the same machine never
waits for it. It is killed (its whole process group) after `verify.timeout`, or when the daemon
stops.

Exit 0 marks the checkpoint `verified` (it counts as passed: `daemon/verification.py`);
anything else, a timeout included, `failed`: the checkpoint is corrupt from then on (kept,
never counted as the newest), the `alert` command runs, and the history's `user_test` record
holds the command's last lines. A command that cannot start at all is an `error`: recorded,
but no verdict on the checkpoint. A verdict is remembered for the checkpoint's signature, so
the daily run tests each newest checkpoint once; `ckptd verify --test` tests it again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Final, Literal

from daemon.config import Config, RootConfig
from daemon.history.events import UserTest
from daemon.history.log import History
from daemon.integrity.check import signature_of
from daemon.planner import plan_root_full
from daemon.verification import (
    UserTestRecord,
    VerificationState,
    newest_sound,
    run_corrupt_alert,
)
from policies.model import Checkpoint

Verdict = Literal["verified", "failed", "error"]

LAST_LINES: Final = 20
LINE_CHARACTERS: Final = 300
TAIL_BYTES: Final = 64 * 1024
KILL_GRACE: Final = 5.0
POLL_SECONDS: Final = 0.2

# ioprio_set system call numbers (the same table as daemon/integrity/background.py).
_IOPRIO_SET: Final = {
    "x86_64": 251,
    "i386": 289,
    "i686": 289,
    "armv7l": 314,
    "aarch64": 30,
    "riscv64": 30,
    "ppc64le": 273,
    "s390x": 282,
}
_IOPRIO_WHO_PROCESS: Final = 1
_IOPRIO_IDLE: Final = 3 << 13
NICE: Final = 19


@dataclass(frozen=True, slots=True)
class UserTestResult:
    """Given one run of the user's test on one checkpoint: the verdict, the exit code (None
    when it timed out or could not start: `error` says why), how long it took, its last lines
    of output and the checkpoint's signature digest before the run ("" when it changed while
    tested: then the verdict is not remembered)."""

    root: str
    checkpoint: str
    command: tuple[str, ...]
    verdict: Verdict
    exit_code: int | None
    seconds: float
    last_lines: tuple[str, ...]
    error: str | None
    digest: str

    def event(self) -> UserTest:
        """Return the history record of this run."""
        return UserTest(
            root=self.root,
            checkpoint=self.checkpoint,
            command=self.command,
            verdict=self.verdict,
            exit_code=self.exit_code,
            seconds=round(self.seconds, 3),
            last_lines=self.last_lines,
            error=self.error,
        )


def command_for(template: str, root: str, checkpoint: Checkpoint) -> tuple[str, ...]:
    """Given `verify.command`, a root and a checkpoint, return the argument vector to run."""
    values = {
        "path": os.path.join(root, checkpoint.name),
        "root": root,
        "name": checkpoint.name,
        "step": str(checkpoint.step),
    }
    return tuple(word.format(**values) for word in shlex.split(template))


def _priority_lowering() -> Callable[[], None]:
    """Return the function the child runs before exec: nice 19, then the idle I/O class. The
    system call is looked up here, in the parent: the child only calls it."""
    number = _IOPRIO_SET.get(platform.machine())
    syscall: Callable[..., int] | None = None
    with contextlib.suppress(OSError):
        syscall = getattr(ctypes.CDLL(None, use_errno=True), "syscall", None)

    def lower() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
        if number is not None and syscall is not None:
            syscall(number, _IOPRIO_WHO_PROCESS, 0, _IOPRIO_IDLE)

    return lower


def run_user_test(
    config: Config,
    root: str,
    checkpoint: Checkpoint,
    *,
    stop: threading.Event | None = None,
) -> UserTestResult:
    """Given the config (its `verify.command` set), a root's real path and one of its
    checkpoints, run the user's test on it and return the result (nothing recorded yet)."""
    template = config.verify.command
    if not template:
        raise ValueError("verify.command is not set")
    command = command_for(template, root, checkpoint)
    digest = signature_of(root, checkpoint.name, checkpoint.layout).digest
    started = time.monotonic()
    environment = dict(os.environ)
    environment.update(
        CKPTD_CHECKPOINT=os.path.join(root, checkpoint.name),
        CKPTD_ROOT=root,
        CKPTD_NAME=checkpoint.name,
        CKPTD_STEP=str(checkpoint.step),
    )
    with tempfile.TemporaryFile() as output:
        try:
            process = subprocess.Popen(
                command,
                cwd=root,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Safe beside threads: the child makes two system calls, nothing else.
                preexec_fn=_priority_lowering(),
            )
        except (OSError, subprocess.SubprocessError) as failure:
            return UserTestResult(
                root, checkpoint.name, command, "error", None, 0.0, (), str(failure), digest
            )
        code, error = _wait(process, float(config.verify.timeout), stop)
        lines = _last_lines(output)
    seconds = time.monotonic() - started
    if signature_of(root, checkpoint.name, checkpoint.layout).digest != digest:
        digest = ""  # changed while tested: the verdict is about something else now
    verdict: Verdict = "verified" if code == 0 else "failed"
    if error is not None and error.startswith("stopped"):
        verdict = "error"
    return UserTestResult(
        root, checkpoint.name, command, verdict, code, seconds, lines, error, digest
    )


def _wait(
    process: subprocess.Popen[bytes], timeout: float, stop: threading.Event | None
) -> tuple[int | None, str | None]:
    """Given the running test, wait for its end, the timeout or `stop`; return (its exit code,
    or None with why it was killed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return process.wait(min(POLL_SECONDS, max(0.0, deadline - time.monotonic()))), None
        except subprocess.TimeoutExpired:
            pass
        if stop is not None and stop.is_set():
            _kill(process)
            return None, "stopped (shutting down)"
        if time.monotonic() >= deadline:
            _kill(process)
            return None, f"timed out after {timeout:g} s"


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Given the test, end its whole process group: SIGTERM, then SIGKILL after a grace."""
    for signal_number, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal_number)
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_lines(output: IO[bytes]) -> tuple[str, ...]:
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - TAIL_BYTES))
    text = output.read().decode("utf-8", errors="replace")
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if size > TAIL_BYTES and lines:
        lines = lines[1:]  # the first one was cut by the tail
    return tuple(line[:LINE_CHARACTERS] for line in lines[-LAST_LINES:])


def record_user_test(
    config: Config, result: UserTestResult, state: VerificationState, history: History
) -> None:
    """Given a run of the user's test, remember its verdict for the checkpoint's signature,
    record it (`user_test`) and, when it failed, run the `alert` command."""
    if result.verdict != "error" and result.digest:
        record = UserTestRecord(
            result.digest, result.verdict, result.exit_code, result.last_lines, time.time()
        )
        state.tests.store(result.root, result.checkpoint, record)
    history.record(result.event())
    if result.verdict == "failed":
        why = "timed out" if result.exit_code is None else f"exit {result.exit_code}"
        problems = [f"the user's test failed ({why})", *result.last_lines[-5:]]
        run_corrupt_alert(config, result.root, result.checkpoint, problems, history)


@dataclass(frozen=True, slots=True)
class UserTestOutcome:
    """What testing one root's newest sound checkpoint came to: the result, or why not run."""

    root: str
    result: UserTestResult | None = None
    skipped: str | None = None


def run_on_newest(
    config: Config,
    root: RootConfig,
    *,
    now: float,
    history: History,
    state: VerificationState,
    again: bool = False,
    stop: threading.Event | None = None,
) -> UserTestOutcome:
    """Given a root, run the user's test on its newest complete checkpoint that is not corrupt
    (unless it was tested already in its present state and not `again`), record it and return
    the outcome. Nothing is run without `verify.command`."""
    root_path = os.path.realpath(root.path)
    if not config.verify.command:
        return UserTestOutcome(root_path, skipped="verify.command is not set")
    planned = plan_root_full(config, root, now=now, verification=state)
    newest = newest_sound(planned.scan.checkpoints)
    if newest is None:
        return UserTestOutcome(root_path, skipped="no complete checkpoint that is not corrupt")
    signature = signature_of(root_path, newest.name, newest.layout)
    if not again and state.tests.lookup(root_path, newest.name, signature.digest) is not None:
        return UserTestOutcome(root_path, skipped=f"{newest.name} was tested already")
    result = run_user_test(config, root_path, newest, stop=stop)
    record_user_test(config, result, state, history)
    return UserTestOutcome(root_path, result=result)


def run_daily_user_tests(
    config: Config,
    *,
    now: float,
    history: History,
    state: VerificationState | None = None,
    stop: threading.Event | None = None,
) -> list[UserTestOutcome]:
    """Given the config, test the newest sound checkpoint of every root that exists (each
    once per signature), save the verdicts in state_dir and return the outcomes: the daily
    job's body."""
    state = state or VerificationState.in_folder(config.state_dir, create=True)
    outcomes = []
    for root in config.roots:
        if stop is not None and stop.is_set():
            break
        if os.path.isdir(root.path):
            outcomes.append(
                run_on_newest(config, root, now=now, history=history, state=state, stop=stop)
            )
    state.save()
    return outcomes
