"""Ukrainian letters (issue 13 item 8): the foreign city named in Ukrainian where a Ukrainian name
is known, Latin otherwise; a letter signed by the head of *that* Ukrainian city or community, or
by the collective signature, never by a national official listed under a city."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SEEDS, Cli
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from mailer import db
from mailer.fields import HEAD, OFFICIAL, signatory_role
from mailer.models import City, Signatory

FROM = "Campaign Office <office@example.org>"


@pytest.mark.parametrize(
    ("title", "role"),
    [
        ("Mayor of Kharkiv", HEAD),
        ("Mayor", HEAD),
        ("City Mayor of Lviv", HEAD),
        ("Acting Mayor of Mykolaiv", HEAD),
        ("Head of the Trostianets community", HEAD),
        ("Head of Trostianets Territorial Community", HEAD),
        ("Міський голова", HEAD),
        ("Харківський міський голова", HEAD),
        ("Сільський голова", HEAD),
        ("Селищний голова", HEAD),
        ("Голова Тростянецької громади", HEAD),
        ("Голова Тростянецької міської територіальної громади", HEAD),
        ("Мер Києва", HEAD),
        ("Minister of Communities and Territories Development of Ukraine", OFFICIAL),
        ("Міністр розвитку громад та територій України", OFFICIAL),
        ("Deputy Mayor of Kyiv", OFFICIAL),
        ("First Deputy Mayor", OFFICIAL),
        ("Заступник міського голови", OFFICIAL),
        ("Secretary of the City Council", OFFICIAL),
        ("Секретар міської ради", OFFICIAL),
        ("Head of the Kharkiv Regional State Administration", OFFICIAL),
        ("Голова Харківської обласної державної адміністрації", OFFICIAL),
        ("Голова обласної ради", OFFICIAL),
        ("Former Mayor of Kyiv", OFFICIAL),
        ("President of Ukraine", OFFICIAL),
        ("", OFFICIAL),
        (None, OFFICIAL),
    ],
)
def test_who_signs_for_a_city_is_decided_by_title(title: str | None, role: str) -> None:
    assert signatory_role(title=title, role=None) == role


def test_an_explicit_role_wins_over_the_title() -> None:
    assert signatory_role(title="Secretary of the City Council", role=HEAD) == HEAD
    assert signatory_role(title="Mayor of Kyiv", role=OFFICIAL) == OFFICIAL


# --------------------------------------------------------------------------- end to end


def _write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def _seeded(run: Cli, tmp_path: Path, contacts: str) -> None:
    run.ok("import", "signatories", str(SEEDS / "signatories.csv"))
    run.ok("import", "partnerships", str(SEEDS / "partnerships.csv"))
    run.ok("import", "contacts", str(_write(tmp_path / "contacts.csv", contacts)))
    run.ok(
        "campaign", "create", "c", "--template", "appeal", "--from", FROM,
        "--reply-to", "signatory",
    )  # fmt: skip


CONTACTS = (
    "email,name,title,salutation,city,country,language\n"
    "mer@krakow.example.org,Anna Nowak,Prezydent,Pani,Kraków,PL,uk\n"
    "ob@muenchen.example.org,Florian Brandstätter,Oberbürgermeister,Herr,München,DE,uk\n"
    "ob@bielefeld.example.org,Annegret Voss,Oberbürgermeisterin,Frau,Bielefeld,DE,uk\n"
    "mayor@toronto.example.org,Priya Raman,Mayor,Ms,Toronto,CA,en\n"
)


def test_a_ukrainian_letter_names_the_foreign_city_in_ukrainian(run: Cli, tmp_path: Path) -> None:
    _seeded(run, tmp_path, CONTACTS)
    krakow = run.ok("preview", "c", "--contact", "mer@krakow.example.org").output
    # Kraków's Ukrainian name comes from the partnerships import, Kyiv's (its oldest tie, 1993)
    # and Lviv's from the known list of Ukrainian cities.
    assert "Subject: Київ – Краків: звернення міських голів України" in krakow
    body = krakow.split("\n\n", 1)[1]
    assert "місто Краків пов’язують партнерські відносини з українськими містами: Київ" in body
    assert "Львів" in body
    assert "Kraków" not in krakow and "Lviv" not in krakow and "Kyiv" not in krakow
    # No Ukrainian name known for Bielefeld (its partnership gives none): Latin, as written.
    ties = _write(tmp_path / "ties.csv", "ukrainian_city,partner_city,partner_country\n"
                  "Lviv,Bielefeld,DE\n")  # fmt: skip
    run.ok("import", "partnerships", str(ties))
    bielefeld = run.ok("preview", "c", "--contact", "ob@bielefeld.example.org").output
    assert "Subject: Львів – Bielefeld: звернення" in bielefeld
    assert "адже Bielefeld і Львів — міста-партнери" in bielefeld
    check = run.ok("check", "c").output
    assert (
        "letters that name the recipient's city in Latin letters (no Ukrainian name known: a "
        "partner_city_uk column in the partnerships import gives one): 1\n"
        "      e.g. ob@bielefeld.example.org\n"
    ) in check


def test_a_national_official_listed_under_a_city_never_signs_for_it(
    run: Cli, tmp_path: Path
) -> None:
    # München's only tie is Kyiv, and the seed lists only the Minister under Kyiv.
    _seeded(run, tmp_path, CONTACTS)
    muenchen = run.ok("preview", "c", "--contact", "ob@muenchen.example.org").output
    assert "Chernyshov" not in muenchen and "Чернишов" not in muenchen
    assert "Reply-To" not in muenchen.split("\n\n", 1)[0]
    # The collective signature instead: mayors who signed.
    assert "Від імені міських голів, які підписали відкритий лист" in muenchen
    toronto = run.ok("preview", "c", "--contact", "mayor@toronto.example.org").output
    assert "Chernyshov" not in toronto and "Minister" not in toronto
    assert "On behalf of the mayors who signed the open letter" in toronto
    check = run("check", "c")
    assert check.exit_code == 0, check.output
    assert (
        "recipients whose partner city Kyiv has no signatory: their letter is signed on behalf "
        "of all signatories (no Reply-To): 3"
    ) in check.output


def test_the_head_of_the_city_signs_and_the_collective_signature_lists_heads_first(
    run: Cli, tmp_path: Path
) -> None:
    signatories = _write(
        tmp_path / "signatories.csv",
        "name,title,city,email\n"
        "Oleksiy Chernyshov,Minister of Communities and Territories Development of Ukraine,"
        "Kyiv,minister@communities.example.org\n"
        "Deputy Person,Secretary of the City Council,Lviv,secretary@lviv.example.org\n"
        "Andriy Sadovyi,Mayor of Lviv,Lviv,mayor@lviv.example.org\n"
        "Igor Terekhov,Mayor of Kharkiv,Kharkiv,\n"
        "Roman Klichuk,Mayor of Chernivtsi,Chernivtsi,\n",
    )
    run.ok("import", "signatories", str(signatories))
    run.ok("import", "partnerships", str(SEEDS / "partnerships.csv"))
    run.ok(
        "import", "contacts",
        str(_write(tmp_path / "c.csv", "email,city,country,language\n"
                   "a@wroclaw.example.org,Wrocław,PL,en\nb@toronto.example.org,Toronto,CA,en\n")),
    )  # fmt: skip
    run.ok("campaign", "create", "c", "--template", "appeal", "--from", FROM,
           "--reply-to", "signatory")  # fmt: skip
    wroclaw = run.ok("preview", "c", "--contact", "a@wroclaw.example.org").output
    assert "Reply-To: Andriy Sadovyi <mayor@lviv.example.org>" in wroclaw
    assert "Andriy Sadovyi\nMayor of Lviv\n" in wroclaw
    toronto = run.ok("preview", "c", "--contact", "b@toronto.example.org").output
    signature = toronto.split("On behalf of the mayors who signed", 1)[1]
    assert signature.index("Andriy Sadovyi") < signature.index("Igor Terekhov")
    assert "Chernyshov" not in signature and "Deputy Person" not in signature


def test_a_role_column_says_who_signs(run: Cli, tmp_path: Path) -> None:
    signatories = _write(
        tmp_path / "signatories.csv",
        "name,title,city,role\n"
        "Deputy Person,Secretary of the City Council,Lviv,head\n"
        "Andriy Sadovyi,Mayor of Lviv,Lviv,official\n"
        "Someone,Mayor of Odesa,Odesa,chairman\n",
    )
    result = run("import", "signatories", str(signatories))
    assert result.exit_code == 0, result.output
    assert "signatories.csv:4: role: 'chairman' is not a role: use head (signs for their " in (
        result.output
    )
    run.ok("import", "partnerships", str(SEEDS / "partnerships.csv"))
    run.ok("import", "contacts", str(_write(tmp_path / "c.csv", "email,city,country\n"
                                            "a@wroclaw.example.org,Wrocław,PL\n")))  # fmt: skip
    run.ok("campaign", "create", "c", "--template", "appeal", "--from", FROM)
    wroclaw = run.ok("preview", "c", "--contact", "a@wroclaw.example.org").output
    assert "Deputy Person\nSecretary of the City Council\n" in wroclaw


def test_partnerships_import_stores_ukrainian_names(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    first = _write(
        tmp_path / "ties.csv",
        "ukrainian_city,partner_city,partner_country,kind,name_uk\n"
        "Lviv,Kraków,PL,partner,Краків\n"
        "Kharkiv,Nürnberg,DE,twin,\n"
        "Odesa,Marseille,FR,twin,Marseille\n",
    )
    result = run("import", "partnerships", str(first))
    assert result.exit_code == 0, result.output
    assert (
        "ties.csv:4: name_uk: 'Marseille' is not a Ukrainian name (no Cyrillic letter); leave "
        "it empty when none is known" in result.output
    )
    with db.transaction(session_factory) as s:
        names = dict(s.execute(select(City.name, City.name_uk)).all())
    assert names["Kraków"] == "Краків"
    assert names["Nürnberg"] is None
    # The Ukrainian cities take their name from the known list.
    assert names["Lviv"] == "Львів" and names["Kharkiv"] == "Харків"
    again = _write(
        tmp_path / "ties2.csv",
        "Ukrainian city,Partner,Country,Partner city (Ukrainian)\n"
        "Lviv,Krakow,PL,Краків\nKharkiv,Nurnberg,DE,Нюрнберг\n",
    )
    result = run.ok("import", "partnerships", str(again))
    assert "1 unchanged" in result.output and "1 updated" in result.output, result.output
    with db.transaction(session_factory) as s:
        assert s.scalar(select(City.name_uk).where(City.name == "Nürnberg")) == "Нюрнберг"


def test_migration_0005_names_the_known_ukrainian_cities(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        db.upgrade(engine, revision="0004_event_actor")
        with engine.begin() as conn:
            for city_id, name, key, country in [
                (1, "Kyiv", "kyiv", "UA"),
                (2, "Kraków", "krakow", "PL"),
                (3, "Trostianets", "trostianets", "UA"),
                (4, "Somewhere", "somewhere", "UA"),
            ]:
                conn.execute(
                    text(
                        "INSERT INTO cities (id, name, name_key, country) VALUES (:i, :n, :k, :c)"
                    ),
                    {"i": city_id, "n": name, "k": key, "c": country},
                )
            conn.execute(
                text(
                    "INSERT INTO signatories (id, name, title, city_id) VALUES (1, 'M', 'Minister', 1)"
                )
            )
        db.upgrade(engine)
        factory = db.session_factory(engine)
        with db.transaction(factory) as s:
            names = dict(s.execute(select(City.id, City.name_uk)).all())
            role = s.scalar(select(Signatory.role))
    finally:
        engine.dispose()
    assert names == {1: "Київ", 2: None, 3: "Тростянець", 4: None}
    assert role is None  # decided by the title when read
