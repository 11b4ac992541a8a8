"""The outbox: the only module that writes the `messages` and `events` tables.

Everyone else changes a message's state through the verbs below, never with SQL of their own
(tests/test_quality.py fails if another module writes either table). Each verb that changes
states writes every changed message's event in the same transaction, most of them in the same
statement batch, so promise 2 (every state change is in the send log, with its time and the
server's answer) holds by construction.

The verbs, in the order a send uses them:

    claims_held_by + settle_for_gone (the claims of a sender that is gone, see senders.py) ->
    start_sending -> queue_audience (and skip_suppressed) -> Due.peek -> claim (which also
    records the results gathered since the last claim, skips the newly suppressed, takes the
    daily cap and the campaign's pace, all in the same commit) -> record (and
    pause_on_bounce_spike while hard bounces come in) -> requeue_streak -> finish_sending

and `requeue` for `mailer retry`; `status_counts`, `suppressed_contacts`, `sent_in_window` and
`cap_resume_at` read. A claim or a record by a sender that another process has declared gone
raises ClaimsLost and writes nothing; the one statement that declares a sender gone (in
`senders`) runs here, in the transaction that settles its claims.
What follows an attempt is decided by `mailer.policy.next_state` and arrives here as a
`NextState`; the outbox only writes it down.

The fast paths were measured (benchmarks/RESULTS.md, "Send, round 2") and are kept on purpose:
the statements that run once per message go to the driver directly as multi-row statements (one
driver step each, so the database thread gives up the GIL once per batch, not once per row);
SQLite claims with `json_each` and no RETURNING; results ride along with the next claim.

Imports models, audience (the audience's pages), campaigns (get_campaign, freeze_templates) and
addresses (address_problem). It must not import engine, policy, compose, transport or smtp: the
outbox knows nothing of templates, servers or backoff.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mailer import audience as audience_mod
from mailer import campaigns
from mailer.addresses import address_problem
from mailer.errors import CampaignHeld, CampaignPaused, ClaimsLost, InvalidValueError
from mailer.identity import Actor
from mailer.models import (
    Campaign,
    CampaignStatus,
    Contact,
    Event,
    EventKind,
    Message,
    MessageStatus,
    Sender,
    Suppression,
    SuppressionReason,
)

MESSAGES = cast(Table, Message.__table__)
EVENTS = cast(Table, Event.__table__)
SENDERS = cast(Table, Sender.__table__)

# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True, kw_only=True)
class NextState:
    """What becomes of a message after an attempt (decided by `policy.next_state`): its new
    status, the event that records the change, the event's detail and, for a retry, when."""

    status: MessageStatus
    event: EventKind
    detail: str | None
    next_attempt_at: dt.datetime | None = None
    # A refusal that says the address does not exist (5.1.1): the address is suppressed as
    # `hard_bounce`, with the server's answer, in the transaction that records the result.
    hard_bounce: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """A message this run holds (`sending`): its row, its contact, and which attempt this is."""

    id: int
    contact_id: int
    attempts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempted:
    """A claimed message the transport was given: its next state and the server's answer, and
    what was built (Message-ID, language, subject, body hash) for the send log."""

    claim: Claim
    state: NextState
    code: int | None
    reply: str | None
    via: str | None
    message_id: str | None
    language: str | None
    subject: str | None
    body_hash: str | None
    # When the message was handed to the transport (its `sent_at` if sent); None: the time the
    # result is recorded.
    handed_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Released:
    """A claimed message never handed to the transport: back to `queued`, the attempt not
    counted; `reason` says why the run let it go, `due_at` when it is due again (its window
    closed before it could go: held until the next one opens)."""

    claim: Claim
    reason: str
    message_id: str | None = None
    language: str | None = None
    subject: str | None = None
    body_hash: str | None = None
    due_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unbuildable:
    """A claimed message whose letter could not be built: `failed`, with the reason."""

    claim: Claim
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    """A claimed message not handed over because its address was suppressed after its claim
    (an unsubscribe, `suppress add`): `skipped`, the attempt not counted, with the reason."""

    claim: Claim
    reason: str


Result = Attempted | Released | Unbuildable | Skipped


@dataclass(frozen=True, slots=True, kw_only=True)
class Claimed:
    """What a claim took: the claims (message id order), how many due letters it skipped
    because their address is suppressed now, whether the daily cap left room for fewer than
    asked, and under a pace when the first claimed letter may leave (each next one a
    1/rate later)."""

    claims: list[Claim]
    skipped: int = 0
    # Due letters skipped because another campaign wrote to their contact within the
    # campaign's quiet days.
    quiet: int = 0
    capped: bool = False
    pace_start: dt.datetime | None = None


class Queued(NamedTuple):
    queued: int
    skipped: int


# --------------------------------------------------------------------------- writing


@contextmanager
def _writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction; on SQLite taken with BEGIN IMMEDIATE so two writers never deadlock."""
    with engine.connect() as conn:
        sqlite_db = engine.dialect.name == "sqlite"
        if sqlite_db:
            conn.info["immediate"] = True
        try:
            with conn.begin():
                yield conn
        finally:
            if sqlite_db:
                conn.info.pop("immediate", None)


# The statements that run once per message are sent to the driver directly: SQLAlchemy's
# per-row parameter processing cost more than the database work (see benchmarks/RESULTS.md).
_PLACEHOLDER = {"sqlite": "?", "postgresql": "%s"}
# Rows per multi-row statement: 8 parameters a row stays far below SQLite's 32,766.
_ROWS_A_STATEMENT = 500

# One event row: message, campaign, contact, at, kind, SMTP code, detail, via.
_EventRow = tuple[int, int, int, dt.datetime, str, int | None, str | None, str | None]
_EVENT_COLUMNS = (
    "message_id",
    "campaign_id",
    "contact_id",
    "at",
    "kind",
    "smtp_code",
    "detail",
    "via",
)


def _datetime_to_db(conn: Connection) -> Callable[[dt.datetime | None], Any]:
    # The dialect's own processor: on SQLite it writes the very text SQLAlchemy stores
    # ("... 20:00:00.000000"), so a time compares right against the stored ones (the driver's
    # own "... 20:00:00" sorts before it: a letter due at exactly `now` was not due).
    process = MESSAGES.c.updated_at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
    # A batch carries one or two distinct times (its `now`, a retry's date): convert each once.
    seen: dict[dt.datetime, Any] = {}

    def convert(value: dt.datetime | None) -> Any:
        if value is None or process is None:
            return value
        done = seen.get(value)
        if done is None:
            done = seen[value] = process(value)
        return done

    return convert


def _insert_events(
    conn: Connection, events: Sequence[_EventRow], *, actor: str | None = None
) -> None:
    """The events, each with `actor` (who acted: `user@host pid N`, see identity.py)."""
    if not events:
        return
    ph = _PLACEHOLDER.get(conn.dialect.name)
    if ph is None:
        conn.execute(
            EVENTS.insert(),
            [{**dict(zip(_EVENT_COLUMNS, e, strict=True)), "actor": actor} for e in events],
        )
        return
    to_db = _datetime_to_db(conn)
    # Many rows in one statement: the driver runs it in one step (one release of the GIL, see
    # engine._Run.db_thread) instead of one step per row.
    for start in range(0, len(events), _ROWS_A_STATEMENT):
        chunk = events[start : start + _ROWS_A_STATEMENT]
        values = ", ".join([f"({ph}, {ph}, {ph}, {ph}, {ph}, {ph}, {ph}, {ph}, {ph})"] * len(chunk))
        params: list[Any] = []
        for mid, campaign_id, contact_id, at, kind, code, detail, via in chunk:
            params.extend((mid, campaign_id, contact_id, to_db(at), kind, code, detail, via, actor))
        conn.exec_driver_sql(
            "INSERT INTO events (message_id, campaign_id, contact_id, at, kind, smtp_code, "
            f"detail, via, actor) VALUES {values}",
            tuple(params),
        )


def _insert_messages(
    conn: Connection, rows: Sequence[tuple[int, int, str]], now: dt.datetime
) -> list[tuple[int, int, str]]:
    """New outbox rows (campaign, contact, status) in one multi-row INSERT ... ON CONFLICT DO
    NOTHING RETURNING: only the rows this sender inserted come back (two senders may race)."""
    if not rows:
        return []
    ph = _PLACEHOLDER.get(conn.dialect.name)
    if ph is None:
        # A backend without the driver-level form: no ON CONFLICT either (only SQLite and
        # PostgreSQL are supported; this keeps another dialect working for one sender).
        insert = MESSAGES.insert().returning(
            MESSAGES.c.id, MESSAGES.c.contact_id, MESSAGES.c.status
        )
        values = [
            {
                "campaign_id": campaign_id,
                "contact_id": contact_id,
                "status": status,
                "attempts": 0,
                "queued_at": now,
                "updated_at": now,
            }
            for campaign_id, contact_id, status in rows
        ]
        return [(int(m), int(c), str(s)) for m, c, s in conn.execute(insert, values)]
    at = _datetime_to_db(conn)(now)
    placeholders = ", ".join([f"({ph}, {ph}, {ph}, 0, {ph}, {ph})"] * len(rows))
    params: list[Any] = []
    for campaign_id, contact_id, status in rows:
        params.extend((campaign_id, contact_id, status, at, at))
    result = conn.exec_driver_sql(
        "INSERT INTO messages (campaign_id, contact_id, status, attempts, queued_at, "
        f"updated_at) VALUES {placeholders} ON CONFLICT DO NOTHING RETURNING id, contact_id, "
        "status",
        tuple(params),
    )
    return [(int(mid), int(cid), str(status)) for mid, cid, status in result]


# --------------------------------------------------------------------------- a send's start


def start_sending(
    engine: Engine,
    *,
    slug: str,
    templates_dir: Path,
    now: dt.datetime,
) -> Campaign:
    """The campaign becomes `sending`, its templates frozen on its first send. Returns it
    detached. Refuses, as ensure_sendable does, a cancelled campaign (InvalidValueError), one
    someone paused (CampaignPaused) and one a bounce spike holds (CampaignHeld): `send
    --acknowledge-bounces` lifts a hold in ensure_sendable, before the run starts."""
    # An IMMEDIATE transaction: two senders starting at once must queue, not fail on upgrade.
    with _writing(engine) as conn, Session(bind=conn) as session:
        campaign = campaigns.get_campaign(session, slug)
        # The one check `send` makes (ensure_sendable), again in the run's own transaction:
        # a pause or hold since then stands. Here a bounce-spike hold is never lifted.
        _refuse_unsendable(session, campaign, acknowledge_bounces=False, now=now)
        if not campaign.template_sources:
            campaigns.freeze_templates(session, campaign, templates_dir=templates_dir)
        campaign.status = CampaignStatus.SENDING.value
        if campaign.started_at is None:
            campaign.started_at = now
        session.flush()
        session.expunge(campaign)
    return campaign


def claims_held_by(engine: Engine, *, campaign_id: int, holder: str | None) -> list[Claim]:
    """The campaign's `sending` claims of one holder (None: claims with no holder)."""
    c = MESSAGES.c
    held = c.claimed_by.is_(None) if holder is None else c.claimed_by == holder
    with engine.connect() as conn:
        rows = conn.execute(
            select(c.id, c.contact_id, c.attempts)
            .where(c.campaign_id == campaign_id, c.status == MessageStatus.SENDING.value, held)
            .order_by(c.id)
        ).all()
    return [Claim(id=int(m), contact_id=int(k), attempts=int(n)) for m, k, n in rows]


