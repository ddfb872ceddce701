"""Retention policy: which images ``prune`` keeps, and why — restic's ``forget`` rules, exactly.

Within one group (the images of one source name), newest first:
- ``keep-last N`` keeps the N newest images;
- ``keep-hourly/daily/weekly/monthly/yearly N``: each image starts a new bucket (an hour, day, ISO
  week, month, year on the wall clock of the policy's time zone) when its bucket differs from the
  bucket of the last image this rule kept; then the rule keeps it, and N counts down. So every
  bucket keeps its newest image, buckets without images cost nothing, and the rule stops after N
  buckets (``unlimited``: never);
- ``keep-within D`` keeps every image newer than the group's newest image minus D;
- ``keep-within-hourly/daily/… D`` apply the bucket rule without a count to the images newer than
  the newest minus D.
Rules are ORed, an image may satisfy several (all are reported), and an empty policy is refused.

Durations (``1y2m3d4h``) are subtracted the way restic (Go's ``AddDate``) does: years, months and
days on the wall clock, an overflowing day rolls over (March 31 minus one month is "February 31",
which is March 3 — or 2 in a leap year), then hours as elapsed time. A wall-clock time a DST change
skips is read as that many minutes after the change (02:30 → 03:30); one that occurs twice is the
first. Buckets are calendar labels in the zone: the hour repeated when DST ends is one hourly
bucket two hours long, and the days of the DST changes are 23 and 25 hours long.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from imgbackup.errors import UsageError

UNLIMITED = -1
COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
WITHIN_RULES = ("hourly", "daily", "weekly", "monthly", "yearly")
MAX_COUNT = 1_000_000          # more buckets than images anyone keeps; bounds a typo
_DURATION_PART = re.compile(r"(\d+)([ymdh])")
_UNIT_FIELD = {"y": "years", "m": "months", "d": "days", "h": "hours"}
HELD = "held"


@dataclass(frozen=True)
class Duration:
    """Years, months, days and hours, as in ``--keep-within 1y2m3d4h``."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        """``1y2m3d4h`` (any order, each unit at most once, m = months); UsageError otherwise."""
        raw = str(text).strip().lower()
        parts: dict[str, int] = {}
        pos = 0
        while pos < len(raw):
            m = _DURATION_PART.match(raw, pos)
            if not m:
                raise UsageError(f"{text!r} is not a duration",
                                 "write years, months, days and hours like 1y2m3d4h (m = months)")
            unit = _UNIT_FIELD[m.group(2)]
            if unit in parts:
                raise UsageError(f"{text!r} gives {unit} twice")
            parts[unit] = int(m.group(1))
            pos = m.end()
        if not parts or not any(parts.values()):
            raise UsageError(f"{text!r} is an empty duration: it would keep nothing",
                             "leave the option out, or give a length like 30d")
        if max(parts.values()) > 100_000:
            raise UsageError(f"{text!r} is too long a duration")
        return cls(**parts)

    def __str__(self) -> str:
        return "".join(f"{n}{u}" for u, n in zip("ymdh", (self.years, self.months, self.days, self.hours), strict=True) if n)

    def at_most_seconds(self) -> float:
        """An upper bound of its length (a year 366 days, a month 31, a day 25 hours at a DST change)."""
        return ((self.years * 366 + self.months * 31) * 25 + self.days * 25 + self.hours) * 3600.0

    def before(self, moment: datetime.datetime) -> datetime.datetime:
        """``moment`` minus this duration: Go's ``AddDate(-y, -m, -d)`` then ``Add(-h hours)``."""
        year, month = moment.year - self.years, moment.month - self.months
        year += (month - 1) // 12
        month = (month - 1) % 12 + 1
        day = datetime.date.fromordinal(datetime.date(year, month, 1).toordinal() + moment.day - 1 - self.days)
        wall = moment.replace(year=day.year, month=day.month, day=day.day, fold=0)
        instant = wall.timestamp()                      # fold=0: a skipped time lands after the change
        return datetime.datetime.fromtimestamp(instant - self.hours * 3600, moment.tzinfo)


