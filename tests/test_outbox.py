"""The outbox verbs on a real SQLite file and on real PostgreSQL (each dialect has its own fast
paths): every state change comes with its event, so the log explains every message's state."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from smtp_server import seed_campaign
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session

from mailer import campaigns, db, outbox, senders
from mailer.errors import ClaimsLost, InvalidValueError, NotFoundError
from mailer.identity import Actor
from mailer.models import (
    Campaign,
    CampaignStatus,
    Contact,
    Event,
    EventKind,
    Message,
    MessageStatus,
    Suppression,
)
from mailer.outbox import Attempted, Claim, NextState, Released, Unbuildable

NOW = dt.datetime(2022, 3, 14, 12, 0, tzinfo=dt.UTC)
SLUG = "appeal"
ACTOR = Actor(user="olena", host="office.example.org", pid=4242)

# The state each event leaves its message in: the last event of a message must explain its state.
STATE_AFTER = {
    EventKind.QUEUED: MessageStatus.QUEUED,
    EventKind.REQUEUED: MessageStatus.QUEUED,
    EventKind.CLAIMED: MessageStatus.SENDING,
    EventKind.SENT: MessageStatus.SENT,
    EventKind.DEFERRED: MessageStatus.RETRY,
    EventKind.FAILED: MessageStatus.FAILED,
    EventKind.SKIPPED: MessageStatus.SKIPPED,
    EventKind.UNCERTAIN: MessageStatus.UNCERTAIN,
}


@dataclass
class Store:
    engine: Engine
    root: Path
    emails: list[str]

    @property
    def campaign(self) -> Campaign:
        with Session(self.engine) as s:
            campaign = campaigns.get_campaign(s, SLUG)
            s.expunge(campaign)
            return campaign

    def messages(self) -> dict[str, Message]:
        with Session(self.engine) as s:
            rows = s.execute(select(Contact.email, Message).join(Message.contact)).all()
        return {email: m for email, m in rows}

    def events(self, kind: EventKind | None = None) -> list[Event]:
        with Session(self.engine) as s:
            # The letters' events; audit events (the campaign's creation) name no letter.
            query = select(Event).where(Event.message_id.is_not(None)).order_by(Event.id)
            if kind is not None:
                query = query.where(Event.kind == kind.value)
            return list(s.scalars(query))

    def statuses(self) -> dict[str, int]:
        counts = outbox.status_counts(self.engine, campaign_id=self.campaign.id)
        return {k: n for k, n in counts.items() if n}

    def assert_log_explains_every_state(self) -> None:
        """Promise 2: each message's last event is the change that put it in its state."""
        last: dict[int, str] = {}
        for event in self.events():
            assert event.message_id is not None
            last[event.message_id] = event.kind
        for message in self.messages().values():
            assert message.id in last, f"message {message.id} has no event"
            assert STATE_AFTER[EventKind(last[message.id])].value == message.status, (
                message.id,
                last[message.id],
                message.status,
            )

    def queue(self) -> outbox.Queued:
        return outbox.queue_audience(self.engine, campaign=self.campaign, now=NOW, chunk=4)

    def claim(self, n: int, *, run: str = "run-a", now: dt.datetime = NOW) -> list[Claim]:
        due = outbox.Due(self.engine, campaign_id=self.campaign.id)
        rows = due.peek(n, skip=frozenset(), now=now)
        return outbox.claim(
            self.engine,
            campaign_id=self.campaign.id,
            ids=[mid for mid, _ in rows],
            sender_id=run,
            now=now,
        ).claims


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        root: Path = request.getfixturevalue("workspace")
        engine = db.make_engine(f"sqlite:///{root / 'mailer.db'}")
    else:
        engine = db.make_engine(request.getfixturevalue("pg_url"))
        db.upgrade(engine)
        root = tmp_path / "ws"
        root.mkdir()
    try:
        emails = seed_campaign(engine, root, count=10)
        yield Store(engine=engine, root=root, emails=emails)
    finally:
        engine.dispose()