def settle_for_gone(
    engine: Engine,
    *,
    campaign_id: int,
    holder: str | None,
    results: Sequence[Result],
    now: dt.datetime,
    actor: str | None,
    why: str,
    lease_expired: bool,
) -> int | None:
    """Settle the claims of a sender that is gone (see senders.gone): each still `sending` and
    still its own gets its result (back to the queue, a known outcome, or `uncertain`), and the
    sender's row is marked gone -- in one transaction. With `lease_expired`, the sender must
    still be past its lease when this commits: if it renewed it meanwhile, it lives, nothing is
    written and None is returned. Returns how many claims were settled."""
    with _writing(engine) as conn:
        if holder is not None:
            row = conn.execute(
                select(SENDERS.c.stopped_at, SENDERS.c.lease_until)
                .where(SENDERS.c.id == holder)
                .with_for_update()
            ).first()
            if row is not None and row.stopped_at is None:
                if lease_expired and _as_utc(row.lease_until) >= now:
                    return None
                conn.execute(
                    update(SENDERS)
                    .where(SENDERS.c.id == holder)
                    .values(
                        stopped_at=now,
                        stop_reason=f"declared gone by {actor or 'another sender'}: {why}"[:1000],
                        holding=0,
                    )
                )
        c = MESSAGES.c
        held = c.claimed_by.is_(None) if holder is None else c.claimed_by == holder
        still = set(
            conn.execute(
                select(c.id)
                .where(
                    c.id.in_([r.claim.id for r in results]),
                    c.status == MessageStatus.SENDING.value,
                    held,
                )
                .with_for_update()
            ).scalars()
        )
        mine = [r for r in results if r.claim.id in still]
        _record_in(conn, campaign_id=campaign_id, results=mine, now=now, actor=actor)
    return len(mine)


# --------------------------------------------------------------------------- queue and skip


def contact_emails(reader: Connection | Session, contact_ids: Sequence[int]) -> dict[int, str]:
    """Each contact's stored address (contacts that no longer exist are left out)."""
    rows = reader.execute(select(Contact.id, Contact.email).where(Contact.id.in_(contact_ids)))
    return {int(k): str(v) for k, v in rows}


def queue_audience(
    engine: Engine, *, campaign: Campaign, now: dt.datetime, chunk: int = 1000
) -> Queued:
    """Queue every contact of the audience that has no message yet (an invalid address is
    `skipped` at once, with why), then skip the suppressed (see skip_suppressed) and, when the
    campaign has quiet days, those another campaign wrote to lately (skip_recently_contacted).

    The audience is read in keyset pages of `chunk` ids, each queued in its own transaction, so
    memory stays flat at any audience size and another sender is never kept waiting long."""
    audience = audience_mod.Audience.from_json(campaign.audience)
    queued = skipped = 0
    with Session(engine) as reading:
        for ids in audience_mod.contact_id_pages(reading, audience, size=chunk):
            # No read snapshot held while this page is written (nor through the whole walk).
            reading.rollback()
            with _writing(engine) as conn:
                page = _queue_page(conn, campaign_id=campaign.id, contact_ids=ids, now=now)
            queued += page.queued
            skipped += page.skipped
    skipped += skip_suppressed(engine, campaign_id=campaign.id, now=now)
    quiet_days = (campaign.settings or {}).get("quiet_days")
    if quiet_days:
        skipped += skip_recently_contacted(
            engine, campaign_id=campaign.id, quiet_days=int(quiet_days), now=now
        )
    return Queued(queued=queued, skipped=skipped)


def _queue_page(
    conn: Connection, *, campaign_id: int, contact_ids: Sequence[int], now: dt.datetime
) -> Queued:
    have = set(
        conn.execute(
            select(MESSAGES.c.contact_id).where(
                MESSAGES.c.campaign_id == campaign_id, MESSAGES.c.contact_id.in_(contact_ids)
            )
        ).scalars()
    )
    missing = [i for i in contact_ids if i not in have]
    if not missing:
        return Queued(queued=0, skipped=0)
    emails = contact_emails(conn, missing)
    rows: list[tuple[int, int, str]] = []
    invalid: dict[int, str] = {}
    for cid in missing:
        email = emails.get(cid, "")
        problem = address_problem(email)
        if problem is None:
            rows.append((campaign_id, cid, MessageStatus.QUEUED.value))
        else:
            invalid[cid] = f"invalid address {email!r}: {problem}"
            rows.append((campaign_id, cid, MessageStatus.SKIPPED.value))
    inserted: list[tuple[int, int, str]] = []
    for start in range(0, len(rows), _ROWS_A_STATEMENT * 2):
        inserted += _insert_messages(conn, rows[start : start + _ROWS_A_STATEMENT * 2], now)
    events: list[_EventRow] = []
    for mid, cid, status in inserted:
        if status == MessageStatus.SKIPPED.value:
            detail = invalid.get(cid, "invalid address")
            events.append((mid, campaign_id, cid, now, EventKind.SKIPPED.value, None, detail, None))
        else:
            events.append((mid, campaign_id, cid, now, EventKind.QUEUED.value, None, None, None))
    _insert_events(conn, events)
    skipped = sum(1 for _, _, status in inserted if status == MessageStatus.SKIPPED.value)
    return Queued(queued=len(inserted) - skipped, skipped=skipped)


def skip_suppressed(engine: Engine, *, campaign_id: int, now: dt.datetime) -> int:
    """Messages not yet sent whose address is suppressed now become `skipped`, with the reason."""
    with _writing(engine) as conn:
        rows = conn.execute(
            select(MESSAGES.c.id, MESSAGES.c.contact_id, Suppression.reason, Suppression.source)
            .join(Contact, Contact.id == MESSAGES.c.contact_id)
            .join(Suppression, Suppression.email == Contact.email)
            .where(
                MESSAGES.c.campaign_id == campaign_id,
                MESSAGES.c.status.in_([MessageStatus.QUEUED.value, MessageStatus.RETRY.value]),
            )
        ).all()
        for start in range(0, len(rows), _ROWS_A_STATEMENT):
            conn.execute(
                update(MESSAGES)
                .where(
                    MESSAGES.c.id.in_([mid for mid, *_ in rows[start : start + _ROWS_A_STATEMENT]])
                )
                .values(status=MessageStatus.SKIPPED.value, updated_at=now, next_attempt_at=None)
            )
        _insert_events(
            conn,
            [
                (
                    mid,
                    campaign_id,
                    cid,
                    now,
                    EventKind.SKIPPED.value,
                    None,
                    f"suppressed: {reason}" + (f" ({source})" if source else ""),
                    None,
                )
                for mid, cid, reason, source in rows
            ],
        )
    return len(rows)


# --------------------------------------------------------------------------- what is due


@functools.cache
def _peek_statements() -> tuple[Select[Any], ...]:
    """The peek statements, built once: building them cost more than running them."""
    c = MESSAGES.c
    queued, retry = MessageStatus.QUEUED.value, MessageStatus.RETRY.value
    now = bindparam("now", type_=c.next_attempt_at.type)
    # Due retries and due queued rows that carry a date (held for a window or a follow-up's
    # delay, see timing.py) first, in order of due time, then the plain queue in id order. Each statement reads ranges of ix_messages_campaign_status: one `status = queued
    # OR ...` made SQLite read and sort every message of the campaign on every claim, a cost
    # that grew with the list (quadratic over a run). The plain queue is read from a cursor:
    # everything before it has been claimed or given up by this run.
    parts = (
        and_(c.status == retry, c.next_attempt_at.is_(None)),
        and_(
            c.status.in_([queued, retry]),
            c.next_attempt_at.is_not(None),
            c.next_attempt_at <= now,
        ),
        and_(c.status == queued, c.next_attempt_at.is_(None), c.id > bindparam("after")),
    )
    return tuple(
        select(c.id, c.contact_id)
        .where(c.campaign_id == bindparam("campaign"), part)
        .order_by(*((c.next_attempt_at, c.id) if i == 1 else (c.id,)))
        .limit(bindparam("n", type_=Integer))
        for i, part in enumerate(parts)
    )


class Due:
    """Which messages of one campaign are due, in claim order. Reads only: nothing is claimed
    until `claim`, so what is peeked may be composed ahead without widening the crash window."""

    def __init__(self, engine: Engine, *, campaign_id: int) -> None:
        self.engine = engine
        self.campaign_id = campaign_id
        # The plain queue is read in id order: the last id peeked from it.
        self.cursor = 0
        self._retries: bool | None = None
        self._retries_checked_at = 0.0
        # Bumped by expect_retries; the retry check is asked again when it moves.
        self._generation = 0
        self._checked_generation = -1

    def expect_retries(self) -> None:
        """A message was just deferred: the retry parts of the peek are worth reading again."""
        self._generation += 1

    def peek(self, n: int, *, skip: frozenset[int], now: dt.datetime) -> list[tuple[int, int]]:
        """The next due (message id, contact id) pairs in claim order, leaving out `skip` and
        the plain queue up to the cursor (which moves past what is returned)."""
        peeks = _peek_statements()
        params = {"campaign": self.campaign_id, "now": now, "after": self.cursor}
        found: list[tuple[int, int]] = []
        with self.engine.connect() as conn:
            retries = self._any_retries(conn)
            for part, peek in enumerate(peeks):
                if part < len(peeks) - 1 and not retries:
                    continue
                # Retries have no cursor: ask for enough to skip those already peeked.
                want = n - len(found) + (len(skip) if part < len(peeks) - 1 else 0)
                plain_queue = part == len(peeks) - 1
                for mid, cid in conn.execute(peek, {**params, "n": want}):
                    if mid not in skip and len(found) < n:
                        found.append((mid, cid))
                        if plain_queue:
                            self.cursor = mid
                if len(found) >= n:
                    break
        return found

    def _any_retries(self, conn: Connection) -> bool:
        """Whether the retry parts of the peek can find anything: most runs have no retries,
        and two statements per batch fewer is a few percent of a run. Asked again after this
        run defers a message, and every few seconds (another sender may have)."""
        checked = time.monotonic()
        if (
            self._retries is None
            or self._checked_generation != self._generation
            or checked - self._retries_checked_at > 5.0
        ):
            generation = self._generation
            c = MESSAGES.c
            self._retries = (
                conn.execute(
                    select(c.id)
                    .where(
                        c.campaign_id == self.campaign_id,
                        or_(
                            c.status == MessageStatus.RETRY.value,
                            and_(
                                c.status == MessageStatus.QUEUED.value,
                                c.next_attempt_at.is_not(None),
                            ),
                        ),
                    )
                    .limit(1)
                ).first()
                is not None
            )
            self._retries_checked_at = checked
            self._checked_generation = generation
        return self._retries

    def any(self, *, now: dt.datetime) -> bool:
        """Whether anything of the campaign is due now (queued, or a retry whose time came; a
        letter held until later is not)."""
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(MESSAGES.c.id)
                    .where(
                        MESSAGES.c.campaign_id == self.campaign_id,
                        or_(
                            and_(
                                MESSAGES.c.status == MessageStatus.QUEUED.value,
                                or_(
                                    MESSAGES.c.next_attempt_at.is_(None),
                                    MESSAGES.c.next_attempt_at <= now,
                                ),
                            ),
                            and_(
                                MESSAGES.c.status == MessageStatus.RETRY.value,
                                MESSAGES.c.next_attempt_at <= now,
                            ),
                        ),
                    )
                    .limit(1)
                ).first()
                is not None
            )


# --------------------------------------------------------------------------- claims and results


@functools.cache
def _claim_statement() -> Any:
    """The claim for a backend without the SQLite fast path, built once."""
    c = MESSAGES.c
    now = bindparam("now", type_=c.next_attempt_at.type)
    # A queued letter held until later (timing.py) is not due either.
    due = and_(
        c.status.in_([MessageStatus.QUEUED.value, MessageStatus.RETRY.value]),
        or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now),
    )
    # Only rows still due are claimed: a row another sender claimed since it was peeked stays
    # theirs (on PostgreSQL the UPDATE waits for their commit and then re-checks `due`).
    return (
        update(MESSAGES)
        .where(c.id.in_(bindparam("ids", expanding=True)), due)
        .values(
            status=MessageStatus.SENDING.value,
            attempts=c.attempts + 1,
            claimed_by=bindparam("run"),
            updated_at=now,
        )
        .returning(c.id, c.contact_id, c.attempts)
    )


