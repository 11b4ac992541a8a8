"""Time, injected: the one `utcnow`, the `Clock` type that code depending on the time takes, and
the `Sleeper` that waits for a time on that clock.

Tests pass a clock they move by hand instead of sleeping, and a sleeper that moves it. Imports
nothing of mailer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable

# A function returning the current time, aware and in UTC.
Clock = Callable[[], dt.datetime]
# Waits until the clock shows the given time (a test's sleeper just moves its clock there).
Sleeper = Callable[[dt.datetime], Awaitable[None]]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def sleeper_for(clock: Clock) -> Sleeper:
    """A sleeper that really waits until `clock` shows the time (a little at a time, so a clock
    that jumps, or a laptop that slept, is noticed)."""

    async def sleep(until: dt.datetime) -> None:
        while (left := (until - clock()).total_seconds()) > 0:
            await asyncio.sleep(min(left, 60.0))

    return sleep


__all__ = ["Clock", "Sleeper", "sleeper_for", "utcnow"]
