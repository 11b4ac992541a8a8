"""Each recipient's time zone (mailer/zones.py): the rules in order, offline, and a bad zone in
an imported file (one rejected row naming file, row and column)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from conftest import Cli
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from mailer.errors import InvalidValueError
from mailer.models import Contact
from mailer.zones import (
    Gazetteer,
    Place,
    ZoneResolver,
    ZoneRule,
    canonical_zone,
    country_zone,
    parse_zone,
)

TODAY = dt.date(2024, 3, 1)


@pytest.fixture(scope="module")
def resolver() -> ZoneResolver:
    return ZoneResolver(default="Europe/Kyiv", today=TODAY)


def test_zone_names_are_checked_and_written_the_iana_way() -> None:
    assert canonical_zone("europe/kyiv") == "Europe/Kyiv"
    assert canonical_zone(" America/New York ") == "America/New_York"
    assert canonical_zone("Europe/Kiev") == "Europe/Kiev"  # the old name is a known link
    for bad in ("Mars/Olympus", "Berlin", "", "localtime", "../../etc/passwd"):
        with pytest.raises(ValueError, match="unknown time zone"):
            canonical_zone(bad)
    with pytest.raises(InvalidValueError) as caught:
        parse_zone("Europe/Atlantis", what="--window-zone")
    assert str(caught.value).startswith("--window-zone: unknown time zone 'Europe/Atlantis'")


@pytest.mark.parametrize(
    ("place", "zone", "rule"),
    [
        # The contact's own zone wins over anything their city would say.
        (Place(timezone="Asia/Tokyo", city="Berlin", country="DE"), "Asia/Tokyo", ZoneRule.CONTACT),
        (Place(city="Kyiv", country="UA"), "Europe/Kyiv", ZoneRule.CITY),
        (Place(city="Kiev", country="UA"), "Europe/Kyiv", ZoneRule.CITY),
        (Place(city="Simferopol", country="UA"), "Europe/Simferopol", ZoneRule.CITY),
        (Place(city="Lisboa", country="PT"), "Europe/Lisbon", ZoneRule.CITY),
        (Place(city="Ponta Delgada", country="PT"), "Atlantic/Azores", ZoneRule.CITY),
        (Place(city="New York", country="US"), "America/New_York", ZoneRule.CITY),
        (Place(city="Los Angeles", country="US"), "America/Los_Angeles", ZoneRule.CITY),
        (Place(city="Auckland", country="NZ"), "Pacific/Auckland", ZoneRule.CITY),
        # Germany keeps one time (Busingen keeps Berlin's): no city needed, none can disagree.
        (Place(city="Somewhere Small", country="DE"), "Europe/Berlin", ZoneRule.COUNTRY),
        (Place(country="JP"), "Asia/Tokyo", ZoneRule.COUNTRY),
        # The US keeps several times and the town is unknown: the campaign's default.
        (Place(city="Nowhereville", country="US"), "Europe/Kyiv", ZoneRule.DEFAULT),
        (Place(country="US"), "Europe/Kyiv", ZoneRule.DEFAULT),
        (Place(city="Berlin"), "Europe/Kyiv", ZoneRule.DEFAULT),
        (Place(), "Europe/Kyiv", ZoneRule.DEFAULT),
        # A bad zone kept by an older import is passed over, and said.
        (
            Place(timezone="Mars/Olympus", city="Tokyo", country="JP"),
            "Asia/Tokyo",
            ZoneRule.COUNTRY,
        ),
    ],
)
def test_zone_rules_in_order(
    resolver: ZoneResolver, place: Place, zone: str, rule: ZoneRule
) -> None:
    found = resolver.resolve(place)
    assert (found.zone, found.rule) == (zone, rule)
    if rule is ZoneRule.DEFAULT:
        assert found.note  # check lists why it fell back


def test_a_zone_or_country_from_an_older_import_counts() -> None:
    place = Place.of(
        timezone=None,
        attributes={"time_zone": "America/Chicago", "country": "us"},
        city=None,
        country=None,
        region=None,
    )
    assert place == Place(timezone="America/Chicago", country="US")


def test_same_named_towns_in_different_zones_are_told_apart_by_their_state(
    resolver: ZoneResolver,
) -> None:
    illinois = resolver.resolve(Place(city="Springfield", country="US", region="Illinois"))
    assert (illinois.zone, illinois.note) == ("America/Chicago", None)
    massachusetts = resolver.resolve(Place(city="Springfield", country="US", region="MA"))
    assert (massachusetts.zone, massachusetts.note) == ("America/New_York", None)
    unsure = resolver.resolve(Place(city="Springfield", country="US"))
    assert unsure.rule is ZoneRule.CITY and "the largest was taken" in (unsure.note or "")


def test_a_country_is_one_zone_only_when_all_of_it_keeps_one_time() -> None:
    assert country_zone("DE", year=2024) == "Europe/Berlin"
    assert country_zone("FR", year=2024) == "Europe/Paris"
    assert country_zone("PT", year=2024) is None  # the Azores
    assert country_zone("UA", year=2024) is None  # Crimea keeps Moscow time
    assert country_zone("US", year=2024) is None
    assert country_zone("XX", year=2024) is None


def test_the_gazetteer_can_be_given_its_cities() -> None:
    cities = {
        "1": {
            "name": "Testville",
            "countrycode": "US",
            "population": 100,
            "timezone": "America/Denver",
            "admin1code": "CO",
            "alternatenames": ["Tëstville Springs"],
        }
    }
    small = ZoneResolver(default="UTC", today=TODAY, gazetteer=Gazetteer(cities=cities))
    assert small.resolve(Place(city="Testville", country="US")).zone == "America/Denver"
    assert small.resolve(Place(city="Testville Springs", country="us")).zone == "America/Denver"


# --------------------------------------------------------------------------- import


def test_a_timezone_column_is_read_and_an_unknown_zone_rejects_its_row(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    file = workspace / "mayors.csv"
    file.write_text(
        "email,name,city,country,Time zone\n"
        "a@example.org,A,Berlin,DE,asia/tokyo\n"
        "b@example.org,B,Lisbon,PT,Mars/Olympus\n"
        "c@example.org,C,Tokyo,JP,\n",
        encoding="utf-8",
    )
    result = run("import", "contacts", str(file))
    assert result.exit_code == 0, result.output
    assert (
        f"{file.name}:3: Time zone: unknown time zone 'Mars/Olympus'; use an IANA name such as "
        "Europe/Berlin, America/New_York or Asia/Tokyo"
    ) in result.output
    assert "2 added" in result.output and "1 rejected" in result.output
    with Session(engine) as s:
        stored = {e: tz for e, tz in s.execute(select(Contact.email, Contact.timezone))}
    assert stored == {"a@example.org": "Asia/Tokyo", "c@example.org": None}

    listed = run.ok("contacts", "list", "--where", "timezone=asia/tokyo", "--format", "csv").output
    assert [line.split(",")[0] for line in listed.splitlines()[1:]] == ["a@example.org"]
    assert "  time zone     Asia/Tokyo" in run.ok("contacts", "show", "a@example.org").output
    strict = run("import", "contacts", str(file), "--strict")
    assert strict.exit_code == 1
    assert "Mars/Olympus" in strict.output


def test_a_zone_kept_as_an_attribute_by_an_older_import_is_read_from_the_database(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    from mailer import campaigns, timing
    from mailer.audience import Audience

    file = workspace / "old.csv"
    # "Zone" is no field: kept as the attribute `zone`, as an import before the column did.
    file.write_text(
        "email,city,country,Zone,Note\n"
        "a@example.org,Berlin,DE,Asia/Tokyo,x\n"
        "b@example.org,Berlin,DE,,y\n"
        "c@example.org,,,,z\n",
        encoding="utf-8",
    )
    run.ok("import", "contacts", str(file))
    folder = workspace / "templates" / "t"
    folder.mkdir(parents=True)
    (folder / "en.txt.j2").write_text("Subject: Hi\n\nHello\n", encoding="utf-8")
    with Session(engine) as s, s.begin():
        campaign = campaigns.create_campaign(
            s,
            slug="c",
            template="t",
            from_address="office@example.org",
            reply_to=None,
            audience=Audience(),
            title=None,
            default_language="en",
            templates_dir=workspace / "templates",
        )
        ids = list(s.scalars(select(Contact.id).order_by(Contact.id)))
        report = timing.zone_report(s, campaign, contact_ids=ids, today=TODAY)
    assert report.counts == {
        ZoneRule.CONTACT: 1,
        ZoneRule.CITY: 0,
        ZoneRule.COUNTRY: 1,
        ZoneRule.DEFAULT: 1,
    }
    assert report.fallbacks == [("c@example.org", "no time zone, city or country")]
