"""Threaded follow-ups end to end, on SQLite and PostgreSQL: due `--after` each contact's own
first letter, in the same thread (In-Reply-To, References, `Re:` subject), quoting the first
letter's date; re-checked at send time for replies, bounces and unsubscribes; an out-of-office
return date waited for; cancelled with the campaign they follow."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import Cli
from smtp_server import SmtpTestServer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from test_windows_send import FakeClock, import_contacts

from mailer import db, outbox, review, timing
from mailer import engine as send_engine
from mailer.cli import cli
from mailer.config import find_workspace
from mailer.errors import InvalidValueError
from mailer.identity import Actor
from mailer.models import Campaign, Contact, Event, Message
from mailer.send_report import SendReport
from mailer.smtp import SmtpPool, parse_smtp_url

UTC = dt.UTC
T0 = dt.datetime(2024, 6, 3, 10, tzinfo=UTC)  # a Monday
APPEAL = """Subject: An appeal to {{ contact.name }}

Dear {{ contact.name }},

the mayors of Ukraine ask you to stand with them.
"""
NUDGE = """Subject:

Dear {{ contact.name }},

we wrote to you on {{ first_letter.date | format_date }} ("{{ first_letter.subject }}").
"""
PEOPLE = [(f"{n}@example.org", n.upper(), "Berlin", "DE") for n in ("a", "b", "c", "d", "e")]


@dataclass
class Office:
    run: Cli
    engine: Engine
    workspace: Path
    server: SmtpTestServer

    def send(self, slug: str, clock: FakeClock, **options: object) -> SendReport:
        pool = SmtpPool(parse_smtp_url(self.server.url(), timeout=10), size=2)
        return send_engine.send_campaign(
            workspace=find_workspace(start=self.workspace),
            engine=self.engine,
            slug=slug,
            transport=pool,
            concurrency=2,
            clock=clock,
            sleep=clock.sleep,
            timing_options=timing.RunTiming(**options),  # type: ignore[arg-type]
        )

    def letter(self, slug: str, email: str) -> Message:
        with Session(self.engine) as s:
            found = s.scalar(
                select(Message)
                .join(Contact, Contact.id == Message.contact_id)
                .join(Campaign, Campaign.id == Message.campaign_id)
                .where(Campaign.slug == slug, Contact.email == email)
            )
        assert found is not None
        return found

    def details(self, slug: str, kind: str) -> dict[str, str]:
        with Session(self.engine) as s:
            rows = s.execute(
                select(Contact.email, Event.detail)
                .join(Contact, Contact.id == Event.contact_id)
                .join(Campaign, Campaign.id == Event.campaign_id)
                .where(Campaign.slug == slug, Event.kind == kind)
                .order_by(Event.id)
            ).all()
        return {email: detail or "" for email, detail in rows}


@pytest.fixture(params=["sqlite", "postgresql"])
def office(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Office]:
    root = tmp_path / "ws"
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'mailer.db'}"
    else:
        url = request.getfixturevalue("pg_url")
        monkeypatch.setenv("MAILER_DATABASE_URL", url)
    result = CliRunner().invoke(cli, ["--db", url, "init", str(root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    engine = db.make_engine(url)
    run = Cli(root)
    for name, source in (("letter", APPEAL), ("nudge", NUDGE)):
        (root / "templates" / name).mkdir(parents=True)
        (root / "templates" / name / "en.txt.j2").write_text(source, encoding="utf-8")
    import_contacts(run, root, [(*p, "") for p in PEOPLE], "email,name,city,country,timezone")
    with SmtpTestServer() as server:
        yield Office(run=run, engine=engine, workspace=root, server=server)
    engine.dispose()


def sent_appeal_with_outcomes(office: Office) -> None:
    """`appeal` went to everyone at T0; A replied, B bounced, E is away until 13 June."""
    office.run.ok(
        "campaign", "create", "appeal", "--template", "letter", "--from", "office@example.org"
    )
    assert office.send("appeal", FakeClock(T0)).sent == 5
    ids = {p[0]: office.letter("appeal", p[0]).id for p in PEOPLE}
    later = T0 + dt.timedelta(hours=3)
    with Session(office.engine) as s, s.begin():
        outbox.record_reply(
            s,
            message=ids["a@example.org"],
            at=later,
            subject="Re: An appeal",
            excerpt="Yes.",
            now=later,
        )
        outbox.record_bounce(
            s,
            message=ids["b@example.org"],
            status="5.1.1",
            diagnostic="no such user",
            smtp_code=550,
            at=later,
            now=later,
        )
        outbox.record_auto_reply(
            s,
            message=ids["e@example.org"],
            at=later,
            subject="Out of office",
            away_until=dt.date(2024, 6, 13),
            now=later,
        )


def test_a_follow_up_goes_in_the_thread_when_due_and_only_to_who_has_not_answered(
    office: Office,
) -> None:
    sent_appeal_with_outcomes(office)
    created = office.run.ok(
        "campaign", "create", "follow-1", "--template", "nudge", "--from", "office@example.org",
        "--follow-up-of", "appeal", "--after", "7d",
    ).output  # fmt: skip
    assert "contacted in appeal" in created
    shown = office.run.ok("campaign", "show", "follow-1").output
    assert "Follows:   appeal, 7d after each contact's letter (same thread)" in shown
    checked = office.run.ok("check", "follow-1").output
    assert "empty subject" not in checked  # `Re: <the first letter's subject>` stands in

    # A day later: nothing is due yet; A (replied) and B (bounced, suppressed) never will be.
    first = office.send("follow-1", FakeClock(T0 + dt.timedelta(days=1)))
    assert first.sent == 0 and first.held == 3
    assert first.next_due is not None and first.next_due.at == T0 + dt.timedelta(days=7)
    held = office.details("follow-1", "held")
    assert held["c@example.org"] == (
        "due 2024-06-10 10:00 UTC: follow-up 7d after their letter of appeal (2024-06-03 10:00 UTC)"
    )
    # E said she is back on 13 June: due at the start of that day on her clock (Berlin).
    assert held["e@example.org"] == (
        "due 2024-06-12 22:00 UTC: follow-up 7d after their letter of appeal "
        "(2024-06-03 10:00 UTC); then away until 2024-06-13 (an out-of-office answer)"
    )
    skipped = office.details("follow-1", "skipped")
    assert skipped["a@example.org"] == (
        "follow-up of appeal: they replied to appeal (2024-06-03 13:00 UTC)"
    )
    assert skipped["b@example.org"].startswith("suppressed: hard_bounce")
    with Session(office.engine) as s:
        (summary,) = review.campaign_status(s, "follow-1", now=T0 + dt.timedelta(days=1))
    assert (summary.waiting, summary.next_due_at) == (3, T0 + dt.timedelta(days=7))
    assert "waiting   3 held for their window or delay; the next due 2024-06-10 10:00 UTC" in (
        review.format_status_text([summary])
    )
    assert summary.to_json()["waiting"] == 3

    # D answers before their follow-up is due: re-checked when it falls due, it is skipped.
    with Session(office.engine) as s, s.begin():
        at = T0 + dt.timedelta(days=2)
        outbox.record_reply(
            s,
            message=office.letter("appeal", "d@example.org").id,
            at=at,
            subject="Re",
            excerpt="",
            now=at,
        )
    clock = FakeClock(T0 + dt.timedelta(days=8))  # Tuesday 11 June, 12:00 in Berlin
    said: list[str] = []
    report = office.send(
        "follow-1", clock, windows=("Mon-Fri 09:00-17:00",), wait=True, notify=said.append
    )
    assert report.sent == 2 and report.next_due is None
    assert office.details("follow-1", "skipped")["d@example.org"].startswith(
        "follow-up of appeal: they replied to appeal (2024-06-05 10:00 UTC)"
    )
    assert office.letter("follow-1", "c@example.org").sent_at == T0 + dt.timedelta(days=8)
    # E: back on Thursday, and the window opens at 09:00 on her clock.
    assert office.letter("follow-1", "e@example.org").sent_at == dt.datetime(
        2024, 6, 13, 7, tzinfo=UTC
    )
    assert said == [
        "waiting until 2024-06-13 07:00 UTC (Thu 09:00 in Europe/Berlin): then 1 letter(s), "
        "e.g. e@example.org of follow-1 fall due"
    ]

    follow_ups = [r for r in office.server.accepted() if r.message()["In-Reply-To"]]
    assert sorted(r.rcpt_tos[0] for r in follow_ups) == ["c@example.org", "e@example.org"]
    for received in follow_ups:
        email = received.rcpt_tos[0]
        first_letter = office.letter("appeal", email)
        message = received.message()
        assert message["In-Reply-To"] == first_letter.message_id
        assert message["References"] == first_letter.message_id
        assert message["Subject"] == f"Re: An appeal to {email[0].upper()}"
        body = message.get_body(("plain",))
        assert body is not None
        assert f'we wrote to you on 3 June 2024 ("An appeal to {email[0].upper()}")' in (
            body.get_content()
        )
        assert office.letter("follow-1", email).message_id == message["Message-ID"]
    # The appeal to all five, then the follow-up to C and E only, once each.
    assert len(office.server.accepted()) == 7


def test_cancelling_the_parent_cancels_its_follow_ups_pending_letters(office: Office) -> None:
    sent_appeal_with_outcomes(office)
    office.run.ok(
        "campaign", "create", "follow-1", "--template", "nudge", "--from", "office@example.org",
        "--follow-up-of", "appeal", "--after", "7d",
    )  # fmt: skip
    office.run.ok(
        "campaign", "create", "follow-2", "--template", "nudge", "--from", "office@example.org",
        "--follow-up-of", "appeal", "--after", "14d", "--replied-to", "appeal",
    )  # fmt: skip
    assert office.send("follow-1", FakeClock(T0 + dt.timedelta(days=1))).held == 3
    # Those who answered are whom follow-2 is for: their answer is no reason to skip them.
    assert office.send("follow-2", FakeClock(T0 + dt.timedelta(days=1))).held == 1
    skipped = outbox.cancel_campaign(
        office.engine,
        slug="appeal",
        actor=Actor.current(),
        reason="wrong list",
        now=T0 + dt.timedelta(days=2),
    )
    assert skipped == {"appeal": 0, "follow-1": 3, "follow-2": 1}
    with Session(office.engine) as s:
        statuses = {slug: st for slug, st in s.execute(select(Campaign.slug, Campaign.status))}
        pending = s.scalar(select(Message.id).where(Message.status.in_(["queued", "retry"])))
    assert statuses == {"appeal": "cancelled", "follow-1": "cancelled", "follow-2": "cancelled"}
    # The follow-ups' held letters were skipped too, each saying why.
    assert pending is None
    cancelled = [
        detail
        for detail in office.details("follow-1", "skipped").values()
        if detail.endswith("wrong list (follow-up of appeal)")
    ]
    assert len(cancelled) == 3
    with pytest.raises(InvalidValueError, match="campaign follow-1 is cancelled"):
        office.send("follow-1", FakeClock(T0 + dt.timedelta(days=9)))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--follow-up-of", "nope", "--after", "7d"),
            "Error: --follow-up-of nope: no campaign 'nope'; campaigns: appeal",
        ),
        (
            ("--follow-up-of", "appeal", "--after", "7d"),
            "Error: --follow-up-of appeal: campaign appeal has not sent a letter yet",
        ),
        (
            ("--follow-up-of", "appeal", "--after", "soon"),
            "Error: --after 'soon' is not a duration: use a number and a unit (m, h, d, w), "
            "e.g. 7d, 36h or 2w",
        ),
        (("--follow-up-of", "appeal", "--after", "7x"), "Error: --after '7x' is not a duration"),
        (("--after", "7d"), "Error: --after is the delay of a follow-up: give --follow-up-of SLUG"),
        (("--follow-up-of", "appeal"), "Error: --follow-up-of appeal: say how long after"),
    ],
)
def test_bad_follow_ups_are_one_error_line_and_nothing_is_created(
    run: Cli, workspace: Path, engine: Engine, args: tuple[str, ...], message: str
) -> None:
    for name, source in (("letter", APPEAL),):
        (workspace / "templates" / name).mkdir(parents=True)
        (workspace / "templates" / name / "en.txt.j2").write_text(source, encoding="utf-8")
    import_contacts(run, workspace, [(*PEOPLE[0], "")], "email,name,city,country,timezone")
    run.ok("campaign", "create", "appeal", "--template", "letter", "--from", "office@example.org")
    result = run(
        "campaign", "create", "follow-1", "--template", "letter", "--from", "office@example.org",
        *args,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(message), line
    with Session(engine) as s:
        assert s.scalar(select(Campaign.id).where(Campaign.slug == "follow-1")) is None
