"""One veto for deletions and slims (daemon/pruning/vetoes.py): the reason, the log line and the
`veto` record each kind has always written."""

from __future__ import annotations

import logging

import pytest

from daemon.history.log import HistoryLog
from daemon.pruning.vetoes import DELETION, SLIM, Vetoed, record_veto
from daemon.safety.facts import Holder
from policies.model import Checkpoint

HOLDER = Holder(pid=4242, create_time=1.0, cmdline="python train.py", how="open", path="/x")


class Recording(HistoryLog):
    def __init__(self) -> None:
        super().__init__("/nonexistent/history.jsonl")
        self.records: list[dict[str, object]] = []

    def write(self, event: str, **fields: object) -> None:
        self.records.append({"event": event, **fields})


@pytest.mark.parametrize(
    ("kind", "logger", "reason", "line"),
    [
        (
            DELETION,
            "ckptd.prune",
            "in-use:pid 4242 (python train.py)",
            "veto checkpoint-300: in-use:pid 4242 (python train.py)",
        ),
        (
            SLIM,
            "ckptd.slim",
            "slim-vetoed:in-use:pid 4242 (python train.py)",
            "veto slim of checkpoint-300: slim-vetoed:in-use:pid 4242 (python train.py)",
        ),
    ],
)
def test_a_veto_says_what_each_kind_always_said(
    kind: Vetoed, logger: str, reason: str, line: str, caplog: pytest.LogCaptureFixture
) -> None:
    history = Recording()
    with caplog.at_level(logging.INFO, logger=logger):
        result = record_veto(kind, history, "/data/run", Checkpoint("checkpoint-300", 300), HOLDER)
    assert result == ("checkpoint-300", reason)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [(logger, line)]
    assert history.records == [
        {
            "event": "veto",
            "root": "/data/run",
            "checkpoint": "checkpoint-300",
            "step": 300,
            "reason": reason,
            "pid": 4242,
            "cmdline": "python train.py",
        }
    ]
