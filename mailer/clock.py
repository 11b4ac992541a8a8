"""Time, injected: the one `utcnow` and the `Clock` type that code depending on the time takes.

Tests pass a clock they move by hand instead of sleeping. Imports nothing of mailer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

# A function returning the current time, aware and in UTC.
Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


__all__ = ["Clock", "utcnow"]
