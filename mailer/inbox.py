"""Inbox sync: what comes back from the office's mailbox goes into the record, exactly once.

source (inbox_sources) -> bytes -> classify (inbox_classify) -> seen before? (Message-ID and
digest, whichever source it came from) -> matched to our letter (the VERP address it was
delivered to, verified with the workspace keys; a Message-ID in In-Reply-To / References or in a
report's returned copy; failing those the address) -> recorded through the
outbox's verbs, in batches: each batch's outcomes, the mails it saw and the folder's position
are committed together, so an interrupted sync resumes where it stopped and a second sync
changes nothing. After each batch a campaign whose hard bounces spike is paused.

This module writes only its own tables (`inbox_folders`, `inbox_messages`); every change to a
message, an event or a suppression goes through `outbox`.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import Engine, Table, insert, select, tuple_, update
from sqlalchemy.orm import Session

from mailer import db, outbox, tokens
from mailer.inbox_classify import Failure, Mail, MailKind, classify_all
from mailer.inbox_sources import Item, MailSource, Position
from mailer.models import Campaign, Contact, InboxFolder, InboxMessage, Message, utcnow

Clock = Callable[[], dt.datetime]
INBOX_MESSAGES = cast(Table, InboxMessage.__table__)
_IN_CHUNK = 500


class Outcome:
    """What became of one mail (the `kind` kept in `inbox_messages`, and the summary's classes)."""

    REPLIED = "replied"
    AUTO_REPLIED = "auto_replied"
    BOUNCED = "bounced"
    DELAYED = "delayed"
    COMPLAINT = "complaint"
    UNSUBSCRIBED = "unsubscribed"
    # Skipped, and why.
    DUPLICATE = "duplicate"
    NOT_OURS = "not_ours"
    UNKNOWN_ADDRESS = "unknown_address"
    ALREADY_RECORDED = "already_recorded"
    REPORT = "report"
    UNREADABLE = "unreadable"
    # Could not be read this time (not remembered: the next sync tries it again).
    READ_ERROR = "read_error"


RECORDED: tuple[tuple[str, str], ...] = (
    (Outcome.REPLIED, "replies"),
    (Outcome.AUTO_REPLIED, "auto-replies (out of office and the like)"),
    (Outcome.BOUNCED, "hard bounces (address suppressed)"),
    (Outcome.DELAYED, "delivery delays (no action)"),
    (Outcome.COMPLAINT, "complaints (address suppressed)"),
    (Outcome.UNSUBSCRIBED, "unsubscribe requests (address suppressed)"),
)
SKIPPED: tuple[tuple[str, str], ...] = (
    (Outcome.DUPLICATE, "seen before (here or in another mailbox)"),
    (Outcome.NOT_OURS, "not about any letter of ours"),
    (Outcome.UNKNOWN_ADDRESS, "delivery reports for addresses we never wrote to"),
    (Outcome.ALREADY_RECORDED, "bounces already recorded for that letter"),
    (Outcome.REPORT, "other automatic reports (read receipts, delivered notices)"),
    (Outcome.UNREADABLE, "unreadable (not a mail)"),
    (Outcome.READ_ERROR, "could not be read now (tried again next time)"),
)


@dataclass(frozen=True, kw_only=True)
class SyncPolicy:
    batch_size: int = 500
    # Past the first batch, mails are classified in a worker process (the other core) while
    # this one records the batch before: parsing, not the database, is most of the work.
    worker: bool = True
    # A mail that names none of our letters counts as an answer from a contact only if we
    # wrote to them within this time before it.
    reply_window: dt.timedelta = dt.timedelta(days=60)
    spike: outbox.BounceSpikePolicy = field(default_factory=outbox.BounceSpikePolicy)


@dataclass(kw_only=True)
class SyncReport:
    source: str
    folders: tuple[str, ...]
    counts: Counter[str] = field(default_factory=Counter)
    # (campaign slug, reason) for each campaign this sync paused.
    paused: list[tuple[str, str]] = field(default_factory=list)

    @property
    def read(self) -> int:
        return sum(self.counts.values())

    @property
    def recorded(self) -> int:
        return sum(self.counts[k] for k, _ in RECORDED)


def format_sync_report(report: SyncReport) -> list[str]:
    """The summary `mailer inbox sync` prints: counts per class, and any campaign it paused."""
    where = report.source + (f" ({', '.join(report.folders)})" if any(report.folders) else "")
    lines = [f"Synced {where}: {report.read:,} new mail(s), {report.recorded:,} recorded."]
    width = max(len(label) for _, label in (*RECORDED, *SKIPPED))
    for key, label in RECORDED:
        lines.append(f"  {label:<{width}}  {report.counts[key]:>7,}")
    skipped = [(k, label) for k, label in SKIPPED if report.counts[k]]
    if skipped:
        lines.append("Skipped:")
        lines.extend(f"  {label:<{width}}  {report.counts[k]:>7,}" for k, label in skipped)
    for slug, reason in report.paused:
        lines.append(
            f"Campaign {slug} PAUSED: {reason}. `mailer status {slug}` shows it; "
            "sending resumes only once you acknowledge it."
        )
    return lines


# --------------------------------------------------------------------------- sync


def sync(
    *,
    engine: Engine,
    source: MailSource,
    clock: Clock = utcnow,
    policy: SyncPolicy | None = None,
    progress: Callable[[SyncReport], None] | None = None,
    keys: tokens.KeyRing | None = None,
) -> SyncReport:
    """Read every folder of `source` and record what came back (see the module docstring).

    `keys`: the workspace's token keys (workspace_secret.keyring), to match bounces by their
    VERP address; without them only Message-IDs and addresses match."""
    policy = policy or SyncPolicy()
    factory = db.session_factory(engine)
    report = SyncReport(source=source.name, folders=source.folders())
    for folder in report.folders:
        _sync_folder(
            factory,
            source,
            folder,
            report,
            clock=clock,
            policy=policy,
            progress=progress,
            keys=keys,
        )
    return report


def _sync_folder(
    factory: Callable[[], Session],
    source: MailSource,
    folder: str,
    report: SyncReport,
    *,
    clock: Clock,
    policy: SyncPolicy,
    progress: Callable[[SyncReport], None] | None,
    keys: tokens.KeyRing | None,
) -> None:
    with factory() as session, session.begin():
        row = session.scalar(
            select(InboxFolder).where(
                InboxFolder.source == source.name, InboxFolder.folder == folder
            )
        )
        if row is None:
            row = InboxFolder(source=source.name, folder=folder)
            session.add(row)
            session.flush()
        folder_id = row.id
        position = Position(uidvalidity=row.uidvalidity, last_uid=row.last_uid)
        seen_keys = set(
            session.scalars(select(InboxMessage.key).where(InboxMessage.folder_id == folder_id))
        )
    items = source.read(folder, position=position, seen=seen_keys.__contains__)
    batches = _batches(items, policy.batch_size)
    for batch, mails in _classified(batches, worker=policy.worker):
        with factory() as session, session.begin():
            _record_batch(
                session, folder_id, batch, mails, report, clock=clock, policy=policy, keys=keys
            )
        if progress is not None:
            progress(report)
    with factory() as session, session.begin():
        session.execute(
            update(InboxFolder).where(InboxFolder.id == folder_id).values(synced_at=clock())
        )


def _classified(
    batches: Iterator[list[Item]], *, worker: bool
) -> Iterator[tuple[list[Item], list[Mail]]]:
    """Each batch with its mails classified; with `worker`, the next batch is classified in a
    worker process while the caller records this one (one batch ahead, so memory stays flat)."""
    pool: ProcessPoolExecutor | None = None
    ahead: tuple[list[Item], Future[list[Mail]]] | None = None
    try:
        for n, batch in enumerate(batches):
            datas = [item.data for item in batch if item.data is not None]
            if not worker or n == 0:
                # A small sync is over before a worker would have started.
                yield batch, classify_all(datas)
                continue
            if pool is None:
                pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            submitted = (batch, pool.submit(classify_all, datas))
            if ahead is not None:
                yield ahead[0], ahead[1].result()
            ahead = submitted
        if ahead is not None:
            yield ahead[0], ahead[1].result()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True, slots=True)