def claim(
    engine: Engine,
    *,
    campaign_id: int,
    ids: Sequence[int],
    sender_id: str,
    now: dt.datetime,
    results: Sequence[Result] = (),
    actor: str | None = None,
    daily_cap: int | None = None,
    pace: float | None = None,
    quiet_days: int | None = None,
) -> Claimed:
    """`queued`/due `retry` -> `sending` for those of `ids` still due, each with its `claimed`
    event, committed before any byte of them goes out. In the same transaction (one commit,
    one fsync on SQLite):

    1. `results` of earlier claims are recorded (unless another process has declared this
       sender gone: then ClaimsLost, and nothing is written);
    2. a due letter whose address is suppressed now is `skipped` with the reason, not claimed;
       with `quiet_days`, so is one whose contact another campaign wrote to within them (since
       it was queued: queue_audience skipped those written to before);
    3. under a `daily_cap`, the letters sent in the last 24 hours (every campaign) and those
       being sent now are counted, and no more than the cap leaves room for are claimed -- the
       count is serialised across processes, so two senders never share one slot;
    4. the claim itself: only rows still due (another sender's claim since the peek wins);
    5. under a `pace` (letters per second for the campaign, shared by every sender of it),
       the claimed letters' departure times are reserved on the campaign's pace.

    Sending windows and follow-up delays are judged before: the engine asks timing.Gate.admit
    which peeked letters are due now, and only those are composed and offered here, so a held
    letter is neither claimed nor counted against the cap or the pace."""
    with _writing(engine) as conn:
        _hold_on(conn, sender_id)
        _record_in(
            conn, campaign_id=campaign_id, results=results, now=now, actor=actor, holder=sender_id
        )
        skipped = _skip_suppressed_among(
            conn, campaign_id=campaign_id, ids=ids, now=now, actor=actor
        )
        wanted = [i for i in ids if i not in skipped]
        quiet: set[int] = set()
        if quiet_days and wanted:
            quiet = _skip_quiet_among(
                conn,
                campaign_id=campaign_id,
                ids=wanted,
                quiet_days=quiet_days,
                now=now,
                actor=actor,
            )
            wanted = [i for i in wanted if i not in quiet]
        capped = False
        if daily_cap is not None and wanted:
            room = max(0, _cap_room(conn, cap=daily_cap, now=now))
            if room < len(wanted):
                wanted, capped = wanted[:room], True
        claims: list[Claim] = []
        if wanted:
            claims = _claim_rows(
                conn, campaign_id=campaign_id, ids=wanted, sender_id=sender_id, now=now, actor=actor
            )
        start = None
        if pace is not None and claims:
            start = _reserve_pace(
                conn, campaign_id=campaign_id, count=len(claims), rate=pace, now=now
            )
    return Claimed(
        claims=claims, skipped=len(skipped), quiet=len(quiet), capped=capped, pace_start=start
    )


def _hold_on(conn: Connection, sender_id: str) -> None:
    """Raises ClaimsLost if another process has declared this sender gone (its lease expired):
    the letters it held are settled already. On PostgreSQL the sender's row stays locked to the
    end of the transaction, so a recovery waits for it (SQLite's write lock does that)."""
    ph = _PLACEHOLDER.get(conn.dialect.name)
    if ph is None:
        row = conn.execute(
            select(SENDERS.c.stopped_at, SENDERS.c.stop_reason).where(SENDERS.c.id == sender_id)
        ).first()
    else:
        # Run once per claim and per record: as plain SQL it costs a tenth of a statement
        # SQLAlchemy builds.
        lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
        row = conn.exec_driver_sql(
            f"SELECT stopped_at, stop_reason FROM senders WHERE id = {ph}{lock}", (sender_id,)
        ).first()
    if row is not None and row[0] is not None:
        raise ClaimsLost(
            f"this sender's claims were taken over ({row[1] or 'it was stopped'}): "
            "it hands nothing more over"
        )


def _ids_param(conn: Connection, ids: Sequence[int]) -> tuple[str, Any]:
    """`id IN (...)` for a list of ids as one parameter: SQLite's json_each, PostgreSQL's ANY."""
    if conn.dialect.name == "sqlite":
        return "(SELECT value FROM json_each(?))", json.dumps(list(ids))
    return "(SELECT unnest(%s::bigint[]))", list(ids)


# A message still due (for the claim's own re-check), in SQL over `m` (messages) and a `now`.
# A queued letter held until later (a window, a follow-up's delay: timing.py) is not due.
_DUE_SQL = (
    "(m.status IN ('queued', 'retry') AND (m.next_attempt_at IS NULL "
    "OR m.next_attempt_at <= {now}))"
)


def _skip_suppressed_among(
    conn: Connection, *, campaign_id: int, ids: Sequence[int], now: dt.datetime, actor: str | None
) -> set[int]:
    """Due letters among `ids` whose address is suppressed now become `skipped` (with the
    reason): an unsubscribe or `suppress add` during a send stops every letter not yet
    claimed. One indexed look-up per id; usually nothing is found."""
    ph = _PLACEHOLDER.get(conn.dialect.name)
    if ph is None or not ids:
        return set()
    among, param = _ids_param(conn, ids)
    at = _datetime_to_db(conn)(now)
    rows = conn.exec_driver_sql(
        "SELECT m.id, m.contact_id, s.reason, s.source FROM messages m "
        "JOIN contacts c ON c.id = m.contact_id JOIN suppressions s ON s.email = c.email "
        f"WHERE m.id IN {among} AND {_DUE_SQL.format(now=ph)}",
        (param, at),
    ).all()
    if not rows:
        return set()
    found = {int(r[0]) for r in rows}
    conn.execute(
        update(MESSAGES)
        .where(MESSAGES.c.id.in_(sorted(found)))
        .values(status=MessageStatus.SKIPPED.value, updated_at=now, next_attempt_at=None)
    )
    _insert_events(
        conn,
        [
            (
                int(mid),
                campaign_id,
                int(cid),
                now,
                EventKind.SKIPPED.value,
                None,
                _suppressed_detail(reason, source),
                None,
            )
            for mid, cid, reason, source in rows
        ],
        actor=actor,
    )
    return found


def _skip_quiet_among(
    conn: Connection,
    *,
    campaign_id: int,
    ids: Sequence[int],
    quiet_days: int,
    now: dt.datetime,
    actor: str | None,
) -> set[int]:
    """Quiet days at the claim: due letters among `ids` whose contact another campaign wrote to
    within `quiet_days` (a send that ran since this one queued them) become `skipped`, each
    with an event naming that campaign and day. Returns their ids."""
    c = MESSAGES.c
    due = and_(
        c.status.in_([MessageStatus.QUEUED.value, MessageStatus.RETRY.value]),
        or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now),
    )
    rows = conn.execute(select(c.id, c.contact_id).where(c.id.in_(list(ids)), due)).all()
    if not rows:
        return set()
    recent = recently_contacted(
        conn,
        campaign_id=campaign_id,
        contact_ids=sorted({int(cid) for _, cid in rows}),
        since=now - dt.timedelta(days=quiet_days),
    )
    found = [(int(mid), int(cid)) for mid, cid in rows if cid in recent]
    if not found:
        return set()
    conn.execute(
        update(MESSAGES)
        .where(c.id.in_([mid for mid, _ in found]), due)
        .values(status=MessageStatus.SKIPPED.value, updated_at=now, next_attempt_at=None)
    )
    _insert_events(
        conn,
        [
            (
                mid,
                campaign_id,
                cid,
                now,
                EventKind.SKIPPED.value,
                None,
                _quiet_detail(*recent[cid], quiet_days=quiet_days) + "; found at its claim",
                None,
            )
            for mid, cid in found
        ],
        actor=actor,
    )
    return {mid for mid, _ in found}


def _quiet_detail(slug: str, when: dt.datetime, *, quiet_days: int) -> str:
    return (
        f"quiet days: campaign {slug} wrote to this contact on {when:%Y-%m-%d}, within the "
        f"{quiet_days} quiet day(s)"
    )


def _suppressed_detail(reason: str, source: str | None) -> str:
    return f"suppressed: {reason}" + (f" ({source})" if source else "")


# PostgreSQL: the transaction-scoped advisory lock that serialises the daily cap's count and
# take across every sender (SQLite's write lock does that by itself).
_CAP_LOCK = 0x6D61696C  # "mail"