def attempted(claim: Claim, state: NextState, *, code: int | None, reply: str) -> Attempted:
    return Attempted(
        claim=claim,
        state=state,
        code=code,
        reply=reply,
        via="mx.example.org:25",
        message_id=f"<{claim.id}@example.org>",
        language="en",
        subject="An appeal",
        body_hash="ab" * 32,
    )


# --------------------------------------------------------------------------- queue and skip


def test_queue_streams_the_audience_skips_the_invalid_and_the_suppressed(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            insert(Contact),
            [
                {
                    "email": "not an address@example.org",
                    "attributes": {},
                    "tags": [],
                    "created_at": NOW,
                    "updated_at": NOW,
                }
            ],
        )
        conn.execute(
            insert(Suppression),
            [{"email": store.emails[3], "reason": "manual", "source": "test", "created_at": NOW}],
        )
    # 11 contacts in pages of 4: three pages, each its own transaction.
    # The suppressed contact is queued, then skipped (with the suppression's reason).
    assert store.queue() == outbox.Queued(queued=10, skipped=2)
    rows = store.messages()
    assert rows["not an address@example.org"].status == "skipped"
    assert rows[store.emails[3]].status == "skipped"
    assert {m.status for e, m in rows.items() if e in store.emails and e != store.emails[3]} == {
        "queued"
    }
    skipped = {e.detail for e in store.events(EventKind.SKIPPED)}
    assert skipped == {
        "invalid address 'not an address@example.org': contains a space or line break",
        "suppressed: manual (test)",
    }
    assert len(store.events(EventKind.QUEUED)) == 10
    # Again: nothing new, nothing written twice.
    assert store.queue() == outbox.Queued(queued=0, skipped=0)
    assert len(store.events()) == 12
    store.assert_log_explains_every_state()


def test_a_contact_added_later_is_queued_on_the_next_queue(store: Store) -> None:
    store.queue()
    more = seed_campaign(store.engine, store.root, count=3, start=100, create=False)
    assert store.queue() == outbox.Queued(queued=3, skipped=0)
    assert {store.messages()[e].status for e in more} == {"queued"}
    store.assert_log_explains_every_state()


def test_a_suppression_after_queueing_skips_what_is_not_sent_yet(store: Store) -> None:
    store.queue()
    store.claim(1)
    with store.engine.begin() as conn:
        conn.execute(
            insert(Suppression),
            [
                {"email": e, "reason": "unsubscribed", "source": None, "created_at": NOW}
                for e in store.emails[:2]
            ],
        )
    # The first is being sent (its claim is out): only the second can still be held back.
    assert outbox.skip_suppressed(store.engine, campaign_id=store.campaign.id, now=NOW) == 1
    rows = store.messages()
    assert (rows[store.emails[0]].status, rows[store.emails[1]].status) == ("sending", "skipped")
    assert [e.detail for e in store.events(EventKind.SKIPPED)] == ["suppressed: unsubscribed"]
    store.assert_log_explains_every_state()


# --------------------------------------------------------------------------- claims and results


def test_claim_takes_only_what_is_still_due_and_logs_each_claim(store: Store) -> None:
    store.queue()
    claims = store.claim(4, run="run-a")
    assert [c.attempts for c in claims] == [1, 1, 1, 1]
    assert [c.id for c in claims] == sorted(c.id for c in claims)
    rows = store.messages()
    assert [rows[e].status for e in store.emails[:5]] == ["sending"] * 4 + ["queued"]
    assert {rows[e].claimed_by for e in store.emails[:4]} == {"run-a"}
    logged = store.events(EventKind.CLAIMED)
    assert [(e.message_id, e.detail, e.via) for e in logged] == [
        (c.id, "attempt 1", "run-a") for c in claims
    ]
    # Another sender that peeked the same rows gets none of them.
    again = outbox.claim(
        store.engine,
        campaign_id=store.campaign.id,
        ids=[c.id for c in claims],
        sender_id="run-b",
        now=NOW,
    )
    assert again.claims == [] and not again.capped and again.skipped == 0
    assert len(store.events(EventKind.CLAIMED)) == 4
    store.assert_log_explains_every_state()


