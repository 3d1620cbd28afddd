"""A change a process turned down: the one way a deletion's or a slim's veto is logged and
recorded (a `veto` record), so both say it the same way, bar the reason's prefix."""

from __future__ import annotations

import logging
from typing import NamedTuple

from daemon.history.events import Veto
from daemon.history.log import History
from daemon.safety import facts as proc_facts
from policies.model import Checkpoint


class Vetoed(NamedTuple):
    """How one kind of change says it was vetoed: the prefix of its reason (before
    `in-use:<holder>`), the start of its log line, and the logger of its module."""

    prefix: str
    logged: str
    log: logging.Logger


DELETION = Vetoed("", "veto", logging.getLogger("ckptd.prune"))
SLIM = Vetoed("slim-vetoed:", "veto slim of", logging.getLogger("ckptd.slim"))


def record_veto(
    kind: Vetoed,
    history: History,
    root_path: str,
    checkpoint: Checkpoint,
    holder: proc_facts.Holder,
) -> tuple[str, str]:
    """Given the kind of change, the history, the root and a checkpoint a process holds, log
    and record the veto; return (checkpoint name, reason)."""
    reason = f"{kind.prefix}in-use:{holder.describe()}"
    kind.log.info("%s %s: %s", kind.logged, checkpoint.name, reason)
    history.record(
        Veto(
            root=root_path,
            checkpoint=checkpoint.name,
            step=checkpoint.step,
            reason=reason,
            pid=holder.pid,
            cmdline=holder.cmdline,
        )
    )
    return checkpoint.name, reason