def _cap_room(conn: Connection, *, cap: int, now: dt.datetime) -> int:
    """How many more letters the rolling 24-hour cap allows: the cap, less what was sent in the
    last 24 hours (every campaign), less what is being sent now (claimed, every campaign)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (_CAP_LOCK,))
    ph = _PLACEHOLDER.get(conn.dialect.name, "?")
    since = _datetime_to_db(conn)(now - dt.timedelta(hours=24))
    # `kind = 'sent'` as a literal: SQLite uses the partial index ix_events_sent_at only then.
    sent = conn.exec_driver_sql(
        f"SELECT count(*) FROM events WHERE kind = 'sent' AND at > {ph}", (since,)
    ).scalar_one()
    # Per campaign through ix_messages_campaign_status, not a scan of every message.
    sending = conn.exec_driver_sql(
        "SELECT count(*) FROM messages WHERE campaign_id IN (SELECT id FROM campaigns) "
        "AND status = 'sending'"
    ).scalar_one()
    return cap - int(sent) - int(sending)


def _reserve_pace(
    conn: Connection, *, campaign_id: int, count: int, rate: float, now: dt.datetime
) -> dt.datetime:
    """Reserve `count` departures at `rate` on the campaign's pace (a token bucket kept in the
    database: the earliest time its next letter may leave). Returns when the first may leave;
    every sender of the campaign advances the same pace, so together they keep one rate."""
    row = conn.execute(
        select(Campaign.pace_next_at).where(Campaign.id == campaign_id).with_for_update()
    ).first()
    next_at = _as_utc(row[0]) if row is not None and row[0] is not None else None
    start = now if next_at is None or next_at < now else next_at
    conn.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id)
        .values(pace_next_at=start + dt.timedelta(seconds=count / rate))
    )
    return start


def reserve_pace(
    engine: Engine, *, campaign_id: int, count: int, rate: float, now: dt.datetime
) -> dt.datetime:
    """New departures on the campaign's pace for letters a sender holds already (their slots
    passed while it could not send them). Returns when the first may leave."""
    with _writing(engine) as conn:
        return _reserve_pace(conn, campaign_id=campaign_id, count=count, rate=rate, now=now)


def _claim_rows(
    conn: Connection,
    *,
    campaign_id: int,
    ids: Sequence[int],
    sender_id: str,
    now: dt.datetime,
    actor: str | None,
) -> list[Claim]:
    if conn.dialect.name == "sqlite":
        return _claim_in_sqlite(conn, ids=ids, sender_id=sender_id, now=now, actor=actor)
    claimed = sorted(
        (int(mid), int(cid), int(n))
        for mid, cid, n in conn.execute(
            _claim_statement(), {"now": now, "ids": list(ids), "run": sender_id}
        )
    )
    _insert_events(
        conn,
        [
            (mid, campaign_id, cid, now, EventKind.CLAIMED.value, None, f"attempt {n}", sender_id)
            for mid, cid, n in claimed
        ],
        actor=actor,
    )
    return [Claim(id=mid, contact_id=cid, attempts=n) for mid, cid, n in claimed]


def _claim_in_sqlite(
    conn: Connection, *, ids: Sequence[int], sender_id: str, now: dt.datetime, actor: str | None
) -> list[Claim]:
    """The claim as three statements of one step each: RETURNING would be a driver step
    (and a wait for the GIL) per row. The rows this claim took are the batch's rows now
    `sending` for this sender: none of them was before (each was due when peeked)."""
    at = _datetime_to_db(conn)(now)
    wanted = json.dumps(list(ids))
    mine = "id IN (SELECT value FROM json_each(?)) AND claimed_by = ? AND status = 'sending'"
    conn.exec_driver_sql(
        "UPDATE messages SET status = 'sending', attempts = attempts + 1, claimed_by = ?, "
        "updated_at = ? WHERE id IN (SELECT value FROM json_each(?)) AND status IN ('queued', "
        "'retry') AND (next_attempt_at IS NULL OR next_attempt_at <= ?)",
        (sender_id, at, wanted, at),
    )
    conn.exec_driver_sql(
        "INSERT INTO events (message_id, campaign_id, contact_id, at, kind, smtp_code, "
        "detail, via, actor) SELECT id, campaign_id, contact_id, ?, ?, NULL, 'attempt ' || "
        f"attempts, ?, ? FROM messages WHERE {mine} ORDER BY id",
        (at, EventKind.CLAIMED.value, sender_id, actor, wanted, sender_id),
    )
    found = conn.exec_driver_sql(
        f"SELECT json_group_array(json_array(id, contact_id, attempts)) FROM messages WHERE {mine}",
        (wanted, sender_id),
    ).scalar_one()
    return [
        Claim(id=int(mid), contact_id=int(cid), attempts=int(n))
        for mid, cid, n in sorted(json.loads(found))
    ]


def record(
    engine: Engine,
    *,
    campaign_id: int,
    results: Sequence[Result],
    now: dt.datetime,
    sender_id: str | None = None,
    actor: str | None = None,
) -> None:
    """Each claimed message's result: its new state, the server's answer and its event (and
    for a 5.1.1-class refusal the address's `hard_bounce` suppression). Raises ClaimsLost if
    another process has declared `sender_id` gone meanwhile: nothing is written."""
    if not results:
        return
    with _writing(engine) as conn:
        if sender_id is not None:
            _hold_on(conn, sender_id)
        _record_in(
            conn, campaign_id=campaign_id, results=results, now=now, actor=actor, holder=sender_id
        )


# One result's message row: status, attempts, next attempt, sent at, SMTP code, reply,
# Message-ID, language, subject, body hash, and (last) the row's id.
_ResultRow = tuple[
    str,
    int,
    dt.datetime | None,
    dt.datetime | None,
    int | None,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
    int,
]


def _record_in(
    conn: Connection,
    *,
    campaign_id: int,
    results: Sequence[Result],
    now: dt.datetime,
    actor: str | None = None,
    holder: str | None = None,
) -> None:
    """The results' rows and events. With `holder` (PostgreSQL), only rows still `sending` for
    it change and only theirs get events: a result written a second time, because the answer
    to a COMMIT was lost with the connection, changes nothing the second time."""
    if not results:
        return
    rows: list[_ResultRow] = []
    events: list[_EventRow] = []
    bounced: list[Attempted] = []
    sent = MessageStatus.SENT
    for result in results:
        c = result.claim
        if isinstance(result, Attempted):
            state = result.state
            if state.hard_bounce:
                bounced.append(result)
            rows.append(
                (
                    state.status.value,
                    c.attempts,
                    state.next_attempt_at,
                    (result.handed_at or now) if state.status is sent else None,
                    result.code,
                    result.reply,
                    result.message_id,
                    result.language,
                    result.subject,
                    result.body_hash,
                    c.id,
                )
            )
            events.append(
                (
                    c.id,
                    campaign_id,
                    c.contact_id,
                    now,
                    state.event.value,
                    result.code,
                    state.detail,
                    result.via,
                )
            )
        elif isinstance(result, Released | Skipped):
            # Never handed over: the claim was no attempt, and the count goes back.
            due_at = None
            if isinstance(result, Released):
                status, kind = MessageStatus.QUEUED, EventKind.REQUEUED
                # Its window closed before it could go: held until the next one (timing.py).
                due_at = result.due_at
                detail = f"released unsent, attempt {c.attempts} not made ({result.reason})" + (
                    f"; due {_utc_text(due_at)}" if due_at else ""
                )
                mid, lang, subject, body_hash = (
                    result.message_id,
                    result.language,
                    result.subject,
                    result.body_hash,
                )
            else:
                status, kind, detail = MessageStatus.SKIPPED, EventKind.SKIPPED, result.reason
                mid = lang = subject = body_hash = None
            rows.append(
                (
                    status.value,
                    c.attempts - 1,
                    due_at,
                    None,
                    None,
                    None,
                    mid,
                    lang,
                    subject,
                    body_hash,
                    c.id,
                )
            )
            events.append((c.id, campaign_id, c.contact_id, now, kind.value, None, detail, None))
        else:
            rows.append(
                (
                    MessageStatus.FAILED.value,
                    c.attempts,
                    None,
                    None,
                    None,
                    result.error,
                    None,
                    None,
                    None,
                    None,
                    c.id,
                )
            )
            events.append(
                (
                    c.id,
                    campaign_id,
                    c.contact_id,
                    now,
                    EventKind.FAILED.value,
                    None,
                    result.error,
                    None,
                )
            )
    changed = _update_results(conn, rows, now, holder=holder)
    if changed is not None:
        events = [e for e in events if e[0] in changed]
        bounced = [r for r in bounced if r.claim.id in changed]
    _insert_events(conn, events, actor=actor)
    if bounced:
        _suppress_hard_bounces(conn, bounced, now=now)


def hard_bounce_source(result: Attempted) -> str:
    """The suppression's source for a 5.1.1-class answer: the server's words, and the letter."""
    answer = " ".join(f"{result.code or ''} {result.reply or ''}".split())
    return f"smtp {result.via or ''}: {answer}"[:270] + f" [message {result.claim.id}]"


def _suppress_hard_bounces(
    conn: Connection, bounced: Sequence[Attempted], *, now: dt.datetime
) -> None:
    """The address said not to exist: `bounced_at` on the letter (it counts toward the bounce
    spike) and a `hard_bounce` suppression with the server's answer (an address suppressed
    already keeps its first reason)."""
    conn.execute(
        update(MESSAGES)
        .where(MESSAGES.c.id.in_([r.claim.id for r in bounced]))
        .values(bounced_at=now)
    )
    emails = contact_emails(conn, [r.claim.contact_id for r in bounced])
    rows = [
        {
            "email": emails[r.claim.contact_id],
            "reason": SuppressionReason.HARD_BOUNCE.value,
            "source": hard_bounce_source(r),
            "created_at": now,
        }
        for r in bounced
        if r.claim.contact_id in emails
    ]
    statement = _SUPPRESS.get(conn.dialect.name)
    for row in rows:
        if statement is not None:
            conn.execute(statement, row)
        elif not conn.execute(
            select(SUPPRESSIONS.c.id).where(SUPPRESSIONS.c.email == row["email"])
        ).first():
            conn.execute(insert(SUPPRESSIONS), row)


@functools.cache
def _record_statement() -> Any:
    """The result update for a backend without a driver-level form (see _update_results)."""
    return (
        update(MESSAGES)
        .where(MESSAGES.c.id == bindparam("b_id"))
        .values(
            status=bindparam("b_status"),
            attempts=bindparam("b_attempts"),
            next_attempt_at=bindparam("b_next"),
            sent_at=bindparam("b_sent_at"),
            smtp_code=bindparam("b_code"),
            smtp_reply=bindparam("b_reply"),
            message_id=bindparam("b_mid"),
            language=bindparam("b_lang"),
            subject=bindparam("b_subject"),
            body_hash=bindparam("b_hash"),
            claimed_by=None,
            updated_at=bindparam("b_now"),
        )
    )


_RESULT_KEYS = (
    "b_status",
    "b_attempts",
    "b_next",
    "b_sent_at",
    "b_code",
    "b_reply",
    "b_mid",
    "b_lang",
    "b_subject",
    "b_hash",
    "b_id",
)


def _update_results(
    conn: Connection, rows: Sequence[_ResultRow], now: dt.datetime, *, holder: str | None = None
) -> set[int] | None:
    """Writes the rows; returns the ids it changed where that is known (PostgreSQL, with a
    `holder`: only rows still `sending` for it), else None (every row)."""
    ph = _PLACEHOLDER.get(conn.dialect.name)
    if ph is None:
        conn.execute(
            _record_statement(),
            [{**dict(zip(_RESULT_KEYS, row, strict=True)), "b_now": now} for row in rows],
        )
        return None
    to_db = _datetime_to_db(conn)
    at = to_db(now)
    params = [
        (
            status,
            attempts,
            to_db(next_at),
            to_db(sent_at),
            code,
            reply,
            mid,
            lang,
            subject,
            body_hash,
            at,
            row_id,
        )
        for (
            status,
            attempts,
            next_at,
            sent_at,
            code,
            reply,
            mid,
            lang,
            subject,
            body_hash,
            row_id,
        ) in rows
    ]
    if conn.dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 33):
        # One statement for the whole batch (one driver step: see engine._Run.db_thread).
        for start in range(0, len(params), _ROWS_A_STATEMENT // 2):
            chunk = params[start : start + _ROWS_A_STATEMENT // 2]
            values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
            conn.exec_driver_sql(
                "UPDATE messages SET status = v.column1, attempts = v.column2, "
                "next_attempt_at = v.column3, sent_at = v.column4, smtp_code = v.column5, "
                "smtp_reply = v.column6, message_id = coalesce(v.column7, message_id), "
                "language = coalesce(v.column8, language), "
                "subject = coalesce(v.column9, subject), "
                "body_hash = coalesce(v.column10, body_hash), claimed_by = NULL, "
                f"updated_at = v.column11 FROM (VALUES {values}) AS v "
                "WHERE messages.id = v.column12",
                tuple(value for row in chunk for value in row),
            )
        return None
    if conn.dialect.name == "postgresql":
        # One statement per chunk, never executemany: psycopg runs executemany in pipeline
        # mode, which a connection lost mid-batch ends with a noisy "error ignored terminating
        # <psycopg.Pipeline [BAD]>" (issue 11); and one statement is one round trip.
        row_sql = (
            "(%s::text, %s::int, %s::timestamptz, %s::timestamptz, %s::int, %s::text, "
            "%s::text, %s::text, %s::text, %s::text, %s::timestamptz, %s::int)"
        )
        changed: set[int] = set()
        mine = " AND messages.status = 'sending' AND messages.claimed_by = %s" if holder else ""
        for start in range(0, len(params), _ROWS_A_STATEMENT // 2):
            chunk = params[start : start + _ROWS_A_STATEMENT // 2]
            result = conn.exec_driver_sql(
                "UPDATE messages SET status = v.status, attempts = v.attempts, "
                "next_attempt_at = v.next_at, sent_at = v.sent_at, smtp_code = v.code, "
                "smtp_reply = v.reply, message_id = coalesce(v.mid, messages.message_id), "
                "language = coalesce(v.lang, messages.language), "
                "subject = coalesce(v.subject, messages.subject), "
                "body_hash = coalesce(v.hash, messages.body_hash), claimed_by = NULL, "
                f"updated_at = v.at FROM (VALUES {', '.join([row_sql] * len(chunk))}) AS "
                "v(status, attempts, next_at, sent_at, code, reply, mid, lang, subject, hash, "
                f"at, id) WHERE messages.id = v.id{mine} RETURNING messages.id",
                (*(value for row in chunk for value in row), *((holder,) if holder else ())),
            )
            changed.update(int(mid) for (mid,) in result)
        return changed if holder else None
    conn.exec_driver_sql(
        f"UPDATE messages SET status={ph}, attempts={ph}, next_attempt_at={ph}, sent_at={ph}, "
        f"smtp_code={ph}, smtp_reply={ph}, message_id={ph}, language={ph}, subject={ph}, "
        f"body_hash={ph}, claimed_by=NULL, updated_at={ph} WHERE id={ph}",
        params,
    )
    return None


# --------------------------------------------------------------------------- back to the queue


def requeue_streak(
    engine: Engine, *, campaign_id: int, ids: Sequence[int], now: dt.datetime
) -> int:
    """Messages refused as part of a systemic failure (`failed` by this run) go back to
    `queued`: the refusal said nothing about these recipients, so a `hard_bounce` suppression
    it added is taken back too. Returns how many moved."""
    if not ids:
        return 0
    with _writing(engine) as conn:
        rows = conn.execute(
            update(MESSAGES)
            .where(MESSAGES.c.id.in_(list(ids)), MESSAGES.c.status == MessageStatus.FAILED.value)
            .values(status=MessageStatus.QUEUED.value, updated_at=now, bounced_at=None)
            .returning(MESSAGES.c.id, MESSAGES.c.contact_id)
        ).all()
        emails = contact_emails(conn, [cid for _, cid in rows])
        for mid, cid in rows:
            if cid in emails:
                conn.execute(
                    SUPPRESSIONS.delete().where(
                        SUPPRESSIONS.c.email == emails[cid],
                        SUPPRESSIONS.c.reason == SuppressionReason.HARD_BOUNCE.value,
                        SUPPRESSIONS.c.source.like(f"smtp %[message {int(mid)}]"),
                    )
                )
        _insert_events(
            conn,
            [
                (
                    mid,
                    campaign_id,
                    cid,
                    now,
                    EventKind.REQUEUED.value,
                    None,
                    "refused as part of a systemic failure; back in the queue",
                    None,
                )
                for mid, cid in rows
            ],
        )
    return len(rows)


def release_unhanded(
    engine: Engine,
    *,
    campaign_id: int,
    sender_id: str,
    now: dt.datetime,
    actor: str | None = None,
) -> int:
    """At the end of a run that settled everything it knew of: any row still `sending` for
    this sender was claimed by a commit whose answer was lost with the connection (the sender
    took it for failed and never handed the letter over). Back to the queue, with its event."""
    c = MESSAGES.c
    with _writing(engine) as conn:
        rows = conn.execute(
            update(MESSAGES)
            .where(
                c.campaign_id == campaign_id,
                c.status == MessageStatus.SENDING.value,
                c.claimed_by == sender_id,
            )
            .values(
                status=MessageStatus.QUEUED.value,
                attempts=c.attempts - 1,
                claimed_by=None,
                updated_at=now,
            )
            .returning(c.id, c.contact_id)
        ).all()
        _insert_events(
            conn,
            [
                (
                    mid,
                    campaign_id,
                    cid,
                    now,
                    EventKind.REQUEUED.value,
                    None,
                    "released unsent: claimed by a commit whose answer was lost with the "
                    "database connection, never handed over",
                    None,
                )
                for mid, cid in rows
            ],
            actor=actor,
        )
    return len(rows)


class Requeued(NamedTuple):
    """What `mailer retry` moved back to the queue, per former status, and how many it left
    alone because their address is suppressed (a retry cannot help them)."""

    moved: dict[str, int]
    suppressed: int


def requeue(
    engine: Engine,
    *,
    slug: str,
    failed: bool,
    uncertain: bool,
    now: dt.datetime,
    actor: str | None = None,
) -> Requeued:
    """`mailer retry`: failed and/or uncertain messages back to `queued` (a suppressed address
    is left alone); a `done` campaign is `sending` again. The attempt count goes on (the log
    and the message agree on how often a letter was tried): a letter that had used up its
    attempts gets one more try per retry."""
    if not (failed or uncertain):
        raise InvalidValueError(
            "say what to retry: --failed (refused or given up), --uncertain (outcome unknown: "
            "the recipient may already have it), or both"
        )
    wanted = [
        s for s, on in ((MessageStatus.FAILED, failed), (MessageStatus.UNCERTAIN, uncertain)) if on
    ]
    moved: dict[str, int] = {}
    c = MESSAGES.c
    suppressed_address = (
        select(Contact.id)
        .join(Suppression, Suppression.email == Contact.email)
        .where(Contact.id == c.contact_id)
        .exists()
    )
    with _writing(engine) as conn:
        with Session(bind=conn) as session:
            campaign = campaigns.get_campaign(session, slug)
            campaign_id, status = campaign.id, campaign.status
        left = int(
            conn.execute(
                select(func.count()).where(
                    c.campaign_id == campaign_id,
                    c.status.in_([state.value for state in wanted]),
                    suppressed_address,
                )
            ).scalar_one()
        )
        for state in wanted:
            rows = conn.execute(
                update(MESSAGES)
                .where(c.campaign_id == campaign_id, c.status == state.value, ~suppressed_address)
                .values(
                    status=MessageStatus.QUEUED.value,
                    next_attempt_at=None,
                    claimed_by=None,
                    updated_at=now,
                )
                .returning(c.id, c.contact_id, c.attempts)
            ).all()
            moved[state.value] = len(rows)
            _insert_events(
                conn,
                [
                    (
                        mid,
                        campaign_id,
                        cid,
                        now,
                        EventKind.REQUEUED.value,
                        None,
                        f"mailer retry: was {state.value} after {n} attempt(s)",
                        None,
                    )
                    for mid, cid, n in rows
                ],
                actor=actor,
            )
        if sum(moved.values()) and status == CampaignStatus.DONE.value:
            conn.execute(
                update(Campaign)
                .where(Campaign.id == campaign_id)
                .values(status=CampaignStatus.SENDING.value)
            )
    return Requeued(moved=moved, suppressed=left)


# --------------------------------------------------------------------------- a send's end


def finish_sending(
    engine: Engine, *, campaign_id: int, paused: bool, now: dt.datetime
) -> dict[str, int]:
    """The campaign's status after a run: `done` when nothing is left open, `paused` when the
    run was paused or interrupted, `sending` otherwise. Returns the message counts per status."""
    totals = status_counts(engine, campaign_id=campaign_id)
    open_ = sum(
        totals[s.value] for s in (MessageStatus.QUEUED, MessageStatus.RETRY, MessageStatus.SENDING)
    )
    values: dict[str, Any]
    if open_ == 0:
        values = {"status": CampaignStatus.DONE.value, "finished_at": now}
    elif paused:
        values = {"status": CampaignStatus.PAUSED.value}
    else:
        values = {"status": CampaignStatus.SENDING.value}
    with _writing(engine) as conn:
        # Cancelled, or paused by a person or a bounce spike, while this run went on: that
        # stands (and a cancelled campaign's handed-back letters are skipped).
        if finish_sending_team(conn, campaign_id=campaign_id, now=now):
            return status_counts_in(conn, campaign_id=campaign_id)
        # A campaign held by a bounce spike stays paused until the user acknowledges it.
        conn.execute(
            update(Campaign)
            .where(Campaign.id == campaign_id, Campaign.held.is_(False))
            .values(**values)
        )
    return totals


# --------------------------------------------------------------------------- reading


def suppressed_contacts(engine: Engine, contact_ids: Sequence[int]) -> dict[int, str]:
    """Of these contacts, those whose address is suppressed now, with the reason in words."""
    if not contact_ids:
        return {}
    with engine.connect() as conn:
        rows = conn.execute(
            select(Contact.id, Suppression.reason, Suppression.source)
            .join(Suppression, Suppression.email == Contact.email)
            .where(Contact.id.in_(list(contact_ids)))
        ).all()
    return {int(cid): _suppressed_detail(reason, source) for cid, reason, source in rows}


def status_counts(engine: Engine, *, campaign_id: int) -> dict[str, int]:
    """Messages of the campaign per status (every status present, zero or not)."""
    with engine.connect() as conn:
        return status_counts_in(conn, campaign_id=campaign_id)


def status_counts_in(conn: Connection, *, campaign_id: int) -> dict[str, int]:
    """status_counts on a connection already open (inside a transaction)."""
    rows = conn.execute(
        select(MESSAGES.c.status, func.count())
        .where(MESSAGES.c.campaign_id == campaign_id)
        .group_by(MESSAGES.c.status)
    ).all()
    counts = {s.value: 0 for s in MessageStatus}
    counts.update({str(status): int(n) for status, n in rows})
    return counts


def settled_contacts(session: Session, *, campaign_id: int) -> set[int]:
    """Contacts whose message of the campaign is past the queue (neither `queued` nor `retry`)."""
    return set(
        session.scalars(
            select(MESSAGES.c.contact_id).where(
                MESSAGES.c.campaign_id == campaign_id,
                MESSAGES.c.status.notin_([MessageStatus.QUEUED.value, MessageStatus.RETRY.value]),
            )
        )
    )


def _as_utc(value: object) -> dt.datetime:
    at = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at


def sent_in_window(engine: Engine, *, now: dt.datetime) -> tuple[int, dt.datetime | None]:
    """Messages sent in the last 24 hours across every campaign, and the oldest of those sends."""
    since = now - dt.timedelta(hours=24)
    with engine.connect() as conn:
        count, oldest = conn.execute(
            select(func.count(), func.min(EVENTS.c.at)).where(
                EVENTS.c.kind == EventKind.SENT.value, EVENTS.c.at > since
            )
        ).one()
    return int(count), None if oldest is None else _as_utc(oldest)


def cap_resume_at(engine: Engine, *, now: dt.datetime, cap: int) -> dt.datetime | None:
    """When the rolling 24-hour `cap` allows sending again (None: it allows it now)."""
    since = now - dt.timedelta(hours=24)
    count, _ = sent_in_window(engine, now=now)
    if count < cap:
        return None
    # Sending may go on when enough of the window's sends have aged out to drop below the cap.
    with engine.connect() as conn:
        at = conn.execute(
            select(EVENTS.c.at)
            .where(EVENTS.c.kind == EventKind.SENT.value, EVENTS.c.at > since)
            .order_by(EVENTS.c.at)
            .offset(count - cap)
            .limit(1)
        ).scalar()
    if at is None:
        return None
    return _as_utc(at) + dt.timedelta(hours=24)


__all__ = [
    "Attempted",
    "Claim",
    "Claimed",
    "Due",
    "NextState",
    "Queued",
    "Released",
    "Requeued",
    "Result",
    "Skipped",
    "Unbuildable",
    "cap_resume_at",
    "claim",
    "claims_held_by",
    "contact_emails",
    "finish_sending",
    "hard_bounce_source",
    "pause_on_bounce_spike",
    "queue_audience",
    "record",
    "release_unhanded",
    "requeue",
    "requeue_streak",
    "reserve_pace",
    "sent_in_window",
    "settle_for_gone",
    "settled_contacts",
    "skip_suppressed",
    "start_sending",
    "status_counts",
    "status_counts_in",
    "suppressed_contacts",
]


# --- outcomes: what comes back (inbox)
#
# Written by `inbox.sync` from what arrives in the office's mailbox. The engine will also need
# `ensure_not_held` (before a send resumes a campaign) and `acknowledge_bounce_spike`.

SUPPRESSIONS = cast(Table, Suppression.__table__)

# Inbox outcomes are logged as coming from the mailbox, not from an SMTP server.
VIA_INBOX = "inbox"


@dataclass(frozen=True, kw_only=True)
class BounceSpikePolicy:
    """A campaign is paused when its hard bounces pass both bounds (since the last acknowledgement)."""

    ratio: float = 0.05
    minimum: int = 10


@dataclass(frozen=True, kw_only=True, slots=True)
class _Letter:
    id: int
    campaign_id: int
    contact_id: int
    email: str
    status: str
    replied_at: dt.datetime | None
    bounced_at: dt.datetime | None
    away_until: dt.date | None


# Statements built once: inbox sync runs them once per mail that comes back, and building a
# statement costs SQLAlchemy more than SQLite takes to run it.
_LETTER = (
    select(
        Message.id,
        Message.campaign_id,
        Message.contact_id,
        Contact.email,
        Message.status,
        Message.replied_at,
        Message.bounced_at,
        Message.away_until,
    )
    .join(Contact, Contact.id == Message.contact_id)
    .where(Message.id == bindparam("letter"))
)
_BOUNCE = (
    update(MESSAGES)
    .where(MESSAGES.c.id == bindparam("letter"))
    .values(
        status=MessageStatus.FAILED.value,
        smtp_code=bindparam("b_code"),
        smtp_reply=bindparam("b_reply"),
        bounced_at=bindparam("b_at"),
        next_attempt_at=None,
        updated_at=bindparam("b_now"),
    )
)
_REPLIED = (
    update(MESSAGES)
    .where(MESSAGES.c.id == bindparam("letter"))
    .values(replied_at=bindparam("r_at"), updated_at=bindparam("r_now"))
)
_AWAY = (
    update(MESSAGES)
    .where(MESSAGES.c.id == bindparam("letter"))
    .values(away_until=bindparam("a_until"), updated_at=bindparam("a_now"))
)
_EVENT = insert(EVENTS)
_SUPPRESS = {
    "sqlite": sqlite.insert(SUPPRESSIONS).on_conflict_do_nothing(index_elements=["email"]),
    "postgresql": postgresql.insert(SUPPRESSIONS).on_conflict_do_nothing(index_elements=["email"]),
}


def _letter(session: Session, message: int) -> _Letter:
    # Core on the session's connection: the ORM's per-statement machinery costs more than the
    # lookup.
    row = session.connection().execute(_LETTER, {"letter": message}).one()
    return _Letter(
        id=row[0],
        campaign_id=row[1],
        contact_id=row[2],
        email=row[3],
        status=row[4],
        replied_at=_aware(row[5]),
        bounced_at=_aware(row[6]),
        away_until=row[7],
    )


def _log(
    session: Session,
    *,
    kind: EventKind,
    at: dt.datetime,
    message: int | None,
    campaign_id: int | None,
    contact_id: int | None,
    detail: str | None,
    smtp_code: int | None = None,
    via: str = VIA_INBOX,
) -> None:
    session.connection().execute(
        _EVENT,
        {
            "message_id": message,
            "campaign_id": campaign_id,
            "contact_id": contact_id,
            "at": at,
            "kind": kind.value,
            "smtp_code": smtp_code,
            "detail": detail,
            "via": via,
        },
    )


def _suppress(
    session: Session, *, email: str, reason: SuppressionReason, source: str, at: dt.datetime
) -> bool:
    """Suppress an address unless it is already (it keeps its first reason). True if new."""
    values = {
        "email": email.strip().lower(),
        "reason": reason.value,
        "source": source[:300],
        "created_at": at,
    }
    statement = _SUPPRESS.get(session.get_bind().dialect.name)
    if statement is not None:
        # A concurrent unsubscribe (the HTTP endpoint, another sync) must not fail this one.
        result = session.connection().execute(statement, values)
        return bool(cast("CursorResult[Any]", result).rowcount)
    if session.scalar(select(Suppression.id).where(Suppression.email == values["email"])):
        return False
    session.connection().execute(insert(SUPPRESSIONS), values)
    return True


def record_bounce(
    session: Session,
    *,
    message: int,
    status: str,
    diagnostic: str,
    smtp_code: int | None,
    at: dt.datetime,
    now: dt.datetime,
    reporter: str | None = None,
) -> bool:
    """A permanent failure reported by a DSN: the letter (`messages.id` = `message`) becomes
    `failed` with the DSN's status and diagnostic, gets its `bounced` event, and the address is
    suppressed as `hard_bounce`. False (and nothing written) if it had bounced already."""
    letter = _letter(session, message)
    if letter.bounced_at is not None:
        return False
    answer = " ".join(f"{status} {diagnostic}".split())
    session.connection().execute(
        _BOUNCE,
        {"letter": message, "b_code": smtp_code, "b_reply": answer, "b_at": at, "b_now": now},
    )
    by = f" (reported by {reporter})" if reporter else ""
    _log(
        session,
        kind=EventKind.BOUNCED,
        at=at,
        message=message,
        campaign_id=letter.campaign_id,
        contact_id=letter.contact_id,
        smtp_code=smtp_code,
        detail=f"{answer}{by}",
    )
    _suppress(
        session,
        email=letter.email,
        reason=SuppressionReason.HARD_BOUNCE,
        source=f"inbox: bounce {status}",
        at=at,
    )
    return True


def record_delay(
    session: Session,
    *,
    message: int,
    status: str,
    diagnostic: str,
    smtp_code: int | None,
    at: dt.datetime,
    reporter: str | None = None,
) -> None:
    """A temporary failure (4.x.x, `Action: delayed`): a `deferred` event only; no state change."""
    letter = _letter(session, message)
    by = f" (reported by {reporter})" if reporter else ""
    _log(
        session,
        kind=EventKind.DEFERRED,
        at=at,
        message=message,
        campaign_id=letter.campaign_id,
        contact_id=letter.contact_id,
        smtp_code=smtp_code,
        detail=" ".join(f"delivery delayed: {status} {diagnostic}".split()) + by,
    )


def record_reply(
    session: Session, *, message: int, at: dt.datetime, subject: str, excerpt: str, now: dt.datetime
) -> bool:
    """A human reply to our letter: a `replied` event (detail: the subject on its first line,
    then the reply's first lines) and `replied_at` (the first reply's date). True if it was the
    first reply to this letter."""
    letter = _letter(session, message)
    first = letter.replied_at is None or at < letter.replied_at
    if first:
        session.connection().execute(_REPLIED, {"letter": message, "r_at": at, "r_now": now})
    _log(
        session,
        kind=EventKind.REPLIED,
        at=at,
        message=message,
        campaign_id=letter.campaign_id,
        contact_id=letter.contact_id,
        detail=reply_detail(subject=subject, excerpt=excerpt),
    )
    return letter.replied_at is None


def reply_detail(*, subject: str, excerpt: str) -> str:
    """How a reply is kept in its event: the subject on the first line, then the first lines."""
    return " ".join(subject.split()) + "\n" + excerpt.strip()


def split_reply_detail(detail: str | None) -> tuple[str, str]:
    """(subject, first lines) of a `replied` event's detail."""
    subject, _, excerpt = (detail or "").partition("\n")
    return subject, excerpt


