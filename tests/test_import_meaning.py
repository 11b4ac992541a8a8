"""What an import understands, and says it did not (issue 14, items 5 and 6): Ukrainian cities
across spellings, cities abroad across accents, headers and language names in the languages we
write in, columns it did not understand, letters a lossy save replaced by '?', changed contacts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Cli
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mailer.fields import KnownCity, UkrainianCities, name_skeletons, parse_language
from mailer.models import City, Contact, Partnership, Signatory, city_key


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def ukrainian_cities(factory: sessionmaker[Session]) -> list[str]:
    with factory() as session:
        return sorted(session.scalars(select(City.name).where(City.country == "UA")))


# --------------------------------------------------------------------------- Ukrainian cities


def test_spellings_of_kharkiv_are_one_city(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(
        tmp_path / "p.csv",
        "ukrainian_city,partner_city,partner_country\n"
        "Kharkiv,Lille,FR\n"
        "Charkiw,Nürnberg,DE\n"
        "Kharkov,Cincinnati,US\n"
        "Charkow,Bologna,IT\n"
        "Харків,Brno,CZ\n"
        "Charków,Poznań,PL\n"
        "Lwów,Wrocław,PL\n"
        "Kiew,München,DE\n",
    )
    result = run.ok("import", "partnerships", str(path))
    assert result.output.splitlines()[-1] == "p.csv: 8 added, 0 updated, 0 unchanged, 0 rejected"
    # Matched, not multiplied: each named as the known list writes it, with its region.
    assert ukrainian_cities(session_factory) == ["Kharkiv", "Kyiv", "Lviv"]
    with session_factory() as session:
        kharkiv = session.scalars(select(City).where(City.name == "Kharkiv")).one()
        ties = session.scalars(
            select(Partnership).where(Partnership.ukrainian_city_id == kharkiv.id)
        ).all()
    assert kharkiv.region == "Kharkiv Oblast" and len(ties) == 6


def test_unknown_ukrainian_city_is_rejected_with_a_suggestion_unless_new_city(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(
        tmp_path / "p.csv",
        "ukrainian_city,partner_city,partner_country\nKharkiw,Lille,FR\nKharkivsk,Lyon,FR\n"
        "Chortkiv,Kraków,PL\n",
    )
    result = run.ok("import", "partnerships", str(path))
    assert result.output.splitlines() == [
        "p.csv:3: ukrainian_city: unknown Ukrainian city 'Kharkivsk'; did you mean Kharkiv? "
        "(give --new-city to add it as a new city)",
        "p.csv:4: ukrainian_city: unknown Ukrainian city 'Chortkiv'; did you mean Kharkiv? "
        "(give --new-city to add it as a new city)",
        "p.csv: 1 added, 0 updated, 0 unchanged, 2 rejected",
    ]
    assert ukrainian_cities(session_factory) == ["Kharkiv"]
    only_new = write(
        tmp_path / "n.csv",
        "ukrainian_city,partner_city,partner_country\nChortkiv,Kraków,PL\n",
    )
    run.ok("import", "partnerships", str(only_new), "--new-city")
    assert ukrainian_cities(session_factory) == ["Chortkiv", "Kharkiv"]
    # Once added, it is known: its spellings match it from then on.
    again = write(
        tmp_path / "a.csv", "ukrainian_city,partner_city,partner_country\nChortkow,Lublin,PL\n"
    )
    assert "1 added" in run.ok("import", "partnerships", str(again)).output
    assert ukrainian_cities(session_factory) == ["Chortkiv", "Kharkiv"]


def test_signatories_match_their_city_too(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(
        tmp_path / "s.csv",
        "name,title,city\nIhor Terekhov,Mayor,Charkiw\nAndriy Sadovyi,Mayor,Львів\n"
        "Somebody,Mayor,Atlantyda\n",
    )
    result = run.ok("import", "signatories", str(path))
    assert result.output.splitlines()[0].startswith(
        "s.csv:4: city: unknown Ukrainian city 'Atlantyda'"
    )
    with session_factory() as session:
        cities = {s.name: s.city.name for s in session.scalars(select(Signatory)) if s.city}
    assert cities == {"Ihor Terekhov": "Kharkiv", "Andriy Sadovyi": "Lviv"}


def test_skeletons_are_a_spelling_match_not_a_hand_list() -> None:
    known = UkrainianCities(
        [
            KnownCity("Kharkiv", "Kharkiv Oblast", ("Харків",)),
            KnownCity("Chernihiv", None, ("Чернігів",)),
            KnownCity("Chernivtsi", None, ("Чернівці",)),
            KnownCity("Zaporizhzhia", None, ("Запоріжжя",)),
        ]
    )
    for spelling, city in [
        ("Kharkiv", "Kharkiv"),
        ("Charkiw", "Kharkiv"),
        ("Kharkov", "Kharkiv"),
        ("Charkow", "Kharkiv"),
        ("Харків", "Kharkiv"),
        ("Харьков", "Kharkiv"),
        ("Tschernihiw", "Chernihiv"),
        ("Czernihów", "Chernihiv"),
        ("Czerniowce", "Chernivtsi"),
        ("Saporischschja", "Zaporizhzhia"),
        ("Zaporoże", "Zaporizhzhia"),
    ]:
        assert known.match(spelling).name == city, spelling
    assert name_skeletons("Kharkiv") & name_skeletons("Charkiw")
    assert not name_skeletons("Chernihiv") & name_skeletons("Chernivtsi")
    with pytest.raises(ValueError, match="did you mean Chernihiv"):
        known.match("Chernyhivka")


def test_cities_abroad_match_across_case_and_accents(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    """The partnership says Wrocław; a Windows-1252 save of the contacts says Wroclaw."""
    write(
        tmp_path / "p.csv",
        "ukrainian_city,partner_city,partner_country\nLviv,Wrocław,PL\nKyiv,Łódź,PL\n"
        "Odesa,Gießen,DE\n",
    )
    run.ok("import", "partnerships", str(tmp_path / "p.csv"))
    path = write(
        tmp_path / "c.csv",
        "email;name;city;country\nm@wroclaw.example.org;Jacek;WROCLAW;PL\n"
        "m@lodz.example.org;Hanna;Lodz;PL\nm@giessen.example.org;Frank;Giessen;DE\n",
        "cp1252",
    )
    run.ok("import", "contacts", str(path))
    with session_factory() as session:
        cities = {c.email: c.city.name for c in session.scalars(select(Contact)) if c.city}
        abroad = sorted(session.scalars(select(City.name).where(City.country != "UA")))
    assert cities == {
        "m@wroclaw.example.org": "Wrocław",
        "m@lodz.example.org": "Łódź",
        "m@giessen.example.org": "Gießen",
    }
    assert abroad == ["Gießen", "Wrocław", "Łódź"]
    assert city_key("Wrocław") == city_key("WROCLAW") == "wroclaw"


# --------------------------------------------------------------------------- what it did not understand


def test_unrecognised_columns_are_named_with_the_map_that_reads_them(
    run: Cli, tmp_path: Path
) -> None:
    path = write(
        tmp_path / "u.csv",
        "E-Mail,Naam,Stadtname,Einwohner\na@example.org,Anna,Graz,291072\n",
    )
    result = run.ok("import", "contacts", str(path))
    assert result.output.splitlines() == [
        "u.csv: column 'Stadtname' is not a field: kept as the attribute stadtname; "
        "--map 'Stadtname=city' reads it as the city",
        "u.csv: column 'Einwohner' is not a field: kept as the attribute einwohner; "
        "--map 'Einwohner=FIELD' reads it as one of title, salutation, organisation, city, "
        "region, country, language, tags, timezone",
        "u.csv: 1 added, 0 updated, 0 unchanged, 0 rejected",
    ]
    partnerships = write(
        tmp_path / "p.csv",
        "ukrainian_city,partner_city,partner_country,Bemerkung\nLviv,Graz,AT,x\n",
    )
    result = run.ok("import", "partnerships", str(partnerships))
    assert result.output.splitlines()[0].startswith(
        "p.csv: column 'Bemerkung' is not a field: not read; --map 'Bemerkung=FIELD' reads it"
    )


def test_headers_and_language_names_in_our_languages(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(
        tmp_path / "m.csv",
        "Adresse e-mail;Maire;Fonction;Ville;Pays;Langue\n"
        "maire@ville.example.org;Anne Hidalgo;Maire;Paris;France;Français\n",
    )
    run.ok("import", "contacts", str(path))
    for header, language in [
        ("Bürgermeister;E-Mail-Adresse;Stadt;Land;Sprache", "Deutsch"),
        ("Burmistrz;Adres e-mail;Miasto;Kraj;Język", "Polski"),
        ("Sindaco;Indirizzo email;Città;Paese;Lingua", "Italiano"),
        ("Alcalde;Correo electrónico;Ciudad;País;Idioma", "Español"),
    ]:
        names = header.split(";")
        file = write(
            tmp_path / f"{language}.csv",
            f"{header}\nX {language};{language.lower()}@example.org;Town;Deutschland;{language}\n",
        )
        result = run.ok("import", "contacts", str(file))
        assert " 0 rejected" in result.output, (names, result.output)
    with session_factory() as session:
        stored = {c.email: (c.name, c.language) for c in session.scalars(select(Contact))}
    assert stored["maire@ville.example.org"] == ("Anne Hidalgo", "fr")
    assert stored["deutsch@example.org"] == ("X Deutsch", "de")
    assert stored["polski@example.org"] == ("X Polski", "pl")
    assert stored["italiano@example.org"] == ("X Italiano", "it")
    assert stored["español@example.org"] == ("X Español", "es")
    assert parse_language("Deutsch") == parse_language("German") == "de"
    assert parse_language("niemiecki") == "de"


def test_a_question_mark_where_a_letter_was_is_a_warning_with_the_row(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(
        tmp_path / "l.csv",
        "email,name,city,country,note\n"
        "a@example.org,Anna,?ód?,PL,\n"
        "b@example.org,Wroc?aw Office,Wrocław,PL,Why?\n"
        "what?is@example.org,Q,Kraków,PL,Is it? Yes.\n",
    )
    result = run.ok("import", "contacts", str(path))
    assert result.output.splitlines() == [
        "l.csv:2: city: warning: '?ód?' has '?' where a letter should be: the file was saved in "
        "an encoding without that letter (save it as CSV UTF-8 and import it again)",
        "l.csv:3: name: warning: 'Wroc?aw Office' has '?' where a letter should be: the file "
        "was saved in an encoding without that letter (save it as CSV UTF-8 and import it again)",
        "l.csv: column 'note' is not a field: kept as the attribute note; --map 'note=FIELD' "
        "reads it as one of title, salutation, organisation, region, language, tags, timezone",
        "l.csv: 3 added, 0 updated, 0 unchanged, 0 rejected",
    ]


def test_changed_names_and_cities_are_listed(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    first = write(
        tmp_path / "a.csv",
        "email,name,city,country\na@example.org,Anna Berg,Graz,AT\nb@example.org,Bo,Linz,AT\n"
        "c@example.org,,,\n",
    )
    run.ok("import", "contacts", str(first))
    second = write(
        tmp_path / "b.csv",
        "email,name,city,country\na@example.org,Anna Berg-Lind,Graz,AT\n"
        "b@example.org,Bo,Wien,AT\nc@example.org,Cy,Salzburg,AT\n",
    )
    result = run.ok("import", "contacts", str(second))
    assert result.output.splitlines() == [
        "b.csv:2: a@example.org: name changed from 'Anna Berg' to 'Anna Berg-Lind'",
        "b.csv:3: b@example.org: city changed from 'Linz' to 'Wien'",
        "b.csv: 0 added, 3 updated, 0 unchanged, 0 rejected",
    ]


def test_migration_rekeys_and_merges_cities_that_were_multiplied(tmp_path: Path) -> None:
    """A workspace made before: "Wrocław" and "Wroclaw" were two cities, each with a contact
    and a tie to Lviv; after `db upgrade` they are one, with both contacts and one tie."""
    from sqlalchemy import text

    from mailer import db

    engine = db.make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        db.upgrade(engine, revision="0001")
        with engine.begin() as conn:
            for city_id, name, key, country in [
                (1, "Wrocław", "wrocław", "PL"),
                (2, "Wroclaw", "wroclaw", "PL"),
                (3, "Lviv", "lviv", "UA"),
                (4, "L'viv", "l'viv", "UA"),
            ]:
                conn.execute(
                    text(
                        "INSERT INTO cities (id, name, name_key, country) VALUES (:i, :n, :k, :c)"
                    ),
                    {"i": city_id, "n": name, "k": key, "c": country},
                )
            for contact_id, city_id in [(1, 1), (2, 2)]:
                conn.execute(
                    text(
                        "INSERT INTO contacts (id, email, city_id, attributes, tags, created_at, "
                        "updated_at) VALUES (:i, :e, :c, '{}', '[]', '2026-01-01', '2026-01-01')"
                    ),
                    {"i": contact_id, "e": f"c{contact_id}@example.org", "c": city_id},
                )
            for tie_id, ua, partner in [(1, 3, 1), (2, 3, 2), (3, 4, 2)]:
                conn.execute(
                    text(
                        "INSERT INTO partnerships (id, ukrainian_city_id, partner_city_id, kind) "
                        "VALUES (:i, :u, :p, 'twin')"
                    ),
                    {"i": tie_id, "u": ua, "p": partner},
                )
        db.upgrade(engine)
        with engine.connect() as conn:
            cities = conn.execute(text("SELECT id, name, name_key FROM cities ORDER BY id")).all()
            contact_cities = conn.execute(text("SELECT city_id FROM contacts")).scalars().all()
            ties = conn.execute(
                text("SELECT ukrainian_city_id, partner_city_id FROM partnerships")
            ).all()
    finally:
        engine.dispose()
    assert [tuple(c) for c in cities] == [(1, "Wrocław", "wroclaw"), (3, "Lviv", "lviv")]
    assert contact_cities == [1, 1]
    assert [tuple(t) for t in ties] == [(3, 1)]
