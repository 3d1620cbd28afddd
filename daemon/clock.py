"""Time zones and time stamps: the one place that knows which zone "local" means and how a
moment is written down.

The zone is always a real zone with its daylight-saving rules (a `ZoneInfo`), never the fixed
offset the machine has today: `datetime.now().astimezone().tzinfo` is +01:00 in Berlin in
January, and a snapshot time computed with it for July would be an hour off.

Two ways a moment is written, each in one function:
- `utc_iso`: records and files read by programs (the history, the state file, `--json`);
- `local_text`: what people read (`ckptd status`, `history`, `trash list`, `check-config`, the
  log on a terminal), in the config's zone (else the machine's), always with the zone's name.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from daemon.config import Config

TimeSpec = Literal["auto", "seconds", "milliseconds"]
# /etc/localtime is a symlink into the zone database on every systemd distribution.
ZONEINFO_MARKER = "/zoneinfo/"


def machine_zone() -> tzinfo:
    """Given the machine's settings (`TZ`, then /etc/localtime and friends), return its zone
    with its daylight-saving rules; UTC when none is configured or readable.

    Read afresh on each call (a few small file reads): a `TZ` changed for a test or a zone
    changed with `timedatectl` before a reload is seen.
    """
    try:
        import tzlocal  # APScheduler 3's own dependency

        zone: tzinfo = tzlocal.reload_localzone()
        return zone
    except Exception:  # a broken TZ or /etc/timezone: the symlink below may still say
        pass
    try:
        target = os.path.realpath("/etc/localtime")
        if ZONEINFO_MARKER in target:
            return ZoneInfo(target.split(ZONEINFO_MARKER, 1)[1])
    except (OSError, ValueError, ZoneInfoNotFoundError):
        pass
    return UTC


def resolve_zone(name: str | None) -> tzinfo:
    """Given `timezone:` from the config (an IANA name, or None), return that zone, else the
    machine's."""
    return ZoneInfo(name) if name else machine_zone()


def zone_for(config: Config) -> tzinfo:
    """Given the config, return the zone its schedules run in (its own, else the machine's)."""
    return resolve_zone(config.timezone)


def utc_iso(moment: float | datetime, *, timespec: TimeSpec = "milliseconds") -> str:
    """Given seconds since the epoch (or an aware datetime), return the UTC ISO 8601 time with
    `+00:00`.

    `milliseconds` (the history's records), `seconds` (the daemon's state file), `auto`
    (`isoformat()`'s own: microseconds only when there are any; `--json` documents, manifests).
    """
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            raise ValueError("a naive datetime has no place in time: give an aware one")
        return moment.astimezone(UTC).isoformat(timespec=timespec)
    return datetime.fromtimestamp(moment, tz=UTC).isoformat(timespec=timespec)


def local_text(moment: float | datetime, zone: tzinfo, *, seconds: bool = False) -> str:
    """Given an aware moment (or seconds since the epoch) and a zone, return it as people read
    it there: `2026-07-15 03:00 CEST`, with `seconds` `2026-07-15 03:00:07 CEST`."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, tz=UTC)
    elif moment.tzinfo is None:
        raise ValueError("a naive datetime has no place in time: give an aware one")
    return moment.astimezone(zone).strftime(
        "%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z"
    )
