"""The retention policy against tables computed by hand (the reasoning is beside each table).

Every expected verdict below was worked out on paper from the rules in README "Retention" (restic's
``forget`` semantics), not by running the code: calendar facts used are noted where they matter
(2023-01-01 is a Sunday and so in ISO week 2022-W52; New York's DST ended 2023-11-05 02:00 EDT →
01:00 EST and began 2024-03-10 02:00 EST → 03:00 EDT).
"""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgbackup.engine.retention import Candidate, Duration, RetentionPolicy, apply_policy
from imgbackup.errors import UsageError

UTC = datetime.UTC


def utc(*args: int) -> float:
    return datetime.datetime(*args, tzinfo=UTC).timestamp()


def judge(policy: RetentionPolicy, images: dict[str, float]) -> dict[str, list[str]]:
    """id → the reasons it is kept ([] = removed)."""
    return {v.id: v.reasons for v in apply_policy(policy, [Candidate(i, t) for i, t in images.items()])}


# Ten images across three years (UTC). ISO weeks: A 2021-W24, B 2022-W09, C 2022-W52 (Sat Dec 31),
# D and E 2022-W52 (Sun Jan 1 2023), F and G 2023-W01 (Mon Jan 2, Sun Jan 8), H I J 2023-W02.
YEARS = {
    "A": utc(2021, 6, 15, 10), "B": utc(2022, 3, 1, 9), "C": utc(2022, 12, 31, 23, 30),
    "D": utc(2023, 1, 1, 0, 30), "E": utc(2023, 1, 1, 12), "F": utc(2023, 1, 2, 8),
    "G": utc(2023, 1, 8, 22), "H": utc(2023, 1, 9, 6), "I": utc(2023, 1, 9, 18), "J": utc(2023, 1, 10, 3),
}


def test_buckets_across_years_by_hand() -> None:
    # Newest first J I H G F E D C B A.
    # last 2: J, I.  daily 3: J (01-10), I (01-09), H same day as I, G (01-08) - count spent.
    # weekly 2: J (W02), I H same week, G (W01) - spent.  monthly 3: J (2023-01), I..D same month,
    # C (2022-12), B (2022-03) - spent.  yearly 3: J (2023), C (2022), B same year, A (2021) - spent.
    policy = RetentionPolicy(keep_last=2, keep_daily=3, keep_weekly=2, keep_monthly=3, keep_yearly=3,
                             timezone="UTC")
    assert judge(policy, YEARS) == {
        "J": ["keep-last", "keep-daily", "keep-weekly", "keep-monthly", "keep-yearly"],
        "I": ["keep-last", "keep-daily"],
        "H": [],
        "G": ["keep-daily", "keep-weekly"],
        "F": [], "E": [], "D": [],
        "C": ["keep-monthly", "keep-yearly"],
        "B": ["keep-monthly"],
        "A": ["keep-yearly"],
    }


def test_iso_weeks_by_hand() -> None:
    # weekly unlimited, newest first: J (2023-W02), I H same, G (2023-W01), F same, E (2022-W52: Jan 1
    # 2023 is a Sunday), D same, C same week (Saturday Dec 31), B (2022-W09), A (2021-W24).
    policy = RetentionPolicy(keep_weekly="unlimited", timezone="UTC")
    kept = {i for i, why in judge(policy, YEARS).items() if why}
    assert kept == {"J", "G", "E", "B", "A"}


def test_keep_within_days_and_hours_by_hand() -> None:
    # newest J 2023-01-10 03:00; 1d12h before is 2023-01-08 15:00: strictly newer are J I H G.
    policy = RetentionPolicy(keep_within="1d12h", timezone="UTC")
    assert {i for i, why in judge(policy, YEARS).items() if why} == {"J", "I", "H", "G"}
    assert judge(policy, YEARS)["G"] == ["keep-within 1d12h"]
    # ORed with keep-last 1: J has both reasons, the rest only one.
    both = judge(RetentionPolicy(keep_within="1d", keep_last=1, timezone="UTC"), YEARS)
    assert both["J"] == ["keep-within 1d", "keep-last"]
    assert {i for i, why in both.items() if why} == {"J", "I", "H"}   # 1d: after 2023-01-09 03:00


