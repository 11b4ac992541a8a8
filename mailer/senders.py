"""The senders table: every `mailer send` run on a campaign -- who it is, the lease on the
letters it holds, and when another process may declare it gone.

A sender registers before it claims anything and renews its lease with a heartbeat. Its claims
(`messages.claimed_by` = its id) are recovered by another process only when it is *gone*:

- its lease has expired (it missed its heartbeats for the whole lease: dead, cut off from the
  database, or a laptop asleep -- which then hands nothing more over, see engine), or
- it stopped (its row says so) and still holds something, or
- on the same boot of the same machine, its journal's lock is free: the kernel dropped it, so
  its process is gone (see journal.py). From another machine this proof is not available and
  only the lease counts.

A claim whose holder has no row at all was made by an older version (which refuses to run on
this schema) and is gone too. Never is a sender judged by its host name and process id: two
laptops cloned from one image share a host name, and a process id is reused.

The only writer of `senders`. Imports models, identity and journal; knows nothing of
messages' states (outbox) or of the run (engine).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session

from mailer import journal
from mailer.identity import Actor
from mailer.models import Campaign, Message, MessageStatus, Sender


@dataclass(frozen=True, kw_only=True, slots=True)
class SenderIdentity:
    """Who a sender is: its id (what its claims carry), the person and process behind it, the
    SMTP login it sends as, and where its journal is (on which boot of which machine)."""

    id: str
    actor: Actor
    smtp_user: str | None = None
    via: str | None = None
    boot: str | None = None
    journal: str | None = None

    @property
    def label(self) -> str:
        """`user@host pid N` (and `as LOGIN`): what events.actor and `mailer senders` show."""
        login = f" as {self.smtp_user}" if self.smtp_user else ""
        return f"{self.actor.label}{login}"[:300]


def new_sender_id() -> str:
    return uuid.uuid4().hex[:16]


def register(
    engine: Engine,
    *,
    identity: SenderIdentity,
    campaign_id: int,
    now: dt.datetime,
    lease: dt.timedelta,
    rate: float | None,
) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(Sender).values(
                id=identity.id,
                campaign_id=campaign_id,
                os_user=identity.actor.user[:100],
                host=identity.actor.host[:255],
                pid=identity.actor.pid,
                smtp_user=identity.smtp_user,
                via=identity.via,
                actor=identity.label,
                boot_id=identity.boot,
                journal=identity.journal,
                started_at=now,
                heartbeat_at=now,
                lease_until=now + lease,
                holding=0,
                sent=0,
                rate=rate,
            )
        )


def renew(
    engine: Engine,
    *,
    sender_id: str,
    now: dt.datetime,
    lease: dt.timedelta,
    holding: int,
    sent: int,
) -> bool:
    """The heartbeat: the lease runs `lease` from now. False if another process has declared
    this sender gone meanwhile (its claims are no longer its own)."""
    with engine.begin() as conn:
        changed = conn.execute(
            update(Sender)
            .where(Sender.id == sender_id, Sender.stopped_at.is_(None))
            .values(heartbeat_at=now, lease_until=now + lease, holding=holding, sent=sent)
        ).rowcount
    return bool(changed)


def stop(engine: Engine, *, sender_id: str, now: dt.datetime, reason: str, sent: int) -> None:
    """The sender ended (its claims all settled): not live any more, with why."""
    with engine.begin() as conn:
        conn.execute(
            update(Sender)
            .where(Sender.id == sender_id, Sender.stopped_at.is_(None))
            .values(stopped_at=now, stop_reason=reason[:1000], holding=0, sent=sent)
        )


# --------------------------------------------------------------------------- gone or live


@dataclass(frozen=True, kw_only=True, slots=True)
class Holder:
    """Who holds `sending` claims of a campaign (`id` None: claims without a holder)."""

    id: str | None
    label: str | None
    lease_until: dt.datetime | None
    heartbeat_at: dt.datetime | None
    stopped_at: dt.datetime | None
    boot: str | None
    journal: str | None
    registered: bool

    @property
    def name(self) -> str:
        return self.label or self.id or "an unknown sender"


def holders(engine: Engine, *, campaign_id: int) -> list[Holder]:
    """Every holder of the campaign's `sending` claims, with its sender row if it has one."""
    with engine.connect() as conn:
        held = select(Message.claimed_by).where(
            Message.campaign_id == campaign_id, Message.status == MessageStatus.SENDING.value
        )
        ids = sorted({row[0] for row in conn.execute(held.distinct())}, key=lambda x: x or "")
        if not ids:
            return []
        rows = {
            row.id: row
            for row in conn.execute(
                select(
                    Sender.id,
                    Sender.actor,
                    Sender.lease_until,
                    Sender.heartbeat_at,
                    Sender.stopped_at,
                    Sender.boot_id,
                    Sender.journal,
                ).where(Sender.id.in_([i for i in ids if i is not None]))
            )
        }
    found = []
    for sender_id in ids:
        row = rows.get(sender_id) if sender_id is not None else None
        found.append(
            Holder(
                id=sender_id,
                label=row.actor if row else None,
                lease_until=row.lease_until if row else None,
                heartbeat_at=row.heartbeat_at if row else None,
                stopped_at=row.stopped_at if row else None,
                boot=row.boot_id if row else None,
                journal=row.journal if row else None,
                registered=row is not None,
            )
        )
    return found


