"""Reading the send log back: campaign status, per-recipient logs, a contact's history.

Everything here only reads. The outbox (`messages`) holds each recipient's current state, the
`events` table the append-only history; both are read in pages so a log of any size streams.
Times for people are local with their zone, times in CSV/JSON ISO 8601 UTC (mailer/localtime.py).
The report (report.py) reads through the functions here too, so its figures are the status's.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from mailer.audience import (
    Audience,
    contacts_query,
    normalise_email,
    suppressed_among,
    suppression_for,
)
from mailer.errors import InvalidValueError, NotFoundError
from mailer.localtime import format_duration, format_iso, format_local, local_zone
from mailer.models import (
    Campaign,
    City,
    Contact,
    Event,
    EventKind,
    Message,
    MessageStatus,
    Partnership,
    Suppression,
    city_key,
    utcnow,
)
from mailer.outbox import split_reply_detail

STATES: tuple[str, ...] = tuple(s.value for s in MessageStatus)
# States in which a message still has work ahead of it.
OPEN_STATES = (MessageStatus.QUEUED.value, MessageStatus.SENDING.value, MessageStatus.RETRY.value)
# States whose last SMTP answer explains something that went wrong.
PROBLEM_STATES = (
    MessageStatus.FAILED.value,
    MessageStatus.RETRY.value,
    MessageStatus.UNCERTAIN.value,
)
# What came back, per campaign: letters answered, answered automatically, bounced, and
# recipients who asked not to be written to again.
OUTCOMES: tuple[str, ...] = ("replied", "auto_replied", "bounced", "unsubscribed")
RATE_WINDOW = dt.timedelta(minutes=10)
PAGE_SIZE = 1000


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, kw_only=True)
class FailureReason:
    smtp_code: int | None
    reply: str
    count: int

    def label(self) -> str:
        code = str(self.smtp_code) if self.smtp_code is not None else "no code"
        return f"{code} {self.reply}".strip() if self.reply else code


@dataclass(frozen=True, kw_only=True)
class SendRate:
    """How fast letters went out lately: the `sent` events of the RATE_WINDOW that ends at the
    latest one, over the span they actually took (74 letters in 1 s are 74 a second, not "7.4 a
    minute" averaged over ten minutes), and the configured limits beside it."""

    letters: int = 0
    first_at: dt.datetime | None = None
    last_at: dt.datetime | None = None
    # The latest letter went out within RATE_WINDOW of now: sending is going on.
    current: bool = False
    # The configured limit as written ("300/min"), the daily cap, and where they were set:
    # "campaign" (its settings) or "mailer.toml" ([smtp] rate / daily_cap).
    limit: str | None = None
    limit_source: str | None = None
    daily_cap: int | None = None
    daily_cap_source: str | None = None

    @property
    def seconds(self) -> float:
        if self.first_at is None or self.last_at is None:
            return 0.0
        return (self.last_at - self.first_at).total_seconds()

    @property
    def per_second(self) -> float | None:
        """Letters over the seconds they took (at least one: the clock's grain); None for fewer
        than two letters, which have no span."""
        if self.letters < 2:
            return None
        return self.letters / max(self.seconds, 1.0)

    @property
    def per_minute(self) -> float | None:
        per_second = self.per_second
        return None if per_second is None else per_second * 60

    def to_json(self) -> dict[str, Any]:
        per_minute = self.per_minute
        return {
            "letters": self.letters,
            "first_at": format_iso(self.first_at),
            "last_at": format_iso(self.last_at),
            "seconds": round(self.seconds, 3),
            "per_minute": round(per_minute, 1) if per_minute is not None else None,
            "current": self.current,
        }


def _speed(per_second: float) -> str:
    if per_second >= 1:
        return f"{per_second:,.0f} a second" if per_second >= 10 else f"{per_second:.1f} a second"
    per_minute = per_second * 60
    if per_minute >= 1:
        return f"{per_minute:,.1f} a minute"
    return f"{per_minute * 60:,.1f} an hour"


def format_rate(rate: SendRate, *, zone: dt.tzinfo | None = None) -> str:
    """The recent rate in words, then the configured limit: one line for `status` and the
    report."""
    if rate.letters == 0 or rate.last_at is None:
        words = "nothing sent yet"
    else:
        last = format_local(rate.last_at, zone=zone)
        per_second = rate.per_second
        if per_second is None:
            stretch = f"1 letter in the last {_window_words()}, at {last}"
            if not rate.current:
                stretch = f"1 letter, at {last}"
        else:
            stretch = (
                f"{rate.letters:,} letters in {format_duration(rate.seconds)} "
                f"({_speed(per_second)}), the last at {last}"
            )
        words = (
            stretch
            if rate.current
            else f"nothing sent in the last {_window_words()}; before that {stretch}"
        )
    return words + "; " + _limit_words(rate)


def _short_rate(rate: SendRate) -> str:
    """The rate for a table cell: `74 a second`, or `-` when nothing is going out now."""
    per_second = rate.per_second
    if not rate.current or per_second is None:
        return "-"
    return _speed(per_second)


def _window_words() -> str:
    return f"{int(RATE_WINDOW.total_seconds() // 60)} minutes"


def _limit_words(rate: SendRate) -> str:
    cap = f"{rate.daily_cap:,} a day" if rate.daily_cap is not None else None
    if rate.limit is None and cap is None:
        return "no rate limit set"
    if rate.limit is None:
        return f"no rate limit set, at most {cap} ({rate.daily_cap_source})"
    if cap is None:
        return f"limit {rate.limit} ({rate.limit_source})"
    if rate.limit_source == rate.daily_cap_source:
        return f"limit {rate.limit} and {cap} ({rate.limit_source})"
    return f"limit {rate.limit} ({rate.limit_source}) and {cap} ({rate.daily_cap_source})"


@dataclass(frozen=True, kw_only=True)
class CampaignSummary:
    """One campaign's state, as `mailer status` shows it."""

    campaign: str
    title: str | None
    status: str
    counts: dict[str, int]
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    rate: SendRate = field(default_factory=SendRate)
    top_failures: list[FailureReason] = field(default_factory=list)
    # The earliest time a `retry` message is due again.
    next_retry_at: dt.datetime | None = None
    # What came back (inbox sync): replied, auto_replied, bounced, unsubscribed.
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    # Why the campaign is paused, and whether sending waits for the user (a bounce spike).
    pause_reason: str | None = None
    held: bool = False
    # Queued letters held until later (a sending window, a follow-up's delay, a return date),
    # and when the first of them falls due.
    waiting: int = 0
    next_due_at: dt.datetime | None = None
    # Failed letters whose address is suppressed since (a hard bounce, an unsubscribe): no
    # retry can help them, and `mailer retry --failed` leaves them alone.
    failed_suppressed: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def rate_per_minute(self) -> float | None:
        """The rate now: 0 when nothing went out in the last RATE_WINDOW, None for one letter."""
        return self.rate.per_minute if self.rate.current else 0.0

    @property
    def finished(self) -> int:
        """Messages that reached an end state (sent, failed, skipped, uncertain)."""
        return self.total - sum(self.counts[s] for s in OPEN_STATES)

    @property
    def progress(self) -> float:
        """Percent of messages in an end state; 0 for a campaign with no messages."""
        return round(100.0 * self.finished / self.total, 1) if self.total else 0.0

    @property
    def not_sent_yet(self) -> bool:
        return self.total == 0

    def next_steps(self, *, zone: dt.tzinfo | None = None) -> list[str]:
        """What the people running the campaign should do now, in plain words (times in
        `zone`, by default the local one)."""
        slug, c = self.campaign, self.counts
        if self.held:
            return [
                f"paused by a bounce spike: see `mailer log {slug} --status failed` and check the "
                "list; sending resumes only once you acknowledge it"
            ]
        if self.status == "cancelled":
            return [f"{self.pause_reason or 'cancelled'}: nothing more is sent for it"]
        if self.status == "paused" and (self.pause_reason or "").startswith("paused by "):
            return [f"{self.pause_reason}; `mailer campaign resume {slug}` lets it go on"]
        if self.not_sent_yet:
            return [
                f"check it with `mailer check {slug}`, then send with `mailer send {slug} --smtp URL`"
            ]
        steps = []
        if c["queued"] - self.waiting > 0:
            steps.append(
                f"{c['queued'] - self.waiting:,} waiting: `mailer send {slug} --smtp URL` sends them"
            )
        if self.waiting:
            steps.append(
                f"{self.waiting:,} held until their time (sending window, follow-up delay or "
                f"return date), the next due {format_local(self.next_due_at, zone=zone)}: `mailer send "
                f"{slug} --smtp URL` then, or with --wait now"
            )
        if c["retry"]:
            due = (
                f", due from {format_local(self.next_retry_at, zone=zone)}"
                if self.next_retry_at
                else ""
            )
            steps.append(
                f"{c['retry']:,} refused for now by the server: the next "
                f"`mailer send {slug}` tries them again{due}"
            )
        if c["sending"]:
            steps.append(
                f"{c['sending']:,} claimed by a sender: if no `mailer send` is running, "
                f"the next `mailer send {slug}` settles them"
            )
        retriable = c["failed"] - self.failed_suppressed
        if retriable > 0:
            steps.append(
                f"{retriable:,} failed: see why with `mailer log {slug} --status failed`; "
                f"once the cause is fixed, `mailer retry {slug} --failed` queues them again"
            )
        if self.failed_suppressed:
            steps.append(
                f"{self.failed_suppressed:,} failed and suppressed since (no such mailbox, "
                "unsubscribed, or asked not to be written to): no retry can help them"
            )
        if c["uncertain"]:
            steps.append(
                f"{c['uncertain']:,} uncertain (they may have arrived): check your server's "
                f"records (`mailer log {slug} --status uncertain`); only for letters that did "
                f"not arrive, `mailer retry {slug} --uncertain`"
            )
        if not steps:
            steps.append("nothing left to do: every recipient was sent to or skipped on purpose")
        return steps

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "campaign": self.campaign,
            "status": self.status,
            "total": self.total,
        }
        data.update(self.counts)
        data.update(self.outcomes)
        data.update(
            {
                "pause_reason": self.pause_reason,
                "title": self.title,
                "progress": self.progress,
                "started_at": format_iso(self.started_at),
                "ended_at": format_iso(self.ended_at),
                "rate_per_minute": (
                    round(self.rate_per_minute, 1) if self.rate_per_minute is not None else None
                ),
                "recent_rate": self.rate.to_json(),
                "rate_limit": self.rate.limit,
                "daily_cap": self.rate.daily_cap,
                "top_failures": [
                    {"smtp_code": f.smtp_code, "reply": f.reply, "count": f.count}
                    for f in self.top_failures
                ],
                "note": "not sent yet" if self.not_sent_yet else None,
                "next_retry_at": format_iso(self.next_retry_at),
                "waiting": self.waiting,
                "next_due_at": format_iso(self.next_due_at),
                # Words for people, but JSON: its times are UTC like every other in it.
                "next_steps": self.next_steps(zone=dt.UTC),
            }
        )
        return data


