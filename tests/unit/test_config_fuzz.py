"""Whatever the file holds, loading it returns a Config or raises ConfigError: never a crash."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import Config, validate_text
from daemon.errors import ConfigError

EXAMPLE_LINES = (
    (Path(__file__).resolve().parents[2] / "config.example.yaml").read_text().splitlines()
)


yaml_characters = st.sampled_from(
    [
        *" \n\t:-{}[],&*!|>'\"#%@`?~.0123456789abkeyplastroots_path/\\x",
        *["!!int ", "!!float ", "!!binary ", "!!python/object ", "<<: ", "3:00", "0x1F", "\x00"],
    ]
)


def outcome(text: str) -> Config | list[str]:
    try:
        return validate_text(text, "config.yaml")[0]
    except ConfigError as error:
        assert error.problems, "a ConfigError without problems"
        return error.problems


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(yaml_characters, max_size=60).map("".join))
def test_random_text_never_crashes(text: str) -> None:
    result = outcome(text)
    if isinstance(result, list):
        assert all(problem.startswith("config.yaml") for problem in result)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, len(EXAMPLE_LINES) - 1),
    st.sampled_from(["", "  ", "x: 1", ": :", "- 5", "keep_last: -1", "\tpath: /", "path: /"]),
)
def test_a_damaged_example_fails_with_located_problems(line: int, replacement: str) -> None:
    lines = list(EXAMPLE_LINES)
    lines[line] = replacement
    result = outcome("\n".join(lines) + "\n")
    if isinstance(result, list):
        for problem in result:
            location = problem.split(" ", 1)[0]
            assert location.startswith("config.yaml:") and location.split(":")[1].isdigit()