class _Letter:
    id: int
    campaign_id: int
    email: str
    sent_at: dt.datetime | None


class _Matcher:
    """Our letters named by a batch of mails: by VERP address and Message-ID, and the latest
    sent to an address."""

    def __init__(
        self, session: Session, mails: Sequence[Mail], *, keys: tokens.KeyRing | None = None
    ) -> None:
        ids: set[str] = set()
        addresses: set[str] = set()
        for mail in mails:
            ids.update(mail.refers_to)
            addresses.update(
                a
                for a in (mail.sender, mail.complainant, *(f.recipient for f in mail.failures))
                if a
            )
        self.by_id: dict[str, _Letter] = {}
        for chunk in _chunks(sorted(ids)):
            by_id = (
                select(
                    Message.message_id,
                    Message.id,
                    Message.campaign_id,
                    Contact.email,
                    Message.sent_at,
                )
                .join(Contact)
                .where(Message.message_id.in_(chunk))
            )
            for mid, letter_id, campaign_id, email, sent_at in session.execute(by_id):
                self.by_id[str(mid).lower()] = _Letter(letter_id, campaign_id, email, sent_at)
        self.latest: dict[str, _Letter] = {}
        for chunk in _chunks(sorted(addresses)):
            by_address = (
                select(Message.id, Message.campaign_id, Contact.email, Message.sent_at)
                .join(Contact)
                .where(Contact.email.in_(chunk), Message.sent_at.is_not(None))
            )
            for letter_id, campaign_id, email, sent_at in session.execute(by_address):
                letter = _Letter(letter_id, campaign_id, email, sent_at)
                known = self.latest.get(letter.email)
                if known is None or _later(letter, known):
                    self.latest[letter.email] = letter
        self.by_verp = _verp_letters(session, mails, keys) if keys is not None else {}

    def named(self, mail: Mail) -> _Letter | None:
        # The envelope names the letter even when the content that came back names another.
        for token in mail.verp:
            letter = self.by_verp.get(token)
            if letter is not None:
                return letter
        for mid in mail.refers_to:
            letter = self.by_id.get(mid)
            if letter is not None:
                return letter
        return None

    def answered(self, mail: Mail, *, at: dt.datetime, window: dt.timedelta) -> _Letter | None:
        """The letter a reply answers: named by it, else the latest we sent its sender lately."""
        letter = self.named(mail)
        if letter is not None or mail.sender is None:
            return letter
        latest = self.latest.get(mail.sender)
        if latest is None or latest.sent_at is None:
            return None
        sent = _aware(latest.sent_at)
        if at - window <= sent <= at + dt.timedelta(days=1):
            return latest
        return None

    def failed(self, mail: Mail, failure: Failure) -> _Letter | None:
        letter = self.named(mail)
        if letter is not None and (len(mail.failures) == 1 or letter.email == failure.recipient):
            return letter
        return self.latest.get(failure.recipient)