def campaign_status(
    session: Session,
    slug: str | None = None,
    *,
    now: dt.datetime | None = None,
    default_rate: str | None = None,
    default_daily_cap: int | None = None,
) -> list[CampaignSummary]:
    """Every campaign (or the one named), oldest first.

    `default_rate` and `default_daily_cap` are the workspace's ([smtp] rate and daily_cap in
    mailer.toml): the limits shown for a campaign whose own settings name none."""
    if slug is not None:
        # Imported here: campaigns brings the template machinery, which reading needs not.
        from mailer.campaigns import get_campaign

        campaigns = [get_campaign(session, slug)]
    else:
        campaigns = list(session.scalars(select(Campaign).order_by(Campaign.id)))
    defaults = _Limits(rate=default_rate, daily_cap=default_daily_cap)
    return [_summary(session, c, now=now or utcnow(), defaults=defaults) for c in campaigns]


def configured_rate(value: object) -> str | None:
    """A rate as mailer.toml or a campaign's settings hold it ("300/min"), or None."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def configured_cap(value: object) -> int | None:
    """A daily cap as mailer.toml or a campaign's settings hold it, or None (bool is no cap)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, kw_only=True)
class _Limits:
    rate: str | None
    daily_cap: int | None


def send_rate(
    session: Session,
    *,
    campaign: Campaign,
    now: dt.datetime,
    default_rate: str | None = None,
    default_daily_cap: int | None = None,
) -> SendRate:
    """The campaign's recent rate (see SendRate) and its configured limits."""
    sent = (Event.campaign_id == campaign.id, Event.kind == EventKind.SENT.value)
    # Newest first along the (campaign_id, at) index: stops at the first `sent` it meets.
    last = _aware(
        session.scalar(
            select(Event.at).where(*sent, Event.at <= now).order_by(Event.at.desc()).limit(1)
        )
    )
    letters, first = 0, None
    if last is not None:
        count, earliest = session.execute(
            select(func.count(), func.min(Event.at)).where(
                *sent, Event.at > last - RATE_WINDOW, Event.at <= last
            )
        ).one()
        letters, first = int(count or 0), _aware(earliest)
    settings = campaign.settings if isinstance(campaign.settings, dict) else {}
    rate, rate_source = configured_rate(settings.get("rate")), "campaign"
    if rate is None and default_rate:
        rate, rate_source = default_rate, "mailer.toml"
    cap, cap_source = configured_cap(settings.get("daily_cap")), "campaign"
    if cap is None and default_daily_cap is not None:
        cap, cap_source = default_daily_cap, "mailer.toml"
    return SendRate(
        letters=letters,
        first_at=first,
        last_at=last,
        current=last is not None and last > now - RATE_WINDOW,
        limit=rate,
        limit_source=rate_source if rate is not None else None,
        daily_cap=cap,
        daily_cap_source=cap_source if cap is not None else None,
    )


