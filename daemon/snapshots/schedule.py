"""When the daily snapshot runs and which dates it keeps: pure functions of dates, wall-clock
times and a zone. No I/O and no clock (`now` and the zone are parameters; the zone comes from
`daemon.clock`); `tests/unit/test_purity.py` checks it as it checks `policies/`.

Wall-clock rule on the daylight-saving days: a time that happens twice (fall back) means its
first occurrence; one that does not exist (inside the spring gap) means the end of the gap, as
cron does. Either way a date gets one snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta, tzinfo

DATE_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}$")
TEMPORARY_NAME = re.compile(r"^\.tmp-(\d{4}-\d{2}-\d{2})-(\d+)$")


def scheduled_instant(day: date, at: str, zone: tzinfo) -> datetime:
    """Given a date, a wall-clock time "HH:MM" and a zone, return the aware instant it means.

    A wall time that happens twice (the autumn DST change) means its first occurrence. One that
    does not exist (inside the spring gap, e.g. 02:30 in Europe/Berlin on 2026-03-29) means the
    first moment after the gap, as cron does: 03:00 local.
    """
    hours, minutes = (int(part) for part in at.split(":"))
    wall = datetime.combine(day, time(hours, minutes))
    for shift in range(0, 24 * 60):
        candidate = (wall + timedelta(minutes=shift)).replace(tzinfo=zone, fold=0)
        round_trip = candidate.astimezone(UTC).astimezone(zone)
        if round_trip.replace(tzinfo=None) == candidate.replace(tzinfo=None):
            return candidate
    raise ValueError(f"no valid local time at or after {at} on {day} in {zone}")


def snapshot_due(
    now: datetime, at: str, zone: tzinfo, existing_dates: Collection[date]
) -> date | None:
    """Given the time, `snapshots.at`, the zone and the dates already taken, return the date
    whose snapshot should be taken now, or None.

    Today's (local date in the zone) is due once its scheduled instant has passed and no folder
    for it exists: at the scheduled time and at start-up after a missed one. A missed earlier
    day is not made up later under its own name: a snapshot is named for when it was taken.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    today = now.astimezone(zone).date()
    if today in existing_dates:
        return None
    return today if now >= scheduled_instant(today, at, zone) else None


def next_snapshot_time(
    now: datetime, at: str, zone: tzinfo, existing_dates: Collection[date]
) -> datetime:
    """Given the time, `snapshots.at`, the zone and the dates taken, return when the next
    snapshot runs (now, if one is due)."""
    if snapshot_due(now, at, zone, existing_dates) is not None:
        return now
    today = now.astimezone(zone).date()
    today_at = scheduled_instant(today, at, zone)
    if now < today_at and today not in existing_dates:
        return today_at
    return scheduled_instant(today + timedelta(days=1), at, zone)


def snapshot_dates(folder_names: Iterable[str]) -> list[date]:
    """Given the names of the folders in the snapshots folder, return the dates of those that
    are snapshots (`YYYY-MM-DD`), oldest first."""
    found: list[date] = []
    for name in folder_names:
        if DATE_NAME.match(name):
            try:
                found.append(date.fromisoformat(name))
            except ValueError:  # 2026-02-31: a date-shaped name is not a snapshot
                continue
    return sorted(found)


def dates_to_remove(dates: Sequence[date], keep: int) -> list[date]:
    """Given the snapshot dates (oldest first) and `keep`, return those past the newest `keep`."""
    return list(dates[: max(0, len(dates) - keep)])


def temporary_name(day: str, pid: int) -> str:
    """Given a snapshot's date and the writing process, return its temporary folder's name."""
    return f".tmp-{day}-{pid}"


def temporary_owner(name: str) -> int | None:
    """Given a name in the snapshots folder, return the pid that was writing it when it is a
    temporary folder, else None."""
    match = TEMPORARY_NAME.match(name)
    return int(match.group(2)) if match else None
