"""How a send behaves: its knobs (`SendPolicy`), why a run stops (`StopReason`), what a rate
limit must offer (`RateLimiter`), and the pure decision of what follows an attempt
(`next_state`). The place to change the backoff, the give-up rule or the batch size.

It touches no database, reads no clock (the time comes in as `now`) and does no I/O:
everything here is tested without a workspace. Imports the outcome types of `transport` and the `NextState` that
`outbox` writes down; never engine, compose or smtp.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Protocol

from mailer.models import EventKind, MessageStatus
from mailer.outbox import NextState
from mailer.transport import Outcome, OutcomeKind


@dataclass(frozen=True, kw_only=True)
class SendPolicy:
    """The knobs a careful operator would rarely touch; tests turn them down."""

    # Small batches keep the claimed-but-unsent window small: after a crash, every claim of it
    # becomes `uncertain`.
    batch_size: int = 100
    max_attempts: int = 5
    backoff_base: dt.timedelta = dt.timedelta(minutes=1)
    backoff_cap: dt.timedelta = dt.timedelta(hours=2)
    # This many permanent refusals in a row with the very same answer is the server, not the list.
    systemic_streak: int = 10
    error_window: int = 20
    error_ratio: float = 0.5
    record_every: int = 50
    record_interval: float = 0.2
    # A run with at least this many messages due composes them in a worker process (on the
    # other core); below it the worker's start-up (about a second) would cost more than it saves.
    compose_worker_from: int = 2000
    # After a stop, how long in-flight sends may take before they are given up (as uncertain).
    grace: float = 30.0
    # A `sending` claim by another machine is only presumed dead after this long.
    stale_claim: dt.timedelta = dt.timedelta(hours=1)
    # How often a running sender reads its campaign's state (paused or cancelled by anyone).
    state_poll: float = 1.0

    def backoff(self, attempts: int) -> dt.timedelta:
        """The wait after the `attempts`-th attempt was deferred: doubling from the base, capped."""
        doublings = max(0, attempts - 1)
        if doublings >= 32:  # far past any cap, and a timedelta would overflow on the way
            return self.backoff_cap
        return min(self.backoff_base * (1 << doublings), self.backoff_cap)


class StopReason(enum.StrEnum):
    """Why a run stopped before its queue was empty."""

    LIMIT = "limit"  # --limit reached
    DAILY_CAP = "daily-cap"  # --daily-cap reached (rolling 24 hours, all campaigns)
    PAUSED = "paused"  # too many recent messages failed
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM
    SYSTEMIC = "systemic"  # the server, not the list: login refused, unreachable, a refusal streak
    ERROR = "error"  # a fault of mailer's own or of the database
    HELD = "held"  # paused or cancelled in the database (by a person, or a bounce spike)


class RateLimiter(Protocol):
    """A rate limit shared by every connection of a run (transport.TokenBucket is one)."""

    @property
    def rate(self) -> float:
        """Messages per second."""
        ...

    async def acquire(self) -> None:
        """Wait until the next message may go."""
        ...


def next_state(
    outcome: Outcome, *, attempts: int, policy: SendPolicy, now: dt.datetime
) -> NextState:
    """What the transport's answer to the `attempts`-th attempt makes of a message.

    Accepted -> `sent`. A 4xx or a dropped connection -> `retry` after a backoff, or `failed`
    once `policy.max_attempts` attempts were made. A 5xx -> `failed`. A timeout or drop after the
    message itself went out -> `uncertain` (never re-sent on its own)."""
    kind = outcome.kind
    if kind is OutcomeKind.ACCEPTED:
        return NextState(status=MessageStatus.SENT, event=EventKind.SENT, detail=outcome.reply)
    if kind is OutcomeKind.TRANSIENT and attempts < policy.max_attempts:
        at = now + policy.backoff(attempts)
        return NextState(
            status=MessageStatus.RETRY,
            event=EventKind.DEFERRED,
            detail=f"{outcome.reply} (attempt {attempts}; next at {at:%Y-%m-%d %H:%M:%S} UTC)",
            next_attempt_at=at,
        )
    if kind is OutcomeKind.UNCERTAIN:
        return NextState(
            status=MessageStatus.UNCERTAIN, event=EventKind.UNCERTAIN, detail=outcome.reply
        )
    detail = outcome.reply
    if kind is OutcomeKind.TRANSIENT:
        detail = f"{outcome.reply} (gave up after {attempts} attempts)"
    return NextState(status=MessageStatus.FAILED, event=EventKind.FAILED, detail=detail)


__all__ = ["RateLimiter", "SendPolicy", "StopReason", "next_state"]
