"""Durations and sizes as people write them: `90s`, `1h`, `50GB` (powers of 1000), `64GiB`."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import (
    BeforeValidator,
)

# --- units -------------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_DURATION_FACTORS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}


def parse_duration(value: object) -> float:
    """Given `90`, `"30s"`, `"5m"`, `"1h"` or `"2d"`, return seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 1h or 2d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match.group(1)) * _DURATION_FACTORS[match.group(2) or "s"]
    raise ValueError(f"{value!r} is not a duration such as 30s, 5m, 1h or 2d")


def parse_size(value: object) -> int:
    """Given `1024`, `"3.6GB"` (powers of 1000) or `"2GiB"` (powers of 1024), return bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 50GB or 2GiB")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return int(value)
    if isinstance(value, str) and (match := _SIZE.match(value)):
        return int(float(match.group(1)) * _SIZE_FACTORS[(match.group(2) or "B").lower()])
    raise ValueError(f"{value!r} is not a size such as 50GB or 2GiB")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
