"""`ckptd demo` as a user runs it: checkpoints are written, some are pruned, the folder goes."""

from __future__ import annotations

import os
import re
import subprocess


def test_demo_writes_and_prunes(ckptd_command: list[str], cli_env: dict[str, str]) -> None:
    result = subprocess.run(
        [*ckptd_command, "demo", "--seconds", "6"],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    summary = re.search(
        r"demo: wrote (\d+) checkpoints, pruned (\d+), kept (\d+): \[(.*)\]", output
    )
    assert summary, output
    written, pruned, kept = (int(summary.group(index)) for index in (1, 2, 3))
    assert written >= 8
    assert pruned >= 1
    assert kept + pruned == written
    assert "delete" in output  # the history table lists the deletions
    # Not a TTY: plain progress lines instead of the live view.
    assert re.search(r"t=\s*\d+\.\ds written=\d+ on_disk=\d+ pruned=\d+", output)
    folder = re.search(r"ckptd demo in (\S+)", output)
    assert folder and not os.path.exists(folder.group(1))