def test_each_kind_of_result_is_recorded_with_its_event(store: Store) -> None:
    store.queue()
    sent, retry, refused, unknown, released, unbuildable = store.claim(6)
    later = NOW + dt.timedelta(minutes=5)
    results: list[outbox.Result] = [
        attempted(
            sent,
            NextState(status=MessageStatus.SENT, event=EventKind.SENT, detail="2.0.0 queued"),
            code=250,
            reply="2.0.0 queued",
        ),
        attempted(
            retry,
            NextState(
                status=MessageStatus.RETRY,
                event=EventKind.DEFERRED,
                detail="4.3.0 later (attempt 1)",
                next_attempt_at=later,
            ),
            code=451,
            reply="4.3.0 later",
        ),
        attempted(
            refused,
            NextState(status=MessageStatus.FAILED, event=EventKind.FAILED, detail="5.1.1 unknown"),
            code=550,
            reply="5.1.1 unknown",
        ),
        attempted(
            unknown,
            NextState(status=MessageStatus.UNCERTAIN, event=EventKind.UNCERTAIN, detail="cut"),
            code=None,
            reply="cut",
        ),
        Released(claim=released, reason="interrupted", message_id="<r@example.org>"),
        Unbuildable(claim=unbuildable, error="cannot build the message: no subject"),
    ]
    # Recorded with the next claim, in its transaction.
    (next_claim,) = outbox.claim(
        store.engine,
        campaign_id=store.campaign.id,
        ids=[m.id for e, m in store.messages().items() if e == store.emails[6]],
        sender_id="run-a",
        now=NOW,
        results=results,
    ).claims
    rows = {m.id: m for m in store.messages().values()}
    got = {
        c.id: (rows[c.id].status, rows[c.id].attempts, rows[c.id].smtp_code, rows[c.id].smtp_reply)
        for c in (sent, retry, refused, unknown, released, unbuildable)
    }
    assert got == {
        sent.id: ("sent", 1, 250, "2.0.0 queued"),
        retry.id: ("retry", 1, 451, "4.3.0 later"),
        refused.id: ("failed", 1, 550, "5.1.1 unknown"),
        unknown.id: ("uncertain", 1, None, "cut"),
        # Never handed over: the attempt does not count.
        released.id: ("queued", 0, None, None),
        unbuildable.id: ("failed", 1, None, "cannot build the message: no subject"),
    }
    assert rows[sent.id].sent_at == NOW
    assert rows[sent.id].message_id == f"<{sent.id}@example.org>"
    assert (rows[sent.id].language, rows[sent.id].subject) == ("en", "An appeal")
    assert rows[retry.id].sent_at is None and rows[retry.id].next_attempt_at == later
    assert rows[released.id].message_id == "<r@example.org>"
    assert all(rows[c.id].claimed_by is None for c in (sent, retry, released, unbuildable))
    assert rows[next_claim.id].status == "sending"
    after = {
        e.message_id: (e.kind, e.smtp_code, e.detail, e.via)
        for e in store.events()
        if e.kind != "claimed" and e.kind != "queued"
    }
    assert after == {
        sent.id: ("sent", 250, "2.0.0 queued", "mx.example.org:25"),
        retry.id: ("deferred", 451, "4.3.0 later (attempt 1)", "mx.example.org:25"),
        refused.id: ("failed", 550, "5.1.1 unknown", "mx.example.org:25"),
        unknown.id: ("uncertain", None, "cut", "mx.example.org:25"),
        released.id: ("requeued", None, "released unsent, attempt 1 not made (interrupted)", None),
        unbuildable.id: ("failed", None, "cannot build the message: no subject", None),
    }
    store.assert_log_explains_every_state()