@dataclass(frozen=True, kw_only=True, slots=True)
class Gone:
    """Why a holder's claims may be settled by another process (words for the send log), and
    whether only its expired lease says so (then the settling re-checks it as it commits)."""

    why: str
    by_lease: bool = False


def gone(holder: Holder, *, now: dt.datetime) -> Gone | None:
    """Whether the holder is gone (see the module docstring); None while it may be at work."""
    if not holder.registered or holder.id is None:
        return Gone(why="it left no sender record (an older version of mailer)")
    if holder.stopped_at is not None:
        return Gone(why="it had stopped")
    if journal.is_abandoned(holder.journal, sender_id=holder.id, boot=holder.boot):
        return Gone(why="its process on this machine is gone")
    if holder.lease_until is not None and holder.lease_until < now:
        return Gone(
            why=f"its lease ran out at {holder.lease_until:%Y-%m-%d %H:%M:%S} UTC",
            by_lease=True,
        )
    return None


def settled(engine: Engine, sender_id: str, *, now: dt.datetime) -> bool:
    """For a sender whose process is known to be gone (its journal's lock was free): whether
    nothing of it is left to recover (it holds no `sending` claim). Its row, if it still
    looks live, is marked gone."""
    with engine.connect() as conn:
        held = conn.execute(
            select(Message.id)
            .where(Message.claimed_by == sender_id, Message.status == MessageStatus.SENDING.value)
            .limit(1)
        ).first()
    if held is not None:
        return False
    mark_gone(
        engine,
        sender_id=sender_id,
        now=now,
        why="its process on this machine is gone; it held nothing",
        by="a later sender",
    )
    return True


def mark_gone(engine: Engine, *, sender_id: str, now: dt.datetime, why: str, by: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(Sender)
            .where(Sender.id == sender_id, Sender.stopped_at.is_(None))
            .values(
                stopped_at=now,
                stop_reason=f"declared gone by {by}: {why}"[:1000],
                holding=0,
            )
        )


# --------------------------------------------------------------------------- who is sending


@dataclass(frozen=True, kw_only=True, slots=True)
class SenderView:
    """One sender as `mailer senders` shows it."""

    id: str
    campaign: str
    actor: str
    via: str | None
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    lease_until: dt.datetime
    holding: int
    sent: int
    rate: float | None
    stopped_at: dt.datetime | None
    stop_reason: str | None
    # Not stopped, lease running, and not provably gone on this machine.
    live: bool


