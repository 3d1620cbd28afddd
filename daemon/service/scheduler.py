"""The schedule: weekly prune, daily snapshot, disk checks and the user's daily test
(`verify.command`), on APScheduler 3's BackgroundScheduler.

Every job that changes files runs on one single-thread executor ("files"), `max_instances=1`,
`coalesce=True` and a generous misfire grace, so a late or piled-up run happens once and never
beside another. The job functions themselves only hand the work to the service's worker thread
and wait for it (see daemon/service/lifecycle.py): one thread does everything that touches the disk.

Triggers are pure: they compute the next fire time from a given `now`, never from the clock, so
the daylight-saving days are tested without waiting for them. Wall-clock rule on those days
(Europe/Berlin 2026-03-29 and 2026-10-25): a time that occurs twice (fall back, 02:00-03:00)
fires once, at its first occurrence; a time that does not exist (spring forward, 02:00-03:00)
fires once, at the same elapsed instant, which the clock shows an hour later (02:30 -> 03:30).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from daemon.clock import utc_iso, zone_for
from daemon.config import Config
from daemon.logs import get_logger

log = get_logger(__name__)

FILES_EXECUTOR = "files"
# The user's daily test (`verify.command`) may run for an hour: its own thread, so the prune,
# snapshot and disk jobs never queue behind it.
VERIFY_EXECUTOR = "verify"
# A job missed by up to 6 hours (machine asleep, daemon restarted) still runs, once.
MISFIRE_GRACE_SECONDS = 6 * 3600
# The leases of shared roots are renewed on a thread of their own: a long prune on the "files"
# thread must never let the lease it prunes under expire.
LEASE_EXECUTOR = "lease"
JOB_NAMES = ("prune", "snapshot", "disk", "verify", "lease")


class WallClockTrigger(BaseTrigger):  # type: ignore[misc]
    """Given a CronTrigger, fire at each wall-clock time it names once, even on fall-back days.

    APScheduler 3's CronTrigger returns a repeated wall time twice (02:30 CEST, then 02:30 CET)
    on the fall-back day; a cron line means one run per matching wall time, so the second is
    skipped. A non-existent time comes back normalised to a real instant.
    """

    def __init__(self, cron: CronTrigger) -> None:
        self.cron = cron
        self.timezone = cron.timezone

    def get_next_fire_time(
        self, previous_fire_time: dt.datetime | None, now: dt.datetime
    ) -> dt.datetime | None:
        """Given the previous fire time (or None) and now, return the next fire time (or None)."""
        candidate: dt.datetime | None = self.cron.get_next_fire_time(previous_fire_time, now)
        # Bounded: a repeated wall time is followed by a different one within a few steps.
        for _ in range(8):
            if candidate is None:
                return None
            candidate = self._normalise(candidate)
            if previous_fire_time is None or not self._same_wall_time(
                candidate, previous_fire_time
            ):
                return candidate
            # Step in UTC: wall-clock arithmetic would drop `fold` and land on the same time again.
            later = (candidate.astimezone(dt.UTC) + dt.timedelta(seconds=1)).astimezone(
                self.timezone
            )
            candidate = self.cron.get_next_fire_time(None, later)
        return candidate

    def _normalise(self, moment: dt.datetime) -> dt.datetime:
        # Round-trip through UTC: a non-existent local time becomes the real instant it denotes.
        return moment.astimezone(dt.UTC).astimezone(self.timezone)

    def _same_wall_time(self, first: dt.datetime, second: dt.datetime) -> bool:
        a = first.astimezone(self.timezone).replace(tzinfo=None, fold=0)
        b = second.astimezone(self.timezone).replace(tzinfo=None, fold=0)
        return a == b

    def __str__(self) -> str:
        return f"wallclock[{self.cron}]"

    def __repr__(self) -> str:
        return f"<WallClockTrigger {self.cron!r}>"


def prune_trigger(config: Config, timezone: dt.tzinfo) -> BaseTrigger:
    """Given the config, return the weekly-prune trigger (cron syntax; raises ValueError if bad)."""
    return WallClockTrigger(CronTrigger.from_crontab(config.prune.schedule, timezone=timezone))


def snapshot_trigger(config: Config, timezone: dt.tzinfo) -> BaseTrigger:
    """Given the config, return the daily-snapshot trigger at `snapshots.at` local time."""
    hour, minute = (int(part) for part in config.snapshots.at.split(":"))
    return WallClockTrigger(CronTrigger(hour=hour, minute=minute, timezone=timezone))


def disk_trigger(config: Config, timezone: dt.tzinfo) -> BaseTrigger:
    """Given the config, return the disk-check trigger, every `disk.interval`."""
    return IntervalTrigger(seconds=max(1.0, float(config.disk.interval)), timezone=timezone)


def verify_trigger(config: Config, timezone: dt.tzinfo) -> BaseTrigger:
    """Given the config, return the trigger of the user's daily test at `verify.at` local time."""
    hour, minute = (int(part) for part in config.verify.at.split(":"))
    return WallClockTrigger(CronTrigger(hour=hour, minute=minute, timezone=timezone))