def _count(value: object, what: str) -> int:
    if isinstance(value, str) and value.strip().lower() == "unlimited":
        return UNLIMITED
    if isinstance(value, bool):
        raise UsageError(f"{what} must be a number or 'unlimited'")
    try:
        number = int(str(value).strip()) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number or 'unlimited', not {value!r}") from None
    if number == UNLIMITED:
        return UNLIMITED
    if not 0 <= number <= MAX_COUNT:
        raise UsageError(f"{what} must be 0..{MAX_COUNT} or 'unlimited', not {number}")
    return number


@dataclass(frozen=True)
class RetentionPolicy:
    """What ``prune`` keeps; ``from_mapping`` builds one from a job file's ``[retention]`` table."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: Duration | None = None
    keep_within_hourly: Duration | None = None
    keep_within_daily: Duration | None = None
    keep_within_weekly: Duration | None = None
    keep_within_monthly: Duration | None = None
    keep_within_yearly: Duration | None = None
    timezone: str | None = None          # an IANA name; None: this machine's local zone

    def __post_init__(self) -> None:
        for rule in COUNT_RULES:
            object.__setattr__(self, f"keep_{rule}", _count(getattr(self, f"keep_{rule}"), f"keep-{rule}"))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("keep_within") and value is not None and not isinstance(value, Duration):
                object.__setattr__(self, f.name, Duration.parse(value))
        if self.timezone is not None:
            zone_named(self.timezone)

    @classmethod
    def from_mapping(cls, doc: Mapping[str, object]) -> RetentionPolicy:
        """From ``keep_daily = 7``-style keys (dashes allowed too) and ``timezone``; unknown keys refused."""
        known = {f.name for f in fields(cls)}
        args = {}
        for key, value in doc.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise UsageError(f"unknown retention rule {key!r}",
                                 "use keep_last, keep_hourly … keep_yearly, keep_within, keep_within_daily …, "
                                 "timezone")
            args[name] = value
        return cls(**args)

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f"keep_{r}") for r in COUNT_RULES) and not any(
            getattr(self, f.name) for f in fields(self) if f.name.startswith("keep_within"))

    def to_dict(self) -> dict:
        """The rules that are on, by their option names' keys (``keep_daily``: 7, ``keep_within``: "30d")."""
        doc: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "timezone" or not value:
                continue
            doc[f.name] = "unlimited" if value == UNLIMITED else str(value) if isinstance(value, Duration) else value
        return doc

    def describe(self) -> str:
        return ", ".join(f"{k.replace('_', '-')} {v}" for k, v in self.to_dict().items()) or "no rules"

    def longest_within(self) -> float:
        """The longest span a within-rule promises to keep, in seconds (an upper bound); 0 without one."""
        spans = [d.at_most_seconds() for f in fields(self) if f.name.startswith("keep_within")
                 if (d := getattr(self, f.name)) is not None]
        return max(spans, default=0.0)

    def zone(self) -> tuple[datetime.tzinfo, str]:
        return zone_named(self.timezone) if self.timezone else local_zone()


@dataclass(frozen=True)
class Candidate:
    """One image a policy judges: its id and creation time (Unix seconds)."""

    id: str
    created: float


@dataclass
class Verdict:
    id: str
    created: float
    keep: bool = False
    reasons: list[str] = field(default_factory=list)


# --- bucket labels -----------------------------------------------------------------------------

def _always(t: datetime.datetime, nr: int) -> object:
    return nr


def _hour(t: datetime.datetime, nr: int) -> object:
    return (t.year, t.month, t.day, t.hour)


def _day(t: datetime.datetime, nr: int) -> object:
    return (t.year, t.month, t.day)


def _week(t: datetime.datetime, nr: int) -> object:
    iso = t.isocalendar()
    return (iso[0], iso[1])


def _month(t: datetime.datetime, nr: int) -> object:
    return (t.year, t.month)


def _year(t: datetime.datetime, nr: int) -> object:
    return t.year


BUCKETS: dict[str, Callable[[datetime.datetime, int], object]] = {
    "last": _always, "hourly": _hour, "daily": _day, "weekly": _week, "monthly": _month, "yearly": _year}