def _summary(
    session: Session, campaign: Campaign, *, now: dt.datetime, defaults: _Limits
) -> CampaignSummary:
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    rows = session.execute(
        select(Message.status, func.count())
        .where(Message.campaign_id == campaign.id)
        .group_by(Message.status)
    )
    for status, n in rows:
        counts[status] = counts.get(status, 0) + int(n)

    span = session.execute(
        select(func.min(Event.at), func.max(Event.at)).where(Event.campaign_id == campaign.id)
    ).one()
    first, last = _aware(span[0]), _aware(span[1])
    started = campaign.started_at or first
    ended = campaign.finished_at
    total: int = sum(counts.values())
    if ended is None and total > 0 and not any(counts[s] for s in OPEN_STATES):
        ended = last

    rate = send_rate(
        session,
        campaign=campaign,
        now=now,
        default_rate=defaults.rate,
        default_daily_cap=defaults.daily_cap,
    )
    next_retry = None
    if counts[MessageStatus.RETRY.value]:
        next_retry = session.scalar(
            select(func.min(Message.next_attempt_at)).where(
                Message.campaign_id == campaign.id,
                Message.status == MessageStatus.RETRY.value,
            )
        )
    waiting, next_due = 0, None
    if counts[MessageStatus.QUEUED.value]:
        waiting, next_due = session.execute(
            select(func.count(), func.min(Message.next_attempt_at)).where(
                Message.campaign_id == campaign.id,
                Message.status == MessageStatus.QUEUED.value,
                Message.next_attempt_at > now,
            )
        ).one()
    failed_suppressed = 0
    if counts[MessageStatus.FAILED.value]:
        failed_suppressed = int(
            session.scalar(
                select(func.count())
                .select_from(Message)
                .join(Contact, Contact.id == Message.contact_id)
                .join(Suppression, Suppression.email == Contact.email)
                .where(
                    Message.campaign_id == campaign.id,
                    Message.status == MessageStatus.FAILED.value,
                )
            )
            or 0
        )
    return CampaignSummary(
        failed_suppressed=failed_suppressed,
        waiting=int(waiting or 0),
        next_due_at=_aware(next_due),
        outcomes=campaign_outcomes(session, campaign_id=campaign.id),
        pause_reason=campaign.pause_reason,
        held=bool(campaign.held),
        next_retry_at=_aware(next_retry),
        campaign=campaign.slug,
        title=campaign.title,
        status=campaign.status,
        counts=counts,
        started_at=started,
        ended_at=ended,
        rate=rate,
        top_failures=failure_reasons(session, campaign_id=campaign.id, limit=5),
    )


def campaign_outcomes(session: Session, *, campaign_id: int) -> dict[str, int]:
    """What came back for one campaign (OUTCOMES): auto-replies and unsubscribes counted once
    per letter and per recipient."""
    replied, bounced = session.execute(
        select(func.count(Message.replied_at), func.count(Message.bounced_at)).where(
            Message.campaign_id == campaign_id
        )
    ).one()
    auto = session.scalar(
        select(func.count(func.distinct(Event.message_id))).where(
            Event.campaign_id == campaign_id, Event.kind == EventKind.AUTO_REPLIED.value
        )
    )
    unsubscribed = session.scalar(
        select(func.count(func.distinct(Event.contact_id))).where(
            Event.campaign_id == campaign_id, Event.kind == EventKind.UNSUBSCRIBED.value
        )
    )
    return {
        "replied": int(replied or 0),
        "auto_replied": int(auto or 0),
        "bounced": int(bounced or 0),
        "unsubscribed": int(unsubscribed or 0),
    }


def format_outcomes(outcomes: dict[str, int]) -> str:
    return (
        f"{outcomes['replied']:,} replied, {outcomes['auto_replied']:,} auto-replied, "
        f"{outcomes['bounced']:,} bounced, {outcomes['unsubscribed']:,} unsubscribed"
    )


def failure_reasons(
    session: Session, *, campaign_id: int, limit: int | None = None
) -> list[FailureReason]:
    """Failed, retrying and uncertain messages grouped by their last SMTP code and reply."""
    rows = session.execute(
        select(Message.smtp_code, Message.smtp_reply, func.count())
        .where(Message.campaign_id == campaign_id, Message.status.in_(PROBLEM_STATES))
        .group_by(Message.smtp_code, Message.smtp_reply)
    )
    # Replies differing only in whitespace or line breaks are the same reason.
    merged: dict[tuple[int | None, str], int] = {}
    for code, reply, n in rows:
        key = (code, _one_line(reply))
        merged[key] = merged.get(key, 0) + int(n)
    ordered = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0][0] or 0, kv[0][1]))
    if limit is not None:
        ordered = ordered[:limit]
    return [FailureReason(smtp_code=code, reply=reply, count=n) for (code, reply), n in ordered]


_QUOTED_ADDRESS = re.compile(r"^invalid address (['\"]).*?\1: ")


def skip_reasons(
    session: Session, *, campaign_id: int, limit: int | None = None
) -> list[FailureReason]:
    """Skipped letters grouped by why (the detail of their latest `skipped` event: suppressed
    and its reason, an unusable address, a cancelled campaign...), most first."""
    latest = (
        select(func.max(Event.id))
        .where(
            Event.message_id == Message.id,
            Event.kind == EventKind.SKIPPED.value,
        )
        .correlate(Message)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Event.detail, func.count())
        .select_from(Message)
        .outerjoin(Event, Event.id == latest)
        .where(Message.campaign_id == campaign_id, Message.status == MessageStatus.SKIPPED.value)
        .group_by(Event.detail)
    )
    merged: dict[str, int] = {}
    for detail, n in rows:
        # Each invalid address is its own text; the reason after it is what groups them.
        key = _QUOTED_ADDRESS.sub("invalid address: ", _one_line(detail)) or "not sent on purpose"
        merged[key] = merged.get(key, 0) + int(n)
    ordered = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))
    if limit is not None:
        ordered = ordered[:limit]
    return [FailureReason(smtp_code=None, reply=reply, count=n) for reply, n in ordered]


# RFC 3463 enhanced status codes: the details a bounce names most, then each subject's meaning.
DSN_MEANINGS = {
    "5.1.1": "no such mailbox",
    "5.1.2": "no such domain",
    "5.1.3": "badly formed address",
    "5.1.6": "mailbox has moved",
    "5.1.10": "the domain accepts no mail",
    "5.2.1": "mailbox disabled",
    "5.2.2": "mailbox full",
    "5.2.3": "letter too large for the mailbox",
    "5.4.4": "no route to the recipient's server",
    "5.7.1": "refused by the recipient's policy (blocked or not allowed)",
    "5.7.26": "refused: the sender's domain failed authentication (SPF/DKIM/DMARC)",
}
DSN_SUBJECTS = {
    "0": "other or unknown problem",
    "1": "address problem",
    "2": "mailbox problem",
    "3": "mail system problem",
    "4": "network or routing problem",
    "5": "mail delivery protocol problem",
    "6": "content problem",
    "7": "security or policy refusal",
}
_DSN_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


