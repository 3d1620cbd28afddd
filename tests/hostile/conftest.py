"""Fixtures of the attack tests: a real unprivileged user, and an arena of folders per test.

The user is created once per session with a random name (`useradd`) and removed at the end;
without root (or useradd, or /usr/bin/python3 for her side) every test here is skipped with the
reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.hostile.attacks import (
    Arena,
    Attacker,
    arena_for,
    attacker_unavailable,
    create_attacker,
    remove_attacker,
)

# How long each race of the default suite runs (bench/bench_attacks.py runs them for minutes).
RACE_SECONDS = float(os.environ.get("CKPTD_RACE_SECONDS", "1.5"))


@pytest.fixture(scope="session")
def attacker() -> Iterator[Attacker]:
    reason = attacker_unavailable()
    if reason is not None:
        pytest.skip(reason)
    user = create_attacker()
    try:
        yield user
    finally:
        remove_attacker(user)


@pytest.fixture
def arena(attacker: Attacker) -> Iterator[Arena]:
    with arena_for(attacker) as made:
        yield made