def test_record_alone_and_a_retry_is_claimed_again_once_due(store: Store) -> None:
    store.queue()
    (first,) = store.claim(1)
    later = NOW + dt.timedelta(minutes=2)
    state = NextState(
        status=MessageStatus.RETRY, event=EventKind.DEFERRED, detail="busy", next_attempt_at=later
    )
    outbox.record(
        store.engine,
        campaign_id=store.campaign.id,
        results=[attempted(first, state, code=421, reply="busy")],
        now=NOW,
    )
    due = outbox.Due(store.engine, campaign_id=store.campaign.id)
    # Not due yet: the plain queue comes first, the retry is left out.
    assert first.id not in [mid for mid, _ in due.peek(20, skip=frozenset(), now=NOW)]
    # Due: a retry goes before the plain queue, and its claim counts the second attempt.
    fresh = outbox.Due(store.engine, campaign_id=store.campaign.id)
    assert fresh.peek(1, skip=frozenset(), now=later)[0][0] == first.id
    (second,) = outbox.claim(
        store.engine, campaign_id=store.campaign.id, ids=[first.id], sender_id="run-b", now=later
    ).claims
    assert (second.id, second.attempts) == (first.id, 2)
    assert store.events(EventKind.CLAIMED)[-1].detail == "attempt 2"
    store.assert_log_explains_every_state()


def test_the_peek_reads_in_claim_order_and_notices_new_retries(store: Store) -> None:
    store.queue()
    due = outbox.Due(store.engine, campaign_id=store.campaign.id)
    ids = [mid for mid, _ in due.peek(3, skip=frozenset(), now=NOW)]
    assert ids == sorted(ids)
    # The cursor moves on: the next peek starts after what was peeked.
    following = [mid for mid, _ in due.peek(3, skip=frozenset(ids), now=NOW)]
    assert min(following) > max(ids)
    # A message of the first peek is claimed and deferred to be due at once.
    (claim,) = outbox.claim(
        store.engine, campaign_id=store.campaign.id, ids=[ids[0]], sender_id="r", now=NOW
    ).claims
    outbox.record(
        store.engine,
        campaign_id=store.campaign.id,
        results=[
            attempted(
                claim,
                NextState(
                    status=MessageStatus.RETRY,
                    event=EventKind.DEFERRED,
                    detail="later",
                    next_attempt_at=NOW,
                ),
                code=451,
                reply="later",
            )
        ],
        now=NOW,
    )
    # The peek had found no retries and remembers that for a while; told, it looks again.
    due.expect_retries()
    skip = frozenset(ids[1:] + following)
    assert due.peek(1, skip=skip, now=NOW)[0][0] == claim.id
    assert due.any(now=NOW)


def test_nothing_due_when_everything_is_out(store: Store) -> None:
    store.queue()
    store.claim(10)
    due = outbox.Due(store.engine, campaign_id=store.campaign.id)
    assert due.peek(5, skip=frozenset(), now=NOW) == []
    assert not due.any(now=NOW)


# --------------------------------------------------------------------------- recovery and requeue


