"""The delivery engine: the only place where the outbox, the renderer and a transport meet.

A run goes: recover claims left by a dead sender -> freeze the templates -> resolve the audience
again and queue whoever is missing (skipping the suppressed) -> a pipeline of bounded queues:

    peeker (reads which messages are due; claims nothing) -> composing (renders bytes, in a
    worker process for a large run: see compose_worker) -> claimer (commits `queued -> sending`
    per composed batch) -> feeder -> N sender workers (the transport) -> recorder (commits
    results in small batches)

The claim of a batch is committed before any byte of it goes out, so after a crash a message is
either untouched (`queued`), known (`sent`, `retry`, `failed`), or `sending` -- which the next run
turns into `uncertain` and never re-sends on its own. Batches are composed before they are
claimed, so composing ahead never widens that window; a composed batch that is not claimed (the
run stopped, another sender took it) is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mailer import audience as audience_mod
from mailer import campaigns, compose
from mailer.addresses import address_problem
from mailer.compose_worker import Batch, BatchComposer, ComposeWorker, Composing
from mailer.config import Workspace
from mailer.errors import (
    DatabaseError,
    Interrupted,
    InvalidValueError,
    MailerError,
    TransportError,
)
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
from mailer.transport import DryRun, Outcome, OutcomeKind, Transport

MESSAGES = cast(Table, Message.__table__)
EVENTS = cast(Table, Event.__table__)

Clock = Callable[[], dt.datetime]
_T = TypeVar("_T")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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


@dataclass(kw_only=True)
class SendReport:
    campaign: str
    via: str
    run_id: str
    due: int = 0
    recovered: int = 0
    newly_queued: int = 0
    skipped: int = 0
    claimed: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    uncertain: int = 0
    released: int = 0
    build_errors: int = 0
    fell_back: int = 0
    # Messages composed by the worker process (see compose_worker), not by the sender itself.
    composed_by_worker: int = 0
    test: bool = False
    dry_run: bool = False
    # Why the run stopped before the queue was empty: limit, daily-cap, paused, interrupted,
    # systemic.
    stopped: str | None = None
    resume_at: dt.datetime | None = None
    note: str | None = None
    errors: list[str] = field(default_factory=list)
    # Message counts per status after the run.
    totals: dict[str, int] = field(default_factory=dict)
    rate: float = 0.0

    @property
    def done(self) -> int:
        return self.sent + self.deferred + self.failed + self.uncertain + self.build_errors

    @property
    def incomplete(self) -> bool:
        """Exit 3: something is left that the user must look at or wait for."""
        if self.test or self.dry_run:
            return bool(self.failed or self.uncertain or self.deferred or self.build_errors)
        left = sum(
            self.totals.get(s.value, 0)
            for s in (MessageStatus.FAILED, MessageStatus.UNCERTAIN, MessageStatus.RETRY)
        )
        return bool(left) or self.stopped in ("daily-cap", "paused")


Progress = Callable[[SendReport], None]


@dataclass(frozen=True, kw_only=True)
class SendPlan:
    """What the confirmation shows before anything is sent."""

    campaign: str
    from_address: str
    audience: int
    pending: int
    sample_subject: str | None
    sample_to: str | None


# --------------------------------------------------------------------------- small helpers


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


def _insert(engine: Engine, table: Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING where the backend has it (two senders may race)."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if engine.dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    return table.insert()


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _new_run_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# Runs of this process that have ended: a claim of theirs still `sending` has no owner.
_ENDED_RUNS: set[str] = set()


def _claim_is_dead(
    claimed_by: str | None, updated_at: dt.datetime, *, now: dt.datetime, stale: dt.timedelta
) -> bool:
    if not claimed_by or claimed_by in _ENDED_RUNS:
        return True
    host, _, rest = claimed_by.partition(":")
    pid_text = rest.partition(":")[0]
    if host == socket.gethostname() and pid_text.isdigit():
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    # Another machine's sender, or a pid since reused: only a claim far older than any batch
    # takes is presumed dead.
    return now - updated_at > stale


def get_campaign(engine: Engine, slug: str) -> Campaign:
    with Session(engine) as session:
        return campaigns.get_campaign(session, slug)


def status_counts(engine: Engine, campaign_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(MESSAGES.c.status, func.count())
            .where(MESSAGES.c.campaign_id == campaign_id)
            .group_by(MESSAGES.c.status)
        ).all()
    counts = {s.value: 0 for s in MessageStatus}
    counts.update({str(status): int(n) for status, n in rows})
    return counts


def sent_in_window(engine: Engine, *, now: dt.datetime) -> tuple[int, dt.datetime | None]:
    """Messages sent in the last 24 hours across every campaign, and the oldest of those sends."""
    since = now - dt.timedelta(hours=24)
    with engine.connect() as conn:
        count, oldest = conn.execute(
            select(func.count(), func.min(EVENTS.c.at)).where(
                EVENTS.c.kind == EventKind.SENT.value, EVENTS.c.at > since
            )
        ).one()
    if oldest is not None and not isinstance(oldest, dt.datetime):
        oldest = dt.datetime.fromisoformat(str(oldest))
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    return int(count), oldest


def _cap_resume_at(engine: Engine, *, now: dt.datetime, cap: int) -> dt.datetime | None:
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
    value = at if isinstance(at, dt.datetime) else dt.datetime.fromisoformat(str(at))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value + dt.timedelta(hours=24)


# --------------------------------------------------------------------------- preparation


def recover_stale_claims(
    engine: Engine,
    *,
    campaign_id: int,
    now: dt.datetime,
    run_id: str,
    stale: dt.timedelta = SendPolicy().stale_claim,
) -> int:
    """`sending` rows whose sender is gone: their outcome is unknown, so they become `uncertain`."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                MESSAGES.c.id, MESSAGES.c.contact_id, MESSAGES.c.claimed_by, MESSAGES.c.updated_at
            ).where(
                MESSAGES.c.campaign_id == campaign_id,
                MESSAGES.c.status == MessageStatus.SENDING.value,
            )
        ).all()
    dead = [
        (mid, cid, claimed_by)
        for mid, cid, claimed_by, updated_at in rows
        if _claim_is_dead(claimed_by, updated_at, now=now, stale=stale)
    ]
    if not dead:
        return 0
    recovered = 0
    with _writing(engine) as conn:
        for mid, cid, claimed_by in dead:
            changed = conn.execute(
                update(MESSAGES)
                .where(
                    MESSAGES.c.id == mid,
                    MESSAGES.c.status == MessageStatus.SENDING.value,
                    MESSAGES.c.claimed_by.is_(None)
                    if claimed_by is None
                    else MESSAGES.c.claimed_by == claimed_by,
                )
                .values(
                    status=MessageStatus.UNCERTAIN.value,
                    claimed_by=None,
                    updated_at=now,
                    smtp_reply="the sender stopped while this message was being sent",
                )
            ).rowcount
            if changed:
                recovered += 1
                conn.execute(
                    EVENTS.insert().values(
                        message_id=mid,
                        campaign_id=campaign_id,
                        contact_id=cid,
                        at=now,
                        kind=EventKind.UNCERTAIN.value,
                        detail=(
                            f"found in `sending` left by {claimed_by or 'an unknown sender'}: "
                            "it may or may not have been delivered; "
                            "`mailer retry --uncertain` re-sends"
                        ),
                        via=run_id,
                    )
                )
    return recovered


