from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mailer import audience
from mailer.audience import Audience, parse_where
from mailer.errors import InvalidValueError
from mailer.models import City, Contact, ContactTag, SuppressionReason, city_key


def _add(
    session: Session,
    email: str,
    *,
    city: City,
    language: str,
    tags: tuple[str, ...] = (),
    **attrs: str,
) -> None:
    contact = Contact(
        email=email, language=language, city=city, attributes=dict(attrs), tags=list(tags)
    )
    session.add(contact)
    session.flush()
    session.add_all(ContactTag(contact_id=contact.id, tag=t) for t in tags)


@pytest.fixture
def people(session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    with session_factory.begin() as s:
        krakow = City(name="Kraków", name_key=city_key("Kraków"), country="PL")
        wien = City(name="Wien", name_key=city_key("Wien"), country="AT", region="Wien")
        berlin = City(name="Berlin", name_key=city_key("Berlin"), country="DE")
        _add(s, "a@krakow.example.org", city=krakow, language="pl", tags=("mayor",), size="big")
        _add(s, "b@wien.example.org", city=wien, language="de-AT", tags=("mayor", "eu"))
        _add(s, "c@berlin.example.org", city=berlin, language="de", tags=("press",), size="big")
    return session_factory


def _emails(factory: sessionmaker[Session], aud: Audience) -> list[str]:
    with factory() as s:
        return [c.email for c in s.scalars(audience.contacts_query(s, aud))]


def test_repeated_field_is_alternative_and_fields_combine(people: sessionmaker[Session]) -> None:
    either = Audience(where=parse_where(["country=pl", "country=AT"]))
    assert _emails(people, either) == ["a@krakow.example.org", "b@wien.example.org"]
    both = Audience(where=parse_where(["country=PL", "size=big"]))
    assert _emails(people, both) == ["a@krakow.example.org"]


def test_language_matches_regional_variants_and_city_ignores_accents(
    people: sessionmaker[Session],
) -> None:
    assert _emails(people, Audience(where=parse_where(["language=de"]))) == [
        "b@wien.example.org",
        "c@berlin.example.org",
    ]
    assert _emails(people, Audience(where=parse_where(["City=krakow"]))) == ["a@krakow.example.org"]


def test_tags_must_all_match(people: sessionmaker[Session]) -> None:
    assert _emails(people, Audience(tags=("mayor", "eu"))) == ["b@wien.example.org"]


def test_count_counts_the_matching_contacts(people: sessionmaker[Session]) -> None:
    with people() as s:
        assert audience.count(s, Audience()) == 3
        assert audience.count(s, Audience(tags=("mayor",))) == 2
        assert audience.count(s, Audience(where=parse_where(["country=FR"]))) == 0


def test_unknown_field_is_refused(people: sessionmaker[Session]) -> None:
    with people() as s, pytest.raises(InvalidValueError, match="unknown field 'mood'"):
        audience.count(s, Audience(where=parse_where(["mood=happy"])))


def test_where_without_equals_is_refused() -> None:
    with pytest.raises(InvalidValueError, match="FIELD=VALUE"):
        parse_where(["country"])


def test_audience_round_trips_through_json() -> None:
    aud = Audience(where=(("country", "DE"),), tags=("mayor",))
    assert Audience.from_json(aud.to_json()) == aud
    assert aud.describe() == "country=DE and tag=mayor"


def test_suppression_keeps_first_reason(people: sessionmaker[Session]) -> None:
    with people.begin() as s:
        assert (
            audience.suppress(
                s, emails=["A@Krakow.example.org"], reason=SuppressionReason.MANUAL, source="t"
            )
            == 1
        )
        assert (
            audience.suppress(
                s, emails=["a@krakow.example.org"], reason=SuppressionReason.HARD_BOUNCE, source="t"
            )
            == 0
        )
    with people() as s:
        found = audience.suppression_for(s, "a@KRAKOW.example.org")
        assert found is not None and found.reason == "manual"
        assert audience.suppressed_among(s, ["a@krakow.example.org", "b@wien.example.org"]) == {
            "a@krakow.example.org"
        }


def test_contact_id_pages_walk_the_audience_in_id_order(people: sessionmaker[Session]) -> None:
    with people.begin() as s:
        city = s.scalars(select(City).where(City.country == "DE")).one()
        for i in range(7):
            _add(s, f"m{i}@berlin.example.org", city=city, language="de", tags=("mayor",))
    with people() as s:
        everyone = audience.contact_ids(s, Audience())
        pages = list(audience.contact_id_pages(s, Audience(), size=4))
        assert [len(p) for p in pages] == [4, 4, 2]
        assert [i for p in pages for i in p] == everyone
        # The filter applies on every page, not only the first.
        mayors = list(audience.contact_id_pages(s, Audience(tags=("mayor",)), size=3))
        assert [i for p in mayors for i in p] == audience.contact_ids(s, Audience(tags=("mayor",)))
        assert [len(p) for p in mayors] == [3, 3, 3]
        # A page size that divides the audience ends without an empty page.
        assert [len(p) for p in audience.contact_id_pages(s, Audience(), size=5)] == [5, 5]
        assert list(audience.contact_id_pages(s, Audience(where=parse_where(["country=FR"])))) == []


def test_contact_id_pages_allow_the_transaction_to_end_between_pages(
    people: sessionmaker[Session],
) -> None:
    # queue_audience ends its read transaction after each page; the walk must go on regardless.
    seen: list[int] = []
    with people() as s:
        for page in audience.contact_id_pages(s, Audience(), size=1):
            s.rollback()
            seen.extend(page)
        assert seen == audience.contact_ids(s, Audience())