def dsn_meaning(status: str | None) -> str:
    """`5.1.1` -> "no such mailbox"; an unknown detail falls back on its subject (5.1.x:
    "address problem")."""
    if not status:
        return "no delivery status given"
    if status in DSN_MEANINGS:
        return DSN_MEANINGS[status]
    parts = status.split(".")
    return DSN_SUBJECTS.get(parts[1], "unknown status") if len(parts) == 3 else "unknown status"


@dataclass(frozen=True, kw_only=True)
class BounceReason:
    """Bounced letters with one delivery status (RFC 3463, e.g. 5.1.1) and SMTP code."""

    status: str | None
    smtp_code: int | None
    count: int
    # One server answer of the group, as the bounce gave it.
    example: str

    @property
    def meaning(self) -> str:
        return dsn_meaning(self.status)


def bounce_reasons(session: Session, *, campaign_id: int) -> list[BounceReason]:
    """The campaign's bounced letters grouped by delivery status and SMTP code, most first."""
    rows = session.execute(
        select(Message.smtp_code, Message.smtp_reply, func.count())
        .where(Message.campaign_id == campaign_id, Message.bounced_at.is_not(None))
        .group_by(Message.smtp_code, Message.smtp_reply)
    )
    groups: dict[tuple[str | None, int | None], tuple[int, str]] = {}
    for code, reply, n in rows:
        text = _one_line(reply)
        found = _DSN_STATUS.search(text)
        key = (".".join(found.groups()) if found else None, code)
        count, example = groups.get(key, (0, text))
        groups[key] = (count + int(n), example)
    ordered = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0][0] or "", kv[0][1] or 0))
    return [
        BounceReason(status=status, smtp_code=code, count=n, example=example)
        for (status, code), (n, example) in ordered
    ]


@dataclass(frozen=True, kw_only=True)
class OutcomeRow:
    """One answer that came back (a reply, an unsubscribe...), with whom it came from."""

    at: dt.datetime
    kind: str
    email: str | None
    name: str | None
    city: str | None
    country: str | None
    subject: str
    excerpt: str


def outcome_rows(
    session: Session, *, campaign_id: int, kinds: Sequence[EventKind], limit: int
) -> tuple[list[OutcomeRow], int]:
    """The first `limit` events of these kinds (oldest first), and how many there are."""
    wanted = (Event.campaign_id == campaign_id, Event.kind.in_([k.value for k in kinds]))
    total = int(session.scalar(select(func.count()).select_from(Event).where(*wanted)) or 0)
    rows = session.connection().execute(
        select(
            Event.at, Event.kind, Event.detail, Contact.email, Contact.name, City.name, City.country
        )
        .outerjoin(Contact, Contact.id == Event.contact_id)
        .outerjoin(City, City.id == Contact.city_id)
        .where(*wanted)
        .order_by(Event.at, Event.id)
        .limit(limit)
    )
    out = []
    for at, kind, detail, email, name, city, country in rows:
        if kind == EventKind.REPLIED.value:
            subject, excerpt = split_reply_detail(detail)
        else:
            subject, excerpt = "", detail or ""
        out.append(
            OutcomeRow(
                at=_aware(at) or at,
                kind=kind,
                email=email,
                name=name,
                city=city,
                country=country,
                subject=subject,
                excerpt=excerpt,
            )
        )
    return out, total


@dataclass(frozen=True, kw_only=True)
class LetterDetail:
    """What a log row does not carry, for the few rows a report shows: the Ukrainian partner
    cities of the recipient's city, and the letter's due time, return date and skip reason."""

    partners: tuple[str, ...] = ()
    next_attempt_at: dt.datetime | None = None
    away_until: dt.date | None = None
    auto_replied: bool = False
    skip_reason: str | None = None


def letter_details(
    session: Session, *, campaign_id: int, contact_ids: Sequence[int]
) -> dict[int, LetterDetail]:
    """LetterDetail per contact id, a few queries for a whole list (meant for hundreds)."""
    found: dict[int, dict[str, Any]] = {}
    city_of: dict[int, int] = {}
    conn = session.connection()
    ids = list(dict.fromkeys(contact_ids))
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for cid, due, away, city_id in conn.execute(
            select(Message.contact_id, Message.next_attempt_at, Message.away_until, Contact.city_id)
            .join(Contact, Contact.id == Message.contact_id)
            .where(Message.campaign_id == campaign_id, Message.contact_id.in_(chunk))
        ):
            found[cid] = {"next_attempt_at": _aware(due), "away_until": away}
            if city_id is not None:
                city_of[cid] = city_id
        for event_contact, kind, detail in conn.execute(
            select(Event.contact_id, Event.kind, Event.detail)
            .where(
                Event.campaign_id == campaign_id,
                Event.contact_id.in_(chunk),
                Event.kind.in_([EventKind.SKIPPED.value, EventKind.AUTO_REPLIED.value]),
            )
            .order_by(Event.id)
        ):
            if event_contact is None:
                continue
            item = found.setdefault(event_contact, {})
            if kind == EventKind.SKIPPED.value:
                item["skip_reason"] = _one_line(detail) or None
            else:
                item["auto_replied"] = True
    partners: dict[int, list[str]] = {}
    cities = sorted(set(city_of.values()))
    for start in range(0, len(cities), 500):
        for partner_city, name in conn.execute(
            select(Partnership.partner_city_id, City.name)
            .join(City, City.id == Partnership.ukrainian_city_id)
            .where(Partnership.partner_city_id.in_(cities[start : start + 500]))
            .order_by(Partnership.id)
        ):
            partners.setdefault(partner_city, []).append(name)
    return {
        cid: LetterDetail(
            partners=tuple(partners.get(city_of.get(cid, -1), ())),
            **found.get(cid, {}),
        )
        for cid in ids
    }


def why_not_sent(row: Row, detail: LetterDetail) -> str:
    """Why a letter (a `log_rows` row) is not sent, in words: the server's answer, the bounce,
    the skip reason, or what it waits for."""
    status = row["status"]
    reply = _one_line(row["smtp_reply"])
    if status == MessageStatus.FAILED.value and row["bounced_at"] is not None:
        return f"bounced: {reply}" if reply else "bounced"
    if status in PROBLEM_STATES:
        answer = " ".join(p for p in (str(row["smtp_code"] or ""), reply) if p)
        return answer or "no answer from the server"
    if status == MessageStatus.SKIPPED.value:
        return detail.skip_reason or "not sent on purpose"
    if status == MessageStatus.QUEUED.value:
        return "waiting for `mailer send`"
    if status == MessageStatus.SENDING.value:
        return "being sent now; if no `mailer send` is running, the next one settles it"
    return reply