def test_keep_within_months_roll_over_like_restic() -> None:
    # 2023-03-31 12:00 minus one month is "February 31" = March 3 12:00 (28-day February);
    # an image exactly at the cutoff is not newer than it.
    images = {"new": utc(2023, 3, 31, 12), "at": utc(2023, 3, 3, 12), "after": utc(2023, 3, 3, 12, 0, 1),
              "mar2": utc(2023, 3, 2, 23), "feb28": utc(2023, 2, 28, 12)}
    kept = {i for i, why in judge(RetentionPolicy(keep_within="1m", timezone="UTC"), images).items() if why}
    assert kept == {"new", "after"}
    # In the leap year 2024 "February 31" is March 2.
    leap = {"new": utc(2024, 3, 31, 12), "mar2": utc(2024, 3, 2, 12, 0, 1), "mar1": utc(2024, 3, 1, 13)}
    kept = {i for i, why in judge(RetentionPolicy(keep_within="1m", timezone="UTC"), leap).items() if why}
    assert kept == {"new", "mar2"}
    # One year before 2024-02-29 is "2023-02-29" = 2023-03-01.
    feb29 = {"new": utc(2024, 2, 29, 6), "mar1": utc(2023, 3, 1, 6, 0, 1), "feb28": utc(2023, 2, 28, 23)}
    kept = {i for i, why in judge(RetentionPolicy(keep_within="1y", timezone="UTC"), feb29).items() if why}
    assert kept == {"new", "mar1"}


# New York, the night DST ended (2023-11-05: 01:00-01:59 happens twice, EDT then EST).
NIGHT = {
    "g": utc(2023, 11, 4, 4, 30),    # 11-04 00:30 EDT
    "f": utc(2023, 11, 5, 4, 30),    # 11-05 00:30 EDT
    "a": utc(2023, 11, 5, 5, 10),    # 01:10 EDT
    "b": utc(2023, 11, 5, 5, 50),    # 01:50 EDT
    "c": utc(2023, 11, 5, 6, 10),    # 01:10 EST (the repeated hour)
    "d": utc(2023, 11, 5, 6, 50),    # 01:50 EST
    "e": utc(2023, 11, 5, 7, 10),    # 02:10 EST
    "h": utc(2023, 11, 6, 4, 30),    # 11-05 23:30 EST
    "i": utc(2023, 11, 6, 5, 30),    # 11-06 00:30 EST
}


def test_hourly_buckets_at_dst_end_by_hand() -> None:
    # New York wall hours, newest first: i 11-06 00h, h 11-05 23h, e 02h, d 01h, c 01h (same label),
    # b 01h, a 01h, f 00h, g 11-04 00h: the repeated hour is one bucket, its newest image d is kept.
    ny = judge(RetentionPolicy(keep_hourly=100, timezone="America/New_York"), NIGHT)
    assert {i for i, why in ny.items() if why} == {"i", "h", "e", "d", "f", "g"}
    # In UTC the two 01:xx hours are 05Z and 06Z: b is kept as the newest of 05Z, d of 06Z.
    plain = judge(RetentionPolicy(keep_hourly=100, timezone="UTC"), NIGHT)
    assert {i for i, why in plain.items() if why} == {"i", "h", "e", "d", "b", "f", "g"}


def test_daily_buckets_follow_the_zone_by_hand() -> None:
    # New York days: i 11-06; h e d c b a f 11-05 (25 hours long); g 11-04.
    ny = judge(RetentionPolicy(keep_daily=10, timezone="America/New_York"), NIGHT)
    assert {i for i, why in ny.items() if why} == {"i", "h", "g"}
    # UTC days: i h 11-06; e d c b a f 11-05; g 11-04.
    plain = judge(RetentionPolicy(keep_daily=10, timezone="UTC"), NIGHT)
    assert {i for i, why in plain.items() if why} == {"i", "e", "g"}


def test_keep_within_across_dst_changes_by_hand() -> None:
    # Fall back: newest 2023-11-06 01:30 EST (06:30Z); one day before on the wall clock is
    # 2023-11-05 01:30, which occurs twice: the first (EDT, 05:30Z) is meant, 25 elapsed hours.
    fall = {"new": utc(2023, 11, 6, 6, 30), "in": utc(2023, 11, 5, 5, 31), "out": utc(2023, 11, 5, 5, 29)}
    kept = judge(RetentionPolicy(keep_within="1d", timezone="America/New_York"), fall)
    assert {i for i, why in kept.items() if why} == {"new", "in"}
    # Spring forward: newest 2024-03-11 02:30 EDT (06:30Z); one day before is 2024-03-10 02:30, which
    # does not exist: read as 03:30 EDT (07:30Z), 23 elapsed hours.
    spring = {"new": utc(2024, 3, 11, 6, 30), "in": utc(2024, 3, 10, 7, 31), "out": utc(2024, 3, 10, 7, 29)}
    kept = judge(RetentionPolicy(keep_within="1d", timezone="America/New_York"), spring)
    assert {i for i, why in kept.items() if why} == {"new", "in"}
    # Hours are elapsed time: 24h before 06:30Z is 06:30Z the day before, DST or not.
    hours = {"new": utc(2024, 3, 11, 6, 30), "in": utc(2024, 3, 10, 6, 31), "out": utc(2024, 3, 10, 6, 29)}
    kept = judge(RetentionPolicy(keep_within="24h", timezone="America/New_York"), hours)
    assert {i for i, why in kept.items() if why} == {"new", "in"}


