"""The outbox store: the only module that writes `messages` and `events` (verbs, not SQL).

Each verb changes a message's state and writes its event in the caller's transaction, so the
state and its log entry are committed together or not at all. It must not import the CLI, the
engine, templates or transports.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Table, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mailer.errors import CampaignHeld
from mailer.models import (
    Campaign,
    CampaignStatus,
    Contact,
    Event,
    EventKind,
    Message,
    MessageStatus,
    Suppression,
    SuppressionReason,
)

# --- outcomes: what comes back (inbox)
#
# Written by `inbox.sync` from what arrives in the office's mailbox. The engine will also need
# `ensure_not_held` (before a send resumes a campaign) and `acknowledge_bounce_spike`.

MESSAGES = cast(Table, Message.__table__)
EVENTS = cast(Table, Event.__table__)
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
            "via": VIA_INBOX,
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
    session: Session, *, email: str, message: int | None, at: dt.datetime, source: str
) -> bool:
    """An unsubscribe request: the address is suppressed as `unsubscribed`, with an
    `unsubscribed` event on the letter it answers (or on the contact, when none is known).
    True if the suppression is new."""
    address = email.strip().lower()
    new = _suppress(
        session, email=address, reason=SuppressionReason.UNSUBSCRIBED, source=source, at=at
    )
    if message is not None:
        letter = _letter(session, message)
        _log(
            session,
            kind=EventKind.UNSUBSCRIBED,
            at=at,
            message=message,
            campaign_id=letter.campaign_id,
            contact_id=letter.contact_id,
            detail=source,
        )
    else:
        contact = session.scalar(select(Contact.id).where(Contact.email == address))
        if contact is not None:
            _log(
                session,
                kind=EventKind.UNSUBSCRIBED,
                at=at,
                message=None,
                campaign_id=None,
                contact_id=contact,
                detail=source,
            )
    return new


# Campaign states a bounce spike pauses: those with letters out or still to go.
_PAUSABLE = (CampaignStatus.SENDING.value, CampaignStatus.PAUSED.value, CampaignStatus.DONE.value)


def bounce_spike(
    session: Session, *, campaign_id: int, policy: BounceSpikePolicy | None = None
) -> str | None:
    """Why the campaign's hard bounces amount to a spike (its words for people), or None."""
    policy = policy or BounceSpikePolicy()
    bounced, sent = session.execute(
        select(
            func.count(Message.bounced_at),
            func.count(Message.sent_at),
        ).where(Message.campaign_id == campaign_id)
    ).one()
    acknowledged = int(
        session.scalar(select(Campaign.bounces_acknowledged).where(Campaign.id == campaign_id)) or 0
    )
    bounced, sent = int(bounced), int(sent)
    if bounced - acknowledged < policy.minimum or not sent or bounced <= policy.ratio * sent:
        return None
    return (
        f"bounce spike: {bounced:,} hard bounces of {sent:,} sent "
        f"({100.0 * bounced / sent:.1f}%, above {100.0 * policy.ratio:g}%); "
        "check the list's quality before sending more"
    )


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
    bounced = int(
        session.scalar(
            select(func.count(Message.bounced_at)).where(Message.campaign_id == campaign_id)
        )
        or 0
    )
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
