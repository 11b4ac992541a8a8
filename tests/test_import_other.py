"""Partnerships, signatories, suppressions and `contacts list`: real files, real SQLite."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import Cli
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mailer.models import City, ImportRecord, Partnership, Signatory, Suppression
from mailer.review import csv_cell
from mailer.tables import read_table


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# --------------------------------------------------------------------------- partnerships


def test_partnerships_create_cities_and_upsert(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(
        tmp_path / "p.csv",
        "ukrainian_city,partner_city,partner_country,kind,since,note,ukrainian_region\n"
        "Kharkiv,Nürnberg,DE,twinning,1990,,Kharkiv Oblast\n"
        "Lviv,Kraków,Poland,Sister City,1995,Old friends,\n"
        "Lviv,Wrocław,PL,,,,\n",
    )
    result = run.ok("import", "partnerships", str(path))
    assert result.output.splitlines()[-1] == "p.csv: 3 added, 0 updated, 0 unchanged, 0 rejected"
    with session_factory() as session:
        ties = {
            (p.ukrainian_city.name, p.partner_city.name): (p.kind, p.since, p.note)
            for p in session.scalars(select(Partnership))
        }
        kharkiv = session.scalars(select(City).where(City.name == "Kharkiv")).one()
        krakow = session.scalars(select(City).where(City.name == "Kraków")).one()
    assert ties == {
        ("Kharkiv", "Nürnberg"): ("twin", 1990, None),
        ("Lviv", "Kraków"): ("sister", 1995, "Old friends"),
        ("Lviv", "Wrocław"): ("partner", None, None),
    }
    assert (kharkiv.country, kharkiv.region) == ("UA", "Kharkiv Oblast")
    assert krakow.country == "PL"
    again = run.ok("import", "partnerships", str(path))
    assert "0 added, 0 updated, 3 unchanged" in again.output
    changed = write(
        tmp_path / "p2.csv",
        "Ukrainian City;Partner City;Partner Country;Kind;Since\nLviv;Krakow;PL;twin;1995\n",
    )
    # "Krakow" finds "Kraków": city names are matched accent-insensitively.
    assert (
        "0 added, 1 updated, 0 unchanged" in run.ok("import", "partnerships", str(changed)).output
    )


def test_partnership_rows_are_validated(run: Cli, tmp_path: Path) -> None:
    path = write(
        tmp_path / "bad.csv",
        "ukrainian_city,partner_city,partner_country,kind,since,note\n"
        "Kharkiv,Lille,FR,twin,1978,\n"
        "Kharkiv,Lille,FR,twin,1978,\n"
        "Kyiv,Atlantis,XX,twin,2000,\n"
        "Kyiv,Paris,FR,marriage,2000,\n"
        "Kyiv,Rome,IT,twin,1850,\n"
        "Kyiv,Berlin,DE,twin,soon,\n"
        ",Madrid,ES,twin,2001,\n",
    )
    result = run.ok("import", "partnerships", str(path))
    assert result.output.splitlines() == [
        "bad.csv:3: partner_city: duplicate of row 2",
        "bad.csv:4: partner_country: unknown country 'XX'; use an ISO code like DE or an English name",
        "bad.csv:5: kind: unknown kind 'marriage'; use one of twin, sister, partner, friendship, cooperation",
        "bad.csv:6: since: 1850 is not a year between 1900 and "
        + result.output.split("between 1900 and ")[1].split("\n")[0],
        "bad.csv:7: since: 'soon' is not a year",
        "bad.csv:8: ukrainian_city: empty",
        "bad.csv: 1 added, 0 updated, 0 unchanged, 6 rejected",
    ]


def test_partnerships_strict_writes_nothing(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(
        tmp_path / "p.csv",
        "ukrainian_city,partner_city,partner_country,kind\nLviv,Kraków,PL,twin\nLviv,X,ZZ,twin\n",
    )
    result = run("import", "partnerships", str(path), "--strict")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith("Error: p.csv: 1 row(s) rejected")
    with session_factory() as session:
        assert session.scalars(select(City)).all() == []
        assert session.scalars(select(ImportRecord)).all() == []


# --------------------------------------------------------------------------- signatories


def test_signatories_upsert_by_name_and_city(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(
        tmp_path / "s.csv",
        "name,title,city,email\n"
        "Ihor Terekhov,Mayor of Kharkiv,Kharkiv,\n"
        "Andriy Sadovyi,Mayor of Lviv,Lviv,mayor@lviv.example.org\n"
        "Somebody,Mayor,Odesa,not-an-address\n"
        "ihor terekhov,Mayor,Kharkiv,\n",
    )
    result = run.ok("import", "signatories", str(path))
    assert result.output.splitlines() == [
        "s.csv:4: email: 'not-an-address': An email address must have an @-sign.",
        "s.csv:5: name: duplicate of row 2",
        "s.csv: 2 added, 0 updated, 0 unchanged, 2 rejected",
    ]
    update = write(
        tmp_path / "u.csv",
        "Full name,Position,Municipality,E-mail\n"
        "Ihor Terekhov,Mayor of Kharkiv,Kharkiv,reply@kharkiv.example.org\n",
    )
    assert "0 added, 1 updated" in run.ok("import", "signatories", str(update)).output
    with session_factory() as session:
        people = {s.name: s for s in session.scalars(select(Signatory))}
    assert people["Ihor Terekhov"].email == "reply@kharkiv.example.org"
    assert people["Ihor Terekhov"].city is not None
    assert people["Ihor Terekhov"].city.country == "UA"
    assert people["Andriy Sadovyi"].email == "mayor@lviv.example.org"


# --------------------------------------------------------------------------- suppressions


def test_suppress_add_list_import(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    result = run.ok("suppress", "add", "A@Example.org", "b@example.org", "--reason", "manual")
    assert result.output == "2 address(es) suppressed, 0 already suppressed.\n"
    result = run("suppress", "add", "nope", "--reason", "manual")
    assert result.exit_code == 1 and result.output.startswith("Error: not an email address")
    result = run("suppress", "add", "c@example.org", "--reason", "bored")
    assert result.exit_code == 1 and "unknown suppression reason 'bored'" in result.output
    path = write(
        tmp_path / "unsub.csv",
        "E-mail,Reason\na@example.org,\nc@example.org,hard-bounce\nd@example.org,\nbroken,\n",
    )
    result = run.ok("suppress", "import", str(path), "--reason", "unsubscribed")
    assert result.output.splitlines() == [
        "unsub.csv:5: E-mail: 'broken': An email address must have an @-sign.",
        "unsub.csv: 2 suppressed, 1 already suppressed, 1 rejected",
    ]
    with session_factory() as session:
        reasons = {e: r for e, r in session.execute(select(Suppression.email, Suppression.reason))}
    assert reasons == {
        "a@example.org": "manual",
        "b@example.org": "manual",
        "c@example.org": "hard_bounce",
        "d@example.org": "unsubscribed",
    }
    listing = run.ok("suppress", "list").output.splitlines()
    assert listing[-1] == "4 suppressed address(es)"
    assert listing[0].startswith("a@example.org  manual  cli  ")


# --------------------------------------------------------------------------- contacts list


@pytest.fixture
def listed(run: Cli, tmp_path: Path) -> Cli:
    path = write(
        tmp_path / "c.csv",
        "email,name,city,country,language,tags,district\n"
        "anna@example.org,Anna Berg,Graz,AT,de,mayor,North\n"
        'bob@example.org,=HYPERLINK("http://x.test"),Leeds,GB,en,press,South\n'
        "olena@example.org,Олена,Lviv,UA,uk,mayor;ua,North\n",
    )
    run.ok("import", "contacts", str(path))
    run.ok("suppress", "add", "bob@example.org", "--reason", "unsubscribed")
    return run


def test_contacts_list_table_filters(listed: Cli) -> None:
    out = listed.ok("contacts", "list").output.splitlines()
    assert out[0].split() == [
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
    ]
    assert out[-1] == "3 contact(s)"
    out = listed.ok("contacts", "list", "--where", "country=at", "--where", "country=UA").output
    assert "anna@example.org" in out and "olena@example.org" in out and "bob@" not in out
    out = listed.ok("contacts", "list", "--tag", "mayor", "--where", "district=North").output
    assert out.splitlines()[-1] == "2 contact(s)"
    out = listed.ok("contacts", "list", "--where", "language=fr").output
    assert out == "No contacts match (language=fr).\n"
    result = listed("contacts", "list", "--where", "shoe_size=42")
    assert result.exit_code == 1 and result.output.startswith("Error: --where shoe_size=42")


def test_contacts_list_csv_is_spreadsheet_safe(listed: Cli) -> None:
    out = listed.ok("contacts", "list", "--format", "csv").output
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["email"] for r in rows] == [
        "anna@example.org",
        "bob@example.org",
        "olena@example.org",
    ]
    assert rows[1]["name"] == '\'=HYPERLINK("http://x.test")'
    assert rows[1]["suppressed"] == "yes" and rows[0]["suppressed"] == ""
    assert rows[2]["tags"] == "mayor;ua" and rows[2]["name"] == "Олена"
    assert [csv_cell(v) for v in ("+1", "-x", "@a", "\tq", "ok")] == [
        "'+1",
        "'-x",
        "'@a",
        "'\tq",
        "ok",
    ]


def test_contacts_list_json_is_one_array(listed: Cli) -> None:
    data = json.loads(listed.ok("contacts", "list", "--format", "json", "--tag", "mayor").output)
    assert [d["email"] for d in data] == ["anna@example.org", "olena@example.org"]
    assert data[0]["attributes"] == {"district": "North"}
    assert (
        data[1]["city"] == "Lviv"
        and data[1]["country"] == "UA"
        and data[1]["tags"] == ["mayor", "ua"]
    )
    assert (
        json.loads(listed.ok("contacts", "list", "--format", "json", "--tag", "none").output) == []
    )


# --------------------------------------------------------------------------- read_table


def test_read_table_yields_rows_by_header(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.csv", "email;reason\r\na@example.org;manual\r\n\r\nb@example.org;\r\n"
    )
    assert list(read_table(path)) == [
        (2, {"email": "a@example.org", "reason": "manual"}),
        (4, {"email": "b@example.org", "reason": ""}),
    ]