def follow_up_note(detail: LetterDetail) -> str:
    """What a letter to follow up has had back: an automatic answer and its return date."""
    if detail.away_until is not None:
        return f"auto-reply: back on {detail.away_until.isoformat()}"
    return "auto-reply" if detail.auto_replied else ""


def format_status_text(
    summaries: Sequence[CampaignSummary], *, zone: dt.tzinfo | None = None
) -> str:
    """Plain aligned text: what `status` prints when the output is not a terminal."""
    if not summaries:
        return "No campaigns yet. Create one with `mailer campaign create SLUG ...`.\n"
    zone = zone or local_zone()
    lines: list[str] = []
    for s in summaries:
        lines.extend(_status_block(s, zone=zone))
        lines.append("")
    return "\n".join(lines)


def _status_block(s: CampaignSummary, *, zone: dt.tzinfo) -> list[str]:
    title = f" — {s.title}" if s.title else ""
    lines = [f"{s.campaign}{title}  [{s.status}]"]
    if s.pause_reason:
        lines.append(f"  PAUSED: {s.pause_reason}")
    if s.not_sent_yet:
        lines.append("  not sent yet: no messages queued")
        lines.extend(f"  next: {step}" for step in s.next_steps(zone=zone))
        return lines
    width = max(len(state) for state in STATES)
    for state in STATES:
        lines.append(f"  {state:<{width}}  {s.counts[state]:>9,}")
    lines.append(f"  {'total':<{width}}  {s.total:>9,}")
    lines.append(f"  progress  {s.progress:.1f}% ({s.finished:,} of {s.total:,} finished)")
    lines.append(f"  started   {format_local(s.started_at, zone=zone)}")
    lines.append(f"  ended     {format_local(s.ended_at, zone=zone)}")
    lines.append(f"  rate      {format_rate(s.rate, zone=zone)}")
    lines.append(f"  outcomes  {format_outcomes(s.outcomes)}")
    if s.waiting:
        lines.append(
            f"  waiting   {s.waiting:,} held for their window or delay; the next due "
            f"{format_local(s.next_due_at, zone=zone)}"
        )
    if s.top_failures:
        lines.append("  top failure reasons:")
        for reason in s.top_failures:
            lines.append(f"    {reason.count:>7,} × {_clip(reason.label(), 90)}")
    lines.extend(f"  next: {step}" for step in s.next_steps(zone=zone))
    return lines


# --------------------------------------------------------------------------- log

LOG_COLUMNS: tuple[str, ...] = (
    "email",
    "name",
    "city",
    "country",
    "language",
    "status",
    "attempts",
    "queued_at",
    "sent_at",
    "replied_at",
    "bounced_at",
    "last_event_at",
    "smtp_code",
    "smtp_reply",
    "message_id",
    "subject",
)
EVENT_COLUMNS: tuple[str, ...] = (
    "at",
    "kind",
    "email",
    "name",
    "city",
    "country",
    "status",
    "smtp_code",
    "detail",
    "via",
    "message_id",
)
# The columns a terminal table shows; exports carry all of them.
LOG_TABLE_COLUMNS: tuple[str, ...] = (
    "email",
    "name",
    "city",
    "country",
    "status",
    "attempts",
    "sent_at",
    "replied_at",
    "bounced_at",
    "smtp_code",
    "smtp_reply",
)
EVENT_TABLE_COLUMNS: tuple[str, ...] = (
    "at",
    "kind",
    "email",
    "city",
    "country",
    "status",
    "smtp_code",
    "detail",
)

Row = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class LogFilter:
    statuses: tuple[str, ...] = ()
    contact: str | None = None
    city: str | None = None
    country: str | None = None
    since: dt.datetime | None = None
    # Letters to follow up: sent, no human reply (an auto-reply is none), not bounced, and the
    # address not suppressed since (unsubscribed, complaint, bounce, do-not-contact).
    awaiting_reply: bool = False


def parse_statuses(values: Iterable[str]) -> tuple[str, ...]:
    out = []
    for value in values:
        for part in value.split(","):
            state = part.strip().lower()
            if not state:
                continue
            if state not in STATES:
                raise InvalidValueError(
                    f"--status {part.strip()!r}: unknown status; use one of {', '.join(STATES)}"
                )
            out.append(state)
    return tuple(dict.fromkeys(out))


_RELATIVE = re.compile(
    r"^\s*(\d+)\s*(m|min|mins|minutes?|h|hours?|d|days?|w|weeks?)\s*(?:ago)?\s*$"
)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(
    value: str, *, now: dt.datetime | None = None, zone: dt.tzinfo | None = None
) -> dt.datetime:
    """`2026-03-14`, `2026-03-14T09:30`, `...+02:00`, or relative: `30m`, `2h`, `3d`, `1w`.

    A date or time without a zone is in `zone` (by default the local one), the zone every time
    mailer shows is in.
    """
    text = value.strip()
    match = _RELATIVE.match(text.lower())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        delta = dt.timedelta(**{_UNITS[unit[0]]: amount})
        return (now or utcnow()) - delta
    try:
        parsed = dt.datetime.fromisoformat(text.replace(" ", "T", 1) if len(text) > 10 else text)
    except ValueError:
        raise InvalidValueError(
            f"--since {value!r}: not a date or time; use e.g. 2026-03-14, "
            "2026-03-14T09:30, or a relative age like 30m, 2h, 3d, 1w"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone or local_zone())
    return parsed.astimezone(dt.UTC)


