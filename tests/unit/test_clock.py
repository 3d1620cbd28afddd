"""The one zone helper and the time stamps: a machine set to Europe/Berlin means Berlin with its
daylight-saving rules, on the two DST days of 2026 and in July alike."""

from __future__ import annotations

import time as time_module
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from daemon import clock
from daemon.config import Config
from daemon.snapshots.schedule import next_snapshot_time, scheduled_instant

BERLIN = ZoneInfo("Europe/Berlin")

# 03:00 local on the days around both changes of 2026 and in midsummer, with the offset it has.
BERLIN_03_00 = [
    (date(2026, 3, 28), "+01:00"),  # the Saturday before spring forward: CET
    (date(2026, 3, 29), "+02:00"),  # spring forward at 02:00: 03:00 is already CEST
    (date(2026, 3, 30), "+02:00"),
    (date(2026, 7, 15), "+02:00"),  # the example: came out +01:00
    (date(2026, 10, 24), "+02:00"),
    (date(2026, 10, 25), "+01:00"),  # fall back at 03:00 CEST: 03:00 is CET
    (date(2026, 10, 26), "+01:00"),
]


@pytest.fixture
def machine_in_berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local zone is Europe/Berlin (as `TZ` sets it for libc and tzlocal)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time_module.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time_module.tzset()


def test_the_machine_zone_is_the_named_zone_not_todays_offset(machine_in_berlin: None) -> None:
    zone = clock.machine_zone()
    assert zone == BERLIN
    # A fixed offset would give both days the same one.
    assert (
        datetime(2026, 1, 15, tzinfo=zone).utcoffset()
        != datetime(2026, 7, 15, tzinfo=zone).utcoffset()
    )


@pytest.mark.parametrize(("day", "offset"), BERLIN_03_00, ids=lambda value: str(value))
def test_a_snapshot_time_from_the_machine_zone_has_that_days_offset(
    machine_in_berlin: None, day: date, offset: str
) -> None:
    zone = clock.zone_for(Config())  # no `timezone:` in the config: the machine's
    assert scheduled_instant(day, "03:00", zone).isoformat() == f"{day}T03:00:00{offset}"


@pytest.mark.parametrize(("day", "offset"), BERLIN_03_00, ids=lambda value: str(value))
def test_the_next_snapshot_asked_the_day_before_has_its_own_days_offset(
    machine_in_berlin: None, day: date, offset: str
) -> None:
    zone = clock.zone_for(Config())
    noon_before = datetime.combine(day - timedelta(days=1), time(12), zone)
    upcoming = next_snapshot_time(noon_before, "03:00", zone, [day - timedelta(days=1)])
    assert upcoming.isoformat() == f"{day}T03:00:00{offset}"


def test_a_configured_zone_wins_over_the_machines(machine_in_berlin: None) -> None:
    assert clock.zone_for(Config(timezone="Asia/Tokyo")) == ZoneInfo("Asia/Tokyo")
    assert clock.resolve_zone("Europe/Berlin") == BERLIN
    assert clock.resolve_zone(None) == BERLIN


def test_utc_iso_writes_each_precision_as_the_records_always_had_it() -> None:
    moment = 1_780_000_000.25  # 2026-05-28T20:26:40.25Z
    assert clock.utc_iso(moment) == "2026-05-28T20:26:40.250+00:00"  # the history
    assert clock.utc_iso(moment, timespec="seconds") == "2026-05-28T20:26:40+00:00"  # state
    assert clock.utc_iso(moment, timespec="auto") == "2026-05-28T20:26:40.250000+00:00"
    assert clock.utc_iso(1_780_000_000, timespec="auto") == "2026-05-28T20:26:40+00:00"
    # An aware datetime in any zone: the same instant, written in UTC.
    summer = datetime(2026, 7, 15, 3, 0, tzinfo=BERLIN)
    assert clock.utc_iso(summer, timespec="auto") == "2026-07-15T01:00:00+00:00"
    with pytest.raises(ValueError, match="naive"):
        clock.utc_iso(datetime(2026, 7, 15, 3, 0))


def test_local_text_names_the_zone_of_that_day() -> None:
    summer = datetime(2026, 7, 15, 1, 0, tzinfo=UTC)
    winter = datetime(2026, 1, 15, 2, 0, tzinfo=UTC)
    assert clock.local_text(summer, BERLIN) == "2026-07-15 03:00 CEST"
    assert clock.local_text(winter, BERLIN) == "2026-01-15 03:00 CET"