def record_auto_reply(
    session: Session,
    *,
    message: int,
    at: dt.datetime,
    subject: str,
    away_until: dt.date | None,
    now: dt.datetime,
) -> None:
    """An automatic answer (out of office and the like): an `auto_replied` event; the contact
    still has not replied. A return date it names is kept (`away_until`, the latest one)."""
    letter = _letter(session, message)
    if away_until is not None and (letter.away_until is None or away_until > letter.away_until):
        session.connection().execute(
            _AWAY, {"letter": message, "a_until": away_until, "a_now": now}
        )
    back = f"; back on {away_until.isoformat()}" if away_until else ""
    _log(
        session,
        kind=EventKind.AUTO_REPLIED,
        at=at,
        message=message,
        campaign_id=letter.campaign_id,
        contact_id=letter.contact_id,
        detail=" ".join(subject.split()) + back,
    )


def record_complaint(
    session: Session, *, email: str, message: int | None, feedback_type: str, at: dt.datetime
) -> bool:
    """A feedback-loop complaint (RFC 5965): the address is suppressed as `complaint`, with a
    `complaint` event on the letter complained about. True if the suppression is new."""
    detail = f"feedback-loop report: {feedback_type or 'abuse'}"
    if message is not None:
        letter = _letter(session, message)
        email = letter.email
        _log(
            session,
            kind=EventKind.COMPLAINT,
            at=at,
            message=message,
            campaign_id=letter.campaign_id,
            contact_id=letter.contact_id,
            detail=detail,
        )
    return _suppress(
        session,
        email=email,
        reason=SuppressionReason.COMPLAINT,
        source=f"inbox: complaint ({feedback_type or 'abuse'})",
        at=at,
    )


