"""What `ckptd run` loads: nothing it never uses.

The daemon's idle resident size has a budget (60 MB with 3 roots x 1,000 checkpoints,
bench/bench_daemon.py), and rich, the terminal table library of the commands, is 6 MB of
it that the daemon never prints with. structlog imports rich when it can find it; daemon.logs
imports structlog so that it does not, and daemon.render imports rich only where a table is
made.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPOSITORY,
    )
    return set(result.stdout.split())


def test_the_daemon_and_its_logging_do_not_load_rich() -> None:
    loaded = _modules_after(
        "import daemon.commands.run\n"
        "from daemon.logs import configure_logging\n"
        "configure_logging('info', 'console')\n"
        "configure_logging('info', 'json')"
    )
    assert "daemon.service.lifecycle" in loaded and "structlog" in loaded
    assert not {name for name in loaded if name == "rich" or name.startswith("rich.")}


def test_the_commands_that_print_tables_still_get_rich() -> None:
    loaded = _modules_after(
        "import daemon.logs\nfrom daemon.render import make_console\nmake_console()"
    )
    assert "rich.console" in loaded