def _verp_letters(
    session: Session, mails: Sequence[Mail], keys: tokens.KeyRing
) -> dict[str, _Letter]:
    """The letters the batch's VERP tokens name, each token verified (a forged one names none)."""
    wanted: dict[str, tuple[int, int]] = {}
    for mail in mails:
        for token in mail.verp:
            ids = tokens.decode(token)
            if ids is not None and keys.candidates(ids.version):
                wanted[token] = (ids.campaign_id, ids.contact_id)
    found: dict[tuple[int, int], tuple[_Letter, str]] = {}
    pairs = sorted(set(wanted.values()))
    for start in range(0, len(pairs), _IN_CHUNK):
        rows = session.execute(
            select(
                Message.id,
                Message.campaign_id,
                Message.contact_id,
                Contact.email,
                Message.sent_at,
                Campaign.slug,
            )
            .join(Contact, Contact.id == Message.contact_id)
            .join(Campaign, Campaign.id == Message.campaign_id)
            .where(
                tuple_(Message.campaign_id, Message.contact_id).in_(
                    pairs[start : start + _IN_CHUNK]
                )
            )
        )
        for letter_id, campaign_id, contact_id, email, sent_at, slug in rows:
            found[(campaign_id, contact_id)] = (
                _Letter(letter_id, campaign_id, email, sent_at),
                str(slug),
            )
    letters: dict[str, _Letter] = {}
    for token, pair in wanted.items():
        hit = found.get(pair)
        if hit is not None and tokens.verify(
            keys, token, purpose=tokens.Purpose.VERP, slug=hit[1], email=hit[0].email
        ):
            letters[token] = hit[0]
    return letters