def test_the_claims_of_a_gone_sender_are_settled_once_and_a_live_one_is_left_alone(
    store: Store,
) -> None:
    store.queue()
    campaign_id = store.campaign.id
    lease = dt.timedelta(minutes=2)
    for name in ("gone", "live"):
        senders.register(
            store.engine,
            identity=senders.SenderIdentity(id=name, actor=Actor.current()),
            campaign_id=campaign_id,
            now=NOW,
            lease=lease,
            rate=None,
        )
    gone = store.claim(3, run="gone")
    live = store.claim(1, run="live")
    legacy = store.claim(1, run="host:4242:cafe")
    holders = {h.id: h for h in senders.holders(store.engine, campaign_id=campaign_id)}
    assert set(holders) == {"gone", "live", "host:4242:cafe"}
    later = NOW + dt.timedelta(minutes=3)
    # The live sender renewed its lease; the other did not; the legacy claim has no sender.
    assert senders.renew(
        store.engine,
        sender_id="live",
        now=NOW + dt.timedelta(minutes=2),
        lease=lease,
        holding=1,
        sent=0,
    )
    holders = {h.id: h for h in senders.holders(store.engine, campaign_id=campaign_id)}
    assert senders.gone(holders["live"], now=later) is None
    verdict = senders.gone(holders["gone"], now=later)
    assert verdict is not None and verdict.by_lease and "lease ran out" in verdict.why
    legacy_verdict = senders.gone(holders["host:4242:cafe"], now=later)
    assert legacy_verdict is not None and not legacy_verdict.by_lease

    uncertain = NextState(status=MessageStatus.UNCERTAIN, event=EventKind.UNCERTAIN, detail="?")
    results: list[outbox.Result] = [
        Released(claim=gone[0], reason="gone stopped before handing it over"),
        attempted(gone[1], uncertain, code=None, reply="?"),
        attempted(
            gone[2],
            NextState(status=MessageStatus.SENT, event=EventKind.SENT, detail="ok"),
            code=250,
            reply="ok",
        ),
    ]
    # Not yet expired at NOW: settling by lease writes nothing.
    assert (
        outbox.settle_for_gone(
            store.engine,
            campaign_id=campaign_id,
            holder="gone",
            results=results,
            now=NOW,
            actor="tester",
            why="lease",
            lease_expired=True,
        )
        is None
    )
    assert outbox.claims_held_by(store.engine, campaign_id=campaign_id, holder="gone") == gone
    settled = outbox.settle_for_gone(
        store.engine,
        campaign_id=campaign_id,
        holder="gone",
        results=results,
        now=later,
        actor="tester",
        why="its lease ran out",
        lease_expired=True,
    )
    assert settled == 3
    # A second recoverer finds nothing left to settle.
    assert (
        outbox.settle_for_gone(
            store.engine,
            campaign_id=campaign_id,
            holder="gone",
            results=results,
            now=later,
            actor="tester",
            why="its lease ran out",
            lease_expired=True,
        )
        == 0
    )
    rows = {m.id: m for m in store.messages().values()}
    assert [rows[c.id].status for c in gone] == ["queued", "uncertain", "sent"]
    assert rows[live[0].id].status == "sending" and rows[legacy[0].id].status == "sending"
    # The gone sender may not write any more: its claims are someone else's business now.
    with pytest.raises(ClaimsLost, match="declared gone by tester"):
        outbox.claim(store.engine, campaign_id=campaign_id, ids=[], sender_id="gone", now=later)
    assert [e.actor for e in store.events(EventKind.UNCERTAIN)] == ["tester"]
    store.assert_log_explains_every_state()


def test_a_systemic_streak_goes_back_to_the_queue(store: Store) -> None:
    store.queue()
    claims = store.claim(3)
    refused = NextState(status=MessageStatus.FAILED, event=EventKind.FAILED, detail="554 relay")
    outbox.record(
        store.engine,
        campaign_id=store.campaign.id,
        results=[attempted(c, refused, code=554, reply="relay") for c in claims],
        now=NOW,
    )
    moved = outbox.requeue_streak(
        store.engine, campaign_id=store.campaign.id, ids=[c.id for c in claims[:2]], now=NOW
    )
    assert moved == 2
    assert store.statuses() == {"queued": 9, "failed": 1}
    assert [e.detail for e in store.events(EventKind.REQUEUED)] == [
        "refused as part of a systemic failure; back in the queue"
    ] * 2
    assert outbox.requeue_streak(store.engine, campaign_id=store.campaign.id, ids=[], now=NOW) == 0
    store.assert_log_explains_every_state()