def test_within_bucket_rules_by_hand() -> None:
    # keep-within-daily 2d from J (2023-01-10 03:00): window after 2023-01-08 03:00 holds J I H G;
    # one per day: J (01-10), I (01-09, newer than H), G (01-08).
    kept = judge(RetentionPolicy(keep_within_daily="2d", timezone="UTC"), YEARS)
    assert {i for i, why in kept.items() if why} == {"J", "I", "G"}
    assert kept["G"] == ["keep-within-daily 2d"]
    # keep-within-yearly 2y: window after 2021-01-10 03:00 is everything; one per year: J, C, A.
    kept = judge(RetentionPolicy(keep_within_yearly="2y", timezone="UTC"), YEARS)
    assert {i for i, why in kept.items() if why} == {"J", "C", "A"}


def test_equal_times_and_empty_groups() -> None:
    same = {"aa": utc(2024, 1, 1), "bb": utc(2024, 1, 1), "cc": utc(2023, 1, 1)}
    kept = judge(RetentionPolicy(keep_last=1), same)
    assert kept == {"bb": ["keep-last"], "aa": [], "cc": []}      # equal times: the higher id counts as newer
    assert apply_policy(RetentionPolicy(keep_last=1), []) == []


def test_bad_policies_are_refused() -> None:
    with pytest.raises(UsageError, match="no rules"):
        apply_policy(RetentionPolicy(), [Candidate("a", 1.0)])
    for bad in ("", "1w", "3d3d", "0d", "1.5d", "d", "-1d"):
        with pytest.raises(UsageError):
            Duration.parse(bad)
    with pytest.raises(UsageError, match="time zone"):
        RetentionPolicy(keep_last=1, timezone="Mars/Olympus")
    with pytest.raises(UsageError, match="keep-daily"):
        RetentionPolicy(keep_daily=-5)
    with pytest.raises(UsageError, match="unknown retention rule"):
        RetentionPolicy.from_mapping({"keep_dayly": 7})


def test_policy_from_a_job_table() -> None:
    policy = RetentionPolicy.from_mapping({"keep_daily": 7, "keep_within": "1y2m3d4h", "keep-weekly": "unlimited",
                                           "timezone": "Europe/Berlin"})
    assert policy.keep_within == Duration(1, 2, 3, 4) and str(policy.keep_within) == "1y2m3d4h"
    assert policy.to_dict() == {"keep_daily": 7, "keep_weekly": "unlimited", "keep_within": "1y2m3d4h"}
    assert Duration.parse("4h3d") == Duration(days=3, hours=4)


def test_local_zone_keeps_dst_rules(monkeypatch) -> None:
    # The default zone is the machine's, with its rules: with TZ=America/New_York the DST night
    # above buckets as in New York, not at one fixed offset.
    monkeypatch.setenv("TZ", "America/New_York")
    ny = judge(RetentionPolicy(keep_hourly=100), NIGHT)
    assert {i for i, why in ny.items() if why} == {"i", "h", "e", "d", "f", "g"}
    monkeypatch.setenv("TZ", "EST5EDT,M3.2.0,M11.1.0")      # a POSIX rule string: read by libc
    import time
    time.tzset()
    try:
        posix = judge(RetentionPolicy(keep_hourly=100), NIGHT)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert {i for i, why in posix.items() if why} == {"i", "h", "e", "d", "f", "g"}


DAY = 86400.0


@given(st.lists(st.floats(0, 3000 * DAY, allow_nan=False), min_size=1, max_size=60, unique=True),
       st.integers(1, 40))
def test_daily_keeps_the_newest_of_each_of_the_newest_days(times, n) -> None:
    """Property: keep-daily N keeps exactly the newest image of each of the N newest days that have images."""
    images = {f"{i:04d}": t for i, t in enumerate(times)}
    kept = {i for i, why in judge(RetentionPolicy(keep_daily=n, timezone="UTC"), images).items() if why}
    newest_per_day: dict[int, tuple[float, str]] = {}
    for i, t in images.items():
        day = int(t // DAY)
        newest_per_day[day] = max(newest_per_day.get(day, (-1.0, "")), (t, i))
    expected = {newest_per_day[d][1] for d in sorted(newest_per_day, reverse=True)[:n]}
    assert kept == expected
