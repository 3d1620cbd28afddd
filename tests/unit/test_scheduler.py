"""Next fire times from a given `now`, never the clock: weekly prune, daily snapshot, disk checks,
and the two daylight-saving days of 2026 in Europe/Berlin."""

from __future__ import annotations

import datetime as dt
import threading
import time
from zoneinfo import ZoneInfo

import pytest

from daemon.clock import resolve_zone
from daemon.config import Config, DiskConfig, PruneConfig, SnapshotsConfig
from daemon.service.scheduler import (
    Schedule,
    build_triggers,
    prune_trigger,
    snapshot_trigger,
)

BERLIN = ZoneInfo("Europe/Berlin")
UTC = dt.UTC


def fire_times(trigger: object, start: dt.datetime, count: int) -> list[dt.datetime]:
    times: list[dt.datetime] = []
    previous = None
    now = start
    for _ in range(count):
        next_time = trigger.get_next_fire_time(previous, now)  # type: ignore[attr-defined]
        assert next_time is not None
        times.append(next_time)
        previous = next_time
        now = next_time
    return times


def config(**keys: object) -> Config:
    return Config(timezone="Europe/Berlin", **keys)  # type: ignore[arg-type]


def test_weekly_prune_default_is_sunday_four_local() -> None:
    trigger = prune_trigger(config(), BERLIN)
    start = dt.datetime(2026, 11, 18, 12, 0, tzinfo=BERLIN)  # a Wednesday
    first, second = fire_times(trigger, start, 2)
    assert first == dt.datetime(2026, 11, 22, 4, 0, tzinfo=BERLIN)
    assert first.weekday() == 6
    assert second - first == dt.timedelta(days=7)


def test_prune_schedule_across_spring_forward_keeps_local_four() -> None:
    trigger = prune_trigger(config(), BERLIN)
    first, second = fire_times(trigger, dt.datetime(2026, 3, 25, tzinfo=BERLIN), 2)
    assert first.astimezone(UTC) == dt.datetime(2026, 3, 29, 2, 0, tzinfo=UTC)  # 04:00 CEST
    assert second.astimezone(UTC) == dt.datetime(2026, 4, 5, 2, 0, tzinfo=UTC)


def instants_per_local_date(times: list[dt.datetime]) -> dict[dt.date, int]:
    counts: dict[dt.date, int] = {}
    for moment in times:
        local = moment.astimezone(BERLIN).date()
        counts[local] = counts.get(local, 0) + 1
    return counts


@pytest.mark.parametrize("day", [dt.date(2026, 3, 29), dt.date(2026, 10, 25)])
def test_three_o_clock_snapshot_fires_exactly_once_on_each_dst_date(day: dt.date) -> None:
    trigger = snapshot_trigger(config(snapshots=SnapshotsConfig(at="03:00")), BERLIN)
    start = dt.datetime.combine(day - dt.timedelta(days=2), dt.time(12), tzinfo=BERLIN)
    times = fire_times(trigger, start, 5)
    counts = instants_per_local_date(times)
    assert counts[day] == 1
    assert all(count == 1 for count in counts.values())
    on_day = next(t for t in times if t.astimezone(BERLIN).date() == day)
    local = on_day.astimezone(BERLIN)
    assert (local.hour, local.minute) == (3, 0)
    # Distinct real instants, strictly increasing.
    utc_times = [t.astimezone(UTC) for t in times]
    assert utc_times == sorted(set(utc_times))


def test_half_past_two_on_spring_forward_runs_once_at_half_past_three() -> None:
    """02:30 does not exist on 2026-03-29 in Berlin: run once, at 01:30 UTC (03:30 CEST)."""
    trigger = snapshot_trigger(config(snapshots=SnapshotsConfig(at="02:30")), BERLIN)
    times = fire_times(trigger, dt.datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN), 3)
    assert [t.astimezone(UTC) for t in times] == [
        dt.datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
        dt.datetime(2026, 3, 30, 0, 30, tzinfo=UTC),
        dt.datetime(2026, 3, 31, 0, 30, tzinfo=UTC),
    ]
    assert times[0].astimezone(BERLIN).hour == 3