def record_unsubscribe(
    session: Session,
    *,
    email: str,
    message: int | None,
    at: dt.datetime,
    source: str,
    via: str = VIA_INBOX,
) -> bool:
    """An unsubscribe request: the address is suppressed as `unsubscribed`, with an
    `unsubscribed` event on the letter it answers (or on the contact, when none is known).
    True if the suppression is new.

    Idempotent: a request repeated (a second click, a mail program's retry, the same mail
    read again) for an address already suppressed whose letter (or contact) already has its
    `unsubscribed` event writes nothing. `via`: where it came from (`inbox`, `web`, `cli`)."""
    address = email.strip().lower()
    new = _suppress(
        session, email=address, reason=SuppressionReason.UNSUBSCRIBED, source=source, at=at
    )
    if message is not None:
        letter = _letter(session, message)
        campaign_id: int | None = letter.campaign_id
        contact_id: int | None = letter.contact_id
        logged = Event.message_id == message
    else:
        campaign_id = None
        contact_id = session.scalar(select(Contact.id).where(Contact.email == address))
        if contact_id is None:
            return new
        logged = Event.contact_id == contact_id
    if not new and session.scalar(
        select(Event.id).where(logged, Event.kind == EventKind.UNSUBSCRIBED.value).limit(1)
    ):
        return new
    _log(
        session,
        kind=EventKind.UNSUBSCRIBED,
        at=at,
        message=message,
        campaign_id=campaign_id,
        contact_id=contact_id,
        detail=source,
        via=via,
    )
    return new


# Campaign states a bounce spike pauses: those with letters out or still to go.
_PAUSABLE = (CampaignStatus.SENDING.value, CampaignStatus.PAUSED.value, CampaignStatus.DONE.value)


def _bounce_counts(session: Session | Connection, campaign_id: int) -> tuple[int, int]:
    """(hard bounces, letters that reached a server) of a campaign. A hard bounce is a DSN
    that came back (inbox sync) or a 5.1.1-class refusal of a running send (both set
    `bounced_at`); a letter refused at once never got `sent_at`, so it is counted in both."""
    bounced, sent, refused = session.execute(
        select(
            func.count(Message.bounced_at),
            func.count(Message.sent_at),
            func.count(Message.bounced_at).filter(Message.sent_at.is_(None)),
        ).where(Message.campaign_id == campaign_id)
    ).one()
    return int(bounced), int(sent) + int(refused)


def bounce_spike(
    session: Session, *, campaign_id: int, policy: BounceSpikePolicy | None = None
) -> str | None:
    """Why the campaign's hard bounces amount to a spike (its words for people), or None."""
    policy = policy or BounceSpikePolicy()
    bounced, sent = _bounce_counts(session, campaign_id)
    acknowledged = int(
        session.scalar(select(Campaign.bounces_acknowledged).where(Campaign.id == campaign_id)) or 0
    )
    if bounced - acknowledged < policy.minimum or not sent or bounced <= policy.ratio * sent:
        return None
    return (
        f"bounce spike: {bounced:,} hard bounces of {sent:,} sent "
        f"({100.0 * bounced / sent:.1f}%, above {100.0 * policy.ratio:g}%); "
        "check the list's quality before sending more"
    )


def pause_on_bounce_spike(
    engine: Engine, *, campaign_id: int, now: dt.datetime, policy: BounceSpikePolicy | None = None
) -> str | None:
    """What a running send calls while its SMTP answers bring hard bounces: pauses and holds
    the campaign on a spike. Returns the reason if the campaign is held (now or already)."""
    with _writing(engine) as conn, Session(bind=conn) as session:
        held, reason = session.execute(
            select(Campaign.held, Campaign.pause_reason).where(Campaign.id == campaign_id)
        ).one()
        if held:
            return str(reason or "held by a bounce spike")
        spike = bounce_spike(session, campaign_id=campaign_id, policy=policy)
        if spike is None:
            return None
        pause_for_bounce_spike(session, campaign_id=campaign_id, reason=spike, now=now)
        session.flush()
        return spike


def pause_for_bounce_spike(
    session: Session, *, campaign_id: int, reason: str, now: dt.datetime
) -> bool:
    """Pause the campaign and hold it: `send` must not resume it until the user acknowledges.
    True if it was not held already."""
    result = session.execute(
        update(Campaign)
        .where(
            Campaign.id == campaign_id,
            Campaign.status.in_(_PAUSABLE),
            Campaign.held.is_(False),
        )
        .values(status=CampaignStatus.PAUSED.value, pause_reason=reason, paused_at=now, held=True)
        .execution_options(synchronize_session=False)
    )
    return bool(cast("CursorResult[Any]", result).rowcount)


def ensure_not_held(
    session: Session, *, campaign_id: int, acknowledge: bool, now: dt.datetime
) -> None:
    """What `send` calls before it resumes a campaign: raises CampaignHeld while a bounce spike
    holds it, unless `acknowledge` (then the hold is lifted, see acknowledge_bounce_spike)."""
    campaign = session.execute(
        select(Campaign.slug, Campaign.held, Campaign.pause_reason).where(
            Campaign.id == campaign_id
        )
    ).one()
    slug, held, reason = campaign
    if not held:
        return
    if not acknowledge:
        raise CampaignHeld(
            f"campaign {slug} is paused: {reason}. Look at `mailer log {slug} --status failed`; "
            "to send anyway, acknowledge it (send again with --acknowledge-bounces)"
        )
    acknowledge_bounce_spike(session, campaign_id=campaign_id, now=now)