def apply_policy(policy: RetentionPolicy, images: Iterable[Candidate]) -> list[Verdict]:
    """Judge one group of images; the verdicts come newest first (equal times: higher id first)."""
    if policy.empty:
        raise UsageError("the retention policy has no rules, so it would keep nothing",
                         "give at least one --keep-… option")
    tz, _ = policy.zone()
    ordered = sorted(images, key=lambda c: (c.created, c.id), reverse=True)
    if not ordered:
        return []
    latest = datetime.datetime.fromtimestamp(ordered[0].created, tz)
    counted = [[f"keep-{r}", getattr(policy, f"keep_{r}"), BUCKETS[r], None] for r in COUNT_RULES]
    within = None if policy.keep_within is None else policy.keep_within.before(latest).timestamp()
    windows = []
    for rule in WITHIN_RULES:
        span: Duration | None = getattr(policy, f"keep_within_{rule}")
        if span is not None:
            windows.append([f"keep-within-{rule} {span}", span.before(latest).timestamp(), BUCKETS[rule], None])
    verdicts = []
    for nr, image in enumerate(ordered):
        when = datetime.datetime.fromtimestamp(image.created, tz)
        verdict = Verdict(image.id, image.created)
        if within is not None and image.created > within:
            verdict.reasons.append(f"keep-within {policy.keep_within}")
        for rule in counted:
            name, left, bucket, last = rule
            if left == 0:
                continue
            label = bucket(when, nr)
            if label != last:
                rule[3] = label
                if left > 0:
                    rule[1] = left - 1
                verdict.reasons.append(name)
        for window in windows:
            name, cutoff, bucket, last = window
            if image.created > cutoff:
                label = bucket(when, nr)
                if label != last:
                    window[3] = label
                    verdict.reasons.append(name)
        verdict.keep = bool(verdict.reasons)
        verdicts.append(verdict)
    return verdicts


# --- time zones --------------------------------------------------------------------------------

def zone_named(name: str) -> tuple[datetime.tzinfo, str]:
    try:
        return ZoneInfo(name), name
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"unknown time zone {name!r}",
                         "give an IANA name such as Europe/Berlin, America/New_York or UTC") from None


def local_zone() -> tuple[datetime.tzinfo, str]:
    """This machine's zone with its DST rules (``TZ``, else /etc/localtime), not today's fixed offset."""
    tz = os.environ.get("TZ")
    if tz is not None:
        key = tz[1:] if tz.startswith(":") else tz
        if not key:
            return datetime.UTC, "UTC"
        try:
            if key.startswith("/"):
                with open(key, "rb") as f:
                    return ZoneInfo.from_file(f, key=key), key
            return ZoneInfo(key), key
        except (OSError, ValueError, ZoneInfoNotFoundError):
            return LibcZone(), key           # a POSIX rule string (EST5EDT,M3.2.0,M11.1.0): libc reads it
    try:
        with open("/etc/localtime", "rb") as f:
            target = os.path.realpath("/etc/localtime")
            key = target.split("/zoneinfo/", 1)[1] if "/zoneinfo/" in target else "localtime"
            return ZoneInfo.from_file(f, key=key), key
    except (OSError, ValueError):
        return datetime.UTC, "UTC"


class LibcZone(datetime.tzinfo):
    """The C library's local time (for a ``TZ`` that zoneinfo cannot read)."""

    def fromutc(self, dt: datetime.datetime) -> datetime.datetime:
        stamp = (dt.replace(tzinfo=None) - datetime.datetime(1970, 1, 1)).total_seconds()
        local = time.localtime(stamp // 1)
        return datetime.datetime(*local[:6], dt.microsecond, tzinfo=self)

    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        if dt is None:
            return datetime.timedelta(seconds=time.localtime().tm_gmtoff)
        stamp = time.mktime((dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second, 0, 0, -1))
        return datetime.timedelta(seconds=time.localtime(stamp).tm_gmtoff)

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)

    def tzname(self, dt: datetime.datetime | None) -> str:
        return time.strftime("%Z", time.localtime())
