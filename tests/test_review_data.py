"""Sample send logs for the review and report tests, written straight through the models.

Not a test module itself: `test_review*.py` and `test_report*.py` import `build_sample` from it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from mailer.models import (
    Campaign,
    City,
    Contact,
    Event,
    Message,
    Suppression,
    city_key,
)

T0 = dt.datetime(2026, 3, 14, 9, 0, tzinfo=dt.UTC)
SCRIPT_NAME = "<script>alert(1)</script>"
FORMULA_NAME = '=HYPERLINK("http://evil.test","click me")'
UNKNOWN_USER = "5.1.1 <x>: Recipient address rejected: User unknown"


@dataclass(frozen=True)
class Recipient:
    email: str
    name: str
    city: str
    language: str
    status: str
    attempts: int = 0
    code: int | None = None
    reply: str | None = None
    # (minutes after T0, event kind, smtp code, detail)
    events: tuple[tuple[int, str, int | None, str | None], ...] = ()


def _sent(minute: int) -> tuple[tuple[int, str, int | None, str | None], ...]:
    return (
        (0, "queued", None, None),
        (minute, "claimed", None, None),
        (minute, "sent", 250, "2.0.0 Ok: queued"),
    )


RECIPIENTS: tuple[Recipient, ...] = (
    Recipient(
        "anna@example.org",
        "Anna Nowak",
        "Kraków",
        "pl",
        "sent",
        1,
        250,
        "2.0.0 Ok: queued",
        _sent(1),
    ),
    Recipient(
        "bruno@example.org",
        "Bruno Martin",
        "Lyon",
        "fr",
        "sent",
        1,
        250,
        "2.0.0 Ok: queued",
        _sent(2),
    ),
    Recipient(
        "berta@example.org",
        "Berta Huber",
        "Wien",
        "de",
        "sent",
        2,
        250,
        "2.0.0 Ok: queued",
        (
            (0, "queued", None, None),
            (3, "deferred", 421, "4.7.0 Try again later"),
            (65, "sent", 250, "2.0.0 Ok: queued"),
        ),
    ),
    Recipient(
        "carla@example.org",
        "Carla Weiss",
        "Wien",
        "de",
        "failed",
        1,
        550,
        UNKNOWN_USER,
        ((0, "queued", None, None), (4, "failed", 550, UNKNOWN_USER)),
    ),
    Recipient(
        "dora@example.org",
        "Dora Lang",
        "Wien",
        "de",
        "failed",
        1,
        550,
        UNKNOWN_USER + "\n",
        ((0, "queued", None, None), (5, "failed", 550, UNKNOWN_USER)),
    ),
    Recipient(
        "mallory@example.org",
        SCRIPT_NAME,
        "Lyon",
        "fr",
        "failed",
        1,
        554,
        "5.7.1 <b>rejected</b> & blocked",
        ((0, "queued", None, None), (6, "failed", 554, "5.7.1 <b>rejected</b> & blocked")),
    ),
    Recipient(
        "emil@example.org",
        "Emil Berg",
        "Kraków",
        "pl",
        "uncertain",
        1,
        None,
        "timeout after DATA",
        ((0, "queued", None, None), (7, "uncertain", None, "timeout after DATA")),
    ),
    Recipient(
        "fritz@example.org",
        "Fritz Roth",
        "Wien",
        "de",
        "retry",
        1,
        421,
        "4.7.0 Try again later",
        ((0, "queued", None, None), (8, "deferred", 421, "4.7.0 Try again later")),
    ),
    Recipient(
        "greta@example.org",
        "Greta Falk",
        "Lyon",
        "fr",
        "queued",
        0,
        None,
        None,
        ((0, "queued", None, None),),
    ),
    Recipient(
        "hans@example.org",
        FORMULA_NAME,
        "Kraków",
        "pl",
        "sending",
        1,
        None,
        "-1",
        ((0, "queued", None, None), (9, "claimed", None, None)),
    ),
    Recipient(
        "ida@example.org",
        "Ida Sommer",
        "Lyon",
        "fr",
        "skipped",
        0,
        None,
        "suppressed: unsubscribed",
        ((0, "skipped", None, "suppressed: unsubscribed"),),
    ),
)
COUNTRIES = {"Kraków": "PL", "Lyon": "FR", "Wien": "AT"}


@dataclass(frozen=True)
class Sample:
    slug: str
    empty_slug: str
    t0: dt.datetime
    ended: dt.datetime


def build_sample(factory: sessionmaker[Session]) -> Sample:
    """Campaign `spring`: one message in every state, events at known times; `empty`: none."""
    with factory() as session, session.begin():
        cities = {}
        for name, country in COUNTRIES.items():
            city = City(name=name, name_key=city_key(name), country=country)
            session.add(city)
            cities[name] = city
        session.add(City(name="Kyiv", name_key="kyiv", country="UA"))
        campaign = Campaign(
            slug="spring",
            title="Spring appeal",
            template="appeal",
            from_address="appeals@campaign.example.org",
            status="sending",
            started_at=T0,
        )
        session.add(campaign)
        session.add(
            Campaign(slug="empty", template="appeal", from_address="appeals@campaign.example.org")
        )
        session.flush()
        for n, r in enumerate(RECIPIENTS):
            contact = Contact(
                email=r.email,
                name=r.name,
                title="Mayor",
                language=r.language,
                city_id=cities[r.city].id,
                organisation="City Hall",
                attributes={"population": str(10000 * (n + 1))},
                tags=["mayors"],
            )
            session.add(contact)
            session.flush()
            sent_event = next((e for e in r.events if e[1] == "sent"), None)
            message = Message(
                campaign_id=campaign.id,
                contact_id=contact.id,
                status=r.status,
                attempts=r.attempts,
                message_id=f"<spring.{n}@campaign.example.org>" if r.attempts else None,
                language=r.language,
                subject=f"Appeal to {r.city}",
                smtp_code=r.code,
                smtp_reply=r.reply,
                queued_at=T0,
                sent_at=T0 + dt.timedelta(minutes=sent_event[0]) if sent_event else None,
            )
            session.add(message)
            session.flush()
            for minute, kind, code, detail in r.events:
                session.add(
                    Event(
                        message_id=message.id,
                        campaign_id=campaign.id,
                        contact_id=contact.id,
                        at=T0 + dt.timedelta(minutes=minute),
                        kind=kind,
                        smtp_code=code,
                        detail=detail,
                        via="127.0.0.1:2525" if code else None,
                    )
                )
        session.add(
            Suppression(
                email="ida@example.org", reason="unsubscribed", source="reply", created_at=T0
            )
        )
        session.add(Suppression(email="ghost@example.org", reason="manual", source="phone call"))
    return Sample(slug="spring", empty_slug="empty", t0=T0, ended=T0 + dt.timedelta(minutes=65))