def list_senders(
    engine: Engine,
    *,
    slug: str | None = None,
    now: dt.datetime,
    include_stopped: bool = False,
) -> list[SenderView]:
    """The live senders (of one campaign, or of every campaign), oldest first; with
    `include_stopped`, also those that ended or were declared gone, and the lapsed."""
    query = (
        select(Sender, Campaign.slug)
        .join(Campaign, Campaign.id == Sender.campaign_id)
        .order_by(Sender.started_at, Sender.id)
    )
    if slug is not None:
        query = query.where(Campaign.slug == slug)
    if not include_stopped:
        query = query.where(Sender.stopped_at.is_(None), Sender.lease_until >= now)
    with Session(engine) as session:
        rows = session.execute(query).all()
    views = []
    for row in rows:
        sender: Sender = row[0]
        live = (
            sender.stopped_at is None
            and sender.lease_until >= now
            and not journal.is_abandoned(sender.journal, sender_id=sender.id, boot=sender.boot_id)
        )
        if not live and not include_stopped:
            continue
        views.append(
            SenderView(
                id=sender.id,
                campaign=str(row[1]),
                actor=sender.actor,
                via=sender.via,
                started_at=sender.started_at,
                heartbeat_at=sender.heartbeat_at,
                lease_until=sender.lease_until,
                holding=sender.holding,
                sent=sender.sent,
                rate=sender.rate,
                stopped_at=sender.stopped_at,
                stop_reason=sender.stop_reason,
                live=live,
            )
        )
    return views


def live_others(engine: Engine, *, campaign_id: int, me: str, now: dt.datetime) -> list[str]:
    """The other live senders of the campaign (their labels): while one works, letters it
    holds are under way, and advice such as `retry --uncertain` must wait."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Sender.id, Sender.actor, Sender.journal, Sender.boot_id).where(
                Sender.campaign_id == campaign_id,
                Sender.id != me,
                Sender.stopped_at.is_(None),
                Sender.lease_until >= now,
            )
        ).all()
    return [
        actor
        for sender_id, actor, path, boot in rows
        if not journal.is_abandoned(path, sender_id=sender_id, boot=boot)
    ]


def _age(then: dt.datetime, now: dt.datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "no --rate"
    if rate >= 1:
        return f"{rate:g}/s"
    if rate * 60 >= 1:
        return f"{rate * 60:g}/min"
    return f"{rate * 3600:g}/h"


def format_senders(views: Sequence[SenderView], *, now: dt.datetime, slug: str | None) -> list[str]:
    """What `mailer senders` prints: one block per campaign, one line per sender."""
    if not views:
        where = f" on campaign {slug}" if slug else ""
        return [f"No sender is working{where} now."]
    lines: list[str] = []
    campaign: str | None = None
    for view in views:
        if view.campaign != campaign:
            campaign = view.campaign
            live = sum(1 for v in views if v.campaign == campaign and v.live)
            lines.append(f"Campaign {campaign}: {live} live sender(s)")
        state = (
            "live"
            if view.live
            else (
                f"stopped {_age(view.stopped_at, now)} ({view.stop_reason or 'ended'})"
                if view.stopped_at is not None
                else "gone (no heartbeat; its claims are recovered by the next send)"
            )
        )
        lines.append(
            f"  {view.actor} [{view.id}] {state}: holds {view.holding}, sent {view.sent}, "
            f"{format_rate(view.rate)}, via {view.via or '?'}; started {_age(view.started_at, now)}, "
            f"last heartbeat {_age(view.heartbeat_at, now)}, lease until "
            f"{view.lease_until:%H:%M:%S} UTC"
        )
    return lines


__all__ = [
    "Gone",
    "Holder",
    "SenderIdentity",
    "SenderView",
    "format_rate",
    "format_senders",
    "gone",
    "holders",
    "list_senders",
    "live_others",
    "mark_gone",
    "new_sender_id",
    "register",
    "renew",
    "settled",
    "stop",
]