def queue_audience(
    engine: Engine, *, campaign: Campaign, now: dt.datetime, chunk: int = 1000
) -> tuple[int, int]:
    """Queue every contact of the audience that has no message yet; skip the suppressed.

    Returns (newly queued, newly skipped).
    """
    with Session(engine) as session:
        wanted = audience_mod.contact_ids(
            session, audience_mod.Audience.from_json(campaign.audience)
        )
    queued = skipped = 0
    insert = _insert(engine, MESSAGES).returning(
        MESSAGES.c.id, MESSAGES.c.contact_id, MESSAGES.c.status
    )
    for ids in _chunks(wanted, chunk):
        with _writing(engine) as conn:
            have = set(
                conn.execute(
                    select(MESSAGES.c.contact_id).where(
                        MESSAGES.c.campaign_id == campaign.id, MESSAGES.c.contact_id.in_(ids)
                    )
                ).scalars()
            )
            missing = [i for i in ids if i not in have]
            if not missing:
                continue
            emails = {
                k: v
                for k, v in conn.execute(
                    select(Contact.id, Contact.email).where(Contact.id.in_(missing))
                )
            }
            rows = []
            invalid: dict[int, str] = {}
            for cid in missing:
                email = emails.get(cid, "")
                problem = address_problem(email)
                ok = problem is None
                if problem is not None:
                    invalid[cid] = f"invalid address {email!r}: {problem}"
                rows.append(
                    {
                        "campaign_id": campaign.id,
                        "contact_id": cid,
                        "status": (MessageStatus.QUEUED if ok else MessageStatus.SKIPPED).value,
                        "attempts": 0,
                        "queued_at": now,
                        "updated_at": now,
                    }
                )
            inserted = _insert_messages(conn, rows)
            if inserted is None:
                inserted = [(m, c, s) for m, c, s in conn.execute(insert, rows)]
            events = []
            for mid, cid, status in inserted:
                if status == MessageStatus.SKIPPED.value:
                    skipped += 1
                    events.append(
                        _event(
                            mid,
                            campaign.id,
                            cid,
                            now,
                            EventKind.SKIPPED,
                            None,
                            invalid.get(cid, "invalid address"),
                            None,
                        )
                    )
                else:
                    queued += 1
                    events.append(
                        _event(mid, campaign.id, cid, now, EventKind.QUEUED, None, None, None)
                    )
            _insert_events(conn, events)
    skipped += skip_suppressed(engine, campaign_id=campaign.id, now=now)
    return queued, skipped


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
        for mid, *_ in rows:
            conn.execute(
                update(MESSAGES)
                .where(MESSAGES.c.id == mid)
                .values(status=MessageStatus.SKIPPED.value, updated_at=now, next_attempt_at=None)
            )
        if rows:
            conn.execute(
                EVENTS.insert(),
                [
                    _event(
                        mid,
                        campaign_id,
                        cid,
                        now,
                        EventKind.SKIPPED,
                        None,
                        f"suppressed: {reason}" + (f" ({source})" if source else ""),
                        None,
                    )
                    for mid, cid, reason, source in rows
                ],
            )
    return len(rows)


def _event(
    message_id: int,
    campaign_id: int,
    contact_id: int,
    at: dt.datetime,
    kind: EventKind,
    code: int | None,
    detail: str | None,
    via: str | None,
) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "campaign_id": campaign_id,
        "contact_id": contact_id,
        "at": at,
        "kind": kind.value,
        "smtp_code": code,
        "detail": detail,
        "via": via,
    }


# The two statements that run once per message are sent to the driver directly: SQLAlchemy's
# per-row parameter processing cost more than the database work (see benchmarks/RESULTS.md).
_PLACEHOLDER = {"sqlite": "?", "postgresql": "%s"}
# Rows per multi-row statement: 8 parameters a row stays far below SQLite's 32,766.
_ROWS_A_STATEMENT = 500


def _datetime_to_db(conn: Connection) -> Callable[[dt.datetime | None], Any]:
    process = MESSAGES.c.updated_at.type.bind_processor(conn.dialect)
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


