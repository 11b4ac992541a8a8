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
import re
from dataclasses import dataclass
from typing import Protocol

from mailer.models import EventKind, MessageStatus
from mailer.outbox import NextState
from mailer.transport import Outcome, OutcomeKind


@dataclass(frozen=True, kw_only=True)
class SendPolicy:
    """The knobs a careful operator would rarely touch; tests turn them down."""

    # Letters claimed at once. After a crash the claims never handed over go back to the queue
    # (see journal.py), so a batch costs nothing in doubt; it is kept small because another
    # machine recovering a dead sender cannot read its journal and must treat every claim of it
    # as possibly sent.
    batch_size: int = 100
    # Under a --rate a claim takes about this many seconds of sending, so claims stay young.
    claim_horizon: float = 1.0
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
    # The heartbeat renews the sender's lease every `heartbeat` seconds for `lease`; another
    # process recovers a sender's claims only once its lease has expired (or, on this machine,
    # its process is provably gone). No letter is handed over within `lease_margin` of the end
    # of the lease, so a sender cut off from the database (or a laptop that slept) never hands
    # over a letter someone else may have recovered. The lease outlasts `db_outage` with room.
    heartbeat: float = 5.0
    lease: dt.timedelta = dt.timedelta(seconds=120)
    lease_margin: dt.timedelta = dt.timedelta(seconds=15)
    # How long a sender waits for an unreachable (or locked) database to come back, handing
    # nothing over and keeping its results, before it gives up.
    db_outage: float = 60.0
    # A database step that takes longer than this (a lock held by another process, a hung
    # connection) stops the handing over until it is through: results must keep up.
    db_stall: float = 1.0
    # How often the letters claimed and not yet handed over are checked against suppressions
    # added since their claim (the claim itself checks them too).
    suppression_poll: float = 0.5
    # The bounce spike is judged at most this often while hard bounces come in.
    spike_check: float = 2.0
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
    BOUNCE_SPIKE = "bounce-spike"  # the campaign's hard bounces passed the threshold: held
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
    return NextState(
        status=MessageStatus.FAILED,
        event=EventKind.FAILED,
        detail=detail,
        hard_bounce=is_hard_bounce(outcome),
    )


# RFC 3463 subjects that say the address itself is bad: 5.1.1 bad mailbox, 5.1.6 mailbox has
# moved, 5.1.10 the domain accepts no mail (null MX, RFC 7505). A policy refusal (5.7.x), a
# full mailbox (5.2.2) or a message too big (5.3.4) says nothing against the address.
_BAD_ADDRESS_STATUS = re.compile(r"5\.1\.(?:1|6|10)(?!\d)")
_ENHANCED_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?!\d)")
# Without an enhanced status code, only unmistakable words count.
_BAD_ADDRESS_WORDS = re.compile(
    r"no such (?:user|mailbox|recipient|address)|user unknown|unknown user|"
    r"recipient (?:address )?unknown|unknown recipient|mailbox (?:not found|does not exist)|"
    r"(?:user|mailbox|address|recipient) does not exist",
    re.IGNORECASE,
)


def is_hard_bounce(outcome: Outcome) -> bool:
    """A permanent refusal that says the address does not exist (a 5.1.1-class answer, at RCPT
    or after DATA): the address is suppressed as `hard_bounce` with the server's answer."""
    if outcome.kind is not OutcomeKind.PERMANENT or outcome.code not in (550, 551, 553, 554):
        return False
    reply = outcome.reply.lstrip()
    enhanced = _ENHANCED_STATUS.match(reply)
    if enhanced is not None:
        return _BAD_ADDRESS_STATUS.fullmatch(enhanced.group()) is not None
    return _BAD_ADDRESS_WORDS.search(reply) is not None


__all__ = ["RateLimiter", "SendPolicy", "StopReason", "is_hard_bounce", "next_state"]