def _filter_conditions(flt: LogFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if flt.statuses:
        conditions.append(Message.status.in_(flt.statuses))
    if flt.contact:
        conditions.append(Contact.email == normalise_email(flt.contact))
    if flt.city:
        conditions.append(City.name_key == city_key(flt.city))
    if flt.country:
        conditions.append(City.country == flt.country.strip().upper())
    if flt.awaiting_reply:
        conditions += [
            Message.status == MessageStatus.SENT.value,
            Message.replied_at.is_(None),
            Message.bounced_at.is_(None),
            ~exists().where(Suppression.email == Contact.email),
        ]
    return conditions


def _last_event_at() -> Any:
    return (
        select(func.max(Event.at))
        .where(Event.message_id == Message.id)
        .correlate(Message)
        .scalar_subquery()
    )


def log_rows(
    session: Session, *, slug: str, flt: LogFilter | None = None, page_size: int = PAGE_SIZE
) -> Iterator[Row]:
    """One row per recipient message (LOG_COLUMNS), in contact order, read page by page.

    Pages follow the (campaign, contact) unique index, so each page is an index range:
    the whole export costs one pass, whatever its size.

    `since` keeps the recipients whose message has an event at or after that time.
    """
    flt = flt or LogFilter()
    from mailer.campaigns import get_campaign

    campaign = get_campaign(session, slug)
    conditions = _log_conditions(campaign_id=campaign.id, flt=flt)
    # Plain columns, not ORM objects: nothing piles up in the session's identity map.
    selected = (
        Message.contact_id,
        Contact.email,
        Contact.name,
        City.name,
        City.country,
        Message.language,
        Message.status,
        Message.attempts,
        Message.queued_at,
        Message.sent_at,
        Message.replied_at,
        Message.bounced_at,
        _last_event_at(),
        Message.smtp_code,
        Message.smtp_reply,
        Message.message_id,
        Message.subject,
    )
    base = (
        select(*selected)
        .join(Contact, Contact.id == Message.contact_id)
        .outerjoin(City, City.id == Contact.city_id)
        .where(*conditions)
        .order_by(Message.contact_id)
        .limit(page_size)
    )
    last_id = 0
    while True:
        # Core execution: the ORM's row machinery would double the cost of a large export.
        page = session.connection().execute(base.where(Message.contact_id > last_id)).all()
        for row in page:
            item = dict(zip(("contact_id", *LOG_COLUMNS), row, strict=True))
            item["last_event_at"] = _aware(item["last_event_at"])
            yield item
        if len(page) < page_size:
            return
        last_id = page[-1][0]


def _log_conditions(*, campaign_id: int, flt: LogFilter) -> list[ColumnElement[bool]]:
    conditions = [Message.campaign_id == campaign_id, *_filter_conditions(flt)]
    if flt.since is not None:
        conditions.append(
            exists().where(and_(Event.message_id == Message.id, Event.at >= flt.since))
        )
    return conditions


def count_log_rows(session: Session, *, campaign_id: int, flt: LogFilter) -> int:
    """How many rows `log_rows` would give for this filter (one COUNT, no rows read out)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Message)
            .join(Contact, Contact.id == Message.contact_id)
            .outerjoin(City, City.id == Contact.city_id)
            .where(*_log_conditions(campaign_id=campaign_id, flt=flt))
        )
        or 0
    )


def event_rows(
    session: Session, *, slug: str, flt: LogFilter | None = None, page_size: int = PAGE_SIZE
) -> Iterator[Row]:
    """One row per event (EVENT_COLUMNS), oldest first, read page by page."""
    flt = flt or LogFilter()
    from mailer.campaigns import get_campaign

    campaign = get_campaign(session, slug)
    conditions = [Event.campaign_id == campaign.id, *_filter_conditions(flt)]
    if flt.since is not None:
        conditions.append(Event.at >= flt.since)
    base = (
        select(
            Event.id,
            Event.at,
            Event.kind,
            Contact.email,
            Contact.name,
            City.name,
            City.country,
            Message.status,
            Event.smtp_code,
            Event.detail,
            Event.via,
            Message.message_id,
        )
        .outerjoin(Message, Message.id == Event.message_id)
        .outerjoin(Contact, Contact.id == Event.contact_id)
        .outerjoin(City, City.id == Contact.city_id)
        .where(*conditions)
        .order_by(Event.at, Event.id)
        .limit(page_size)
    )
    after: tuple[dt.datetime, int] | None = None
    while True:
        query = base
        if after is not None:
            at, event_id = after
            # `at >= x` first, so the (campaign_id, at) index gives a range, not a scan.
            query = query.where(Event.at >= at, or_(Event.at > at, Event.id > event_id))
        page = session.connection().execute(query).all()
        for row in page:
            yield dict(zip(("id", *EVENT_COLUMNS), row, strict=True)) | {"at": _aware(row[1])}
        if len(page) < page_size:
            return
        after = (page[-1][1], page[-1][0])


# The audit export (`mailer log --events --all`): every event of every campaign, import,
# suppression change and campaign change, with who did it and from which machine.
AUDIT_COLUMNS: tuple[str, ...] = (
    "id",
    "at",
    "kind",
    "campaign",
    "email",
    "status",
    "smtp_code",
    "detail",
    "via",
    "actor",
    "host",
    "message_id",
)
AUDIT_TABLE_COLUMNS: tuple[str, ...] = ("at", "kind", "campaign", "email", "actor", "detail")
# What the audit query reads, in order: every column but `host`, which is worked out from `actor`.
_AUDIT_QUERIED = tuple(column for column in AUDIT_COLUMNS if column != "host")


def actor_host(actor: str | None) -> str | None:
    """The machine in an actor label (`user@host pid N`, see identity.Actor.label)."""
    if not actor or "@" not in actor:
        return None
    return actor.partition("@")[2].rpartition(" pid ")[0] or None


def audit_rows(
    session: Session, *, flt: LogFilter | None = None, page_size: int = PAGE_SIZE
) -> Iterator[Row]:
    """Every event (AUDIT_COLUMNS) in the order it was written, read page by page on the
    primary key: the export streams at any size, each page one index range. The filter's
    contact, city, country and since apply; its statuses to the letters' current state."""
    flt = flt or LogFilter()
    conditions = _filter_conditions(flt)
    if flt.since is not None:
        conditions.append(Event.at >= flt.since)
    base = (
        select(
            Event.id,
            Event.at,
            Event.kind,
            Campaign.slug,
            Contact.email,
            Message.status,
            Event.smtp_code,
            Event.detail,
            Event.via,
            Event.actor,
            Message.message_id,
        )
        .outerjoin(Campaign, Campaign.id == Event.campaign_id)
        .outerjoin(Message, Message.id == Event.message_id)
        .outerjoin(Contact, Contact.id == Event.contact_id)
        .outerjoin(City, City.id == Contact.city_id)
        .where(*conditions)
        .order_by(Event.id)
        .limit(page_size)
    )
    after = 0
    while True:
        page = session.connection().execute(base.where(Event.id > after)).all()
        for row in page:
            item = dict(zip(_AUDIT_QUERIED, row, strict=True))
            item["at"] = _aware(row[1])
            item["host"] = actor_host(item["actor"])
            yield item
        if len(page) < page_size:
            return
        after = page[-1][0]


# --------------------------------------------------------------------------- writers


class OutputFormat(enum.StrEnum):
    """The `--format` of the listing commands."""

    TABLE = "table"
    CSV = "csv"
    JSON = "json"


# A spreadsheet runs a cell starting with these as a formula (OWASP "CSV injection").
_FORMULA_CHARS = "=+-@\t\r"


def csv_cell(value: Any) -> str:
    text = value if type(value) is str else _plain(value)
    if text and text[0] in _FORMULA_CHARS:
        return "'" + text
    return text


def write_csv(rows: Iterable[Row], *, columns: Sequence[str], out: IO[str]) -> int:
    """Header plus one line per row, written as the rows arrive. Returns the row count."""
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    n = 0
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in columns])
        n += 1
    return n


def write_json(rows: Iterable[Row], *, columns: Sequence[str], out: IO[str]) -> int:
    """A JSON array written element by element: one object per line between `[` and `]`."""
    out.write("[")
    n = 0
    for row in rows:
        out.write(",\n" if n else "\n")
        out.write(json.dumps({c: _jsonable(row.get(c)) for c in columns}, ensure_ascii=False))
        n += 1
    out.write("\n]\n" if n else "]\n")
    return n


