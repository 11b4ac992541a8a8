"""Times for people: one way everywhere — the user's local time with its zone (`2026-03-14 10:01
CET`) on screens and in the report; ISO 8601 in UTC (`2026-03-14T09:01:00Z`) in CSV and JSON.

The local zone is derived (TZ, else the computer's configuration via tzlocal) but every function
takes it as a parameter, so callers and tests can inject one. Imports nothing of mailer, and
nothing heavy: `send_report` and the CLI may use it on their start-up path.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import zoneinfo

HUMAN_FORMAT = "%Y-%m-%d %H:%M"


def local_zone() -> dt.tzinfo:
    """The zone times are shown in: TZ when set (read on every call, so a test or a wrapper
    script can set it), else the system's zone. Never fails: an unusable setting gives the
    offset libc derives from it, or UTC."""
    configured = os.environ.get("TZ")
    if configured is not None:
        zone = _zone_named(configured)
        if zone is not None:
            return zone
        # A POSIX rule ("CET-1CEST,M3.5.0,M10.5.0/3"): libc understands it; keep its offset now.
        time.tzset()
        return dt.datetime.now().astimezone().tzinfo or dt.UTC
    try:
        from tzlocal import get_localzone

        return get_localzone()
    except Exception:  # tzlocal raises several kinds for a broken /etc/localtime
        return dt.UTC


def _zone_named(value: str) -> dt.tzinfo | None:
    name = value.strip().lstrip(":")
    if "zoneinfo/" in name:
        name = name.split("zoneinfo/", 1)[1]
    if not name:
        return dt.UTC  # POSIX: an empty TZ is UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None


def zone_name(zone: dt.tzinfo) -> str:
    """`Europe/Berlin` for an IANA zone, else what the zone calls itself (`UTC`, `UTC+01:00`)."""
    key = getattr(zone, "key", None)
    if isinstance(key, str):
        return key
    return zone.tzname(dt.datetime.now(dt.UTC)) or "UTC"


def zone_abbreviation(value: dt.datetime) -> str:
    """`CET`, `CEST`, `UTC`; an offset-only abbreviation (`-03`) reads `UTC-03`."""
    name = value.tzname() or ""
    if not name or name[0] in "+-":
        offset = value.utcoffset() or dt.timedelta(0)
        if name:
            return f"UTC{name}"
        minutes = int(offset.total_seconds() // 60)
        sign = "+" if minutes >= 0 else "-"
        hours, rest = divmod(abs(minutes), 60)
        return f"UTC{sign}{hours:02d}" + (f":{rest:02d}" if rest else "")
    return name


def to_local(value: dt.datetime, *, zone: dt.tzinfo | None = None) -> dt.datetime:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    return aware.astimezone(zone or local_zone())


def format_local(
    value: dt.datetime | None, *, zone: dt.tzinfo | None = None, empty: str = "-"
) -> str:
    """`2026-03-14 10:01 CET`: the one way mailer shows a time to people."""
    if value is None:
        return empty
    local = to_local(value, zone=zone)
    return f"{local.strftime(HUMAN_FORMAT)} {zone_abbreviation(local)}"


def format_iso(value: dt.datetime | None) -> str | None:
    """`2026-03-14T09:01:30Z`: ISO 8601 in UTC, for CSV and JSON."""
    if value is None:
        return None
    aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    return aware.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def format_duration(seconds: float) -> str:
    """`under 1 s`, `42 s`, `3 min 20 s`, `2 h 5 min`, `3 days 4 h`."""
    if seconds < 1:
        return "under 1 s"
    total = round(seconds)
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min" + (f" {secs} s" if secs else "")
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    days, hours = divmod(hours, 24)
    return f"{days} day{'s' if days != 1 else ''}" + (f" {hours} h" if hours else "")


__all__ = [
    "format_duration",
    "format_iso",
    "format_local",
    "local_zone",
    "to_local",
    "zone_abbreviation",
    "zone_name",
]
