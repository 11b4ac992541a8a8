"""The typed data model (DESIGN §4). Every change here needs an Alembic migration."""

from __future__ import annotations

import datetime as dt
import enum
import re
from typing import Any

from anyascii import anyascii
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Re-exported: importers, review and report take the one `utcnow` from here.
from mailer.clock import utcnow as utcnow

# Named constraints let Alembic's batch mode rebuild SQLite tables without guessing names.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes on every backend (SQLite would otherwise hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; mailer stores UTC only")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}  # noqa: RUF012


class MessageStatus(enum.StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    RETRY = "retry"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNCERTAIN = "uncertain"


class EventKind(enum.StrEnum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    SKIPPED = "skipped"
    UNCERTAIN = "uncertain"
    REQUEUED = "requeued"
    BOUNCED = "bounced"
    REPLIED = "replied"
    AUTO_REPLIED = "auto_replied"
    COMPLAINT = "complaint"
    UNSUBSCRIBED = "unsubscribed"
    # Still queued, due later: outside its sending window, a follow-up's delay, or a recipient
    # away until a date (the detail says which, and until when).
    HELD = "held"
    # Audit events (no message): who changed what, for a team on one database (issue 16).
    CAMPAIGN_CREATED = "campaign_created"
    CAMPAIGN_UPDATED = "campaign_updated"
    CAMPAIGN_PAUSED = "campaign_paused"
    CAMPAIGN_RESUMED = "campaign_resumed"
    CAMPAIGN_CANCELLED = "campaign_cancelled"
    CAMPAIGN_DELETED = "campaign_deleted"
    IMPORTED = "imported"
    SUPPRESSED = "suppressed"
    UNSUPPRESSED = "unsuppressed"


# The audit kinds above: events about the team's data rather than one letter's delivery.
AUDIT_KINDS: tuple[str, ...] = (
    EventKind.CAMPAIGN_CREATED.value,
    EventKind.CAMPAIGN_UPDATED.value,
    EventKind.CAMPAIGN_PAUSED.value,
    EventKind.CAMPAIGN_RESUMED.value,
    EventKind.CAMPAIGN_CANCELLED.value,
    EventKind.CAMPAIGN_DELETED.value,
    EventKind.IMPORTED.value,
    EventKind.SUPPRESSED.value,
    EventKind.UNSUPPRESSED.value,
)


class CampaignStatus(enum.StrEnum):
    DRAFT = "draft"
    SENDING = "sending"
    PAUSED = "paused"
    DONE = "done"
    CANCELLED = "cancelled"


class SuppressionReason(enum.StrEnum):
    UNSUBSCRIBED = "unsubscribed"
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"


PARTNERSHIP_KINDS = ("twin", "sister", "partner", "friendship", "cooperation")


class City(Base):
    __tablename__ = "cities"
    __table_args__ = (UniqueConstraint("name_key", "country"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # Case- and accent-folded name, so "Krakow" in one sheet finds "Kraków" from another.
    name_key: Mapped[str] = mapped_column(String(200), index=True)
    country: Mapped[str | None] = mapped_column(String(2), index=True)
    region: Mapped[str | None] = mapped_column(String(200))
    # The name in Ukrainian (Cyrillic), for the Ukrainian letters: the known list's for a
    # Ukrainian city, a partnerships import's `partner_city_uk` for a city abroad.
    name_uk: Mapped[str | None] = mapped_column(String(200))

    @property
    def is_ukrainian(self) -> bool:
        return self.country == "UA"


def city_key(name: str) -> str:
    """The key a city is matched by: case, accents, punctuation and letters without a
    decomposition ignored (Wrocław is Wroclaw, Łódź is Lodz, Gießen is Giessen, L'viv is Lviv),
    so a file saved in Windows-1252 finds the city a UTF-8 file made. Migration 0002_tables
    re-keys stored cities with this rule."""
    text = re.sub(r"[^\w\s-]", "", anyascii(name).casefold())
    return " ".join(text.replace("-", " ").replace("_", " ").split())[:200]


class Contact(Base):
    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    # Normalised and lower-cased: the unique key that makes imports idempotent.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str | None] = mapped_column(String(300))
    title: Mapped[str | None] = mapped_column(String(300))
    salutation: Mapped[str | None] = mapped_column(String(300))
    language: Mapped[str | None] = mapped_column(String(35))
    organisation: Mapped[str | None] = mapped_column(String(300))
    city_id: Mapped[int | None] = mapped_column(ForeignKey("cities.id"), index=True)
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # The contact's IANA time zone (Europe/Berlin), checked at import; when empty, their city
    # and country say it (see zones.py).
    timezone: Mapped[str | None] = mapped_column(String(64))

    city: Mapped[City | None] = relationship(lazy="joined")


class ContactTag(Base):
    """Tags again, one row each, so audiences filter by tag in SQL on every backend."""

    __tablename__ = "contact_tags"

    contact_id: Mapped[int] = mapped_column(
        ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)


class Signatory(Base):
    __tablename__ = "signatories"
    __table_args__ = (UniqueConstraint("name", "city_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(300))
    title: Mapped[str | None] = mapped_column(String(300))
    city_id: Mapped[int | None] = mapped_column(ForeignKey("cities.id"), index=True)
    email: Mapped[str | None] = mapped_column(String(320))
    # `head` (signs for their city) or `official` (only in the collective signature); None:
    # decided by the title (fields.signatory_role).
    role: Mapped[str | None] = mapped_column(String(20))

    city: Mapped[City | None] = relationship(lazy="joined")


class Partnership(Base):
    __tablename__ = "partnerships"
    __table_args__ = (UniqueConstraint("ukrainian_city_id", "partner_city_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    ukrainian_city_id: Mapped[int] = mapped_column(ForeignKey("cities.id"), index=True)
    partner_city_id: Mapped[int] = mapped_column(ForeignKey("cities.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20), default="partner")
    since: Mapped[int | None] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)

    ukrainian_city: Mapped[City] = relationship(foreign_keys=[ukrainian_city_id], lazy="joined")
    partner_city: Mapped[City] = relationship(foreign_keys=[partner_city_id], lazy="joined")


class Campaign(Base):
    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    title: Mapped[str | None] = mapped_column(String(300))
    template: Mapped[str] = mapped_column(String(100))
    # {relative file name: source}: frozen when the campaign is created (empty only in a campaign
    # made before migration 0005_team, which froze it at its first send).
    template_sources: Mapped[dict[str, Any]] = mapped_column(default=dict)
    from_address: Mapped[str] = mapped_column(String(400))
    # An address, the word "signatory", or None.
    reply_to: Mapped[str | None] = mapped_column(String(400))
    # {"where": [[field, value], ...], "tags": [...]}: resolved again whenever needed.
    audience: Mapped[dict[str, Any]] = mapped_column(default=dict)
    default_language: Mapped[str] = mapped_column(String(35), default="en")
    status: Mapped[str] = mapped_column(String(20), default=CampaignStatus.DRAFT.value)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    # Why the campaign is paused, in words for people (`status` shows it), and since when.
    pause_reason: Mapped[str | None] = mapped_column(Text)
    paused_at: Mapped[dt.datetime | None] = mapped_column()
    # A pause that `send` must not lift on its own (a bounce spike): the user acknowledges it.
    held: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Hard bounces the user has acknowledged; a new spike is judged on those that came after.
    bounces_acknowledged: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Who paused it (`mailer campaign pause`, see identity.Actor.label): a pause `send` must not
    # lift; `campaign resume` does. None for a run's own pause (Ctrl-C, too many problems).
    paused_by: Mapped[str | None] = mapped_column(String(300))
    # The List-Unsubscribe mailto and one-click URL template, frozen at create like the
    # templates, so every sender's letters carry the same ones. A NULL mailto marks a campaign
    # made before migration 0005_team: it still takes both from the local mailer.toml.
    unsubscribe_mailto: Mapped[str | None] = mapped_column(Text)
    unsubscribe_url: Mapped[str | None] = mapped_column(Text)
    # A follow-up: the campaign it follows and how long after each contact's letter of that
    # campaign its own letter is due (seconds).
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id"), index=True)
    follow_up_after: Mapped[int | None] = mapped_column(Integer)
    # The campaign's shared pace under a `--rate`: the earliest time the next letter may leave,
    # advanced by every sender's claim (so several senders together keep one rate).
    pace_next_at: Mapped[dt.datetime | None] = mapped_column()


class Message(Base):
    """The outbox: one row per (campaign, contact), so a contact can never be queued twice."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("campaign_id", "contact_id"),
        Index("ix_messages_campaign_status", "campaign_id", "status", "next_attempt_at"),
        # What comes back names our letter by its Message-ID (In-Reply-To, a DSN's returned part).
        Index("ix_messages_message_id", "message_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), default=MessageStatus.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column()
    message_id: Mapped[str | None] = mapped_column(String(400))
    language: Mapped[str | None] = mapped_column(String(35))
    subject: Mapped[str | None] = mapped_column(Text)
    body_hash: Mapped[str | None] = mapped_column(String(64))
    smtp_code: Mapped[int | None] = mapped_column(Integer)
    smtp_reply: Mapped[str | None] = mapped_column(Text)
    # Which sender process holds a `sending` claim (several senders may work one campaign).
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    queued_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column()
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # What came back (inbox sync): the first human reply, the hard bounce, and the day an
    # out-of-office answer said its reader is back (a follow-up waits until after it).
    replied_at: Mapped[dt.datetime | None] = mapped_column()
    bounced_at: Mapped[dt.datetime | None] = mapped_column()
    away_until: Mapped[dt.date | None] = mapped_column(Date)

    contact: Mapped[Contact] = relationship(lazy="raise")
    campaign: Mapped[Campaign] = relationship(lazy="raise")


class Event(Base):
    """The append-only send log: every state change with its time and the server's answer."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_campaign_at", "campaign_id", "at"),
        # The rolling 24-hour daily cap counts `sent` events inside each claim: only those rows
        # are indexed, so the other events cost nothing more to write.
        Index(
            "ix_events_sent_at",
            "at",
            sqlite_where=text("kind = 'sent'"),
            postgresql_where=text("kind = 'sent'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    contact_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(20))
    smtp_code: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)
    # The server (host:port) or transport that gave the answer.
    via: Mapped[str | None] = mapped_column(String(300))
    # Who acted: `user@host pid N` (mailer/identity.py), so a team's shared log says who did it.
    actor: Mapped[str | None] = mapped_column(String(300))


class Sender(Base):
    """A `mailer send` run working one campaign: who it is, the lease on its claims (renewed
    by its heartbeat), what it holds, and when and why it stopped. Only a sender whose lease has
    expired (or that is provably dead on this very machine) has its claims recovered by another."""

    __tablename__ = "senders"
    __table_args__ = (Index("ix_senders_campaign_stopped", "campaign_id", "stopped_at"),)

    # Also `messages.claimed_by` of every letter it holds.
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    os_user: Mapped[str] = mapped_column(String(100))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    smtp_user: Mapped[str | None] = mapped_column(String(320))
    # Where its letters go (`host:port`, a Maildir).
    via: Mapped[str | None] = mapped_column(String(300))
    # `user@host pid N`, as written into events.actor.
    actor: Mapped[str] = mapped_column(String(300))
    # The kernel's boot id and the handover journal's path: on the same boot of the same
    # machine another process can read the journal and prove the sender dead (see journal.py).
    boot_id: Mapped[str | None] = mapped_column(String(64))
    journal: Mapped[str | None] = mapped_column(String(1000))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[dt.datetime] = mapped_column()
    # Letters it holds (`sending`) and has sent, as of its last heartbeat; its rate (msg/s).
    holding: Mapped[int] = mapped_column(Integer, default=0)
    sent: Mapped[int] = mapped_column(Integer, default=0)
    rate: Mapped[float | None] = mapped_column(Float)
    stopped_at: Mapped[dt.datetime | None] = mapped_column()
    stop_reason: Mapped[str | None] = mapped_column(Text)


class Suppression(Base):
    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    reason: Mapped[str] = mapped_column(String(20))
    source: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class InboxFolder(Base):
    """A mailbox folder inbox sync reads, and where it stopped (IMAP UIDVALIDITY and last UID)."""

    __tablename__ = "inbox_folders"
    __table_args__ = (UniqueConstraint("source", "folder"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # `maildir:/abs/path`, `mbox:/abs/path` or `imap://user@host:port` (never a password).
    source: Mapped[str] = mapped_column(String(500))
    folder: Mapped[str] = mapped_column(String(500))
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    last_uid: Mapped[int | None] = mapped_column(BigInteger)
    synced_at: Mapped[dt.datetime | None] = mapped_column()


class InboxMessage(Base):
    """One mail inbox sync has seen, once per folder; its Message-ID and digest make it seen
    everywhere, so the same mail read from another source is never counted twice."""

    __tablename__ = "inbox_messages"
    __table_args__ = (UniqueConstraint("folder_id", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    folder_id: Mapped[int] = mapped_column(ForeignKey("inbox_folders.id", ondelete="CASCADE"))
    # Where it is in its folder: a Maildir file name, `UIDVALIDITY:UID`, an mbox entry's hash.
    key: Mapped[str] = mapped_column(String(200))
    message_id: Mapped[str | None] = mapped_column(String(500), index=True)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    # What it was: bounce, delay, reply, auto_reply, complaint, unsubscribe, not_ours, ...
    kind: Mapped[str] = mapped_column(String(20))
    detail: Mapped[str | None] = mapped_column(Text)
    # Our letter it answers, when it answers one.
    outbox_message_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"), index=True
    )
    seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ImportRecord(Base):
    __tablename__ = "imports"

    id: Mapped[int] = mapped_column(primary_key=True)
    file_name: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(20))
    added: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    # [{"row": n, "column": name, "reason": text}, ...]
    rejects: Mapped[list[Any]] = mapped_column(default=list)
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Secret(Base):
    """A shared workspace's generated secrets (PostgreSQL: every sender signs alike). A
    single-user workspace keeps them in an owner-only file instead (mailer/workspace_secret.py).
    Never printed, never exported."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # What the secret keys: `tokens` (unsubscribe links and VERP addresses, mailer/tokens.py).
    name: Mapped[str] = mapped_column(String(40))
    version: Mapped[int] = mapped_column(Integer)
    # URL-safe base64 of random bytes.
    value: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
