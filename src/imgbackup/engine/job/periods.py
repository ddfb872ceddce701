"""Durations (``24h``, ``1d12h``, ``30min``) and period policies (``weekly``, ``monthly``, ``7d``).

A period says how often something is due (a full backup, a filesystem check, a drill):
``never``, ``always`` (every run), a calendar period (``hourly``, ``daily``, ``weekly``,
``monthly``, ``quarterly``, ``yearly``) or a duration. A calendar period is due when the last
occurrence lies in an earlier calendar period, in the job's time zone, than now (weeks are ISO
weeks, Monday first): ``full = "monthly"`` makes the first backup of each month a full one, however
the runs fall. A duration is due when the last occurrence is at least that long ago. Anything that
never happened is due (unless ``never``).
"""

from __future__ import annotations

import datetime
import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "min": 60, "minute": 60, "minutes": 60,
         "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400,
         "w": 604800, "week": 604800, "weeks": 604800}
CALENDAR = ("hourly", "daily", "weekly", "monthly", "quarterly", "yearly")
PERIOD_WORDS = ("never", "always", *CALENDAR)
_TOKEN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)")


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (``24h``, ``1d 12h``, ``90min``, ``2w``); ValueError saying what is wrong."""
    pos, total = 0, 0.0
    text = text.strip().lower()
    if not text:
        raise ValueError("empty duration")
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"{text!r} is not a duration (e.g. '24h', '1d12h', '30min')")
        unit = m.group(2)
        if unit in ("m", "mo", "month", "months", "y", "year", "years"):
            raise ValueError(f"{text!r}: write minutes as 'min'; months and years have no fixed length here")
        if unit not in UNITS:
            raise ValueError(f"{text!r}: unknown unit {unit!r} (s, min, h, d, w)")
        total += float(m.group(1)) * UNITS[unit]
        pos = m.end()
    if total <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return total


def check_period(text: str) -> None:
    """ValueError unless ``text`` is a period word or a duration."""
    if text not in PERIOD_WORDS:
        try:
            parse_duration(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a period ({', '.join(PERIOD_WORDS)}, or a duration such as "
                             "'36h' or '7d')") from None


def zone(name: str | None) -> datetime.tzinfo:
    """The IANA zone ``name``, or the system's local zone for None; ValueError for an unknown one."""
    if name is None:
        local = datetime.datetime.now().astimezone().tzinfo
        return local if local is not None else datetime.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin' or 'UTC')") from None


def _bucket(period: str, when: float, tz: datetime.tzinfo) -> tuple:
    t = datetime.datetime.fromtimestamp(when, tz)
    if period == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if period == "daily":
        return (t.year, t.month, t.day)
    if period == "weekly":
        return tuple(t.isocalendar())[:2]
    if period == "monthly":
        return (t.year, t.month)
    if period == "quarterly":
        return (t.year, (t.month - 1) // 3)
    return (t.year,)


def is_due(period: str, last: float | None, now: float, tz: datetime.tzinfo) -> bool:
    """Whether something done last at ``last`` (None: never) is due again at ``now`` under ``period``."""
    if period == "never":
        return False
    if period == "always" or last is None:
        return True
    if period in CALENDAR:
        return _bucket(period, last, tz) < _bucket(period, now, tz)
    return now - last >= parse_duration(period)


def format_duration(seconds: float) -> str:
    """``1d 2h 3min`` (seconds only below a minute): how late, for people."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts)
