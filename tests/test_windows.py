"""Sending windows (mailer/windows.py): parsing, bad windows, and open/close/next-open in a
recipient's zone across daylight-saving changes. Pure functions of an instant: no clock."""

from __future__ import annotations

import datetime as dt
import random
from zoneinfo import ZoneInfo

import pytest

from mailer.errors import InvalidValueError
from mailer.windows import Schedule, parse_window, parse_windows

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")
# 2024: Europe springs forward on 31 March (02:00 -> 03:00), falls back on 27 October
# (03:00 -> 02:00); the US on 10 March and 3 November; New Zealand falls back on 7 April.
SPRING = dt.date(2024, 3, 31)
AUTUMN = dt.date(2024, 10, 27)


def at(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def schedule(*texts: str) -> Schedule:
    found = parse_windows(texts)
    assert found is not None
    return found


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "shown", "days"),
    [
        ("Mon-Fri 09:00-17:00", "Mon-Fri 09:00-17:00", {0, 1, 2, 3, 4}),
        ("mon,wed,fri 9:00-12:30", "Mon,Wed,Fri 09:00-12:30", {0, 2, 4}),
        ("Friday-Monday 10:00-11:00", "Mon,Fri-Sun 10:00-11:00", {4, 5, 6, 0}),
        ("daily 08:00-24:00", "Mon-Sun 08:00-24:00", set(range(7))),
        ("Sat 00:00-06:00", "Sat 00:00-06:00", {5}),
    ],
)
def test_windows_parse(text: str, shown: str, days: set[int]) -> None:
    window = parse_window(text)
    assert window.text == shown
    assert window.days == frozenset(days)


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([""], "--window: an empty window"),
        (
            ["Mon-Fri 09:00-09:00"],
            "--window 'Mon-Fri 09:00-09:00' is empty: it ends when it starts",
        ),
        (
            ["Mon-Fri 17:00-09:00"],
            "--window 'Mon-Fri 17:00-09:00' is reversed: it ends (09:00) before it starts (17:00)",
        ),
        (
            ["Mon-Thu 09:00-12:00", "Mon-Thu 11:00-17:00"],
            "--window 'Mon-Thu 09:00-12:00' and --window 'Mon-Thu 11:00-17:00' overlap on "
            "Mon-Thu (11:00-12:00)",
        ),
        (
            ["Mon-Fri 09:00-17:00", "Fri 09:00-17:00"],
            "overlap on Fri (09:00-17:00)",
        ),
        (["Funday 09:00-10:00"], "unknown day 'funday'"),
        (["Mon 09:00-25:00"], "25:00 is not a time of day"),
        (["Mon 24:00-24:00"], "24:00 is not a time of day"),
        (["Mon 09:60-10:00"], "09:60 is not a time of day"),
        (["9 to 5"], "expected days and hours"),
        (["Mon-Fri"], "expected days and hours"),
    ],
)
def test_bad_windows_are_refused_with_the_reason(texts: list[str], message: str) -> None:
    with pytest.raises(InvalidValueError) as caught:
        parse_windows(texts)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_touching_windows_are_one_opening() -> None:
    s = schedule("Mon 09:00-12:00", "Mon 12:00-17:00")
    opening = s.opening(at(2024, 6, 3, 8), BERLIN)  # Monday 10:00 CEST
    assert opening is not None and opening.closes_at == at(2024, 6, 3, 15)  # 17:00 CEST
    # Across midnight too: Friday 22:00 to Saturday 02:00.
    night = schedule("Fri 22:00-24:00", "Sat 00:00-02:00")
    opening = night.opening(at(2024, 6, 7, 21), BERLIN)  # Friday 23:00 CEST
    assert opening is not None and opening.closes_at == at(2024, 6, 8, 0)  # Saturday 02:00


def test_open_per_day_is_the_average_open_day() -> None:
    assert schedule("Mon-Thu 09:00-12:00", "Mon-Thu 14:00-17:00").open_per_day() == dt.timedelta(
        hours=6
    )
    assert schedule("Mon 09:00-17:00", "Sat 10:00-12:00").open_per_day() == dt.timedelta(hours=5)


# --------------------------------------------------------------------------- in a zone


def test_business_hours_follow_the_recipients_clock_across_the_spring_change() -> None:
    s = schedule("Mon-Fri 09:00-17:00")
    # Friday before the change: 09:00 CET is 08:00 UTC; Monday after: 09:00 CEST is 07:00 UTC.
    assert s.next_open(at(2024, 3, 29, 5), BERLIN) == at(2024, 3, 29, 8)
    assert s.next_open(at(2024, 3, 29, 17), BERLIN) == at(2024, 4, 1, 7)
    assert not s.is_open(at(2024, 4, 1, 6, 59), BERLIN)
    assert s.is_open(at(2024, 4, 1, 7), BERLIN)
    opening = s.opening(at(2024, 4, 1, 7), BERLIN)
    assert opening is not None and opening.closes_at == at(2024, 4, 1, 15)
    # Tokyo keeps no daylight saving; Auckland falls back on 7 April (NZDT +13 -> NZST +12).
    assert s.next_open(at(2024, 3, 29, 9), ZoneInfo("Asia/Tokyo")) == at(2024, 4, 1, 0)
    auckland = ZoneInfo("Pacific/Auckland")
    # Friday 18:00 NZDT; the window opens on Monday 09:00 NZST, after the change.
    opens = s.next_open(at(2024, 4, 5, 5), auckland)
    assert opens == at(2024, 4, 7, 21)
    assert opens.astimezone(auckland).strftime("%a %H:%M %Z") == "Mon 09:00 NZST"