def test_retry_requeues_what_was_asked_and_reopens_a_done_campaign(store: Store) -> None:
    store.queue()
    failed, uncertain, *rest = store.claim(10)
    results: list[outbox.Result] = [
        attempted(
            failed,
            NextState(status=MessageStatus.FAILED, event=EventKind.FAILED, detail="550"),
            code=550,
            reply="no",
        ),
        attempted(
            uncertain,
            NextState(status=MessageStatus.UNCERTAIN, event=EventKind.UNCERTAIN, detail="cut"),
            code=None,
            reply="cut",
        ),
        *(
            attempted(
                c,
                NextState(status=MessageStatus.SENT, event=EventKind.SENT, detail="ok"),
                code=250,
                reply="ok",
            )
            for c in rest
        ),
    ]
    outbox.record(store.engine, campaign_id=store.campaign.id, results=results, now=NOW)
    totals = outbox.finish_sending(
        store.engine, campaign_id=store.campaign.id, paused=False, now=NOW
    )
    assert (totals["sent"], totals["failed"], totals["uncertain"]) == (8, 1, 1)
    assert store.campaign.status == CampaignStatus.DONE.value
    with pytest.raises(InvalidValueError, match="say what to retry"):
        outbox.requeue(store.engine, slug=SLUG, failed=False, uncertain=False, now=NOW)
    with pytest.raises(NotFoundError, match="no campaign 'nope'"):
        outbox.requeue(store.engine, slug="nope", failed=True, uncertain=False, now=NOW)
    moved = outbox.requeue(store.engine, slug=SLUG, failed=True, uncertain=False, now=NOW)
    assert moved == outbox.Requeued(moved={"failed": 1}, suppressed=0)
    assert store.statuses() == {"sent": 8, "uncertain": 1, "queued": 1}
    assert store.campaign.status == CampaignStatus.SENDING.value
    row = {m.id: m for m in store.messages().values()}[failed.id]
    # The attempt count goes on: the log and the message agree on how often it was tried.
    assert (row.attempts, row.next_attempt_at, row.claimed_by) == (1, None, None)
    moved = outbox.requeue(store.engine, slug=SLUG, failed=True, uncertain=True, now=NOW)
    assert moved == outbox.Requeued(moved={"failed": 0, "uncertain": 1}, suppressed=0)
    assert [e.detail for e in store.events(EventKind.REQUEUED)] == [
        "mailer retry: was failed after 1 attempt(s)",
        "mailer retry: was uncertain after 1 attempt(s)",
    ]
    store.assert_log_explains_every_state()


# --------------------------------------------------------------------------- a send's start and end


def test_start_freezes_the_templates_and_refuses_a_cancelled_campaign(store: Store) -> None:
    campaign = outbox.start_sending(
        store.engine, slug=SLUG, templates_dir=store.root / "templates", now=NOW
    )
    assert campaign.status == "sending" and campaign.started_at == NOW
    assert campaign.template_sources
    later = outbox.start_sending(
        store.engine,
        slug=SLUG,
        templates_dir=store.root / "templates",
        now=NOW + dt.timedelta(days=1),
    )
    assert later.started_at == NOW  # the first start is kept
    with store.engine.begin() as conn:
        conn.execute(update(Campaign).values(status=CampaignStatus.CANCELLED.value))
    with pytest.raises(InvalidValueError, match="cancelled"):
        outbox.start_sending(
            store.engine, slug=SLUG, templates_dir=store.root / "templates", now=NOW
        )