def acknowledge_bounce_spike(session: Session, *, campaign_id: int, now: dt.datetime) -> None:
    """Lift a bounce-spike hold: the bounces seen so far are accepted, a new spike pauses again.
    The campaign stays `paused` (send resumes it); only the hold and its reason go."""
    bounced, _ = _bounce_counts(session, campaign_id)
    session.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id)
        .values(held=False, pause_reason=None, bounces_acknowledged=bounced)
        .execution_options(synchronize_session=False)
    )


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


# --- team: campaign changes, suppressions by hand, and the audit log
#
# A team works one database (DESIGN §3, issue 16): anyone may pause, resume, cancel or delete a
# campaign, and every running sender polls `campaign_state` to obey at once. Each change here is
# written with its audit event (message_id NULL, `events.actor` = who) in the same transaction,
# so `mailer log --events --all` answers "who did what, from where". Quiet days (issue 14) skip
# contacts another campaign wrote to lately, at queue time (`skip_recently_contacted`), and the
# claim re-checks them (`claim(quiet_days=...)`, through `recently_contacted`).

# Messages still waiting for a first or a further attempt: what cancel and quiet days skip.
_PENDING = (MessageStatus.QUEUED.value, MessageStatus.RETRY.value)


def log_change(
    session: Session,
    *,
    kind: EventKind,
    detail: str,
    actor: Actor,
    at: dt.datetime,
    campaign_id: int | None = None,
    contact_id: int | None = None,
) -> None:
    """One audit event (no message) in the session's transaction: a campaign created or
    changed, an import, a suppression added or removed."""
    session.connection().execute(
        insert(EVENTS),
        {
            "message_id": None,
            "campaign_id": campaign_id,
            "contact_id": contact_id,
            "at": at,
            "kind": kind.value,
            "smtp_code": None,
            "detail": detail,
            "via": None,
            "actor": actor.label,
        },
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class CampaignState:
    """A campaign's state as every sender polls it (see engine._Run.watch_campaign)."""

    slug: str
    status: str
    paused_by: str | None
    pause_reason: str | None
    held: bool

    @property
    def halt_reason(self) -> str | None:
        """Why a running sender must stop now, in words for people; None: it may go on.

        A run's own pause (Ctrl-C, too many problems) names nobody and stops nobody else."""
        if self.status == CampaignStatus.CANCELLED.value:
            return self.pause_reason or f"campaign {self.slug} was cancelled"
        if self.status == CampaignStatus.PAUSED.value and (self.paused_by or self.held):
            return self.pause_reason or f"campaign {self.slug} was paused"
        return None


def campaign_state(engine: Engine, *, campaign_id: int) -> CampaignState:
    """The campaign's status and who paused it: one indexed read, cheap enough every second."""
    with engine.connect() as conn:
        row = conn.execute(
            select(
                Campaign.slug,
                Campaign.status,
                Campaign.paused_by,
                Campaign.pause_reason,
                Campaign.held,
            ).where(Campaign.id == campaign_id)
        ).one_or_none()
    if row is None:
        # Deleted under a running sender: nothing may go on.
        return CampaignState(
            slug=str(campaign_id),
            status=CampaignStatus.CANCELLED.value,
            paused_by=None,
            pause_reason="the campaign was deleted",
            held=False,
        )
    slug, status, paused_by, reason, held = row
    return CampaignState(
        slug=slug, status=status, paused_by=paused_by, pause_reason=reason, held=bool(held)
    )


def _follow_up_ids(session: Session, campaign_id: int) -> list[int]:
    """Follow-ups of the campaign, at any depth (campaigns with `parent_id`)."""
    parent = Campaign.parent_id
    found: list[int] = []
    frontier = [campaign_id]
    while frontier:
        children = list(session.scalars(select(Campaign.id).where(parent.in_(frontier))))
        children = [c for c in children if c not in found and c != campaign_id]
        found.extend(children)
        frontier = children
    return found


def _stamp(actor: Actor, now: dt.datetime) -> str:
    return f"{actor.label} at {now:%Y-%m-%d %H:%M} UTC"


def ensure_sendable(
    engine: Engine, *, slug: str, acknowledge_bounces: bool, actor: Actor, now: dt.datetime
) -> None:
    """What `send` asks before anything else: a cancelled campaign sends nothing, a campaign
    someone paused waits for `campaign resume`, and one a bounce spike holds waits for
    `--acknowledge-bounces` (see ensure_not_held; the acknowledgement is logged). The run's
    start_sending asks the same again, without lifting anything."""
    with _writing(engine) as conn, Session(bind=conn) as session:
        campaign = campaigns.get_campaign(session, slug)
        if _refuse_unsendable(
            session, campaign, acknowledge_bounces=acknowledge_bounces, now=now
        ):
            log_change(
                session,
                kind=EventKind.CAMPAIGN_RESUMED,
                detail=f"campaign {slug}: bounce spike acknowledged (send --acknowledge-bounces)",
                actor=actor,
                at=now,
                campaign_id=campaign.id,
            )


def _refuse_unsendable(
    session: Session, campaign: Campaign, *, acknowledge_bounces: bool, now: dt.datetime
) -> bool:
    """The one check of whether a campaign may be sent (ensure_sendable, start_sending):
    raises for a cancelled campaign, one paused by someone, and one a bounce spike holds unless
    `acknowledge_bounces` -- then the hold is lifted and True returned."""
    slug = campaign.slug
    if campaign.status == CampaignStatus.CANCELLED.value:
        raise InvalidValueError(
            f"campaign {slug} is cancelled ({campaign.pause_reason or 'cancelled'}); "
            "nothing is sent for it"
        )
    if campaign.status == CampaignStatus.PAUSED.value and campaign.paused_by:
        raise CampaignPaused(
            f"campaign {slug} is {campaign.pause_reason or 'paused by ' + campaign.paused_by}"
            f"; `mailer campaign resume {slug}` lets it go on"
        )
    if not campaign.held:
        return False
    ensure_not_held(session, campaign_id=campaign.id, acknowledge=acknowledge_bounces, now=now)
    session.refresh(campaign)
    return True


def pause_campaign(
    engine: Engine, *, slug: str, actor: Actor, reason: str | None, now: dt.datetime
) -> CampaignState:
    """`mailer campaign pause`: every sender of the campaign stops within seconds, handing
    back what it has not sent; no `send` starts until `campaign resume`."""
    with _writing(engine) as conn, Session(bind=conn) as session:
        campaign = campaigns.get_campaign(session, slug)
        if campaign.status == CampaignStatus.CANCELLED.value:
            raise InvalidValueError(f"campaign {slug} is cancelled; there is nothing to pause")
        if campaign.status == CampaignStatus.DONE.value:
            raise InvalidValueError(f"campaign {slug} is done; there is nothing left to pause")
        words = f"paused by {_stamp(actor, now)}" + (f": {reason}" if reason else "")
        campaign.status = CampaignStatus.PAUSED.value
        campaign.paused_by = actor.label
        campaign.pause_reason = words
        campaign.paused_at = now
        session.flush()
        log_change(
            session,
            kind=EventKind.CAMPAIGN_PAUSED,
            detail=f"campaign {slug}: {words}",
            actor=actor,
            at=now,
            campaign_id=campaign.id,
        )
        return CampaignState(
            slug=slug,
            status=campaign.status,
            paused_by=campaign.paused_by,
            pause_reason=words,
            held=bool(campaign.held),
        )


def resume_campaign(
    engine: Engine, *, slug: str, actor: Actor, acknowledge_bounces: bool, now: dt.datetime
) -> CampaignState:
    """`mailer campaign resume`: a paused campaign may be sent again (by the next `send`). A
    bounce-spike hold needs `acknowledge_bounces` (CampaignHeld otherwise)."""
    with _writing(engine) as conn, Session(bind=conn) as session:
        campaign = campaigns.get_campaign(session, slug)
        if campaign.status != CampaignStatus.PAUSED.value:
            raise InvalidValueError(f"campaign {slug} is not paused (it is {campaign.status})")
        was = campaign.pause_reason or "paused"
        if campaign.held:
            ensure_not_held(
                session, campaign_id=campaign.id, acknowledge=acknowledge_bounces, now=now
            )
        session.expire(campaign)
        campaign.status = (
            CampaignStatus.SENDING.value
            if campaign.started_at is not None
            else CampaignStatus.DRAFT.value
        )
        campaign.paused_by = None
        campaign.pause_reason = None
        session.flush()
        log_change(
            session,
            kind=EventKind.CAMPAIGN_RESUMED,
            detail=f"campaign {slug}: resumed by {_stamp(actor, now)} (was {was})",
            actor=actor,
            at=now,
            campaign_id=campaign.id,
        )
        return CampaignState(
            slug=slug, status=campaign.status, paused_by=None, pause_reason=None, held=False
        )


def _skip_pending(conn: Connection, *, campaign_id: int, detail: str, now: dt.datetime) -> int:
    """Every letter of the campaign still waiting (`queued`/`retry`) becomes `skipped`, each
    with its event. Returns how many."""
    rows = conn.execute(
        select(MESSAGES.c.id, MESSAGES.c.contact_id).where(
            MESSAGES.c.campaign_id == campaign_id, MESSAGES.c.status.in_(_PENDING)
        )
    ).all()
    for start in range(0, len(rows), _ROWS_A_STATEMENT):
        conn.execute(
            update(MESSAGES)
            .where(
                MESSAGES.c.id.in_([mid for mid, _ in rows[start : start + _ROWS_A_STATEMENT]]),
                MESSAGES.c.status.in_(_PENDING),
            )
            .values(status=MessageStatus.SKIPPED.value, updated_at=now, next_attempt_at=None)
        )
    _insert_events(
        conn,
        [
            (mid, campaign_id, cid, now, EventKind.SKIPPED.value, None, detail, None)
            for mid, cid in rows
        ],
    )
    return len(rows)


def cancel_campaign(
    engine: Engine, *, slug: str, actor: Actor, reason: str | None, now: dt.datetime
) -> dict[str, int]:
    """`mailer campaign cancel`: the campaign and its follow-ups are `cancelled`, their waiting
    letters `skipped` (each with an event); letters a running sender holds are handed back by
    it and skipped when it stops (see finish_sending). Returns letters skipped per campaign."""
    skipped: dict[str, int] = {}
    with _writing(engine) as conn, Session(bind=conn) as session:
        campaign = campaigns.get_campaign(session, slug)
        if campaign.status == CampaignStatus.CANCELLED.value:
            raise InvalidValueError(f"campaign {slug} is cancelled already")
        words = f"cancelled by {_stamp(actor, now)}" + (f": {reason}" if reason else "")
        targets = [campaign.id, *_follow_up_ids(session, campaign.id)]
        for target in targets:
            row = session.get(Campaign, target)
            assert row is not None
            if row.status == CampaignStatus.CANCELLED.value:
                continue
            why = words if target == campaign.id else f"{words} (follow-up of {slug})"
            count = _skip_pending(conn, campaign_id=target, detail=why, now=now)
            skipped[row.slug] = count
            row.status = CampaignStatus.CANCELLED.value
            row.pause_reason = why
            row.paused_at = now
            row.finished_at = now
            session.flush()
            log_change(
                session,
                kind=EventKind.CAMPAIGN_CANCELLED,
                detail=f"campaign {row.slug}: {why}; {count} waiting letter(s) skipped",
                actor=actor,
                at=now,
                campaign_id=target,
            )
    return skipped


def delete_campaign(engine: Engine, *, slug: str, actor: Actor, now: dt.datetime) -> int:
    """`mailer campaign delete`: a campaign nothing of which was ever handed to a server goes,
    with its waiting letters and their events. Its audit events stay in the log (no longer
    linked; their detail names it), and so does the event of its deletion. Returns the
    letters dropped. Refused once any letter was attempted: that is the record."""
    with _writing(engine) as conn, Session(bind=conn) as session:
        campaign = campaigns.get_campaign(session, slug)
        attempted = session.scalar(
            select(func.count()).where(
                MESSAGES.c.campaign_id == campaign.id,
                or_(
                    MESSAGES.c.attempts > 0,
                    MESSAGES.c.sent_at.is_not(None),
                    MESSAGES.c.status.in_(
                        [
                            MessageStatus.SENDING.value,
                            MessageStatus.SENT.value,
                            MessageStatus.UNCERTAIN.value,
                        ]
                    ),
                ),
            )
        )
        if attempted:
            raise InvalidValueError(
                f"campaign {slug} has {attempted} letter(s) that were sent or tried: they are "
                f"the record and stay; `mailer campaign cancel {slug}` stops the rest"
            )
        if _follow_up_ids(session, campaign.id):
            raise InvalidValueError(
                f"campaign {slug} has follow-ups; delete (or cancel) them first"
            )
        for other in session.scalars(select(Campaign).where(Campaign.id != campaign.id)):
            named = audience_mod.Audience.from_json(other.audience)
            if any(slug in getattr(named, key) for key, _, _ in audience_mod.RECORD_FILTERS):
                raise InvalidValueError(
                    f"campaign {other.slug}'s audience names {slug} "
                    f"({named.describe()}); delete or change it first"
                )
        letters = int(
            session.scalar(select(func.count()).where(MESSAGES.c.campaign_id == campaign.id)) or 0
        )
        cid = campaign.id
        # The campaign's audit events outlive it: their detail names it.
        conn.execute(
            update(EVENTS)
            .where(EVENTS.c.campaign_id == cid, EVENTS.c.message_id.is_(None))
            .values(campaign_id=None)
        )
        conn.execute(EVENTS.delete().where(EVENTS.c.campaign_id == cid))
        conn.execute(MESSAGES.delete().where(MESSAGES.c.campaign_id == cid))
        session.delete(campaign)
        session.flush()
        log_change(
            session,
            kind=EventKind.CAMPAIGN_DELETED,
            detail=f"campaign {slug} deleted by {_stamp(actor, now)} "
            f"(template {campaign.template}, from {campaign.from_address}; "
            f"{letters} unsent letter(s) dropped)",
            actor=actor,
            at=now,
        )
    return letters


def finish_sending_team(conn: Connection, *, campaign_id: int, now: dt.datetime) -> bool:
    """For finish_sending: True when the team's state of the campaign must stand (cancelled,
    or paused by someone or by a bounce spike) -- a run's end neither un-pauses nor revives
    it. Letters a cancelled campaign's sender handed back are skipped here."""
    row = conn.execute(
        select(Campaign.status, Campaign.paused_by, Campaign.held, Campaign.pause_reason).where(
            Campaign.id == campaign_id
        )
    ).one_or_none()
    if row is None:
        return True
    status, paused_by, held, reason = row
    if status == CampaignStatus.CANCELLED.value:
        _skip_pending(conn, campaign_id=campaign_id, detail=reason or "cancelled", now=now)
        return True
    return status == CampaignStatus.PAUSED.value and bool(paused_by or held)


def add_suppressions(
    session: Session,
    *,
    emails: Sequence[str],
    reason: SuppressionReason,
    source: str,
    actor: Actor,
    now: dt.datetime,
) -> int:
    """`mailer suppress add`: each newly suppressed address with its `suppressed` event (on
    the contact, when there is one). An address suppressed already keeps its first reason.
    Returns how many are new."""
    added = 0
    for email in dict.fromkeys(audience_mod.normalise_email(e) for e in emails if e.strip()):
        if not _suppress(session, email=email, reason=reason, source=source, at=now):
            continue
        added += 1
        log_change(
            session,
            kind=EventKind.SUPPRESSED,
            detail=f"{email} suppressed ({reason.value}, {source}) by {actor.label}",
            actor=actor,
            at=now,
            contact_id=session.scalar(select(Contact.id).where(Contact.email == email)),
        )
    return added


def remove_suppression(
    session: Session, *, email: str, why: str, actor: Actor, now: dt.datetime
) -> Suppression:
    """`mailer suppress remove`: the address may be written to again; the removal, its reason
    and what the suppression was stay in the log (`unsuppressed` event). Returns the removed
    suppression; InvalidValueError when the address is not suppressed."""
    address = audience_mod.normalise_email(email)
    if not why.strip():
        raise InvalidValueError("suppress remove: say why with --reason (it is kept in the log)")
    found = session.scalar(select(Suppression).where(Suppression.email == address))
    if found is None:
        raise InvalidValueError(f"{address} is not suppressed; `mailer suppress list` lists them")
    was = f"{found.reason}" + (f", {found.source}" if found.source else "")
    session.delete(found)
    session.flush()
    log_change(
        session,
        kind=EventKind.UNSUPPRESSED,
        detail=f"{address} no longer suppressed (was {was}) by {actor.label}: {why.strip()}",
        actor=actor,
        at=now,
        contact_id=session.scalar(select(Contact.id).where(Contact.email == address)),
    )
    return found


def recently_contacted(
    reader: Connection | Session,
    *,
    campaign_id: int,
    contact_ids: Sequence[int],
    since: dt.datetime,
) -> dict[int, tuple[str, dt.datetime]]:
    """Of `contact_ids`, those another campaign sent a letter to since `since`: the campaign's
    slug and when (the latest). The claim re-checks quiet days with it per batch; a
    follow-up's parent does not count (the follow-up exists to write again)."""
    excluded = [campaign_id]
    parent = getattr(Campaign, "parent_id", None)
    if parent is not None:
        excluded += [
            p
            for p in reader.execute(select(parent).where(Campaign.id == campaign_id)).scalars()
            if p is not None
        ]
    found: dict[int, tuple[str, dt.datetime]] = {}
    for start in range(0, len(contact_ids), _ROWS_A_STATEMENT):
        chunk = list(contact_ids[start : start + _ROWS_A_STATEMENT])
        rows = reader.execute(
            select(MESSAGES.c.contact_id, Campaign.slug, MESSAGES.c.sent_at)
            .join(Campaign, Campaign.id == MESSAGES.c.campaign_id)
            .where(
                MESSAGES.c.contact_id.in_(chunk),
                MESSAGES.c.campaign_id.notin_(excluded),
                MESSAGES.c.sent_at >= since,
            )
        ).all()
        for cid, slug, at in rows:
            when = _as_utc(at)
            if cid not in found or when > found[cid][1]:
                found[int(cid)] = (str(slug), when)
    return found


def skip_recently_contacted(
    engine: Engine, *, campaign_id: int, quiet_days: int, now: dt.datetime
) -> int:
    """Quiet days (`--skip-contacted-within`): letters of the campaign not yet tried whose
    contact another campaign wrote to within `quiet_days` become `skipped`, each with an event
    naming that campaign and day. Returns how many."""
    since = now - dt.timedelta(days=quiet_days)
    skipped = 0
    with engine.connect() as reading:
        waiting = reading.execute(
            select(MESSAGES.c.id, MESSAGES.c.contact_id).where(
                MESSAGES.c.campaign_id == campaign_id,
                MESSAGES.c.status == MessageStatus.QUEUED.value,
                MESSAGES.c.attempts == 0,
            )
        ).all()
    for start in range(0, len(waiting), _ROWS_A_STATEMENT):
        page = waiting[start : start + _ROWS_A_STATEMENT]
        with _writing(engine) as conn:
            recent = recently_contacted(
                conn, campaign_id=campaign_id, contact_ids=[c for _, c in page], since=since
            )
            ids = [mid for mid, cid in page if cid in recent]
            if not ids:
                continue
            changed = conn.execute(
                update(MESSAGES)
                .where(
                    MESSAGES.c.id.in_(ids),
                    MESSAGES.c.status == MessageStatus.QUEUED.value,
                    MESSAGES.c.attempts == 0,
                )
                .values(status=MessageStatus.SKIPPED.value, updated_at=now)
                .returning(MESSAGES.c.id, MESSAGES.c.contact_id)
            ).all()
            _insert_events(
                conn,
                [
                    (
                        mid,
                        campaign_id,
                        cid,
                        now,
                        EventKind.SKIPPED.value,
                        None,
                        _quiet_detail(*recent[cid], quiet_days=quiet_days),
                        None,
                    )
                    for mid, cid in changed
                ],
            )
            skipped += len(changed)
    return skipped


__all__ += [
    "CampaignState",
    "add_suppressions",
    "campaign_state",
    "cancel_campaign",
    "delete_campaign",
    "ensure_sendable",
    "finish_sending_team",
    "log_change",
    "pause_campaign",
    "recently_contacted",
    "remove_suppression",
    "resume_campaign",
    "skip_recently_contacted",
]


# --- windows and follow-ups: letters held until their time, or skipped
#
# Written by `timing` (the gate the engine asks which peeked letters are due now, before they
# are composed and claimed) and by a campaign's cancellation (`cancel_campaign`). A held
# letter stays `queued` (or `retry`) with its due time in `next_attempt_at`: the peek leaves it
# alone until then, and the claim never takes it early.


@dataclass(frozen=True, slots=True, kw_only=True)
class Hold:
    """A letter not due yet: held until `until`; `reason` says why (window, delay, away)."""

    message: int
    contact_id: int
    until: dt.datetime
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Drop:
    """A letter that must not go out any more (its parent was answered, bounced, or the
    address is suppressed): `skipped`, with the reason."""

    message: int
    contact_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DueNow:
    """A held letter whose time came under the rules of this run: due now, with the reason."""

    message: int
    contact_id: int
    reason: str


class Timed(NamedTuple):
    held: int
    skipped: int
    released: int


_OPEN = (MessageStatus.QUEUED.value, MessageStatus.RETRY.value)


def _utc_text(at: dt.datetime) -> str:
    return f"{at.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


def hold_and_skip(
    engine: Engine,
    *,
    campaign_id: int,
    holds: Sequence[Hold] = (),
    skips: Sequence[Drop] = (),
    releases: Sequence[DueNow] = (),
    now: dt.datetime,
) -> Timed:
    """In one transaction: `holds` get their due time (a `held` event each, with the reason and
    the time), `skips` become `skipped` (a `skipped` event each), `releases` lose their due time
    (a `requeued` event each: due now). Only letters still `queued`/`retry` change (another
    sender may have claimed one since); returns how many did."""
    if not (holds or skips or releases):
        return Timed(0, 0, 0)
    c = MESSAGES.c
    events: list[_EventRow] = []
    held = skipped = released = 0
    with _writing(engine) as conn:
        by_until: dict[dt.datetime, list[Hold]] = {}
        for h in holds:
            by_until.setdefault(h.until, []).append(h)
        for until, group in by_until.items():
            reasons = {h.message: h for h in group}
            for start in range(0, len(group), _ROWS_A_STATEMENT):
                ids = [h.message for h in group[start : start + _ROWS_A_STATEMENT]]
                changed = conn.execute(
                    update(MESSAGES)
                    .where(c.id.in_(ids), c.status.in_(_OPEN))
                    .values(next_attempt_at=until, updated_at=now)
                    .returning(c.id)
                ).scalars()
                for mid in changed:
                    h = reasons[mid]
                    held += 1
                    events.append(
                        (
                            mid,
                            campaign_id,
                            h.contact_id,
                            now,
                            EventKind.HELD.value,
                            None,
                            f"due {_utc_text(until)}: {h.reason}",
                            None,
                        )
                    )
        for rows, values, kind in (
            (skips, {"status": MessageStatus.SKIPPED.value}, EventKind.SKIPPED),
            (releases, {}, EventKind.REQUEUED),
        ):
            reasons_by_id = {r.message: r for r in rows}
            for start in range(0, len(rows), _ROWS_A_STATEMENT):
                ids = [r.message for r in rows[start : start + _ROWS_A_STATEMENT]]
                changed = conn.execute(
                    update(MESSAGES)
                    .where(c.id.in_(ids), c.status.in_(_OPEN))
                    .values(next_attempt_at=None, updated_at=now, **values)
                    .returning(c.id)
                ).scalars()
                for mid in changed:
                    r = reasons_by_id[mid]
                    if kind is EventKind.SKIPPED:
                        skipped += 1
                    else:
                        released += 1
                    events.append(
                        (mid, campaign_id, r.contact_id, now, kind.value, None, r.reason, None)
                    )
        _insert_events(conn, events)
    return Timed(held, skipped, released)


__all__ += ["Drop", "DueNow", "Hold", "Timed", "hold_and_skip"]
