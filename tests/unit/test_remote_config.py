"""Config and naming of object-storage roots: what check-config accepts and refuses, and the
one name a root's prunes are recorded under."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.config import settings_for, validate_text
from daemon.errors import ConfigError
from daemon.storage.url import report_key

SECRET = "do-not-show-me-0123"


def test_an_s3_root_with_storage_options_and_poll_interval_is_valid() -> None:
    config, warnings = validate_text(
        "defaults: {poll_interval: 45s}\n"
        "roots:\n"
        "  - path: s3://bucket/run1\n"
        f"    storage_options: {{endpoint_url: 'http://127.0.0.1:9', key: k, secret: {SECRET}}}\n"
        "  - path: s3://bucket/run2\n"
        "    poll_interval: 5s\n"
    )
    assert warnings == []
    first, second = config.roots
    assert first.storage_options["secret"] == SECRET
    assert SECRET not in repr(first)
    assert settings_for(config, first).poll_interval == 45.0
    assert settings_for(config, second).poll_interval == 5.0


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        (f"  - path: az://container/run\n    storage_options: {{key: {SECRET}}}\n", "az:// knows"),
        (f"  - path: gs://bucket/run\n    storage_options: {{key: {SECRET}}}\n", "gs:// knows"),
        ("  - path: s3://bucket/run\n    watch: inotify\n", "object storage has no inotify"),
        (f"  - path: s3://bucket/run\n    storage_options: {{passwd: {SECRET}}}\n", "passwd"),
        (f"  - path: s3://bucket/run\n    storage_options: 'secret={SECRET}'\n", "not shown"),
        (f"  - path: /data/run\n    storage_options: {{secret: {SECRET}}}\n", "only object"),
        ("  - path: s3://B/run\n", "not a valid bucket"),
    ],
)
def test_what_check_config_refuses_and_it_never_shows_a_value(root: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_text("roots:\n" + root)
    text = "\n".join(raised.value.problems)
    assert expected in text
    assert SECRET not in text


def test_prunes_are_recorded_under_the_url_or_the_real_path(tmp_path: Path) -> None:
    assert report_key("s3a://bucket/run/") == "s3://bucket/run"
    assert report_key(str(tmp_path)) == os.path.realpath(str(tmp_path))
