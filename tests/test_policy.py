"""What follows an attempt: `policy.next_state`, a pure function, tested without a database."""

from __future__ import annotations

import datetime as dt

import pytest

from mailer.models import EventKind, MessageStatus
from mailer.outbox import NextState
from mailer.policy import SendPolicy, StopReason, is_hard_bounce, next_state
from mailer.transport import Outcome, OutcomeKind

NOW = dt.datetime(2022, 3, 14, 12, 0, tzinfo=dt.UTC)
POLICY = SendPolicy(
    max_attempts=5, backoff_base=dt.timedelta(minutes=1), backoff_cap=dt.timedelta(minutes=10)
)


def outcome(kind: OutcomeKind, code: int | None, reply: str) -> Outcome:
    return Outcome(kind=kind, code=code, reply=reply, via="mx.example.org:25")


def test_accepted_is_sent_with_the_servers_answer() -> None:
    state = next_state(
        outcome(OutcomeKind.ACCEPTED, 250, "2.0.0 Ok: queued as 4711"),
        attempts=1,
        policy=POLICY,
        now=NOW,
    )
    assert state == NextState(
        status=MessageStatus.SENT, event=EventKind.SENT, detail="2.0.0 Ok: queued as 4711"
    )


def test_a_4xx_is_retried_later_with_the_attempt_and_time_in_the_log() -> None:
    state = next_state(
        outcome(OutcomeKind.TRANSIENT, 451, "4.3.0 try later"), attempts=1, policy=POLICY, now=NOW
    )
    assert state.status is MessageStatus.RETRY
    assert state.event is EventKind.DEFERRED
    assert state.next_attempt_at == NOW + dt.timedelta(minutes=1)
    assert state.detail == "4.3.0 try later (attempt 1; next at 2022-03-14 12:01:00 UTC)"


def test_backoff_doubles_with_each_attempt_up_to_the_cap() -> None:
    policy = SendPolicy(
        max_attempts=20, backoff_base=dt.timedelta(minutes=1), backoff_cap=dt.timedelta(minutes=10)
    )
    waits = []
    for attempts in range(1, 8):
        state = next_state(
            outcome(OutcomeKind.TRANSIENT, 421, "busy"), attempts=attempts, policy=policy, now=NOW
        )
        assert state.next_attempt_at is not None
        waits.append(state.next_attempt_at - NOW)
    assert waits == [dt.timedelta(minutes=m) for m in (1, 2, 4, 8, 10, 10, 10)]
    # Far past the cap the wait stays capped (no overflow on the way).
    assert policy.backoff(10_000) == dt.timedelta(minutes=10)


def test_a_4xx_at_the_last_attempt_gives_up() -> None:
    before = next_state(
        outcome(OutcomeKind.TRANSIENT, 452, "mailbox full"), attempts=4, policy=POLICY, now=NOW
    )
    assert before.status is MessageStatus.RETRY
    last = next_state(
        outcome(OutcomeKind.TRANSIENT, 452, "mailbox full"), attempts=5, policy=POLICY, now=NOW
    )
    assert last == NextState(
        status=MessageStatus.FAILED,
        event=EventKind.FAILED,
        detail="mailbox full (gave up after 5 attempts)",
    )


def test_a_5xx_fails_at_once_whatever_the_attempt() -> None:
    for attempts in (1, 3):
        state = next_state(
            outcome(OutcomeKind.PERMANENT, 550, "5.1.1 no such user"),
            attempts=attempts,
            policy=POLICY,
            now=NOW,
        )
        assert state == NextState(
            status=MessageStatus.FAILED,
            event=EventKind.FAILED,
            detail="5.1.1 no such user",
            hard_bounce=True,
        )
        policy_refusal = next_state(
            outcome(OutcomeKind.PERMANENT, 554, "5.7.1 relay access denied"),
            attempts=attempts,
            policy=POLICY,
            now=NOW,
        )
        assert policy_refusal.status is MessageStatus.FAILED and not policy_refusal.hard_bounce


@pytest.mark.parametrize(
    ("code", "reply", "hard"),
    [
        (550, "5.1.1 <mayor@example.org>: Recipient address rejected: User unknown", True),
        (550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found", True),
        (551, "5.1.6 mailbox has moved", True),
        (553, "5.1.1 bad destination mailbox", True),
        (550, "No such user here", True),
        (550, "user unknown", True),
        (550, "5.7.1 mailbox unavailable: message refused as spam", False),
        (552, "5.2.2 mailbox full", False),
        (554, "5.7.1 no such user -- just kidding, policy", False),
        (550, "mailbox unavailable", False),
        (550, "5.1.12 something else", False),
        (450, "4.1.1 try later", False),
    ],
)
def test_only_answers_that_say_the_address_does_not_exist_are_hard_bounces(
    code: int, reply: str, hard: bool
) -> None:
    kind = OutcomeKind.TRANSIENT if code < 500 else OutcomeKind.PERMANENT
    assert is_hard_bounce(outcome(kind, code, reply)) is hard


def test_an_unknown_outcome_is_uncertain_and_has_no_retry_time() -> None:
    state = next_state(
        outcome(OutcomeKind.UNCERTAIN, None, "connection lost after DATA"),
        attempts=1,
        policy=POLICY,
        now=NOW,
    )
    assert state == NextState(
        status=MessageStatus.UNCERTAIN,
        event=EventKind.UNCERTAIN,
        detail="connection lost after DATA",
    )
    assert state.next_attempt_at is None


def test_stop_reasons_keep_their_words() -> None:
    # The words are what `send`'s messages and older callers compare against.
    assert [r.value for r in StopReason] == [
        "limit",
        "daily-cap",
        "paused",
        "interrupted",
        "systemic",
        "bounce-spike",
        "error",
        "held",
    ]
    assert StopReason.DAILY_CAP == "daily-cap"