def test_start_refuses_a_held_campaign_as_send_does_and_never_lifts_the_hold(
    store: Store,
) -> None:
    """One hold check: start_sending refuses what ensure_sendable refuses, with the same words,
    and only `send --acknowledge-bounces` (ensure_sendable) lifts a bounce-spike hold."""
    from mailer.errors import CampaignHeld

    templates = store.root / "templates"
    outbox.start_sending(store.engine, slug=SLUG, templates_dir=templates, now=NOW)
    with Session(store.engine) as s, s.begin():
        assert outbox.pause_for_bounce_spike(
            s, campaign_id=store.campaign.id, reason="bounce spike: 9 of 30", now=NOW
        )
    for refuse in (
        lambda: outbox.start_sending(store.engine, slug=SLUG, templates_dir=templates, now=NOW),
        lambda: outbox.ensure_sendable(
            store.engine, slug=SLUG, acknowledge_bounces=False, actor=ACTOR, now=NOW
        ),
    ):
        with pytest.raises(CampaignHeld, match=r"bounce spike: 9 of 30.*--acknowledge-bounces"):
            refuse()
    assert (store.campaign.status, store.campaign.held) == ("paused", True)
    outbox.ensure_sendable(store.engine, slug=SLUG, acknowledge_bounces=True, actor=ACTOR, now=NOW)
    started = outbox.start_sending(store.engine, slug=SLUG, templates_dir=templates, now=NOW)
    assert (started.status, started.held) == ("sending", False)
    with Session(store.engine) as s:
        acknowledged = s.execute(
            select(Event.detail, Event.actor).where(
                Event.kind == EventKind.CAMPAIGN_RESUMED.value
            )
        ).all()
    assert acknowledged == [
        (f"campaign {SLUG}: bounce spike acknowledged (send --acknowledge-bounces)", ACTOR.label)
    ]


def test_finish_says_done_paused_or_sending(store: Store) -> None:
    store.queue()
    campaign_id = store.campaign.id
    outbox.finish_sending(store.engine, campaign_id=campaign_id, paused=True, now=NOW)
    assert store.campaign.status == "paused"
    outbox.finish_sending(store.engine, campaign_id=campaign_id, paused=False, now=NOW)
    assert store.campaign.status == "sending"
    claims = store.claim(10)
    sent = NextState(status=MessageStatus.SENT, event=EventKind.SENT, detail="ok")
    outbox.record(
        store.engine,
        campaign_id=campaign_id,
        results=[attempted(c, sent, code=250, reply="ok") for c in claims],
        now=NOW,
    )
    later = NOW + dt.timedelta(hours=1)
    totals = outbox.finish_sending(store.engine, campaign_id=campaign_id, paused=True, now=later)
    assert totals["sent"] == 10 and totals["queued"] == 0
    assert (store.campaign.status, store.campaign.finished_at) == ("done", later)


# --------------------------------------------------------------------------- the daily-cap window


def test_the_window_counts_sends_of_the_last_24_hours_and_says_when_the_cap_frees(
    store: Store,
) -> None:
    store.queue()
    sent = NextState(status=MessageStatus.SENT, event=EventKind.SENT, detail="ok")
    for hours in (0, 1, 2):
        (c,) = store.claim(1, now=NOW + dt.timedelta(hours=hours))
        outbox.record(
            store.engine,
            campaign_id=store.campaign.id,
            results=[attempted(c, sent, code=250, reply="ok")],
            now=NOW + dt.timedelta(hours=hours),
        )
    now = NOW + dt.timedelta(hours=3)
    assert outbox.sent_in_window(store.engine, now=now) == (3, NOW)
    # One send over a cap of 2: free again when the second-oldest send is 24 hours old.
    assert outbox.cap_resume_at(store.engine, now=now, cap=2) == NOW + dt.timedelta(hours=25)
    assert outbox.cap_resume_at(store.engine, now=now, cap=3) == NOW + dt.timedelta(hours=24)
    assert outbox.cap_resume_at(store.engine, now=now, cap=4) is None
    # A day later the first send has aged out of the window.
    assert outbox.sent_in_window(store.engine, now=NOW + dt.timedelta(hours=24, minutes=30)) == (
        2,
        NOW + dt.timedelta(hours=1),
    )


def test_settled_contacts_are_those_past_the_queue(store: Store) -> None:
    store.queue()
    claims = store.claim(2)
    with Session(store.engine) as s:
        assert outbox.settled_contacts(s, campaign_id=store.campaign.id) == {
            c.contact_id for c in claims
        }
        emails = outbox.contact_emails(s, [c.contact_id for c in claims] + [999_999])
    assert sorted(emails.values()) == store.emails[:2]