def write_table(
    rows: Iterable[Row],
    *,
    columns: Sequence[str],
    out: IO[str],
    max_width: int = 40,
    sample: int = 500,
    empty: str = "(no matching rows)\n",
    zone: dt.tzinfo | None = None,
) -> int:
    """Plain aligned columns. Widths come from the first `sample` rows, so output streams.
    With no rows at all, only `empty` is written. Times are for people: local, with the zone."""
    zone = zone or local_zone()

    def cell(value: Any) -> str:
        if isinstance(value, dt.datetime):
            return format_local(value, zone=zone)
        return _plain(value)

    iterator = iter(rows)
    head: list[Row] = []
    for row in iterator:
        head.append(row)
        if len(head) >= sample:
            break
    if not head:
        out.write(empty)
        return 0
    widths = {c: min(max_width, max(len(c), *(len(cell(r.get(c))) for r in head))) for c in columns}

    def line(values: Iterable[str]) -> str:
        cells = [_clip(v, widths[c]).ljust(widths[c]) for c, v in zip(columns, values, strict=True)]
        return "  ".join(cells).rstrip() + "\n"

    out.write(line(columns))
    out.write(line("-" * widths[c] for c in columns))
    n = 0
    for row in _chain(head, iterator):
        out.write(line(cell(row.get(c)) for c in columns))
        n += 1
    return n


def _chain(head: list[Row], rest: Iterator[Row]) -> Iterator[Row]:
    yield from head
    head.clear()
    yield from rest


# --------------------------------------------------------------------------- contact history


@dataclass(frozen=True, kw_only=True)
class SuppressionInfo:
    reason: str
    source: str | None
    at: dt.datetime


@dataclass(frozen=True, kw_only=True)
class MessageRecord:
    campaign: str
    status: str
    attempts: int
    language: str | None
    subject: str | None
    queued_at: dt.datetime
    sent_at: dt.datetime | None
    smtp_code: int | None
    smtp_reply: str | None
    message_id: str | None
    replied_at: dt.datetime | None = None
    bounced_at: dt.datetime | None = None
    away_until: dt.date | None = None


@dataclass(frozen=True, kw_only=True)
class ReplyRecord:
    """A human answer to one of our letters, as inbox sync recorded it."""

    campaign: str | None
    at: dt.datetime
    subject: str
    excerpt: str


@dataclass(frozen=True, kw_only=True)
class EventRecord:
    at: dt.datetime
    campaign: str | None
    kind: str
    smtp_code: int | None
    detail: str | None
    via: str | None