def lease_trigger(config: Config, timezone: dt.tzinfo) -> BaseTrigger | None:
    """Given the config, return the trigger renewing (and taking over) the leases of its
    shared roots, every third of the shortest lease; None when no root is shared now."""
    from daemon.pruning.leasing import is_shared, lease_settings

    durations = [
        float(lease_settings(config, root).duration)
        for root in config.roots
        if is_shared(config, root)
    ]
    if not durations:
        return None
    return IntervalTrigger(seconds=max(0.2, min(durations) / 3), timezone=timezone)


def build_triggers(config: Config) -> dict[str, BaseTrigger]:
    """Given a config, return job name -> trigger; raise ValueError on a bad schedule."""
    timezone = zone_for(config)
    triggers = {"prune": prune_trigger(config, timezone), "disk": disk_trigger(config, timezone)}
    if config.snapshots.enabled:
        triggers["snapshot"] = snapshot_trigger(config, timezone)
    if config.verify.command:
        triggers["verify"] = verify_trigger(config, timezone)
    lease = lease_trigger(config, timezone)
    if lease is not None:
        triggers["lease"] = lease
    return triggers


_EXECUTORS = {"verify": VERIFY_EXECUTOR, "lease": LEASE_EXECUTOR}


class Schedule:
    """Given a callable that runs a named job (and returns when it is done), run it on time."""

    def __init__(self, run_job: Callable[[str], None]) -> None:
        self.run_job = run_job
        self.scheduler = self._new_scheduler(dt.UTC)
        # The listener below logs a failed job once, with its traceback; APScheduler's executor
        # would log it a second time in its own format.
        logging.getLogger("apscheduler.executors").setLevel(logging.CRITICAL)

    def _new_scheduler(self, timezone: dt.tzinfo) -> BackgroundScheduler:
        self.files_executor = ThreadPoolExecutor(max_workers=1)
        self.verify_executor = ThreadPoolExecutor(max_workers=1)
        self.lease_executor = ThreadPoolExecutor(max_workers=1)
        scheduler = BackgroundScheduler(
            executors={
                FILES_EXECUTOR: self.files_executor,
                VERIFY_EXECUTOR: self.verify_executor,
                LEASE_EXECUTOR: self.lease_executor,
            },
            job_defaults={
                "max_instances": 1,
                "coalesce": True,
                "misfire_grace_time": MISFIRE_GRACE_SECONDS,
            },
            timezone=timezone,
        )
        scheduler.add_listener(self._on_job_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED)
        return scheduler

    def start(self, config: Config) -> None:
        """Given the config, create the jobs and start the scheduler thread."""
        self.scheduler = self._new_scheduler(zone_for(config))
        self.apply(build_triggers(config))
        self.scheduler.start()

    def apply(self, triggers: dict[str, BaseTrigger]) -> None:
        """Given job name -> trigger, add, reschedule or remove jobs to match."""
        for name in JOB_NAMES:
            trigger = triggers.get(name)
            existing = self.scheduler.get_job(name)
            if trigger is None:
                if existing is not None:
                    existing.remove()
                continue
            if existing is not None:
                existing.reschedule(trigger)
            else:
                self.scheduler.add_job(
                    self.run_job,
                    trigger,
                    args=[name],
                    id=name,
                    name=name,
                    executor=_EXECUTORS.get(name, FILES_EXECUTOR),
                    replace_existing=True,
                )

    def next_run_times(self) -> dict[str, str]:
        """Given the running scheduler, return job name -> next run time (UTC ISO)."""
        times: dict[str, str] = {}
        for job in self.scheduler.get_jobs():
            next_run = getattr(job, "next_run_time", None)
            if next_run is not None:
                times[job.id] = utc_iso(next_run, timespec="auto")
        return times

    def shutdown(self, *, wait: bool = False) -> None:
        """Stop firing; with `wait`, also wait for the job running now (its thread ends)."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)
        elif wait:
            # Already stopped without waiting (the service's first step): wait for the job now.
            self.files_executor.shutdown(wait=True)
            self.verify_executor.shutdown(wait=True)
            self.lease_executor.shutdown(wait=True)

    @staticmethod
    def _on_job_event(event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            log.warning("job_missed", job=event.job_id, scheduled=str(event.scheduled_run_time))
            return
        log.error(
            "job_failed",
            job=event.job_id,
            error=f"{type(event.exception).__name__}: {event.exception}",
            traceback=event.traceback,
        )


__all__ = [
    "FILES_EXECUTOR",
    "LEASE_EXECUTOR",
    "VERIFY_EXECUTOR",
    "Schedule",
    "WallClockTrigger",
    "build_triggers",
    "disk_trigger",
    "lease_trigger",
    "prune_trigger",
    "snapshot_trigger",
    "verify_trigger",
]
