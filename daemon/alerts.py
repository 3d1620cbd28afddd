"""Running the person's `alert` command (config `disk.alert`): the one way ckptd runs it, for a
disk past critical (daemon/disk/pressure.py) and for a corrupt checkpoint (daemon/verification.py).

The command line is split like a shell would (`shlex`) but run without one; what it is told is
in its environment (`CKPTD_*`), on top of ckptd's own. Every run is recorded as an `alert`
record: its exit code and the end of its stderr, or why it could not run.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping
from typing import Any

from daemon.history.events import Alert
from daemon.history.log import History

# The most of the command's stderr an `alert` record keeps (its end: where the error is).
STDERR_KEPT = 500


def run_alert_command(
    command: str,
    variables: Mapping[str, str],
    *,
    mount: str,
    level: str,
    history: History,
    timeout: float,
) -> int | None:
    """Given the `alert` command line, the `CKPTD_*` variables it is told, and the mount and
    level its record names, run it (no shell), record an `alert` record and return its exit
    code (None when it could not run or timed out)."""
    environment = dict(os.environ)
    environment.update(variables)
    fields: dict[str, Any] = {"mount": mount, "command": command, "level": level}
    code: int | None = None
    try:
        finished = subprocess.run(
            shlex.split(command),
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        code = finished.returncode
        fields.update(exit_code=code, stderr=finished.stderr[-STDERR_KEPT:])
    except subprocess.TimeoutExpired:
        fields.update(error=f"timed out after {timeout:g} s")
    except (OSError, ValueError) as error:
        fields.update(error=str(error))
    history.record(Alert(**fields))
    return code
