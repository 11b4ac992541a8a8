"""`mailer inbox sync` on real Maildir and mbox files, against a campaign really sent."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
from pathlib import Path

import inbox_samples as S
import pytest
from conftest import Cli
from smtp_server import seed_campaign
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from mailer import db, inbox, outbox
from mailer.errors import CampaignHeld, MailboxError
from mailer.inbox_sources import MaildirSource, MboxSource
from mailer.models import (
    Campaign,
    Contact,
    Event,
    InboxFolder,
    InboxMessage,
    Message,
    Suppression,
)

SLUG = "appeal"


def sent_campaign(run: Cli, engine: Engine, workspace: Path, count: int) -> list[tuple[str, str]]:
    """A campaign sent for real (to a Maildir outbox); its (Message-ID, address) pairs."""
    seed_campaign(engine, workspace, count=count)
    run.ok("send", SLUG, "--outbox", str(workspace / "sent"), "--yes")
    with Session(engine) as s:
        rows = s.execute(
            select(Message.message_id, Contact.email)
            .join(Contact, Contact.id == Message.contact_id)
            .order_by(Message.id)
        ).all()
    return [(str(mid), str(address)) for mid, address in rows]


def snapshot(engine: Engine) -> tuple[object, ...]:
    """Everything a sync may write, to prove a second sync writes nothing."""
    with Session(engine) as s:
        return (
            s.execute(select(Event.id, Event.kind, Event.detail).order_by(Event.id)).all(),
            s.execute(select(Suppression.email, Suppression.reason).order_by(Suppression.id)).all(),
            s.execute(
                select(
                    Message.id,
                    Message.status,
                    Message.replied_at,
                    Message.bounced_at,
                    Message.away_until,
                    Message.smtp_reply,
                ).order_by(Message.id)
            ).all(),
            s.execute(select(Campaign.status, Campaign.pause_reason)).all(),
            s.scalar(select(func.count()).select_from(InboxMessage)),
        )


def now_header(delta: dt.timedelta = dt.timedelta(0)) -> str:
    return email.utils.format_datetime(dt.datetime.now(dt.UTC) + delta)


BACK = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=20)


def mixed(letters: list[tuple[str, str]]) -> list[bytes]:
    """One of each kind that comes back, about letters 0-9."""
    from babel.dates import format_date

    (m0, a0), (m1, a1), (m2, a2), (m3, a3), (m4, a4), (m5, a5), (_m6, a6), (_m7, a7) = letters[:8]
    back = format_date(BACK, "d. MMMM y", locale="de")
    return [
        S.reply(to_id=m0, sender=a0, date=now_header()),
        S.auto_reply(
            to_id=m1,
            sender=a1,
            subject="Abwesenheitsnotiz: An appeal",
            body=f"Ich bin ab dem {back} wieder im Büro.",
            date=now_header(),
        ),
        S.dsn(recipient=a2, message_id=m2),
        S.qmail_bounce(recipient=a3, message_id=m3),
        S.delayed_dsn(recipient=a4, message_id=m4),
        S.arf(recipient=a5, message_id=m5),
        S.unsubscribe(sender=a6),
        S.yahoo_bounce(recipient=a7),
        S.junk(),
        S.read_receipt(to_id=m0, sender=a0),
        S.bounce_for_unknown(),
        S.reply(
            to_id="<not-ours@elsewhere.example.com>",
            sender="someone@elsewhere.example.com",
            own_id="<r-not-ours@elsewhere.example.com>",
        ),
        b"\x00\x01 not a mail \xff",
    ]


def test_maildir_sync_records_each_outcome_once(
    run: Cli, engine: Engine, workspace: Path, tmp_path: Path
) -> None:
    letters = sent_campaign(run, engine, workspace, 12)
    box = S.write_maildir(tmp_path / "Maildir", mixed(letters))
    result = run.ok("inbox", "sync", "--maildir", str(box))
    out = result.stdout
    assert "13 new mail(s), 8 recorded" in out
    for label, n in [
        ("replies", 1),
        ("auto-replies", 1),
        ("hard bounces", 3),
        ("delivery delays", 1),
        ("complaints", 1),
        ("unsubscribe requests", 1),
        ("not about any letter of ours", 2),
        ("addresses we never wrote to", 1),
        ("other automatic reports", 1),
        ("unreadable", 1),
    ]:
        assert any(
            label in line and line.rstrip().endswith(f" {n}") for line in out.splitlines()
        ), (
            label,
            out,
        )
    (m0, _a0), (m1, _a1), (m2, a2), (m3, a3), (m4, _a4), (m5, a5), (m6, a6), (m7, a7) = letters[:8]
    with Session(engine) as s:
        msg = {m.message_id: m for m in s.scalars(select(Message))}
        supp = {e: r for e, r in s.execute(select(Suppression.email, Suppression.reason))}
        kinds = s.execute(
            select(Message.message_id, Event.kind)
            .join(Message, Message.id == Event.message_id)
            .where(Event.via == "inbox")
        ).all()
    assert msg[m0].replied_at is not None and msg[m0].status == "sent"
    assert msg[m1].replied_at is None and msg[m1].away_until == BACK
    for mid in (m2, m3, m7):
        assert msg[mid].status == "failed" and msg[mid].bounced_at is not None
    assert msg[m2].smtp_code == 550 and msg[m2].smtp_reply.startswith("5.1.1 550 5.1.1")
    assert "no mailbox here by that name" in msg[m3].smtp_reply
    assert msg[m4].status == "sent" and msg[m4].bounced_at is None
    assert supp == {
        a2: "hard_bounce",
        a3: "hard_bounce",
        a7: "hard_bounce",
        a5: "complaint",
        a6: "unsubscribed",
    }
    assert sorted(kinds) == sorted(
        [
            (m0, "replied"),
            (m1, "auto_replied"),
            (m2, "bounced"),
            (m3, "bounced"),
            (m4, "deferred"),
            (m5, "complaint"),
            (m6, "unsubscribed"),
            (m7, "bounced"),
        ]
    )

    before = snapshot(engine)
    again = run.ok("inbox", "sync", "--maildir", str(box))
    assert "0 new mail(s), 0 recorded" in again.stdout
    assert snapshot(engine) == before

    # The same mails in an mbox (another export of the same mailbox) count nothing twice.
    mbox = S.write_mbox(tmp_path / "export.mbox", mixed(letters))
    third = run.ok("inbox", "sync", "--mbox", str(mbox))
    assert "seen before" in third.stdout and "0 recorded" in third.stdout
    after = snapshot(engine)
    assert after[:4] == before[:4]


def test_review_shows_what_came_back(
    run: Cli, engine: Engine, workspace: Path, tmp_path: Path
) -> None:
    letters = sent_campaign(run, engine, workspace, 10)
    run.ok("inbox", "sync", "--maildir", str(S.write_maildir(tmp_path / "M", mixed(letters))))
    (status,) = json.loads(run.ok("status", SLUG, "--format", "json").stdout)
    assert {k: status[k] for k in ("replied", "auto_replied", "bounced", "unsubscribed")} == {
        "replied": 1,
        "auto_replied": 1,
        "bounced": 3,
        "unsubscribed": 1,
    }
    text = run.ok("status", SLUG).stdout
    assert "outcomes  1 replied, 1 auto-replied, 3 bounced, 1 unsubscribed" in text

    csv_out = run.ok("log", SLUG, "--format", "csv").stdout.splitlines()
    header = csv_out[0].split(",")
    assert {"replied_at", "bounced_at"} <= set(header)
    rows = {
        line.split(",")[0]: dict(zip(header, line.split(","), strict=False)) for line in csv_out[1:]
    }
    assert rows[letters[0][1]]["replied_at"].startswith(str(dt.datetime.now(dt.UTC).year))
    assert rows[letters[2][1]]["bounced_at"] == "2022-03-21T09:15:00Z"
    assert rows[letters[1][1]]["replied_at"] == ""

    shown = run.ok("contacts", "show", letters[0][1]).stdout
    assert "Replies:" in shown and "Re: An appeal" in shown
    assert "| we stand with you and will call our partners tomorrow." in shown
    assert "to stand with them" not in shown  # the quoted letter is not the reply
    data = json.loads(run.ok("contacts", "show", letters[0][1], "--format", "json").stdout)
    (reply,) = data["replies"]
    assert reply["subject"] == "Re: An appeal" and reply["campaign"] == SLUG
    away = run.ok("contacts", "show", letters[1][1]).stdout
    assert f"away until {BACK.isoformat()}" in away and "Replies:" not in away


def test_reply_without_references_is_matched_by_sender_only_if_recent(
    run: Cli, engine: Engine, workspace: Path, tmp_path: Path
) -> None:
    letters = sent_campaign(run, engine, workspace, 3)
    (_, a0), (_, a1) = letters[:2]
    mails = [
        S.reply(to_id=None, sender=a0, own_id="<fresh@city.example.com>", date=now_header()),
        S.reply(
            to_id=None,
            sender=a1,
            own_id="<late@city.example.com>",
            date=now_header(dt.timedelta(days=200)),
        ),
    ]
    # The sync runs 200 days on (time is injected): the second reply comes long after.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=200)
    source = MaildirSource(S.write_maildir(tmp_path / "M", mails))
    report = inbox.sync(engine=engine, source=source, clock=lambda: later)
    assert (report.counts["replied"], report.counts["not_ours"]) == (1, 1)
    with Session(engine) as s:
        replied = set(
            s.scalars(
                select(Contact.email)
                .join(Message, Message.contact_id == Contact.id)
                .where(Message.replied_at.is_not(None))
            )
        )
    assert replied == {a0}


def test_bounce_spike_pauses_and_holds_until_acknowledged(
    run: Cli, engine: Engine, workspace: Path, tmp_path: Path
) -> None:
    letters = sent_campaign(run, engine, workspace, 20)
    bounces = [
        S.dsn(recipient=a, message_id=m, own_id=f"<dsn-{i}@mx.example.net>")
        for i, (m, a) in enumerate(letters[:3])
    ]
    policy = inbox.SyncPolicy(spike=outbox.BounceSpikePolicy(ratio=0.1, minimum=3))
    source = MaildirSource(S.write_maildir(tmp_path / "M", bounces))
    report = inbox.sync(engine=engine, source=source, policy=policy)
    assert [slug for slug, _ in report.paused] == [SLUG]
    assert "PAUSED: bounce spike: 3 hard bounces of 20 sent (15.0%" in "\n".join(
        inbox.format_sync_report(report)
    )
    (status,) = json.loads(run.ok("status", SLUG, "--format", "json").stdout)
    assert status["status"] == "paused"
    assert status["pause_reason"].startswith("bounce spike: 3 hard bounces of 20 sent")
    assert "paused by a bounce spike" in status["next_steps"][0]
    assert "PAUSED: bounce spike" in run.ok("status", SLUG).stdout

    factory = db.session_factory(engine)
    with db.transaction(factory) as s:
        campaign_id = s.scalar(select(Campaign.id).where(Campaign.slug == SLUG))
        assert campaign_id is not None
        with pytest.raises(CampaignHeld, match="bounce spike"):
            outbox.ensure_not_held(
                s, campaign_id=campaign_id, acknowledge=False, now=dt.datetime.now(dt.UTC)
            )
    with db.transaction(factory) as s:
        outbox.ensure_not_held(
            s, campaign_id=campaign_id, acknowledge=True, now=dt.datetime.now(dt.UTC)
        )
    with Session(engine) as s:
        campaign = s.get(Campaign, campaign_id)
        assert campaign is not None
        assert (campaign.held, campaign.pause_reason, campaign.bounces_acknowledged) == (
            False,
            None,
            3,
        )
    # Acknowledged bounces do not pause it again; new ones past the bounds do.
    one_more = [
        S.dsn(recipient=letters[3][1], message_id=letters[3][0], own_id="<dsn-x@mx.example.net>")
    ]
    source = MaildirSource(S.write_maildir(tmp_path / "M2", one_more))
    assert inbox.sync(engine=engine, source=source, policy=policy).paused == []


def test_a_delivery_report_interrupted_midway_is_redone_whole(
    run: Cli, engine: Engine, workspace: Path, tmp_path: Path
) -> None:
    """Each batch commits its outcomes, seen mails and position together: nothing half-written."""
    letters = sent_campaign(run, engine, workspace, 4)
    mails = [
        S.dsn(recipient=a, message_id=m, own_id=f"<dsn-{i}@mx.example.net>")
        for i, (m, a) in enumerate(letters)
    ]
    box = S.write_maildir(tmp_path / "M", mails)

    class Broken(MaildirSource):
        def read(self, folder, *, position, seen):  # type: ignore[no-untyped-def]
            for n, item in enumerate(super().read(folder, position=position, seen=seen)):
                if n == 3:
                    raise MailboxError("the disk went away")
                yield item

    policy = inbox.SyncPolicy(batch_size=2)
    with pytest.raises(MailboxError):
        inbox.sync(engine=engine, source=Broken(box), policy=policy)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(InboxMessage)) == 2
        assert s.scalar(select(func.count(Message.bounced_at))) == 2
        assert s.scalar(select(func.count()).select_from(Suppression)) == 2
    report = inbox.sync(engine=engine, source=MaildirSource(box), policy=policy)
    assert report.counts["bounced"] == 2 and report.read == 2
    with Session(engine) as s:
        assert s.scalar(select(func.count(Message.bounced_at))) == 4
        assert s.scalar(select(InboxFolder.synced_at)) is not None


@pytest.mark.parametrize(
    ("flag", "make", "message"),
    [
        ("--maildir", lambda p: p / "missing", "no such mailbox"),
        ("--maildir", lambda p: _file(p / "file.eml"), "not a Maildir"),
        ("--maildir", lambda p: _dir(p / "plain-folder"), "not a Maildir"),
        ("--mbox", lambda p: p / "missing.mbox", "no such mailbox"),
        ("--mbox", lambda p: _dir(p / "folder"), "not an mbox file"),
        ("--mbox", lambda p: _file(p / "notes.txt"), "not an mbox file"),
    ],
)
def test_a_path_that_is_no_mailbox_is_one_error_line(
    run: Cli, tmp_path: Path, flag: str, make: object, message: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    result = run("inbox", "sync", flag, str(path))
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and message in line and str(path.name) in line


def _file(path: Path) -> Path:
    path.write_text("Hello, this is not a mailbox.\n")
    return path


def _dir(path: Path) -> Path:
    path.mkdir()
    return path


def test_usage_errors(run: Cli, tmp_path: Path) -> None:
    assert run("inbox", "sync").exit_code == 2
    both = run("inbox", "sync", "--maildir", str(tmp_path), "--mbox", str(tmp_path / "x"))
    assert both.exit_code == 2 and "exactly one" in both.output
    folder = run("inbox", "sync", "--maildir", str(tmp_path), "--folder", "INBOX")
    assert folder.exit_code == 2 and "--imap only" in folder.output


def test_truncated_mbox_counts_what_it_can(
    run: Cli, engine: Engine, workspace: Path, tmp_path: Path
) -> None:
    letters = sent_campaign(run, engine, workspace, 2)
    path = S.write_mbox(
        tmp_path / "cut.mbox",
        [
            S.reply(to_id=letters[0][0], sender=letters[0][1]),
            S.dsn(recipient=letters[1][1], message_id=letters[1][0]),
        ],
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 700])
    report = inbox.sync(engine=engine, source=MboxSource(path))
    assert report.read == 2
    assert report.counts["replied"] == 1


def test_unknown_imap_scheme_and_password_in_url_are_refused(run: Cli) -> None:
    for url, text in [
        ("pop3://office@127.0.0.1", "unknown scheme"),
        ("imaps://office:secret@mail.example.org", "must not contain a password"),
        ("imap+plain://office@mail.example.org", "only for a server on this machine"),
        ("imaps://mail.example.org", "no user name"),
    ]:
        result = run("inbox", "sync", "--imap", url)
        assert result.exit_code == 1, url
        assert result.output.startswith("Error: ") and text in result.output
        assert "secret" not in result.output