def test_a_window_starting_in_the_hour_that_does_not_exist_opens_when_the_clock_jumps() -> None:
    s = schedule("Sun 02:00-04:00")
    opens = s.next_open(at(2024, 3, 30, 12), BERLIN)
    assert opens == at(2024, 3, 31, 1)  # 03:00 CEST: 02:00-03:00 never shows on the clock
    assert opens.astimezone(BERLIN).strftime("%H:%M %Z") == "03:00 CEST"
    opening = s.opening(opens, BERLIN)
    assert opening is not None and opening.closes_at == at(2024, 3, 31, 2)  # 04:00 CEST
    assert not s.is_open(opens - dt.timedelta(seconds=1), BERLIN)  # 01:59:59 CET


def test_a_window_wholly_inside_the_missing_hour_does_not_open_that_day() -> None:
    s = schedule("Sun 02:10-02:50")
    opens = s.next_open(at(2024, 3, 30, 12), BERLIN)
    assert opens == at(2024, 4, 7, 0, 10)  # the next Sunday, 02:10 CEST


def test_a_wall_time_that_occurs_twice_is_inside_both_times() -> None:
    s = schedule("Sun 02:00-02:30")
    first = s.next_open(at(2024, 10, 26, 12), BERLIN)
    assert first == at(2024, 10, 27, 0)  # 02:00 CEST
    opening = s.opening(first, BERLIN)
    assert opening is not None and opening.closes_at == at(2024, 10, 27, 0, 30)
    # Closed from 02:30 CEST until the clock shows 02:00 again (CET), an hour after the first.
    assert not s.is_open(at(2024, 10, 27, 0, 45), BERLIN)
    second = s.next_open(at(2024, 10, 27, 0, 30), BERLIN)
    assert second == at(2024, 10, 27, 1)
    assert second.astimezone(BERLIN).strftime("%H:%M %Z") == "02:00 CET"
    opening = s.opening(second, BERLIN)
    assert opening is not None and opening.closes_at == at(2024, 10, 27, 1, 30)
    assert s.next_open(at(2024, 10, 27, 1, 30), BERLIN) == at(2024, 11, 3, 1)


ZONES = [
    "Europe/Kyiv",
    "Europe/Berlin",
    "Europe/Lisbon",
    "America/New_York",
    "America/Los_Angeles",
    "Asia/Tokyo",
    "Pacific/Auckland",
    "Australia/Lord_Howe",  # a half-hour daylight-saving shift
    "Asia/Kathmandu",  # +05:45
]
SCHEDULES = [
    ("Mon-Fri 09:00-17:00",),
    ("Mon-Thu 09:00-12:00", "Mon-Thu 14:00-17:00"),
    ("Sun 01:30-03:15", "Sat 23:00-24:00"),  # around the clock changes
    ("Sun 02:00-02:30",),
]


@pytest.mark.parametrize("texts", SCHEDULES, ids=[" + ".join(t) for t in SCHEDULES])
def test_next_open_and_closing_agree_with_the_clock_everywhere(texts: tuple[str, ...]) -> None:
    """For instants all over a year (both changes included) in many zones: the next opening
    is open and nothing before it is (checked every 5 minutes), and an opening stays open up
    to its closing time and is shut right after it."""
    s = schedule(*texts)
    rng = random.Random(7)
    step = dt.timedelta(minutes=5)
    starts = [at(2024, 3, 30, 20), at(2024, 10, 26, 20), at(2024, 4, 5, 20), at(2024, 11, 2, 20)]
    starts += [
        at(2024, 1, 1) + dt.timedelta(minutes=rng.randrange(366 * 24 * 60)) for _ in range(30)
    ]
    for name in ZONES:
        zone = ZoneInfo(name)
        for start in starts:
            opens = s.next_open(start, zone)
            assert opens >= start and s.is_open(opens, zone), (name, start, opens)
            t = start
            while t + step <= opens - step:
                t += step
                assert not s.is_open(t, zone), (name, start, t, opens)
            opening = s.opening(opens, zone)
            assert opening is not None
            assert opening.closes_at > opens
            assert not s.is_open(opening.closes_at, zone), (name, opens, opening)
            assert s.is_open(opening.closes_at - dt.timedelta(seconds=1), zone)
            t = opens
            while t < opening.closes_at:
                assert s.is_open(t, zone), (name, opens, t)
                t += step
