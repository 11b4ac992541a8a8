"""Sending windows: the local hours a letter may arrive in (`Mon-Fri 09:00-17:00`).

Parses windows, checks a set of them (none empty, reversed or overlapping), and answers, for
one instant in one time zone, whether a window is open, when it closes and when the next one
opens. Everything here is a pure function of the instant and the zone it is given: no clock,
no database, no I/O (the engine and `timing` pass the time in).

A window is wall-clock time: an instant is inside when the recipient's clock shows a listed day
and a time in [start, end). Across a change of daylight-saving time that means:
- spring forward (02:00 -> 03:00): a window starting in the hour that does not exist opens
  when the clock jumps (03:00); a window lying wholly inside that hour does not open that day;
- fall back (03:00 -> 02:00): a wall time that occurs twice is inside both times. A letter is
  still sent at most once (the outbox guarantees that); it may only go in either of them.

Public holidays are not known here: a window is open on every listed weekday.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from mailer.errors import InvalidValueError

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAY_WORDS = {
    **{name.lower(): i for i, name in enumerate(DAY_NAMES)},
    **{
        full: i
        for i, full in enumerate(
            ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
        )
    },
    "tues": 1,
    "thur": 3,
    "thurs": 3,
}
_WINDOW_RE = re.compile(
    r"^\s*(?P<days>[A-Za-z][A-Za-z ,\-]*?)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$"
)
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})$")
_EXAMPLE = "e.g. 'Mon-Fri 09:00-17:00'"
_DAY = 24 * 60
_UTC = dt.UTC


@dataclass(frozen=True, slots=True)
class Window:
    """One window: weekdays (0 = Monday) and a span of minutes after midnight, [start, end)."""

    days: frozenset[int]
    start: int
    end: int

    @property
    def text(self) -> str:
        """The window written the way it is parsed (`Mon-Fri 09:00-17:00`)."""
        return f"{_days_text(self.days)} {_hhmm(self.start)}-{_hhmm(self.end)}"

    def __str__(self) -> str:
        return self.text


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _days_text(days: frozenset[int]) -> str:
    if len(days) == 7:
        return "Mon-Sun"
    ordered = sorted(days)
    runs: list[list[int]] = []
    for day in ordered:
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return ",".join(
        DAY_NAMES[r[0]] if len(r) == 1 else f"{DAY_NAMES[r[0]]}-{DAY_NAMES[r[-1]]}" for r in runs
    )


def _parse_days(text: str, *, shown: str) -> frozenset[int]:
    words = text.strip().lower()
    if words in ("daily", "every day", "everyday"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in words.split(","):
        part = part.strip()
        if not part:
            raise InvalidValueError(f"{shown}: an empty day in the list; {_EXAMPLE}")
        first, sep, last = (p.strip() for p in part.partition("-"))
        try:
            a = _DAY_WORDS[first]
            b = _DAY_WORDS[last] if sep else a
        except KeyError as exc:
            raise InvalidValueError(
                f"{shown}: unknown day {exc.args[0]!r}; use Mon, Tue, Wed, Thu, Fri, Sat, Sun "
                f"(ranges like Mon-Fri, lists like Mon,Wed,Fri), {_EXAMPLE}"
            ) from None
        # A range may wrap over the weekend: Fri-Mon is Fri, Sat, Sun, Mon.
        day = a
        while True:
            days.add(day)
            if day == b:
                break
            day = (day + 1) % 7
    return frozenset(days)


def _parse_time(text: str, *, shown: str, end: bool) -> int:
    match = _TIME_RE.match(text)
    assert match is not None  # the window pattern only lets H:MM or HH:MM through
    hours, minutes = int(match.group(1)), int(match.group(2))
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        raise InvalidValueError(
            f"{shown}: {text} is not a time of day (00:00 to 23:59; 24:00 only as an end)"
        )
    return hours * 60 + minutes


def parse_window(text: str, *, flag: str = "--window") -> Window:
    """One window from text such as `Mon-Fri 09:00-17:00`, `Mon,Wed 14:00-16:30` or
    `daily 10:00-12:00`. Raises InvalidValueError (naming `flag`) for anything else, and for a
    window that is empty or reversed."""
    shown = f"{flag} {text!r}"
    match = _WINDOW_RE.match(text)
    if match is None:
        if not text.strip():
            raise InvalidValueError(f"{flag}: an empty window; {_EXAMPLE}")
        raise InvalidValueError(f"{shown}: expected days and hours, {_EXAMPLE}")
    days = _parse_days(match.group("days"), shown=shown)
    start = _parse_time(match.group("start"), shown=shown, end=False)
    end = _parse_time(match.group("end"), shown=shown, end=True)
    if end == start:
        raise InvalidValueError(f"{shown} is empty: it ends when it starts")
    if end < start:
        raise InvalidValueError(
            f"{shown} is reversed: it ends ({_hhmm(end)}) before it starts ({_hhmm(start)}); "
            "a window lies within one day (a night is two windows, e.g. 'Mon 22:00-24:00' and "
            "'Tue 00:00-06:00')"
        )
    return Window(days=days, start=start, end=end)


# --------------------------------------------------------------------------- a set of windows


@dataclass(frozen=True, slots=True)
class Opening:
    """A window open at the instant asked about, and the instant it closes (UTC)."""

    closes_at: dt.datetime


class Schedule:
    """Several windows together; on each weekday their spans, merged where they touch."""

    __slots__ = ("_spans", "windows")

    def __init__(self, windows: Sequence[Window]) -> None:
        if not windows:
            raise ValueError("a schedule needs at least one window")
        self.windows = tuple(windows)
        spans: list[list[tuple[int, int]]] = [[] for _ in range(7)]
        for window in self.windows:
            for day in window.days:
                spans[day].append((window.start, window.end))
        merged: list[tuple[tuple[int, int], ...]] = []
        for day_spans in spans:
            out: list[tuple[int, int]] = []
            for start, end in sorted(day_spans):
                if out and start <= out[-1][1]:
                    out[-1] = (out[-1][0], max(out[-1][1], end))
                else:
                    out.append((start, end))
            merged.append(tuple(out))
        self._spans = tuple(merged)

    @property
    def texts(self) -> list[str]:
        return [w.text for w in self.windows]

    def describe(self) -> str:
        return " and ".join(self.texts)

    def open_per_day(self) -> dt.timedelta:
        """The open time of an average open day (what `--spread` spreads a day's cap over)."""
        days = [sum(e - s for s, e in spans) for spans in self._spans if spans]
        return dt.timedelta(minutes=sum(days) / len(days))

    # ----- at one instant, in one zone

    def _inside(self, local: dt.datetime) -> bool:
        second = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
        return any(s * 60 <= second < e * 60 for s, e in self._spans[local.weekday()])

    def is_open(self, instant: dt.datetime, zone: ZoneInfo) -> bool:
        """Whether the recipient's clock (`zone`) at `instant` shows a time inside a window."""
        return self._inside(instant.astimezone(zone))

    def opening(self, instant: dt.datetime, zone: ZoneInfo) -> Opening | None:
        """The window open at `instant` in `zone` and when it closes; None when none is open."""
        if not self.is_open(instant, zone):
            return None
        at = instant
        # A window ending at midnight and one starting then are one opening (at most a week).
        for _ in range(8):
            close = self._close_after(at, zone)
            if not self.is_open(close, zone):
                return Opening(closes_at=close)
            at = close
        return Opening(closes_at=at)

    def _close_after(self, instant: dt.datetime, zone: ZoneInfo) -> dt.datetime:
        local = instant.astimezone(zone)
        second = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
        day = local.date()
        for s, e in self._spans[local.weekday()]:
            if s * 60 <= second < e * 60:
                candidates = [t for t in _instants(day, e, zone) if t > instant]
                if candidates:
                    return min(candidates)
        # Not reached for an open instant: its span ends later the same day (or at midnight).
        return instant

    def next_open(self, instant: dt.datetime, zone: ZoneInfo) -> dt.datetime:
        """The first instant at or after `instant` at which a window is open in `zone` (UTC)."""
        if self.is_open(instant, zone):
            return instant.astimezone(_UTC)
        day = instant.astimezone(zone).date()
        # Any weekly schedule opens within eight days, unless a whole week's windows fell into
        # clock changes, which cannot happen twice in a row.
        for offset in range(-1, 16):
            date = day + dt.timedelta(days=offset)
            found = [
                t
                for s, _e in self._spans[date.weekday()]
                for t in _instants(date, s, zone)
                if t >= instant and self.is_open(t, zone)
            ]
            if found:
                return min(found)
        raise ValueError(f"no window of {self.describe()} opens in {zone.key}")


def _instants(day: dt.date, minute: int, zone: ZoneInfo) -> set[dt.datetime]:
    """The instants (UTC) at which the wall clock in `zone` reaches `minute` on `day`: one
    usually, two when that time occurs twice (fall back), and the moment the clock jumps past it
    when it does not occur (spring forward)."""
    if minute >= _DAY:
        day, minute = day + dt.timedelta(days=1), minute - _DAY
    naive = dt.datetime.combine(day, dt.time(minute // 60, minute % 60))
    found = set()
    for fold in (0, 1):
        aware = naive.replace(tzinfo=zone, fold=fold)
        utc = aware.astimezone(_UTC)
        if utc.astimezone(zone).replace(tzinfo=None) == naive:
            found.add(utc)
    if found:
        return found
    # In a gap: the clock jumps from before `naive` to after it between these two readings
    # (transitions fall on whole seconds).
    readings = (
        naive.replace(tzinfo=zone, fold=1).astimezone(_UTC),
        naive.replace(tzinfo=zone, fold=0).astimezone(_UTC),
    )
    lo, hi = (int(t.timestamp()) for t in sorted(readings))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _wall(mid, zone) >= naive:
            hi = mid
        else:
            lo = mid
    return {dt.datetime.fromtimestamp(lo if _wall(lo, zone) >= naive else hi, _UTC)}


def _wall(timestamp: int, zone: ZoneInfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, zone).replace(tzinfo=None)


def parse_windows(texts: Iterable[str], *, flag: str = "--window") -> Schedule | None:
    """A schedule from window texts (None for none). Raises InvalidValueError naming the two
    windows that overlap, or the one that is empty or reversed."""
    windows = [parse_window(text, flag=flag) for text in texts]
    if not windows:
        return None
    for i, a in enumerate(windows):
        for b in windows[i + 1 :]:
            shared = sorted(a.days & b.days)
            start, end = max(a.start, b.start), min(a.end, b.end)
            if shared and start < end:
                raise InvalidValueError(
                    f"{flag} {a.text!r} and {flag} {b.text!r} overlap on "
                    f"{_days_text(frozenset(shared))} ({_hhmm(start)}-{_hhmm(end)}); "
                    "give each hour once"
                )
    return Schedule(windows)


__all__ = [
    "DAY_NAMES",
    "Opening",
    "Schedule",
    "Window",
    "parse_window",
    "parse_windows",
]