def _bulk_update_messages(conn: Connection, rows: list[dict[str, Any]]) -> bool:
    ph = _PLACEHOLDER.get(conn.dialect.name)
    if ph is None or not rows:
        return False
    to_db = _datetime_to_db(conn)
    now = to_db(rows[0]["b_now"])
    sql = (
        f"UPDATE messages SET status={ph}, attempts={ph}, next_attempt_at={ph}, sent_at={ph}, "
        f"smtp_code={ph}, smtp_reply={ph}, message_id={ph}, language={ph}, subject={ph}, "
        f"body_hash={ph}, claimed_by=NULL, updated_at={ph} WHERE id={ph}"
    )
    params = [
        (
            r["b_status"],
            r["b_attempts"],
            to_db(r["b_next"]),
            to_db(r["b_sent_at"]),
            r["b_code"],
            r["b_reply"],
            r["b_mid"],
            r["b_lang"],
            r["b_subject"],
            r["b_hash"],
            now,
            r["b_id"],
        )
        for r in rows
    ]
    if conn.dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 33):
        # One statement for the whole batch (one driver step: see _Run.db_thread).
        for start in range(0, len(params), _ROWS_A_STATEMENT // 2):
            chunk = params[start : start + _ROWS_A_STATEMENT // 2]
            values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
            conn.exec_driver_sql(
                "UPDATE messages SET status = v.column1, attempts = v.column2, "
                "next_attempt_at = v.column3, sent_at = v.column4, smtp_code = v.column5, "
                "smtp_reply = v.column6, message_id = v.column7, language = v.column8, "
                "subject = v.column9, body_hash = v.column10, claimed_by = NULL, "
                f"updated_at = v.column11 FROM (VALUES {values}) AS v "
                "WHERE messages.id = v.column12",
                tuple(value for row in chunk for value in row),
            )
        return True
    conn.exec_driver_sql(sql, params)
    return True


def _insert_messages(
    conn: Connection, rows: list[dict[str, Any]]
) -> list[tuple[int, int, str]] | None:
    """New outbox rows in one multi-row INSERT ... ON CONFLICT DO NOTHING RETURNING (only the
    rows this sender inserted come back), or None where the backend has no driver-level form."""
    ph = _PLACEHOLDER.get(conn.dialect.name)
    if ph is None or not rows:
        return None
    to_db = _datetime_to_db(conn)
    now = to_db(rows[0]["queued_at"])
    values = ", ".join([f"({ph}, {ph}, {ph}, 0, {ph}, {ph})"] * len(rows))
    params: list[Any] = []
    for r in rows:
        params.extend((r["campaign_id"], r["contact_id"], r["status"], now, now))
    result = conn.exec_driver_sql(
        "INSERT INTO messages (campaign_id, contact_id, status, attempts, queued_at, "
        f"updated_at) VALUES {values} ON CONFLICT DO NOTHING RETURNING id, contact_id, status",
        tuple(params),
    )
    return [(int(mid), int(cid), str(status)) for mid, cid, status in result]


def _insert_events(conn: Connection, events: list[dict[str, Any]]) -> None:
    if not events:
        return
    ph = _PLACEHOLDER.get(conn.dialect.name)
    if ph is None:
        conn.execute(EVENTS.insert(), events)
        return
    to_db = _datetime_to_db(conn)
    # Many rows in one statement: the driver runs it in one step (one release of the GIL, see
    # _Run.db_thread) instead of one step per row.
    for start in range(0, len(events), _ROWS_A_STATEMENT):
        chunk = events[start : start + _ROWS_A_STATEMENT]
        values = ", ".join([f"({ph}, {ph}, {ph}, {ph}, {ph}, {ph}, {ph}, {ph})"] * len(chunk))
        params: list[Any] = []
        for e in chunk:
            params.extend(
                (
                    e["message_id"],
                    e["campaign_id"],
                    e["contact_id"],
                    to_db(e["at"]),
                    e["kind"],
                    e["smtp_code"],
                    e["detail"],
                    e["via"],
                )
            )
        conn.exec_driver_sql(
            "INSERT INTO events (message_id, campaign_id, contact_id, at, kind, smtp_code, "
            f"detail, via) VALUES {values}",
            tuple(params),
        )


def _freeze_and_start(
    engine: Engine, *, workspace: Workspace, slug: str, now: dt.datetime
) -> Campaign:
    # An IMMEDIATE transaction: two senders starting at once must queue, not fail on upgrade.
    with _writing(engine) as conn, Session(bind=conn) as session:
        campaign = campaigns.get_campaign(session, slug)
        if campaign.status == CampaignStatus.CANCELLED.value:
            raise InvalidValueError(f"campaign {slug} is cancelled; nothing is sent for it")
        if not campaign.template_sources:
            campaigns.freeze_templates(session, campaign, templates_dir=workspace.templates_dir)
        campaign.status = CampaignStatus.SENDING.value
        if campaign.started_at is None:
            campaign.started_at = now
        session.flush()
        session.expunge(campaign)
    return campaign


@functools.cache
def _claim_statements() -> tuple[tuple[Select[Any], ...], Any]:
    """The peek and claim statements, built once: building them cost more than running them."""
    c = MESSAGES.c
    queued, retry = MessageStatus.QUEUED.value, MessageStatus.RETRY.value
    now = bindparam("now", type_=c.next_attempt_at.type)
    due = or_(
        c.status == queued,
        and_(c.status == retry, or_(c.next_attempt_at.is_(None), c.next_attempt_at <= now)),
    )
    # Due retries (and any queued row that carries a date) first, then the plain queue in id
    # order. Each statement reads ranges of ix_messages_campaign_status: one `status = queued
    # OR ...` made SQLite read and sort every message of the campaign on every claim, a cost
    # that grew with the list (quadratic over a run). The plain queue is read from a cursor:
    # everything before it has been claimed or given up by this run.
    parts = (
        and_(c.status == retry, c.next_attempt_at.is_(None)),
        and_(
            c.status.in_([queued, retry]),
            c.next_attempt_at.is_not(None),
            or_(c.status == queued, c.next_attempt_at <= now),
        ),
        and_(c.status == queued, c.next_attempt_at.is_(None), c.id > bindparam("after")),
    )
    peeks = tuple(
        select(c.id, c.contact_id)
        .where(c.campaign_id == bindparam("campaign"), part)
        .order_by(c.id)
        .limit(bindparam("n", type_=Integer))
        for part in parts
    )
    # Only rows still due are claimed: a row another sender claimed since it was peeked stays
    # theirs (on PostgreSQL the UPDATE waits for their commit and then re-checks `due`).
    claim = (
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
    return peeks, claim


@functools.cache
def _record_statement() -> Any:
    """The result update for a backend without a driver-level form (see _bulk_update_messages)."""
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


# --------------------------------------------------------------------------- the pipeline


@dataclass(slots=True)
class _Job:
    row_id: int
    contact_id: int
    attempts: int
    data: bytes = b""
    mail_from: str = ""
    rcpt_to: tuple[str, ...] = ()
    smtputf8: bool = False
    message_id: str | None = None
    language: str | None = None
    subject: str | None = None
    body_hash: str | None = None
    fell_back: bool = False
    error: str | None = None
    handed: bool = False


@dataclass(slots=True)
class _Result:
    job: _Job
    outcome: Outcome | None  # None: released unsent (or a build error when job.error is set)


_TICK = _Result(job=_Job(row_id=-1, contact_id=-1, attempts=0), outcome=None)

# Peeked (message id, contact id) pairs and their batch being composed.
_Peeked = tuple[list[tuple[int, int]], "asyncio.Future[Batch]"]


def _hand(job: _Job) -> None:
    # The message itself is leaving: from here on a send cut short is uncertain.
    job.handed = True


class _Run:
    def __init__(
        self,
        *,
        engine: Engine,
        workspace: Workspace,
        campaign: Campaign,
        transport: Transport,
        concurrency: int,
        budget: int | None,
        budget_reason: str | None,
        progress: Progress | None,
        clock: Clock,
        policy: SendPolicy,
        report: SendReport,
        bucket: Any,
    ) -> None:
        self.engine = engine
        self.workspace = workspace
        self.campaign = campaign
        self.transport = transport
        self.concurrency = concurrency
        # On a PIPELINING server two messages share a connection: the next envelope goes out
        # while the message before waits for its verdict (see transport._Connection.transact).
        self.sender_tasks = concurrency * int(getattr(transport, "sends_per_connection", 1))
        self.budget = budget
        self.budget_reason = budget_reason
        self.progress = progress
        self.clock = clock
        self.policy = policy
        self.report = report
        self.bucket = bucket
        self.stop = asyncio.Event()
        # Under a rate limit a batch is what goes out in a few seconds, so claims stay young.
        rate = getattr(bucket, "rate", None)
        self.batch_size = policy.batch_size
        if isinstance(rate, int | float) and rate > 0:
            self.batch_size = max(1, min(policy.batch_size, int(rate * 5)))
        self.hurry = asyncio.Event()
        self.stop_reason: str | None = None
        self.error: MailerError | None = None
        self.window: collections.deque[bool] = collections.deque(maxlen=policy.error_window)
        self.streak: list[int] = []
        self.streak_key: tuple[int | None, str] | None = None
        self.inflight: set[int] = set()
        # Claimed and not yet recorded, so a cancelled run can still account for each of them.
        self.outstanding: dict[int, _Job] = {}
        # At most two batches between claim and the senders' queue: after a crash every claim
        # not yet recorded becomes `uncertain`, so the window is kept just deep enough to keep
        # the senders busy.
        self.ahead = asyncio.Semaphore(1)
        # One thread: claims and records never wait for each other's write lock.
        self.db_thread = ThreadPoolExecutor(1, thread_name_prefix="mailer-db")
        self.composing = Composing(
            BatchComposer(engine=engine, workspace=workspace, campaign=campaign), worker=None
        )
        self._retries: bool | None = None
        self._retries_checked_at = 0.0
        self._retries_checked_deferred = 0
        # Results not yet written (see recorder).
        self.unrecorded: list[_Result] = []
        # Peeked (being composed or waiting for the claimer): not to be peeked again.
        self.peeked: set[int] = set()
        # The plain queue is read in id order: the last id peeked from it.
        self.queue_cursor = 0
        # Set once no further batch will be claimed (a budget ran out): the peeker stops.
        self.claiming_over = False

    def halt(self, reason: str, error: MailerError | None = None) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.error = error
        self.stop.set()

    # ----- peeker and claimer
    #
    # Claims and results are written on one database thread (db_thread), so the event loop
    # keeps the SMTP sessions moving while SQLite works and syncs. Each of their statements is
    # one driver step (multi-row VALUES, no RETURNING on SQLite): every step gives up the GIL
    # and must wait to get it back from the busy loop, and per-row steps made a claim take
    # 20 ms (see benchmarks/RESULTS.md, Send). The peek, a read, stays on the loop.

    def _peek(
        self, n: int, *, skip: frozenset[int], after: int
    ) -> tuple[list[tuple[int, int]], int]:
        """The next due (message id, contact id) pairs in claim order, leaving out `skip` and
        the plain queue up to `after`, and the new cursor; nothing is claimed."""
        peeks, _ = _claim_statements()
        params = {"campaign": self.campaign.id, "now": self.clock(), "after": after}
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
                            after = mid
                if len(found) >= n:
                    break
        return found, after

    def _any_retries(self, conn: Connection) -> bool:
        """Whether the retry parts of the peek can find anything: most runs have no retries,
        and two statements per batch fewer is a few percent of a run. Asked again after this
        run defers a message, and every few seconds (another sender may have)."""
        now = time.monotonic()
        if (
            self._retries is None
            or self._retries_checked_deferred != self.report.deferred
            or now - self._retries_checked_at > 5.0
        ):
            c = MESSAGES.c
            self._retries = (
                conn.execute(
                    select(c.id)
                    .where(
                        c.campaign_id == self.campaign.id,
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
            self._retries_checked_at = now
            self._retries_checked_deferred = self.report.deferred
        return self._retries

    async def peeker(self, out: asyncio.Queue[_Peeked | None]) -> None:
        try:
            while not self.stop.is_set() and not self.claiming_over:
                rows, self.queue_cursor = self._peek(
                    self.batch_size, skip=frozenset(self.peeked), after=self.queue_cursor
                )
                if not rows:
                    break
                self.peeked.update(mid for mid, _ in rows)
                await out.put((rows, self.composing.submit([cid for _, cid in rows])))
        except Exception as exc:
            self.halt("error", _as_mailer_error(exc))
        finally:
            await out.put(None)

    def _drop(self, item: _Peeked) -> None:
        rows, future = item
        future.cancel()
        self.peeked.difference_update(mid for mid, _ in rows)

    async def _claim(self, rows: list[tuple[int, int]], batch: Batch) -> list[_Job]:
        """Claims the batch, and records the results that came in since the last commit in the
        same transaction: one commit (one fsync on SQLite) for both."""
        results, self.unrecorded = self.unrecorded, []
        try:
            claimed = await self._on_db(self._claim_and_record, rows, results)
        except BaseException:
            # Not written: the recorder tries them again.
            self.unrecorded[:0] = results
            raise
        jobs = []
        for mid, cid, attempts in sorted(claimed):
            job = _Job(row_id=mid, contact_id=cid, attempts=attempts)
            composed = batch.get(cid, f"contact {cid} no longer exists")
            if isinstance(composed, str):
                job.error = composed
            else:
                job.data = composed.data
                job.mail_from = composed.mail_from
                job.rcpt_to = (composed.rcpt_to,)
                job.smtputf8 = composed.smtputf8
                job.message_id = composed.message_id
                job.language = composed.language
                job.subject = composed.subject
                job.body_hash = composed.body_hash
                job.fell_back = composed.fell_back
            jobs.append(job)
        return jobs

    def _claim_and_record(
        self, rows: list[tuple[int, int]], results: list[_Result]
    ) -> list[tuple[int, int, int]]:
        with _writing(self.engine) as conn:
            self._write_results(conn, results)
            return self._claim_in(conn, rows, self.clock())

    def _record(self, results: list[_Result]) -> None:
        with _writing(self.engine) as conn:
            self._write_results(conn, results)

    async def _on_db(self, call: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.db_thread, call, *args)

    def _claim_in(
        self, conn: Connection, rows: list[tuple[int, int]], now: dt.datetime
    ) -> list[tuple[int, int, int]]:
        if conn.dialect.name == "sqlite":
            return self._claim_in_sqlite(conn, rows, now)
        _, claim = _claim_statements()
        params = {
            "campaign": self.campaign.id,
            "now": now,
            "ids": [mid for mid, _ in rows],
            "run": self.report.run_id,
        }
        claimed = [(int(mid), int(cid), int(n)) for mid, cid, n in conn.execute(claim, params)]
        if claimed:
            _insert_events(
                conn,
                [
                    _event(
                        mid,
                        self.campaign.id,
                        cid,
                        now,
                        EventKind.CLAIMED,
                        None,
                        f"attempt {attempts}",
                        self.report.run_id,
                    )
                    for mid, cid, attempts in claimed
                ],
            )
        return claimed

    def _claim_in_sqlite(
        self, conn: Connection, rows: list[tuple[int, int]], now: dt.datetime
    ) -> list[tuple[int, int, int]]:
        """The claim as three statements of one step each: RETURNING would be a driver step
        (and a wait for the GIL) per row. The rows this claim took are the batch's rows now
        `sending` for this run: none of them was before (each was due when peeked)."""
        at = _datetime_to_db(conn)(now)
        ids = json.dumps([mid for mid, _ in rows])
        run = self.report.run_id
        mine = "id IN (SELECT value FROM json_each(?)) AND claimed_by = ? AND status = 'sending'"
        conn.exec_driver_sql(
            "UPDATE messages SET status = 'sending', attempts = attempts + 1, claimed_by = ?, "
            "updated_at = ? WHERE id IN (SELECT value FROM json_each(?)) AND (status = 'queued' "
            "OR (status = 'retry' AND (next_attempt_at IS NULL OR next_attempt_at <= ?)))",
            (run, at, ids, at),
        )
        conn.exec_driver_sql(
            "INSERT INTO events (message_id, campaign_id, contact_id, at, kind, smtp_code, "
            "detail, via) SELECT id, campaign_id, contact_id, ?, ?, NULL, 'attempt ' || "
            f"attempts, ? FROM messages WHERE {mine} ORDER BY id",
            (at, EventKind.CLAIMED.value, run, ids, run),
        )
        found = conn.exec_driver_sql(
            "SELECT json_group_array(json_array(id, contact_id, attempts)) FROM messages "
            f"WHERE {mine}",
            (ids, run),
        ).scalar_one()
        return [(int(mid), int(cid), int(n)) for mid, cid, n in json.loads(found)]

    async def claimer(
        self, inbox: asyncio.Queue[_Peeked | None], out: asyncio.Queue[list[_Job] | None]
    ) -> None:
        try:
            while (item := await inbox.get()) is not None:
                if self.stop.is_set() or self.claiming_over:
                    self._drop(item)
                    continue
                rows, future = item
                if self.budget is not None:
                    n = min(len(rows), self.budget - self.report.claimed)
                    if n <= 0:
                        self._drop(item)
                        self._end_of_budget()
                        continue
                    rows = rows[:n]
                try:
                    batch = await self.composing.result(future, [cid for _, cid in rows])
                except Exception as exc:
                    self._drop(item)
                    self.halt("error", _as_mailer_error(exc))
                    continue
                await self.ahead.acquire()
                if self.stop.is_set():
                    self.ahead.release()
                    self._drop(item)
                    continue
                try:
                    jobs = await self._claim(rows, batch)
                finally:
                    self._drop(item)
                if not jobs:
                    # Another sender claimed them since they were peeked.
                    self.ahead.release()
                    continue
                self.report.claimed += len(jobs)
                self.outstanding.update((job.row_id, job) for job in jobs)
                if self.budget is not None and self.report.claimed >= self.budget:
                    self._end_of_budget()
                await out.put(jobs)
        except Exception as exc:  # a database failure must still release what was claimed
            self.halt("error", _as_mailer_error(exc))
            # Let the peeker finish: it waits on this queue.
            while (item := await inbox.get()) is not None:
                self._drop(item)
        finally:
            await out.put(None)

    def _end_of_budget(self) -> None:
        # A budget ends claiming only; what is in flight still goes out.
        self.claiming_over = True
        if self.stop_reason is None and self._has_due():
            self.stop_reason = self.budget_reason or "limit"

    def _has_due(self) -> bool:
        now = self.clock()
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(MESSAGES.c.id)
                    .where(
                        MESSAGES.c.campaign_id == self.campaign.id,
                        or_(
                            MESSAGES.c.status == MessageStatus.QUEUED.value,
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

    # ----- feeder: claimed batches to the senders, one message at a time

    async def feeder(
        self,
        inbox: asyncio.Queue[list[_Job] | None],
        out: asyncio.Queue[_Job | None],
        results: asyncio.Queue[_Result | None],
    ) -> None:
        try:
            while (jobs := await inbox.get()) is not None:
                try:
                    for job in jobs:
                        if self.stop.is_set() or job.error is not None:
                            self._emit(results, _Result(job=job, outcome=None))
                        else:
                            await out.put(job)
                finally:
                    self.ahead.release()
        finally:
            for _ in range(self.sender_tasks):
                await out.put(None)

    # ----- senders

    async def sender(
        self, inbox: asyncio.Queue[_Job | None], results: asyncio.Queue[_Result | None]
    ) -> None:
        while (job := await inbox.get()) is not None:
            if self.stop.is_set():
                self._emit(results, _Result(job=job, outcome=None))
                continue
            if self.bucket is not None:
                await self.bucket.acquire()
                if self.stop.is_set():
                    self._emit(results, _Result(job=job, outcome=None))
                    continue
            self.inflight.add(job.row_id)
            try:
                outcome = await self.transport.send(
                    mail_from=job.mail_from,
                    rcpt_to=job.rcpt_to,
                    data=job.data,
                    smtputf8=job.smtputf8,
                    ref=job.message_id,
                    go=self.going,
                    on_payload=functools.partial(_hand, job),
                )
            except TransportError as exc:
                # Systemic (the server went away, refused the login on reconnect): this message
                # never reached a server, so it goes back to the queue like the rest.
                job.handed = False
                self.halt("systemic", exc)
                self._emit(results, _Result(job=job, outcome=None))
                continue
            except Exception as exc:
                # A fault of our own mid-send: the bytes may be out, so never re-send on our own.
                job.handed = True
                self.halt("error", _as_mailer_error(exc))
                outcome = Outcome(
                    kind=OutcomeKind.UNCERTAIN,
                    code=None,
                    reply=f"internal error while sending: {type(exc).__name__}: {exc}",
                    via=self.transport.via,
                )
            finally:
                self.inflight.discard(job.row_id)
            if outcome is None:
                # The run stopped while this message waited for a connection: never sent.
                job.handed = False
                self._emit(results, _Result(job=job, outcome=None))
                continue
            self._watch(job, outcome)
            self._emit(results, _Result(job=job, outcome=outcome))

    def going(self) -> bool:
        return not self.stop.is_set()

    def _watch(self, job: _Job, outcome: Outcome) -> None:
        failed = outcome.kind is not OutcomeKind.ACCEPTED
        self.window.append(failed)
        if outcome.kind is OutcomeKind.PERMANENT:
            key = (outcome.code, outcome.reply)
            if key != self.streak_key:
                self.streak_key, self.streak = key, []
            self.streak.append(job.row_id)
            if len(self.streak) >= self.policy.systemic_streak:
                self.halt(
                    "systemic",
                    TransportError(
                        f"{outcome.via} refused {len(self.streak)} recipients in a row with the "
                        f"same answer ({outcome.code} {outcome.reply}): that is the server, not "
                        f"the list; stopped, the rest of campaign {self.campaign.slug} stays queued"
                    ),
                )
        else:
            self.streak_key, self.streak = None, []
        if (
            len(self.window) == self.policy.error_window
            and sum(self.window) > self.policy.error_ratio * self.policy.error_window
        ):
            self.halt("paused")

    # ----- recorder

    def _write_results(self, conn: Connection, batch: list[_Result]) -> None:
        if not batch:
            return
        now = self.clock()
        updates: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        cid = self.campaign.id
        for result in batch:
            job, outcome = result.job, result.outcome
            row: dict[str, Any] = {
                "b_id": job.row_id,
                "b_status": None,
                "b_attempts": job.attempts,
                "b_next": None,
                "b_sent_at": None,
                "b_code": None,
                "b_reply": None,
                "b_mid": job.message_id,
                "b_lang": job.language,
                "b_subject": job.subject,
                "b_hash": job.body_hash,
                "b_now": now,
            }
            via = outcome.via if outcome else self.transport.via
            if outcome is None and job.error is None:
                # Never handed to the transport: back to the queue, the attempt not counted.
                row.update(b_status=MessageStatus.QUEUED.value, b_attempts=job.attempts - 1)
                events.append(
                    _event(
                        job.row_id,
                        cid,
                        job.contact_id,
                        now,
                        EventKind.REQUEUED,
                        None,
                        f"released unsent ({self.stop_reason or 'stopped'})",
                        None,
                    )
                )
                self.report.released += 1
            elif outcome is None:
                row.update(b_status=MessageStatus.FAILED.value, b_reply=job.error)
                events.append(
                    _event(
                        job.row_id,
                        cid,
                        job.contact_id,
                        now,
                        EventKind.FAILED,
                        None,
                        job.error,
                        None,
                    )
                )
                self.report.build_errors += 1
            else:
                row.update(b_code=outcome.code, b_reply=outcome.reply)
                if job.fell_back:
                    self.report.fell_back += 1
                if outcome.kind is OutcomeKind.ACCEPTED:
                    row.update(b_status=MessageStatus.SENT.value, b_sent_at=now)
                    kind = EventKind.SENT
                    detail = outcome.reply
                    self.report.sent += 1
                elif (
                    outcome.kind is OutcomeKind.TRANSIENT
                    and job.attempts < self.policy.max_attempts
                ):
                    delay = min(
                        self.policy.backoff_base * (2 ** (job.attempts - 1)),
                        self.policy.backoff_cap,
                    )
                    row.update(b_status=MessageStatus.RETRY.value, b_next=now + delay)
                    kind = EventKind.DEFERRED
                    detail = f"{outcome.reply} (attempt {job.attempts}; next at {(now + delay):%Y-%m-%d %H:%M:%S} UTC)"
                    self.report.deferred += 1
                elif outcome.kind is OutcomeKind.UNCERTAIN:
                    row.update(b_status=MessageStatus.UNCERTAIN.value)
                    kind = EventKind.UNCERTAIN
                    detail = outcome.reply
                    self.report.uncertain += 1
                else:
                    row.update(b_status=MessageStatus.FAILED.value)
                    kind = EventKind.FAILED
                    detail = outcome.reply
                    if outcome.kind is OutcomeKind.TRANSIENT:
                        detail = f"{outcome.reply} (gave up after {job.attempts} attempts)"
                    self.report.failed += 1
                events.append(
                    _event(job.row_id, cid, job.contact_id, now, kind, outcome.code, detail, via)
                )
            updates.append(row)
        if not _bulk_update_messages(conn, updates):
            conn.execute(_record_statement(), updates)
        _insert_events(conn, events)

    async def recorder(self, inbox: asyncio.Queue[_Result | None]) -> None:
        # Results reach the database with the next claim, in its transaction (one commit for
        # both), or here once `record_every` have gathered: what a crash leaves `sending` (and
        # so `uncertain`) stays within a claimed batch, the messages under way and these.
        loop = asyncio.get_running_loop()
        last = loop.time()
        finished = False
        while not finished:
            item = await inbox.get()
            if item is None:
                finished = True
            elif item is not _TICK:
                self.unrecorded.append(item)
            due = loop.time() - last >= self.policy.record_interval
            if self.unrecorded and (
                finished or due or len(self.unrecorded) >= self.policy.record_every
            ):
                batch, self.unrecorded = self.unrecorded, []
                try:
                    await self._on_db(self._record, batch)
                except BaseException:
                    self.unrecorded[:0] = batch
                    raise
            if finished or due:
                last = loop.time()
                if self.progress is not None:
                    self.progress(self.report)

    def _emit(self, results: asyncio.Queue[_Result | None], result: _Result) -> None:
        # Off the outstanding list the moment its result exists, so a cancelled run never
        # records a message twice.
        self.outstanding.pop(result.job.row_id, None)
        results.put_nowait(result)

    async def ticker(self, inbox: asyncio.Queue[_Result | None]) -> None:
        # Wakes the recorder so a slow trickle of results is still committed within the interval.
        while True:
            await asyncio.sleep(self.policy.record_interval)
            await inbox.put(_TICK)

    # ----- the whole

    async def run(self) -> None:
        # Composed batches waiting for their claim: deep enough to keep the composer busy while
        # the senders work, and costing nothing after a crash (nothing in it is claimed).
        peeked: asyncio.Queue[_Peeked | None] = asyncio.Queue(maxsize=2)
        claimed: asyncio.Queue[list[_Job] | None] = asyncio.Queue(maxsize=1)
        built: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=max(8, 2 * self.sender_tasks))
        results: asyncio.Queue[_Result | None] = asyncio.Queue()
        recorder = asyncio.create_task(self.recorder(results))
        ticker = asyncio.create_task(self.ticker(results))
        senders = [
            asyncio.create_task(self.sender(built, results)) for _ in range(self.sender_tasks)
        ]
        tasks = [
            asyncio.create_task(self.peeker(peeked)),
            asyncio.create_task(self.claimer(peeked, claimed)),
            asyncio.create_task(self.feeder(claimed, built, results)),
            *senders,
        ]
        try:
            await self._until_stopped_then_grace(tasks, results)
        finally:
            ticker.cancel()
            await results.put(None)
            await recorder

    async def _until_stopped_then_grace(
        self, tasks: list[asyncio.Task[None]], results: asyncio.Queue[_Result | None]
    ) -> None:
        pipeline: asyncio.Future[Any] = asyncio.gather(*tasks)
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({pipeline, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not pipeline.done():
            # In-flight sends may finish (a second Ctrl-C cuts the wait short).
            hurry: asyncio.Future[Any] = asyncio.ensure_future(self.hurry.wait())
            await asyncio.wait(
                {pipeline, hurry}, timeout=self.policy.grace, return_when=asyncio.FIRST_COMPLETED
            )
            hurry.cancel()
        if not pipeline.done():
            for task in tasks:
                task.cancel()
        try:
            await pipeline
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self.halt("error", _as_mailer_error(exc))
        # Whatever happened above, no task of this run may outlive it.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Normally empty. After a cancelled or failed pipeline: sends that may have reached the
        # server are uncertain; claims that never left this process go back to the queue.
        for job in list(self.outstanding.values()):
            outcome = None
            if job.handed:
                outcome = Outcome(
                    kind=OutcomeKind.UNCERTAIN,
                    code=None,
                    reply="still being sent when the run was stopped",
                    via=self.transport.via,
                )
            self._emit(results, _Result(job=job, outcome=outcome))


def _as_mailer_error(exc: BaseException) -> MailerError:
    if isinstance(exc, MailerError):
        return exc
    if isinstance(exc, SQLAlchemyError):
        return DatabaseError(f"database error while sending: {getattr(exc, 'orig', None) or exc}")
    return MailerError(f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- public API


def plan_send(*, workspace: Workspace, engine: Engine, slug: str) -> SendPlan:
    """Recipients, sender and a sample subject, for the confirmation before a send."""
    with Session(engine) as session:
        campaign = campaigns.get_campaign(session, slug)
        ids = audience_mod.contact_ids(session, audience_mod.Audience.from_json(campaign.audience))
        pending = int(
            session.scalar(
                select(func.count())
                .select_from(MESSAGES)
                .where(
                    MESSAGES.c.campaign_id == campaign.id,
                    MESSAGES.c.status.in_([MessageStatus.QUEUED.value, MessageStatus.RETRY.value]),
                )
            )
            or 0
        )
        have = int(
            session.scalar(
                select(func.count())
                .select_from(MESSAGES)
                .where(MESSAGES.c.campaign_id == campaign.id)
            )
            or 0
        )
        subject = to = None
        if ids:
            recipients = compose.load_recipients(session, ids[:1])
            template_set = compose.template_set_for(campaign, templates_dir=workspace.templates_dir)
            composer = compose.composer_for(
                campaign=campaign, template_set=template_set, settings=workspace
            )
            if recipients:
                try:
                    composed = composer.compose(next(iter(recipients.values())))
                    subject, to = composed.subject, composed.rcpt_to
                except MailerError as exc:
                    subject = f"(cannot render: {exc})"
    return SendPlan(
        campaign=slug,
        from_address=campaign.from_address,
        audience=len(ids),
        pending=pending + max(0, len(ids) - have),
        sample_subject=subject,
        sample_to=to,
    )


def send_campaign(
    *,
    workspace: Workspace,
    engine: Engine,
    slug: str,
    transport: Transport,
    concurrency: int = 4,
    rate: float | None = None,
    daily_cap: int | None = None,
    limit: int | None = None,
    test_to: str | None = None,
    progress: Progress | None = None,
    clock: Clock = utcnow,
    policy: SendPolicy | None = None,
    handle_signals: bool = False,
    bucket: Any = None,
) -> SendReport:
    """Deliver a campaign (see the module docstring). Raises TransportError on a systemic failure
    and Interrupted on SIGINT/SIGTERM, after recording everything; otherwise returns the report."""
    policy = policy or SendPolicy()
    if concurrency < 1:
        raise InvalidValueError("--concurrency must be at least 1")
    if limit is not None and limit < 1:
        raise InvalidValueError("--limit must be at least 1")
    if daily_cap is not None and daily_cap < 1:
        raise InvalidValueError("--daily-cap must be at least 1")
    if bucket is None and rate is not None:
        from mailer.transport import TokenBucket

        bucket = TokenBucket(rate=rate)
    if test_to is not None:
        return send_test(
            workspace=workspace,
            engine=engine,
            slug=slug,
            transport=transport,
            to=test_to,
            count=limit or 3,
            bucket=bucket,
        )
    try:
        return asyncio.run(
            _send_campaign(
                workspace=workspace,
                engine=engine,
                slug=slug,
                transport=transport,
                concurrency=concurrency,
                daily_cap=daily_cap,
                limit=limit,
                progress=progress,
                clock=clock,
                policy=policy,
                handle_signals=handle_signals,
                bucket=bucket,
            )
        )
    except SQLAlchemyError as exc:
        raise _as_mailer_error(exc) from exc


async def _send_campaign(
    *,
    workspace: Workspace,
    engine: Engine,
    slug: str,
    transport: Transport,
    concurrency: int,
    daily_cap: int | None,
    limit: int | None,
    progress: Progress | None,
    clock: Clock,
    policy: SendPolicy,
    handle_signals: bool,
    bucket: Any,
) -> SendReport:
    report = SendReport(campaign=slug, via=transport.via, run_id=_new_run_id())
    started = asyncio.get_running_loop().time()
    signals = _Signals(asyncio.get_running_loop(), install=handle_signals)
    run: _Run | None = None
    worker: ComposeWorker | None = None
    try:
        campaign = await asyncio.to_thread(get_campaign, engine, slug)
        now = clock()
        report.recovered = await asyncio.to_thread(
            recover_stale_claims,
            engine,
            campaign_id=campaign.id,
            now=now,
            run_id=report.run_id,
            stale=policy.stale_claim,
        )
        campaign = await asyncio.to_thread(
            _freeze_and_start, engine, workspace=workspace, slug=slug, now=now
        )
        signals.check(slug)
        report.newly_queued, report.skipped = await asyncio.to_thread(
            queue_audience, engine, campaign=campaign, now=now
        )
        signals.check(slug)
        totals = await asyncio.to_thread(status_counts, engine, campaign.id)
        report.due = totals[MessageStatus.QUEUED.value] + totals[MessageStatus.RETRY.value]
        if report.due >= policy.compose_worker_from:
            # Started first: it comes up (about a second) while the server is contacted, and
            # until it is ready this process composes.
            worker = await ComposeWorker.start(
                database_url=engine.url.render_as_string(hide_password=False),
                workspace=workspace,
                campaign_id=campaign.id,
            )
        if report.due:
            # Before anything is claimed: a wrong password or an unreachable server stops the
            # run with the whole list still `queued`. With nothing due, no server is needed.
            await transport.open()
        budget: int | None = None
        budget_reason: str | None = None
        if limit is not None:
            budget, budget_reason = limit, "limit"
        if daily_cap is not None:
            sent_today, _ = await asyncio.to_thread(sent_in_window, engine, now=now)
            left_today = max(0, daily_cap - sent_today)
            if budget is None or left_today < budget:
                budget, budget_reason = left_today, "daily-cap"
        if budget is not None:
            report.due = min(report.due, budget)
        run = _Run(
            engine=engine,
            workspace=workspace,
            campaign=campaign,
            transport=transport,
            concurrency=concurrency,
            budget=budget,
            budget_reason=budget_reason,
            progress=progress,
            clock=clock,
            policy=policy,
            report=report,
            bucket=bucket,
        )
        if progress is not None:
            progress(report)
        run.composing.worker = worker
        signals.run = run
        if signals.count:
            run.halt("interrupted")
        # The database thread gets the GIL back within half a millisecond of asking (the
        # default, 5 ms, is ten messages' worth of sending); restored after the run.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, 0.0005))
        try:
            await run.run()
        finally:
            sys.setswitchinterval(switch)
            run.db_thread.shutdown(wait=True)
    finally:
        _ENDED_RUNS.add(report.run_id)
        signals.remove()
        await transport.close()
        if run is not None:
            await run.composing.close()
            report.composed_by_worker = run.composing.by_worker
        elif worker is not None:
            await worker.close()
    assert run is not None
    elapsed = asyncio.get_running_loop().time() - started
    report.rate = report.done / elapsed if elapsed > 0 else 0.0
    report.stopped = run.stop_reason
    if run.stop_reason == "systemic" and run.streak:
        await asyncio.to_thread(_requeue_streak, engine, run, clock())
    if run.stop_reason == "daily-cap" and daily_cap is not None:
        report.resume_at = await asyncio.to_thread(
            _cap_resume_at, engine, now=clock(), cap=daily_cap
        )
    report.totals = await asyncio.to_thread(
        _finish_campaign, engine, campaign, run.stop_reason, clock()
    )
    if run.error is not None:
        if run.stop_reason == "systemic":
            kind = type(run.error) if isinstance(run.error, TransportError) else TransportError
            raise kind(
                f"{run.error} (campaign {slug}: {report.sent} sent this run, "
                f"{report.totals.get('queued', 0)} queued)"
            )
        raise run.error
    if run.stop_reason == "interrupted":
        raise Interrupted(
            f"interrupted: campaign {slug} paused with {report.sent} sent this run and "
            f"{report.totals.get('queued', 0) + report.totals.get('retry', 0)} still to send; "
            f"run `mailer send {slug}` again to continue"
        )
    return report


class _Signals:
    """SIGINT/SIGTERM: the first stops claiming and lets in-flight sends finish; the second stops
    waiting for them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, install: bool) -> None:
        self.loop = loop
        self.count = 0
        self.run: _Run | None = None
        self.installed: list[int] = []
        if install:
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(signum, self.on_signal)
                    self.installed.append(signum)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass

    def on_signal(self) -> None:
        self.count += 1
        if self.run is not None:
            self.run.halt("interrupted")
            if self.count > 1:
                self.run.hurry.set()

    def check(self, slug: str) -> None:
        if self.count:
            raise Interrupted(
                f"interrupted before anything of campaign {slug} was claimed; nothing was sent"
            )

    def remove(self) -> None:
        for signum in self.installed:
            self.loop.remove_signal_handler(signum)
        self.installed = []


def _requeue_streak(engine: Engine, run: _Run, now: dt.datetime) -> None:
    """A systemic refusal says nothing about these recipients: they go back to the queue."""
    with _writing(engine) as conn:
        rows = conn.execute(
            update(MESSAGES)
            .where(MESSAGES.c.id.in_(run.streak), MESSAGES.c.status == MessageStatus.FAILED.value)
            .values(status=MessageStatus.QUEUED.value, updated_at=now)
            .returning(MESSAGES.c.id, MESSAGES.c.contact_id)
        ).all()
        if rows:
            conn.execute(
                EVENTS.insert(),
                [
                    _event(
                        mid,
                        run.campaign.id,
                        cid,
                        now,
                        EventKind.REQUEUED,
                        None,
                        "refused as part of a systemic failure; back in the queue",
                        None,
                    )
                    for mid, cid in rows
                ],
            )
    run.report.failed -= len(rows)


def _finish_campaign(
    engine: Engine, campaign: Campaign, stop_reason: str | None, now: dt.datetime
) -> dict[str, int]:
    totals = status_counts(engine, campaign.id)
    open_ = sum(
        totals[s.value] for s in (MessageStatus.QUEUED, MessageStatus.RETRY, MessageStatus.SENDING)
    )
    values: dict[str, Any]
    if open_ == 0:
        values = {"status": CampaignStatus.DONE.value, "finished_at": now}
    elif stop_reason in ("paused", "interrupted"):
        values = {"status": CampaignStatus.PAUSED.value}
    else:
        values = {"status": CampaignStatus.SENDING.value}
    with _writing(engine) as conn:
        conn.execute(update(Campaign).where(Campaign.id == campaign.id).values(**values))
    return totals


def send_test(
    *,
    workspace: Workspace,
    engine: Engine,
    slug: str,
    transport: Transport,
    to: str,
    count: int = 3,
    bucket: Any = None,
) -> SendReport:
    """Real renderings of the first recipients, marked as tests, to one address; nothing recorded."""
    problem = address_problem(to.strip())
    if problem is not None:
        raise InvalidValueError(f"--test-to {to!r} is not a valid address: {problem}")
    report = SendReport(campaign=slug, via=transport.via, run_id=_new_run_id(), test=True)
    jobs: list[tuple[Any, str]] = []
    with Session(engine) as session:
        campaign = campaigns.get_campaign(session, slug)
        ids = audience_mod.contact_ids(session, audience_mod.Audience.from_json(campaign.audience))
        template_set = compose.template_set_for(campaign, templates_dir=workspace.templates_dir)
        composer = compose.composer_for(
            campaign=campaign, template_set=template_set, settings=workspace
        )
        picked: list[int] = []
        for chunk in _chunks(ids, 200):
            emails = {
                k: v
                for k, v in session.execute(
                    select(Contact.id, Contact.email).where(Contact.id.in_(chunk))
                )
            }
            blocked = audience_mod.suppressed_among(session, emails.values())
            picked.extend(i for i in chunk if emails.get(i) not in blocked)
            if len(picked) >= count:
                break
        recipients = compose.load_recipients(session, picked[:count])
        for cid in picked[:count]:
            recipient = recipients.get(cid)
            if recipient is None:
                continue
            try:
                composed = composer.compose(recipient, to_override=to.strip(), test=True)
            except MailerError as exc:
                report.build_errors += 1
                report.errors.append(f"contact {cid}: {exc}")
                continue
            jobs.append((composed, composed.subject))
    report.due = len(jobs)

    async def go() -> None:
        await transport.open()
        try:
            for composed, _subject in jobs:
                if bucket is not None:
                    await bucket.acquire()
                outcome = await transport.send(
                    mail_from=composed.mail_from,
                    rcpt_to=(composed.rcpt_to,),
                    data=composed.data,
                    smtputf8=bool(composed.smtputf8),
                    ref=None,
                )
                assert outcome is not None  # sent without a `go` check
                if outcome.kind is OutcomeKind.ACCEPTED:
                    report.sent += 1
                else:
                    report.failed += 1
                    report.errors.append(f"{outcome.code or ''} {outcome.reply}".strip())
        finally:
            await transport.close()

    asyncio.run(go())
    report.note = f"{report.sent} test message(s) sent to {to.strip()}; nothing recorded as sent"
    return report


def dry_run(
    *,
    workspace: Workspace,
    engine: Engine,
    slug: str,
    limit: int | None = None,
    progress: Progress | None = None,
) -> SendReport:
    """Render and build every message that a send would send; send nothing, change nothing."""
    transport = DryRun()
    report = SendReport(campaign=slug, via=transport.via, run_id=_new_run_id(), dry_run=True)
    with Session(engine) as session:
        campaign = campaigns.get_campaign(session, slug)
        ids = audience_mod.contact_ids(session, audience_mod.Audience.from_json(campaign.audience))
        final = set(
            session.scalars(
                select(MESSAGES.c.contact_id).where(
                    MESSAGES.c.campaign_id == campaign.id,
                    MESSAGES.c.status.notin_(
                        [MessageStatus.QUEUED.value, MessageStatus.RETRY.value]
                    ),
                )
            )
        )
        template_set = compose.template_set_for(campaign, templates_dir=workspace.templates_dir)
        composer = compose.composer_for(
            campaign=campaign, template_set=template_set, settings=workspace
        )
        todo = [i for i in ids if i not in final]
        if limit is not None:
            todo = todo[:limit]
        report.due = len(todo)
        for chunk in _chunks(todo, 200):
            emails = {
                k: v
                for k, v in session.execute(
                    select(Contact.id, Contact.email).where(Contact.id.in_(chunk))
                )
            }
            blocked = audience_mod.suppressed_among(session, emails.values())
            recipients = compose.load_recipients(
                session, [i for i in chunk if emails.get(i) not in blocked]
            )
            for cid in chunk:
                email = emails.get(cid, "")
                if email in blocked or address_problem(email) is not None:
                    report.skipped += 1
                    continue
                recipient = recipients.get(cid)
                if recipient is None:
                    continue
                try:
                    composed = composer.compose(recipient)
                except MailerError as exc:
                    report.build_errors += 1
                    if len(report.errors) < 20:
                        report.errors.append(f"{email}: {exc}")
                    continue
                transport.count += 1
                transport.bytes += len(composed.data)
                report.sent += 1
                if composed.fell_back:
                    report.fell_back += 1
            if progress is not None:
                progress(report)
    report.note = (
        f"dry run: {report.sent} message(s) built ({transport.bytes:,} bytes), "
        f"{report.skipped} skipped, {report.build_errors} error(s); nothing sent, nothing changed"
    )
    return report


def requeue(
    *, engine: Engine, slug: str, failed: bool, uncertain: bool, clock: Clock = utcnow
) -> dict[str, int]:
    """`mailer retry`: failed and/or uncertain messages back to `queued`. Returns counts moved."""
    if not (failed or uncertain):
        raise InvalidValueError(
            "say what to retry: --failed (refused or given up), --uncertain (outcome unknown: "
            "the recipient may already have it), or both"
        )
    wanted = [
        s for s, on in ((MessageStatus.FAILED, failed), (MessageStatus.UNCERTAIN, uncertain)) if on
    ]
    campaign = get_campaign(engine, slug)
    now = clock()
    moved: dict[str, int] = {}
    with _writing(engine) as conn:
        for status in wanted:
            rows = conn.execute(
                update(MESSAGES)
                .where(MESSAGES.c.campaign_id == campaign.id, MESSAGES.c.status == status.value)
                .values(
                    status=MessageStatus.QUEUED.value,
                    attempts=0,
                    next_attempt_at=None,
                    claimed_by=None,
                    updated_at=now,
                )
                .returning(MESSAGES.c.id, MESSAGES.c.contact_id)
            ).all()
            moved[status.value] = len(rows)
            if rows:
                conn.execute(
                    EVENTS.insert(),
                    [
                        _event(
                            mid,
                            campaign.id,
                            cid,
                            now,
                            EventKind.REQUEUED,
                            None,
                            f"mailer retry: was {status.value}",
                            None,
                        )
                        for mid, cid in rows
                    ],
                )
        if sum(moved.values()) and campaign.status == CampaignStatus.DONE.value:
            conn.execute(
                update(Campaign)
                .where(Campaign.id == campaign.id)
                .values(status=CampaignStatus.SENDING.value)
            )
    return moved


__all__ = [
    "SendPlan",
    "SendPolicy",
    "SendReport",
    "dry_run",
    "plan_send",
    "recover_stale_claims",
    "requeue",
    "send_campaign",
    "send_test",
    "sent_in_window",
    "status_counts",
]
