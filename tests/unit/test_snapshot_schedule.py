"""When the daily snapshot is due: pure, with DST days in Europe/Berlin."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from daemon.snapshots.schedule import next_snapshot_time, scheduled_instant, snapshot_due

BERLIN = ZoneInfo("Europe/Berlin")
SPRING = date(2026, 3, 29)  # 02:00 CET -> 03:00 CEST: 02:00-02:59 does not exist
AUTUMN = date(2026, 10, 25)  # 03:00 CEST -> 02:00 CET: 02:00-02:59 happens twice


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)  # type: ignore[misc]


def test_an_ordinary_day_is_due_from_the_scheduled_minute_on() -> None:
    day = date(2026, 6, 1)
    assert snapshot_due(utc(2026, 6, 1, 0, 59), "03:00", BERLIN, []) is None  # 02:59 CEST
    assert snapshot_due(utc(2026, 6, 1, 1, 0), "03:00", BERLIN, []) == day
    assert snapshot_due(utc(2026, 6, 1, 21, 0), "03:00", BERLIN, []) == day  # missed: start-up
    assert snapshot_due(utc(2026, 6, 1, 21, 0), "03:00", BERLIN, [day]) is None


def test_the_date_is_the_local_one_not_utc() -> None:
    # 23:30 UTC on 31 May is 01:30 on 1 June in Berlin: June 1st's 03:00 has not come yet.
    assert snapshot_due(utc(2026, 5, 31, 23, 30), "03:00", BERLIN, [date(2026, 5, 31)]) is None
    assert snapshot_due(utc(2026, 5, 31, 23, 30), "01:00", BERLIN, [date(2026, 5, 31)]) == date(
        2026, 6, 1
    )


def test_spring_forward_03_00_exists_and_runs_once() -> None:
    at = scheduled_instant(SPRING, "03:00", BERLIN)
    assert at.astimezone(UTC) == utc(2026, 3, 29, 1, 0)
    assert snapshot_due(utc(2026, 3, 29, 0, 59), "03:00", BERLIN, []) is None
    assert snapshot_due(utc(2026, 3, 29, 1, 0), "03:00", BERLIN, []) == SPRING
    assert snapshot_due(utc(2026, 3, 29, 1, 30), "03:00", BERLIN, [SPRING]) is None


def test_spring_forward_an_at_inside_the_skipped_hour_runs_when_the_gap_ends() -> None:
    at = scheduled_instant(SPRING, "02:30", BERLIN)
    # 02:30 never happens that night; like cron, the job runs at the end of the gap, 03:00 CEST.
    assert at.astimezone(UTC) == utc(2026, 3, 29, 1, 0)
    assert at.strftime("%H:%M %Z") == "03:00 CEST"
    assert snapshot_due(utc(2026, 3, 29, 0, 59), "02:30", BERLIN, []) is None
    assert snapshot_due(utc(2026, 3, 29, 1, 0), "02:30", BERLIN, []) == SPRING
    # On the following ordinary day 02:30 means 02:30 again.
    assert scheduled_instant(SPRING + timedelta(days=1), "02:30", BERLIN).astimezone(UTC) == utc(
        2026, 3, 30, 0, 30
    )


def test_fall_back_03_00_is_after_the_repeated_hour_and_runs_once() -> None:
    at = scheduled_instant(AUTUMN, "03:00", BERLIN)
    assert at.astimezone(UTC) == utc(2026, 10, 25, 2, 0)  # 03:00 CET
    assert snapshot_due(utc(2026, 10, 25, 1, 59), "03:00", BERLIN, []) is None  # 02:59 CET
    assert snapshot_due(utc(2026, 10, 25, 2, 0), "03:00", BERLIN, []) == AUTUMN


def test_fall_back_an_at_inside_the_repeated_hour_runs_at_its_first_occurrence_only() -> None:
    first = utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    second = utc(2026, 10, 25, 1, 30)  # 02:30 CET, an hour later
    assert scheduled_instant(AUTUMN, "02:30", BERLIN).astimezone(UTC) == first
    assert snapshot_due(first - timedelta(minutes=1), "02:30", BERLIN, []) is None
    assert snapshot_due(first, "02:30", BERLIN, []) == AUTUMN
    # The wall clock shows 02:30 again: the date folder exists, so never a second one.
    assert snapshot_due(second, "02:30", BERLIN, [AUTUMN]) is None


@pytest.mark.parametrize("day", [SPRING, AUTUMN])
def test_a_whole_dst_day_minute_by_minute_yields_exactly_one_snapshot(day: date) -> None:
    for at in ("00:00", "02:00", "02:30", "02:59", "03:00", "23:59"):
        taken: list[date] = []
        moment = datetime.combine(day, datetime.min.time(), BERLIN).astimezone(UTC)
        end = datetime.combine(day + timedelta(days=1), datetime.min.time(), BERLIN)
        while moment < end:
            due = snapshot_due(moment, at, BERLIN, taken)
            if due is not None:
                taken.append(due)
            moment += timedelta(minutes=1)
        assert taken == [day], at


def test_next_snapshot_time() -> None:
    assert next_snapshot_time(utc(2026, 6, 1, 0, 0), "03:00", BERLIN, []) == utc(2026, 6, 1, 1)
    now = utc(2026, 6, 1, 5, 0)
    assert next_snapshot_time(now, "03:00", BERLIN, []) == now  # missed: now
    assert next_snapshot_time(now, "03:00", BERLIN, [date(2026, 6, 1)]) == utc(2026, 6, 2, 1)
    # The spring-forward day: tomorrow's 02:30 is the day before's evening plus the gap.
    assert next_snapshot_time(utc(2026, 3, 28, 12), "02:30", BERLIN, [date(2026, 3, 28)]) == utc(
        2026, 3, 29, 1, 0
    )


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        snapshot_due(datetime(2026, 6, 1, 3), "03:00", BERLIN, [])
