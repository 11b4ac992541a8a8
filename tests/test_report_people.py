"""The report lists people, not just counts (issue 14 item 10), shows what came back (issue 12
item 6), the rate over the span actually sent (issue 13 item 9), a sample letter per language,
and times in the reader's local zone."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from conftest import Cli
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from test_report import _parse
from test_review_data import SCRIPT_NAME, T0, build_sample

from mailer import compose, outbox, report, review
from mailer.config import find_workspace
from mailer.models import Campaign, City, Contact, Event, Message, Partnership
from mailer.render import TemplateSet

DAY = dt.timedelta(days=1)
BOUNCE = "smtp; 550 5.1.1 <berta@example.org>: Recipient address rejected: User unknown"


def build_outcomes(factory: sessionmaker[Session], workspace: Path) -> dict[str, int]:
    """The review sample, plus partner cities, a frozen template, two more letters sent, and
    what came back through the outbox's own writers: anna replied, bruno's office answered
    automatically (back on 14 April), berta's letter bounced, jan unsubscribed, kurt is silent.
    Returns message ids by first name."""
    build_sample(factory)
    with factory() as session, session.begin():
        cities = {c.name: c for c in session.scalars(select(City))}
        lviv = City(name="Lviv", name_key="lviv", country="UA")
        session.add(lviv)
        session.flush()
        kyiv, krakow, wien = cities["Kyiv"], cities["Kraków"], cities["Wien"]
        session.add_all(
            [
                Partnership(ukrainian_city_id=kyiv.id, partner_city_id=krakow.id, since=1993),
                Partnership(ukrainian_city_id=lviv.id, partner_city_id=krakow.id, since=1995),
                Partnership(ukrainian_city_id=lviv.id, partner_city_id=wien.id),
            ]
        )
        campaign = session.scalars(select(Campaign).where(Campaign.slug == "spring")).one()
        campaign.template_sources = TemplateSet.from_directory(
            workspace / "templates" / "appeal", name="appeal"
        ).sources
        for n, (email, name, city, language, minute) in enumerate(
            (
                ("jan@example.org", "Jan Kowalski", krakow, "pl", 10),
                ("kurt@example.org", "Kurt Graf", wien, "de", 11),
            )
        ):
            contact = Contact(
                email=email, name=name, title="Mayor", language=language, city_id=city.id
            )
            session.add(contact)
            session.flush()
            at = T0 + dt.timedelta(minutes=minute)
            message = Message(
                campaign_id=campaign.id,
                contact_id=contact.id,
                status="sent",
                attempts=1,
                message_id=f"<spring.extra{n}@campaign.example.org>",
                language=language,
                subject="Appeal",
                smtp_code=250,
                smtp_reply="2.0.0 Ok",
                queued_at=T0,
                sent_at=at,
            )
            session.add(message)
            session.flush()
            session.add(
                Event(
                    message_id=message.id,
                    campaign_id=campaign.id,
                    contact_id=contact.id,
                    at=at,
                    kind="sent",
                    smtp_code=250,
                )
            )
    with factory() as session:
        ids = {
            email.split("@")[0]: mid
            for email, mid in session.execute(
                select(Contact.email, Message.id).join(Message, Message.contact_id == Contact.id)
            )
        }
    with factory() as session, session.begin():
        outbox.record_reply(
            session,
            message=ids["anna"],
            at=T0 + DAY,
            subject="Re: Appeal <from Kyiv>",
            excerpt="We stand with Kyiv.\nOur council meets on Monday.",
            now=T0 + DAY,
        )
        outbox.record_auto_reply(
            session,
            message=ids["bruno"],
            at=T0 + DAY,
            subject="Absence du bureau",
            away_until=dt.date(2026, 4, 14),
            now=T0 + DAY,
        )
        outbox.record_bounce(
            session,
            message=ids["berta"],
            status="5.1.1",
            diagnostic=BOUNCE,
            smtp_code=550,
            at=T0 + DAY,
            now=T0 + DAY,
        )
        outbox.record_unsubscribe(
            session, email="jan@example.org", message=ids["jan"], at=T0 + DAY, source="mailto"
        )
    return ids


@pytest.fixture
def outcomes(session_factory: sessionmaker[Session], workspace: Path) -> sessionmaker[Session]:
    build_outcomes(session_factory, workspace)
    return session_factory


def _report(
    factory: sessionmaker[Session],
    workspace: Path,
    out: Path,
    *,
    limit: int = report.LIST_LIMIT,
    zone: dt.tzinfo = dt.UTC,
) -> tuple[report.ReportData, str]:
    with factory() as session:
        data = report.write_report(
            session,
            slug="spring",
            output=out,
            workspace=find_workspace(start=workspace),
            zone=zone,
            now=T0 + 2 * DAY,
            limit=limit,
        )
    return data, out.read_text(encoding="utf-8")


def _rows(text: str, section: str) -> list[str]:
    """The text of each row of the tables in one section (or part), cells joined by ` | `."""
    match = re.search(rf'<(section|div) id="{section}".*?</\1>', text, flags=re.S)
    assert match, section
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", match.group(0), flags=re.S)
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, flags=re.S) for row in rows]
    return [" | ".join(re.sub(r"<[^>]+>", "", c).strip() for c in row) for row in cells if row]


def test_who_was_contacted_with_city_partner_city_and_when(
    outcomes: sessionmaker[Session], workspace: Path, tmp_path: Path
) -> None:
    data, text = _report(outcomes, workspace, tmp_path / "r.html")
    rows = _rows(text, "contacted")
    assert rows[1:] == [
        "Anna Nowak | anna@example.org | Kraków, PL | Kyiv, Lviv | 2026-03-14 09:01 UTC",
        "Bruno Martin | bruno@example.org | Lyon, FR |  | 2026-03-14 09:02 UTC",
        "Jan Kowalski | jan@example.org | Kraków, PL | Kyiv, Lviv | 2026-03-14 09:10 UTC",
        "Kurt Graf | kurt@example.org | Wien, AT | Lviv | 2026-03-14 09:11 UTC",
    ]
    assert data.contacted.total == 4 and data.contacted.more == 0


def test_who_is_waiting_failed_or_skipped_and_why(
    outcomes: sessionmaker[Session], workspace: Path, tmp_path: Path
) -> None:
    _, text = _report(outcomes, workspace, tmp_path / "r.html")
    rows = _rows(text, "not-sent")
    by_email = {r.split(" | ")[1]: r for r in rows if "@" in r}
    assert (
        "failed | bounced: 5.1.1 " + BOUNCE.replace("<", "&lt;").replace(">", "&gt;")
        in (by_email["berta@example.org"])
    )
    assert (
        "failed | 550 5.1.1 &lt;x&gt;: Recipient address rejected" in by_email["carla@example.org"]
    )
    assert "uncertain | timeout after DATA" in by_email["emil@example.org"]
    assert "retry | 421 4.7.0 Try again later" in by_email["fritz@example.org"]
    assert "skipped | suppressed: unsubscribed" in by_email["ida@example.org"]
    assert "queued | waiting for `mailer send`" in by_email["greta@example.org"]
    assert "sending | " in by_email["hans@example.org"]
    for sent in ("anna", "bruno", "jan", "kurt"):
        assert f"{sent}@example.org" not in by_email


def test_skipped_letters_are_never_no_failures(
    outcomes: sessionmaker[Session], workspace: Path, tmp_path: Path
) -> None:
    with outcomes() as session, session.begin():
        session.execute(
            update(Message)
            .where(Message.status.in_(("failed", "uncertain", "retry", "queued", "sending")))
            .values(status="sent", bounced_at=None)
        )
    _, text = _report(outcomes, workspace, tmp_path / "r.html")
    page = _parse(text)
    failures = page.text_by_id["failures"]
    assert "No failures" not in text
    assert "suppressed: unsubscribed" in failures
    assert "1 letter was not sent on purpose" in failures


def test_who_to_follow_up_sent_not_replied_not_bounced_not_unsubscribed(
    outcomes: sessionmaker[Session], workspace: Path, tmp_path: Path
) -> None:
    data, text = _report(outcomes, workspace, tmp_path / "r.html")
    rows = _rows(text, "follow-up")
    # anna replied, berta bounced, jan unsubscribed; bruno's auto-reply is no reply.
    assert [r.split(" | ")[1] for r in rows[1:]] == ["bruno@example.org", "kurt@example.org"]
    assert rows[1].endswith("auto-reply: back on 2026-04-14")
    assert data.follow_up.total == 2
    assert "--not-replied-to spring" in _parse(text).text_by_id["follow-up"]


def test_what_came_back_replies_rates_bounces(
    outcomes: sessionmaker[Session], workspace: Path, tmp_path: Path
) -> None:
    data, text = _report(outcomes, workspace, tmp_path / "r.html")
    page = _parse(text)
    for kind, n in (("replied", 1), ("auto_replied", 1), ("bounced", 1), ("unsubscribed", 1)):
        assert page.text_by_id[f"outcome-{kind}"] == str(n), kind
    replies = _rows(text, "replies")
    assert replies[1:] == [
        "2026-03-15 09:00 UTC | Anna Nowak | anna@example.org | Kraków, PL | "
        "Re: Appeal &lt;from Kyiv&gt; | We stand with Kyiv.\nOur council meets on Monday."
    ]
    # Reply rate: replies per letter sent (berta's bounced letter was sent too).
    country = {r.split(" | ")[0]: r.split(" | ")[-3:] for r in _rows(text, "by-country")[1:]}
    assert country["Poland (PL)"] == ["2", "1", "50.0%"]
    assert country["Austria (AT)"] == ["2", "0", "0.0%"]
    language = {r.split(" | ")[0]: r.split(" | ")[-3:] for r in _rows(text, "by-language")[1:]}
    assert language["Polish (pl)"] == ["2", "1", "50.0%"]
    assert language["French (fr)"] == ["1", "0", "0.0%"]
    (bounce,) = data.bounces
    assert (bounce.status, bounce.smtp_code, bounce.count) == ("5.1.1", 550, 1)
    assert _rows(text, "bounces")[1:] == [
        f"1 | 5.1.1 | 550 | no such mailbox | 5.1.1 {BOUNCE}".replace("<", "&lt;").replace(
            ">", "&gt;"
        )
    ]
    unsubscribed = page.text_by_id["unsubscribed"]
    assert "Jan Kowalski" in unsubscribed


def test_one_sample_letter_per_language_from_the_frozen_template(
    outcomes: sessionmaker[Session], workspace: Path, tmp_path: Path
) -> None:
    # The copy on disk changes after the campaign froze its own: the report shows what was sent.
    de = workspace / "templates" / "appeal" / "de.txt.j2"
    de.write_text("Subject: CHANGED ON DISK\n\nnot what was sent\n", encoding="utf-8")
    data, text = _report(outcomes, workspace, tmp_path / "r.html")
    assert [s.language for s in data.samples] == ["de", "fr", "pl"]
    ws = find_workspace(start=workspace)
    with outcomes() as session:
        campaign = session.scalars(select(Campaign).where(Campaign.slug == "spring")).one()
        for sample in data.samples:
            assert sample.error is None, sample.error
            expected = compose.preview(
                session,
                campaign,
                contact_email=sample.email,
                templates_dir=ws.templates_dir,
                settings=ws,
            )
            assert sample.subject == expected.subject
    pl = next(s for s in data.samples if s.language == "pl")
    assert pl.email == "anna@example.org" and "Kraków" in pl.text
    assert "CHANGED ON DISK" not in text
    page = _parse(text)
    assert pl.subject in page.text_by_id["sample-pl"]
    assert "Polish (pl)" in page.text_by_id["sample-pl"]


def test_a_sample_letter_never_carries_a_working_unsubscribe_token(
    outcomes: sessionmaker[Session], workspace: Path, tmp_path: Path
) -> None:
    config = workspace / "mailer.toml"
    config.write_text(
        config.read_text(encoding="utf-8").replace(
            "[campaign]\n", '[campaign]\nunsubscribe_url = "https://example.org/u?t={token}"\n'
        ),
        encoding="utf-8",
    )
    ws = find_workspace(start=workspace)
    with outcomes() as session:
        campaign = session.scalars(select(Campaign).where(Campaign.slug == "spring")).one()
        sent = compose.preview(
            session,
            campaign,
            contact_email="anna@example.org",
            templates_dir=ws.templates_dir,
            settings=ws,
        )
    token = re.search(rb"https://example\.org/u\?t=([\w.-]+)", sent.data)
    assert token
    data, text = _report(outcomes, workspace, tmp_path / "r.html")
    assert token.group(1).decode() not in text
    pl = next(s for s in data.samples if s.language == "pl")
    assert "https://example.org/u?t=(personal link, not shown)" in pl.text


def test_lists_are_capped_with_the_command_that_lists_them_all(
    outcomes: sessionmaker[Session], workspace: Path, tmp_path: Path
) -> None:
    data, text = _report(outcomes, workspace, tmp_path / "r.html", limit=2)
    assert len(data.contacted.rows) == 2 and data.contacted.more == 2
    page = _parse(text)
    assert "and 2 more — mailer log spring --status sent lists them all" in " ".join(
        page.text_by_id["contacted"].split()
    )
    not_sent = " ".join(page.text_by_id["not-sent"].split())
    assert (
        "and 3 more — mailer log spring --status failed --status uncertain lists them all"
        in not_sent
    )
    assert len(_rows(text, "contacted")) == 1 + 2


def test_times_are_local_with_the_zone_named(
    outcomes: sessionmaker[Session], run: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "r.html"
    run("report", "spring", "--output", str(out), env={"TZ": "Europe/Berlin"})
    text = out.read_text(encoding="utf-8")
    assert "Anna Nowak | anna@example.org | Kraków, PL | Kyiv, Lviv | 2026-03-14 10:01 CET" in (
        _rows(text, "contacted")
    )
    assert "Europe/Berlin" in _parse(text).text_by_id["meta"]
    assert "time (Europe/Berlin)" in _parse(text).text_by_id["chart"]


def test_report_writes_slug_report_html_by_default(
    outcomes: sessionmaker[Session], run: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run.ok("report", "spring")
    assert result.stdout.startswith("Wrote spring-report.html: 13 recipients, 4 sent")
    assert (tmp_path / "spring-report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE")


def test_report_shows_the_rate_and_limit_like_status(
    outcomes: sessionmaker[Session], run: Cli, workspace: Path, tmp_path: Path
) -> None:
    config = workspace / "mailer.toml"
    config.write_text(
        config.read_text(encoding="utf-8").replace("[smtp]\n", '[smtp]\nrate = "120/min"\n'),
        encoding="utf-8",
    )
    out = tmp_path / "r.html"
    run.ok("report", "spring", "--output", str(out))
    rate = " ".join(_parse(out.read_text(encoding="utf-8")).text_by_id["rate"].split())
    assert rate.endswith("; limit 120/min (mailer.toml).")
    with outcomes() as session:
        (summary,) = review.campaign_status(session, "spring", default_rate="120/min")
    assert review.format_rate(summary.rate, zone=dt.UTC) in rate


def test_sending_windows_section_reads_the_campaign_settings(
    outcomes: sessionmaker[Session], workspace: Path, tmp_path: Path
) -> None:
    _, text = _report(outcomes, workspace, tmp_path / "before.html")
    assert "No sending windows" in _parse(text).text_by_id["windows"]
    with outcomes() as session, session.begin():
        session.execute(
            update(Campaign)
            .where(Campaign.slug == "spring")
            .values(settings={"windows": ["Mon-Fri 09:00-17:00"], "window_zone": "recipient"})
        )
    data, text = _report(outcomes, workspace, tmp_path / "after.html")
    assert data.windows is not None and data.windows.windows == ("Mon-Fri 09:00-17:00",)
    windows = " ".join(_parse(text).text_by_id["windows"].split())
    assert "Mon-Fri 09:00-17:00" in windows and "each recipient's own time zone" in windows


def test_sample_letters_and_lists_show_hostile_names_as_text(
    outcomes: sessionmaker[Session], workspace: Path, tmp_path: Path
) -> None:
    with outcomes() as session, session.begin():
        session.execute(
            update(Contact).where(Contact.email == "bruno@example.org").values(name=SCRIPT_NAME)
        )
    data, text = _report(outcomes, workspace, tmp_path / "r.html")
    fr = next(s for s in data.samples if s.language == "fr")
    assert fr.email == "bruno@example.org" and fr.error is None
    assert SCRIPT_NAME not in text
    page = _parse(text)
    assert page.tags.count("script") == 0
    assert SCRIPT_NAME in page.text_by_id["sample-fr"]  # the reader sees the name, as text
    assert SCRIPT_NAME in page.text_by_id["follow-up"]