def _later(a: _Letter, b: _Letter) -> bool:
    return (_aware(a.sent_at), a.id) > (_aware(b.sent_at), b.id)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


def _aware(value: dt.datetime | None) -> dt.datetime:
    if value is None:
        return dt.datetime.min.replace(tzinfo=dt.UTC)
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def _seen_before(session: Session, mails: Iterable[Mail]) -> tuple[set[str], set[str]]:
    ids = sorted({m.message_id for m in mails if m.message_id})
    digests = sorted({m.digest for m in mails})
    found_ids: set[str] = set()
    found_digests: set[str] = set()
    for chunk in _chunks(digests):
        found_digests.update(
            session.scalars(select(InboxMessage.digest).where(InboxMessage.digest.in_(chunk)))
        )
    for chunk in _chunks(ids):
        found_ids.update(
            str(v)
            for v in session.scalars(
                select(InboxMessage.message_id).where(InboxMessage.message_id.in_(chunk))
            )
        )
    return found_ids, found_digests


def _record_batch(
    session: Session,
    folder_id: int,
    batch: Sequence[Item],
    mails: Sequence[Mail],
    report: SyncReport,
    *,
    clock: Clock,
    policy: SyncPolicy,
    keys: tokens.KeyRing | None = None,
) -> None:
    """`mails` are the batch's readable items classified, in order."""
    now = clock()
    readable = [item for item in batch if item.data is not None]
    report.counts[Outcome.READ_ERROR] += len(batch) - len(readable)
    classified = list(zip(readable, mails, strict=True))
    seen_ids, seen_digests = _seen_before(session, mails)
    matcher = _Matcher(session, mails, keys=keys)
    rows: list[dict[str, object]] = []
    bounced_campaigns: set[int] = set()
    for item, mail in classified:
        duplicate = mail.digest in seen_digests or (
            mail.message_id is not None and mail.message_id in seen_ids
        )
        if duplicate:
            outcome, letter_id = Outcome.DUPLICATE, None
        else:
            outcome, letter_id = _record(
                session, mail, matcher, now=now, policy=policy, bounced=bounced_campaigns
            )
            seen_digests.add(mail.digest)
            if mail.message_id:
                seen_ids.add(mail.message_id)
        report.counts[outcome] += 1
        rows.append(
            {
                "folder_id": folder_id,
                "key": item.key[:200],
                "message_id": mail.message_id[:500] if mail.message_id else None,
                "digest": mail.digest,
                "kind": outcome,
                "detail": mail.why[:1000] or None,
                "outbox_message_id": letter_id,
                "seen_at": now,
            }
        )
    if rows:
        session.execute(insert(INBOX_MESSAGES), rows)
    positions = [i.position for i in batch if i.position.last_uid is not None]
    if positions:
        last = max(positions, key=lambda p: p.last_uid or 0)
        session.execute(
            update(InboxFolder)
            .where(InboxFolder.id == folder_id)
            .values(uidvalidity=last.uidvalidity, last_uid=last.last_uid)
        )
    for campaign_id in sorted(bounced_campaigns):
        reason = outbox.bounce_spike(session, campaign_id=campaign_id, policy=policy.spike)
        if reason and outbox.pause_for_bounce_spike(
            session, campaign_id=campaign_id, reason=reason, now=now
        ):
            slug = session.scalar(select(Campaign.slug).where(Campaign.id == campaign_id))
            report.paused.append((str(slug), reason))