def test_half_past_two_on_fall_back_runs_once_at_first_occurrence() -> None:
    """02:30 happens twice on 2026-10-25 (CEST, then CET): run once, at the first."""
    trigger = snapshot_trigger(config(snapshots=SnapshotsConfig(at="02:30")), BERLIN)
    times = fire_times(trigger, dt.datetime(2026, 10, 24, 12, 0, tzinfo=BERLIN), 3)
    assert [t.astimezone(UTC) for t in times] == [
        dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC),  # 02:30 CEST
        dt.datetime(2026, 10, 26, 1, 30, tzinfo=UTC),  # 02:30 CET, next day
        dt.datetime(2026, 10, 27, 1, 30, tzinfo=UTC),
    ]


def test_fall_back_from_inside_the_repeated_hour_does_not_fire_again() -> None:
    trigger = snapshot_trigger(config(snapshots=SnapshotsConfig(at="02:30")), BERLIN)
    first = dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC).astimezone(BERLIN)
    next_time = trigger.get_next_fire_time(first, first)
    assert next_time is not None
    assert next_time.astimezone(UTC) == dt.datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


def test_hourly_cron_through_fall_back_has_no_duplicates_and_no_gaps() -> None:
    trigger = prune_trigger(config(prune=PruneConfig(schedule="30 * * * *")), BERLIN)
    times = fire_times(trigger, dt.datetime(2026, 10, 25, 0, 0, tzinfo=BERLIN), 6)
    walls = [t.astimezone(BERLIN).strftime("%H:%M") for t in times]
    assert walls == ["00:30", "01:30", "02:30", "03:30", "04:30", "05:30"]


def test_disk_interval_and_bad_cron() -> None:
    triggers = build_triggers(config(disk=DiskConfig(interval=90)))
    start = dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    first = triggers["disk"].get_next_fire_time(None, start)
    second = triggers["disk"].get_next_fire_time(first, first)
    assert second - first == dt.timedelta(seconds=90)
    assert set(triggers) == {"prune", "disk", "snapshot"}
    no_snapshots = build_triggers(config(snapshots=SnapshotsConfig(enabled=False)))
    assert "snapshot" not in no_snapshots
    with pytest.raises(ValueError):
        build_triggers(config(prune=PruneConfig(schedule="61 4 * * sun")))


def test_timezone_resolution() -> None:
    assert resolve_zone("Europe/Berlin") == BERLIN
    assert resolve_zone(None) is not None


def test_schedule_runs_jobs_one_at_a_time_and_survives_errors() -> None:
    """A real BackgroundScheduler: a failing job is logged, the next run still happens, and two
    jobs never overlap on the single 'files' executor."""
    running = 0
    overlap = False
    runs: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def run_job(name: str) -> None:
        nonlocal running, overlap
        with lock:
            running += 1
            overlap = overlap or running > 1
        try:
            time.sleep(0.05)
            runs.append(name)
            if len(runs) >= 6:
                done.set()
            if name == "disk" and runs.count("disk") == 1:
                raise RuntimeError("first disk check fails on purpose")
        finally:
            with lock:
                running -= 1

    schedule = Schedule(run_job)
    schedule.start(config(disk=DiskConfig(interval=1), snapshots=SnapshotsConfig(enabled=False)))
    try:
        # Two fast interval jobs on the same executor: they must serialize.
        from apscheduler.triggers.interval import IntervalTrigger

        schedule.apply(
            {"disk": IntervalTrigger(seconds=0.1), "prune": IntervalTrigger(seconds=0.1)}
        )
        assert done.wait(10)
        assert set(schedule.next_run_times()) == {"disk", "prune"}
    finally:
        schedule.shutdown()
        schedule.shutdown(wait=True)
    assert not overlap
    assert runs.count("disk") >= 2  # the error did not stop the schedule


def test_shutdown_with_wait_after_a_shutdown_waits_for_the_running_job() -> None:
    """The service stops firing first (`shutdown()`), then, once its worker is done, waits for
    the job still running (`shutdown(wait=True)`): that second call must wait, not return at
    once because the scheduler already stopped."""
    from apscheduler.triggers.interval import IntervalTrigger

    started, finished = threading.Event(), threading.Event()

    def run_job(name: str) -> None:
        started.set()
        time.sleep(0.5)
        finished.set()

    schedule = Schedule(run_job)
    schedule.start(config(snapshots=SnapshotsConfig(enabled=False)))
    schedule.apply({"disk": IntervalTrigger(seconds=0.05)})
    try:
        assert started.wait(5)
    finally:
        schedule.shutdown()
        schedule.shutdown(wait=True)
    assert finished.is_set(), "shutdown(wait=True) returned while the job was still running"
