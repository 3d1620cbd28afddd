"""`config_reloaded` says what changed: each changed key with its old and new value."""

from __future__ import annotations

from daemon.config import validate_text
from daemon.config.changes import config_changes

BEFORE = """\
defaults: {policy: {keep_last: 20}, trash: {grace: 1h}}
roots:
  - path: /data/run
    protect: [best.pt]
  - path: /data/old
snapshots: {enabled: false}
"""

AFTER = """\
defaults: {policy: {keep_last: 10}, trash: {grace: 6h}}
roots:
  - path: /data/run
    protect: [best.pt, last.pt]
  - path: /data/new
snapshots: {enabled: false}
"""


def test_each_change_is_named_with_its_old_and_new_value() -> None:
    before, _ = validate_text(BEFORE)
    after, _ = validate_text(AFTER)
    assert config_changes(before, after) == [
        "defaults.policy.keep_last: 20 -> 10",
        "defaults.trash.grace: 3600.0 -> 21600.0",
        "roots: /data/new added",
        "roots: /data/old removed",
        "roots[/data/run].protect: [best.pt] -> [best.pt, last.pt]",
    ]
    assert config_changes(before, before) == []