@dataclass(frozen=True, kw_only=True)
class ContactHistory:
    """Everything known about one address. `imported` is False for an address only suppressed."""

    email: str
    imported: bool
    name: str | None = None
    title: str | None = None
    salutation: str | None = None
    organisation: str | None = None
    language: str | None = None
    city: str | None = None
    region: str | None = None
    country: str | None = None
    timezone: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    suppression: SuppressionInfo | None = None
    messages: list[MessageRecord] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    replies: list[ReplyRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def conv(obj: Any) -> Any:
            return {k: _jsonable(v) for k, v in obj.__dict__.items()}

        data = {k: _jsonable(v) for k, v in self.__dict__.items()}
        data["suppression"] = conv(self.suppression) if self.suppression else None
        data["messages"] = [conv(m) for m in self.messages]
        data["events"] = [conv(e) for e in self.events]
        data["replies"] = [conv(r) for r in self.replies]
        return data


def contact_history(session: Session, email: str) -> ContactHistory:
    address = normalise_email(email)
    contact = session.scalar(select(Contact).where(Contact.email == address))
    suppression = suppression_for(session, address)
    supp = (
        SuppressionInfo(
            reason=suppression.reason, source=suppression.source, at=suppression.created_at
        )
        if suppression is not None
        else None
    )
    if contact is None:
        if supp is None:
            raise NotFoundError(f"no contact {address!r}: it was never imported nor suppressed")
        return ContactHistory(email=address, imported=False, suppression=supp)

    slugs: dict[int, str] = {
        cid: slug for cid, slug in session.execute(select(Campaign.id, Campaign.slug))
    }
    messages = [
        MessageRecord(
            campaign=slugs.get(m.campaign_id, str(m.campaign_id)),
            status=m.status,
            attempts=m.attempts,
            language=m.language,
            subject=m.subject,
            queued_at=m.queued_at,
            sent_at=m.sent_at,
            smtp_code=m.smtp_code,
            smtp_reply=m.smtp_reply,
            message_id=m.message_id,
            replied_at=m.replied_at,
            bounced_at=m.bounced_at,
            away_until=m.away_until,
        )
        for m in session.scalars(
            select(Message)
            .where(Message.contact_id == contact.id)
            .order_by(Message.queued_at, Message.id)
        )
    ]
    mine = select(Message.id).where(Message.contact_id == contact.id)
    events = [
        EventRecord(
            at=e.at,
            campaign=slugs.get(e.campaign_id) if e.campaign_id is not None else None,
            kind=e.kind,
            smtp_code=e.smtp_code,
            detail=e.detail,
            via=e.via,
        )
        for e in session.scalars(
            select(Event)
            .where(or_(Event.contact_id == contact.id, Event.message_id.in_(mine)))
            .order_by(Event.at, Event.id)
        )
    ]
    replies = []
    for e in events:
        if e.kind == EventKind.REPLIED.value:
            subject, text = split_reply_detail(e.detail)
            replies.append(ReplyRecord(campaign=e.campaign, at=e.at, subject=subject, excerpt=text))
    city = contact.city
    return ContactHistory(
        replies=replies,
        email=contact.email,
        imported=True,
        name=contact.name,
        title=contact.title,
        salutation=contact.salutation,
        organisation=contact.organisation,
        language=contact.language,
        city=city.name if city else None,
        region=city.region if city else None,
        country=city.country if city else None,
        timezone=contact.timezone,
        attributes=dict(contact.attributes or {}),
        tags=[str(t) for t in (contact.tags or [])],
        created_at=contact.created_at,
        updated_at=contact.updated_at,
        suppression=supp,
        messages=messages,
        events=events,
    )


def format_contact_history(history: ContactHistory, *, zone: dt.tzinfo | None = None) -> str:
    zone = zone or local_zone()

    def when(value: dt.datetime | None) -> str:
        return format_local(value, zone=zone)

    lines: list[str] = []
    if not history.imported:
        lines.append(f"{history.email} is not an imported contact, but it is suppressed:")
    else:
        lines.append(history.email)
        for label, value in (
            ("name", history.name),
            ("title", history.title),
            ("salutation", history.salutation),
            ("organisation", history.organisation),
            ("city", ", ".join(p for p in (history.city, history.region, history.country) if p)),
            ("language", history.language),
            ("time zone", history.timezone),
            ("tags", ", ".join(history.tags)),
        ):
            if value:
                lines.append(f"  {label:<13} {value}")
        for key, value in sorted(history.attributes.items()):
            if value not in (None, ""):
                lines.append(f"  {key:<13} {_plain(value)}")
        lines.append(f"  {'imported':<13} {when(history.created_at)}")
    if history.suppression:
        s = history.suppression
        source = f" (source: {s.source})" if s.source else ""
        lines.append(f"  SUPPRESSED    {s.reason} since {when(s.at)}{source}: never sent to")
    elif history.imported:
        lines.append("  suppressed    no")
    if not history.imported:
        return "\n".join(lines) + "\n"

    lines.append("")
    if not history.messages:
        lines.append("Campaigns: none (never queued in any campaign)")
    else:
        lines.append("Campaigns:")
        for m in history.messages:
            answer = " ".join(p for p in (str(m.smtp_code or ""), _one_line(m.smtp_reply)) if p)
            sent_or_queued = (
                f"sent {when(m.sent_at)}" if m.sent_at else f"queued {when(m.queued_at)}"
            )
            came_back = [
                f"replied {when(m.replied_at)}" if m.replied_at else "",
                f"bounced {when(m.bounced_at)}" if m.bounced_at else "",
                f"away until {m.away_until.isoformat()}" if m.away_until else "",
            ]
            outcome = ", ".join(p for p in came_back if p)
            lines.append(
                f"  {m.campaign}: {m.status}, {m.attempts} attempt(s), {sent_or_queued}"
                + (f", {outcome}" if outcome else "")
                + (f" — {answer}" if answer else "")
            )
    if history.replies:
        lines.append("")
        lines.append("Replies:")
        for r in history.replies:
            lines.append(f"  {when(r.at)}  {r.campaign or '-'}  {r.subject}")
            lines.extend(f"    | {line}" for line in r.excerpt.splitlines())
    lines.append("")
    if not history.events:
        lines.append("Events: none")
    else:
        lines.append("Events (oldest first):")
        for e in history.events:
            parts = [when(e.at), e.campaign or "-", e.kind]
            if e.smtp_code is not None:
                parts.append(str(e.smtp_code))
            if e.detail:
                parts.append(_one_line(e.detail))
            if e.via:
                parts.append(f"via {e.via}")
            lines.append("  " + "  ".join(parts))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- contacts list
# Beside `contacts show` (contact_history) and the writers: listing contacts is reading the store
# back for people, as the log is; `audience` only says who matches.

CONTACT_COLUMNS = (
    "email",
    "name",
    "title",
    "organisation",
    "language",
    "city",
    "region",
    "country",
    "tags",
    "suppressed",
)


def contact_rows(
    session: Session, *, audience: Audience, page_size: int = PAGE_SIZE
) -> Iterator[Row]:
    """One row per matching contact (CONTACT_COLUMNS plus `attributes`), read page by page."""
    query = contacts_query(session, audience).execution_options(yield_per=page_size)
    batch: list[Contact] = []

    def emit(contacts: list[Contact]) -> Iterator[Row]:
        suppressed = suppressed_among(session, [c.email for c in contacts])
        for c in contacts:
            yield {
                "email": c.email,
                "name": c.name,
                "title": c.title,
                "organisation": c.organisation,
                "language": c.language,
                "city": c.city.name if c.city else None,
                "region": c.city.region if c.city else None,
                "country": c.city.country if c.city else None,
                "tags": list(c.tags or []),
                "suppressed": c.email in suppressed,
                "attributes": dict(c.attributes or {}),
            }

    for contact in session.scalars(query):
        batch.append(contact)
        if len(batch) >= page_size:
            yield from emit(batch)
            batch = []
    yield from emit(batch)


def _contact_text(row: Row) -> Row:
    """A contact row as a spreadsheet or a terminal shows it: tags `a;b`, suppressed `yes`."""
    return row | {"tags": ";".join(row["tags"]), "suppressed": "yes" if row["suppressed"] else ""}


def format_contact_count(count: int, *, audience: Audience) -> str:
    """The line under a `contacts list` table (or instead of it, when nobody matches)."""
    if not count:
        return f"No contacts match ({audience.describe()})."
    return f"{count} contact(s)"


def write_contact_list(
    session: Session, *, audience: Audience, fmt: OutputFormat, out: IO[str]
) -> int:
    """`contacts list`: the matching contacts in `fmt`, streamed. Returns how many."""
    rows = contact_rows(session, audience=audience)
    if fmt is OutputFormat.JSON:
        return write_json(rows, columns=(*CONTACT_COLUMNS, "attributes"), out=out)
    if fmt is OutputFormat.CSV:
        return write_csv(map(_contact_text, rows), columns=CONTACT_COLUMNS, out=out)
    count = write_table(map(_contact_text, rows), columns=CONTACT_COLUMNS, out=out, empty="")
    out.write(format_contact_count(count, audience=audience) + "\n")
    return count


# --------------------------------------------------------------------------- helpers


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # Aggregates (min/max) bypass the column type, so SQLite hands back naive UTC or strings.
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return format_iso(value) or ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return format_iso(value)
    return value


def status_renderables(
    summaries: Sequence[CampaignSummary], *, zone: dt.tzinfo | None = None
) -> list[Any]:
    """Rich tables for a terminal: one overview row per campaign, then its failure reasons."""
    from rich.table import Table
    from rich.text import Text

    zone = zone or local_zone()
    if not summaries:
        return ["No campaigns yet. Create one with `mailer campaign create SLUG ...`."]
    table = Table(title="Campaigns", title_justify="left")
    table.add_column("campaign")
    table.add_column("status")
    for state in STATES:
        table.add_column(state, justify="right")
    for label in ("total", "progress", "started", "ended", "recent rate"):
        table.add_column(label, justify="right")
    for s in summaries:
        if s.not_sent_yet:
            table.add_row(
                s.campaign, s.status, *["-"] * len(STATES), "0", "not sent yet", "-", "-", "-"
            )
            continue
        table.add_row(
            Text(s.campaign),
            s.status,
            *(f"{s.counts[state]:,}" for state in STATES),
            f"{s.total:,}",
            f"{s.progress:.1f}%",
            format_local(s.started_at, zone=zone),
            format_local(s.ended_at, zone=zone),
            _short_rate(s.rate),
        )
    out: list[Any] = [table]
    for s in summaries:
        out.append(Text(f"{s.campaign}, next:"))
        out.append(Text(f"  rate: {format_rate(s.rate, zone=zone)}"))
        out.extend(Text(f"  • {step}") for step in s.next_steps(zone=zone))
        if s.top_failures:
            reasons = Table(title=Text(f"{s.campaign}: top failure reasons"), title_justify="left")
            reasons.add_column("count", justify="right")
            reasons.add_column("code", justify="right")
            reasons.add_column("reply")
            for r in s.top_failures:
                # Text(), not str: a server reply like "[ABC]" must not be read as rich markup.
                reasons.add_row(f"{r.count:,}", str(r.smtp_code or "-"), Text(r.reply or "-"))
            out.append(reasons)
    return out
