"""Durations and sizes as the config writes them."""

from __future__ import annotations

import pytest

from daemon.config import parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        (2.5, 2.5),
        ("45", 45.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1.5m", 90.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        (" 6h ", 21600.0),
        ("0", 0.0),
    ],
)
def test_durations_in_seconds_minutes_hours_days(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "1:30", "", "m", "-5m", "5 minutes", True, None, [5]])
def test_bad_durations_are_refused_with_an_example(text: object) -> None:
    with pytest.raises(ValueError, match="duration such as 30s, 5m, 1h or 2d"):
        parse_duration(text)


def test_a_negative_number_of_seconds_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(-1)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("512", 512),
        ("100B", 100),
        ("1KB", 1000),
        ("1MB", 1000**2),
        ("3.6GB", 3_600_000_000),
        ("50GB", 50 * 1000**3),
        ("2TB", 2 * 1000**4),
        ("1KiB", 1024),
        ("1MiB", 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1TiB", 1024**4),
        ("50gb", 50 * 1000**3),
        ("1.5 GiB", int(1.5 * 1024**3)),
    ],
)
def test_sizes_in_powers_of_1000_and_1024(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["50 gigabytes", "GB", "", "1XB", "-5GB", True, None])
def test_bad_sizes_are_refused_with_an_example(text: object) -> None:
    with pytest.raises(ValueError, match="size such as 50GB or 2GiB"):
        parse_size(text)


def test_a_negative_byte_count_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_size(-10)