def _when(mail: Mail, now: dt.datetime) -> dt.datetime:
    """The mail's own date, unless it has none or claims to come from the future."""
    if mail.date is None or mail.date > now + dt.timedelta(days=1):
        return now
    return mail.date


def _record(
    session: Session,
    mail: Mail,
    matcher: _Matcher,
    *,
    now: dt.datetime,
    policy: SyncPolicy,
    bounced: set[int],
) -> tuple[str, int | None]:
    at = _when(mail, now)
    kind = mail.kind
    if kind is MailKind.UNREADABLE:
        return Outcome.UNREADABLE, None
    if kind is MailKind.REPORT:
        return Outcome.REPORT, None
    if kind in (MailKind.BOUNCE, MailKind.DELAY):
        return _record_report(session, mail, matcher, at=at, now=now, bounced=bounced)
    if kind is MailKind.COMPLAINT:
        letter = matcher.named(mail)
        if letter is None and mail.complainant:
            letter = matcher.latest.get(mail.complainant)
        if letter is None:
            return Outcome.NOT_OURS, None
        outbox.record_complaint(
            session, email=letter.email, message=letter.id, feedback_type=mail.feedback_type, at=at
        )
        return Outcome.COMPLAINT, letter.id
    if kind is MailKind.UNSUBSCRIBE:
        if mail.sender is None:
            return Outcome.UNREADABLE, None
        letter = matcher.latest.get(mail.sender)
        outbox.record_unsubscribe(
            session,
            email=mail.sender,
            message=letter.id if letter else None,
            at=at,
            source="inbox: mail to the unsubscribe address",
        )
        return Outcome.UNSUBSCRIBED, letter.id if letter else None
    letter = matcher.answered(mail, at=at, window=policy.reply_window)
    if letter is None:
        return Outcome.NOT_OURS, None
    if kind is MailKind.AUTO_REPLY:
        outbox.record_auto_reply(
            session,
            message=letter.id,
            at=at,
            subject=mail.subject,
            away_until=mail.away_until,
            now=now,
        )
        return Outcome.AUTO_REPLIED, letter.id
    outbox.record_reply(
        session, message=letter.id, at=at, subject=mail.subject, excerpt=mail.excerpt, now=now
    )
    return Outcome.REPLIED, letter.id


def _record_report(
    session: Session,
    mail: Mail,
    matcher: _Matcher,
    *,
    at: dt.datetime,
    now: dt.datetime,
    bounced: set[int],
) -> tuple[str, int | None]:
    outcome, first = Outcome.UNKNOWN_ADDRESS, None
    for failure in mail.failures:
        letter = matcher.failed(mail, failure)
        if letter is None:
            continue
        first = first or letter.id
        if failure.permanent:
            new = outbox.record_bounce(
                session,
                message=letter.id,
                status=failure.status,
                diagnostic=failure.diagnostic,
                smtp_code=failure.smtp_code,
                at=at,
                now=now,
                reporter=mail.reporter,
            )
            if new:
                bounced.add(letter.campaign_id)
                outcome = Outcome.BOUNCED
            elif outcome != Outcome.BOUNCED:
                outcome = Outcome.ALREADY_RECORDED
        else:
            outbox.record_delay(
                session,
                message=letter.id,
                status=failure.status,
                diagnostic=failure.diagnostic,
                smtp_code=failure.smtp_code,
                at=at,
                reporter=mail.reporter,
            )
            if outcome == Outcome.UNKNOWN_ADDRESS:
                outcome = Outcome.DELAYED
    return outcome, first
