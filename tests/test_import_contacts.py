"""`mailer import contacts`: real files in every shape spreadsheets produce, real SQLite/PostgreSQL."""

from __future__ import annotations

import csv
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import email_validator
import openpyxl
import pytest
from click.testing import CliRunner
from conftest import SEEDS, Cli
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from mailer import db, importers
from mailer.cli import cli
from mailer.errors import ImportFileError
from mailer.importers import EmailChecker, StrictImportFailed, _FirstRows, import_contacts
from mailer.models import City, Contact, ContactTag, ImportRecord, Suppression


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def contacts(factory: sessionmaker[Session]) -> dict[str, Contact]:
    with factory() as session:
        return {c.email: c for c in session.scalars(select(Contact))}


def count(factory: sessionmaker[Session], model: type) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


UKRAINIAN = """\
ім'я,посада,місто,країна,email
Олександр Шевченко,Міський голова,Київ,UA,oleksandr@kyiv.example.org
Марія Коваленко,Секретар ради,Харків,UA,maria@kharkiv.example.org
Юрій Ткачук,Заступник голови,Львів,UA,yurii@lviv.example.org
Ірина Бондаренко,Радниця,Одеса,UA,iryna@odesa.example.org
Євген Гнатюк,Голова громади,Житомир,UA,yevhen@zhytomyr.example.org
"""

WESTERN = """\
Name;Funktion;Stadt;Land;E-Mail;Sprache
Jürgen Müller;Oberbürgermeister;München;Deutschland;j.mueller@muenchen.example.org;de
José Peña;Alcalde;Málaga;Spain;jose.pena@malaga.example.org;es
Änne Groß;Bürgermeisterin;Köln;DE;aenne.gross@koeln.example.org;de-DE
Iñigo Núñez;Teniente de alcalde;Córdoba;ES;inigo@cordoba.example.org;es
François Lefèvre;Maire;Besançon;France;francois@besancon.example.org;fr
"""


# --------------------------------------------------------------------------- encodings & layout


def test_cp1251_ukrainian_file_imports_without_encoding(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(tmp_path / "ua.csv", UKRAINIAN, "cp1251")
    result = run.ok("import", "contacts", str(path))
    assert "ua.csv: 5 added, 0 updated, 0 unchanged, 0 rejected" in result.output
    stored = contacts(session_factory)
    assert stored["maria@kharkiv.example.org"].name == "Марія Коваленко"
    assert stored["maria@kharkiv.example.org"].title == "Секретар ради"
    assert stored["yevhen@zhytomyr.example.org"].city is not None
    assert stored["yevhen@zhytomyr.example.org"].city.name == "Житомир"
    assert stored["yevhen@zhytomyr.example.org"].city.country == "UA"
    assert stored["iryna@odesa.example.org"].name == "Ірина Бондаренко"  # "ім'я" means name


def test_cp1252_german_spanish_file_imports_without_encoding(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(tmp_path / "west.csv", WESTERN, "cp1252")
    result = run.ok("import", "contacts", str(path))
    assert "west.csv: 5 added, 0 updated, 0 unchanged, 0 rejected" in result.output
    stored = contacts(session_factory)
    jose = stored["jose.pena@malaga.example.org"]
    assert (jose.name, jose.title, jose.language) == ("José Peña", "Alcalde", "es")
    assert jose.city is not None and (jose.city.name, jose.city.country) == ("Málaga", "ES")
    aenne = stored["aenne.gross@koeln.example.org"]
    assert aenne.name == "Änne Groß" and aenne.language == "de-DE"
    assert stored["j.mueller@muenchen.example.org"].city.country == "DE"  # type: ignore[union-attr]
    assert stored["francois@besancon.example.org"].city.name == "Besançon"  # type: ignore[union-attr]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_unicode_encodings_with_and_without_bom(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session], encoding: str
) -> None:
    text = WESTERN + "Олена Пчілка;Поетка;Гадяч;UA;olena@hadiach.example.org;uk\n"
    path = write(tmp_path / "list.csv", text, encoding)
    run.ok("import", "contacts", str(path))
    stored = contacts(session_factory)
    assert stored["jose.pena@malaga.example.org"].name == "José Peña"
    assert stored["olena@hadiach.example.org"].name == "Олена Пчілка"
    # The BOM must not stick to the first header name ("Name" stays the name column).
    assert all("\ufeff" not in key for c in stored.values() for key in c.attributes)


def test_ambiguous_legacy_encoding_asks_for_encoding(run: Cli, tmp_path: Path) -> None:
    # Bytes that read as mixed-script gibberish in both cp1251 and cp1252.
    path = tmp_path / "odd.csv"
    path.write_bytes(b"email,name\nx@example.org,\xb3\xf0\xaa\xbf\xb9q\xe4\xa6\xd7z\n")
    result = run("import", "contacts", str(path))
    assert result.exit_code == 1
    assert result.output.startswith("Error: odd.csv: cannot tell the file's encoding")
    assert "--encoding" in result.output
    result = run("import", "contacts", str(path), "--encoding", "latin-1")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_delimiters_are_sniffed(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session], delimiter: str
) -> None:
    rows = [
        ["email", "name", "city", "note"],
        ["a@example.org", "Anna, Maria; Smith", "Lviv", "tab\tfree|pipe"],
        ["b@example.org", "Bob", "Kyiv", "plain"],
    ]
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL).writerows(rows)
    result = run("import", "contacts", str(path))
    assert result.exit_code == 0, result.output
    stored = contacts(session_factory)
    # The tab inside a cell is parsed right, then rejected as a control character.
    assert "d.csv:2: note: contains a control character (tab)" in result.output
    assert stored["b@example.org"].attributes == {"note": "plain"}
    result = run.ok("import", "contacts", str(path), "--delimiter", delimiter, "--dry-run")
    assert "1 rejected" in result.output


def test_quoted_delimiters_and_newlines(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(
        tmp_path / "q.csv",
        "email,name,address\r\n"
        'a@example.org,"Doe, Jane","Rathausplatz 1; Wien"\r\n'
        'b@example.org,Bob,"Line one\r\nLine two"\r\n'
        'c@example.org,"Carla ""the mayor"" Rossi",Roma\r\n'
        'd@example.org,"Dora\nInjected: header",Roma\r\n',
    )
    result = run.ok("import", "contacts", str(path))
    # A line break is kept in a free column (as LF), refused in a field that reaches headers.
    assert "q.csv:5: name: contains a control character (LF)" in result.output
    assert "3 added, 0 updated, 0 unchanged, 1 rejected" in result.output
    stored = contacts(session_factory)
    assert stored["a@example.org"].name == "Doe, Jane"
    assert stored["a@example.org"].attributes == {"address": "Rathausplatz 1; Wien"}
    assert stored["b@example.org"].attributes == {"address": "Line one\nLine two"}
    # Row numbers stay spreadsheet rows even after a cell spanning two lines.
    assert stored["c@example.org"].name == 'Carla "the mayor" Rossi'


@pytest.mark.parametrize("delimiter", [",", "\t"], ids=["csv", "tsv"])
def test_cell_with_a_line_break_imports_as_one_value(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session], delimiter: str
) -> None:
    """Excel's Alt+Enter in a postal address, saved as CSV or TSV (issue 13, item 1)."""
    rows = [
        ["email", "name", "city", "country", "postal_address"],
        ["a@example.org", "Anna Berg", "Malmö", "SE", "Stadshuset\nAugust Palms plats 1"],
        ["b@example.org", "Bo Ek", "Lund", "SE", "Stortorget 7"],
    ]
    path = tmp_path / ("list.csv" if delimiter == "," else "list.tsv")
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, delimiter=delimiter, lineterminator="\r\n").writerows(rows)
    assert b'"Stadshuset\nAugust' in path.read_bytes()
    result = run.ok("import", "contacts", str(path))
    assert result.output.splitlines()[-1].endswith("2 added, 0 updated, 0 unchanged, 0 rejected")
    stored = contacts(session_factory)
    anna = stored["a@example.org"]
    assert anna.attributes == {"postal_address": "Stadshuset\nAugust Palms plats 1"}
    assert anna.city is not None and anna.city.name == "Malmö"
    assert stored["b@example.org"].attributes == {"postal_address": "Stortorget 7"}


def test_header_synonyms_attributes_country_language_tags(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(
        tmp_path / "s.csv",
        "E-Mail,Full Name,Position,Municipality,State,Country,Lang,Org,Anrede,Tags,"
        "Population (2020),Twin since\n"
        "Mayor@Example.ORG ,  Anna Berg ,Mayor,Graz,Steiermark,Austria,de-at,City of Graz,"
        "Sehr geehrte Frau Bürgermeisterin,wave-1; mayor,291072,2011\n"
        "office@example.org,,,Leeds,,UK,English,,,,,\n",
    )
    run.ok("import", "contacts", str(path), "--tag", "europe")
    stored = contacts(session_factory)
    anna = stored["mayor@example.org"]
    assert (anna.name, anna.title, anna.organisation, anna.language) == (
        "Anna Berg",
        "Mayor",
        "City of Graz",
        "de-AT",
    )
    assert anna.salutation == "Sehr geehrte Frau Bürgermeisterin"
    assert anna.city is not None
    assert (anna.city.name, anna.city.region, anna.city.country) == ("Graz", "Steiermark", "AT")
    assert anna.attributes == {"population_2020": "291072", "twin_since": "2011"}
    assert anna.tags == ["europe", "mayor", "wave-1"]
    office = stored["office@example.org"]
    assert office.city is not None and office.city.country == "GB"
    assert office.language == "en" and office.tags == ["europe"]
    with session_factory() as session:
        tags = set(session.execute(select(ContactTag.contact_id, ContactTag.tag)))
    assert tags == {
        (anna.id, "europe"),
        (anna.id, "mayor"),
        (anna.id, "wave-1"),
        (office.id, "europe"),
    }


def test_two_columns_meaning_the_same_field(run: Cli, tmp_path: Path) -> None:
    path = write(tmp_path / "two.csv", "Email,E-mail\na@example.org,b@example.org\n")
    result = run("import", "contacts", str(path))
    assert result.exit_code == 1
    assert result.output == (
        "Error: two.csv: columns 'Email' and 'E-mail' both mean email; rename one or pick "
        "with --map COLUMN=email\n"
    )
    run.ok("import", "contacts", str(path), "--map", "E-mail=email")
    result = run("import", "contacts", str(path), "--tag", "x" * 101)
    assert result.exit_code == 1 and "--tag" in result.output


def test_map_option(run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]) -> None:
    path = write(tmp_path / "m.csv", "E-Post,Kontakt person,Kommune\na@example.org,Ole,Bergen\n")
    result = run("import", "contacts", str(path))
    assert result.exit_code == 1
    assert result.output == (
        "Error: m.csv: no email column (found: E-Post, Kontakt person, Kommune); "
        "use --map COLUMN=email\n"
    )
    run.ok("import", "contacts", str(path), "--map", "e-post=email", "--map", "Kontakt person=name")
    ole = contacts(session_factory)["a@example.org"]
    assert ole.name == "Ole" and ole.attributes == {"kommune": "Bergen"}
    result = run("import", "contacts", str(path), "--map", "E-Post=mail_address")
    assert result.exit_code == 1
    assert "unknown field 'mail_address'; valid fields: email, name" in result.output
    result = run("import", "contacts", str(path), "--map", "Epost2=email")
    assert result.exit_code == 1
    assert "m.csv has no column 'Epost2' (found: E-Post, Kontakt person, Kommune)" in result.output


# --------------------------------------------------------------------------- XLSX


def test_xlsx_import_and_content_detection(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    assert ws is not None
    ws.append(["Email", "Name", "City", "Country", "Population"])
    ws.append(["a@example.org", "Åsa Lind", "Malmö", "SE", 357377])
    ws.append([None, None, None, None, None])
    ws.append(["b@example.org", "Piotr Nowak", "Kraków", "Poland", 800000.0])
    # Saved without the extension: the kind comes from the content.
    path = tmp_path / "list.dat"
    wb.save(path)
    result = run.ok("import", "contacts", str(path))
    assert "list.dat: 2 added" in result.output
    stored = contacts(session_factory)
    assert stored["a@example.org"].attributes == {"population": "357377"}
    assert stored["b@example.org"].city.country == "PL"  # type: ignore[union-attr]


def test_xlsx_with_several_sheets_is_refused(run: Cli, tmp_path: Path) -> None:
    wb = openpyxl.Workbook()
    first = wb.active
    assert first is not None
    first.title = "Mayors"
    first.append(["email"])
    first.append(["a@example.org"])
    second = wb.create_sheet("Notes")
    second.append(["something"])
    wb.create_sheet("Empty")
    path = tmp_path / "two.xlsx"
    wb.save(path)
    result = run("import", "contacts", str(path))
    assert result.exit_code == 1
    assert result.output.startswith("Error: two.xlsx: 2 sheets hold data ('Mayors', 'Notes')")
    assert len(result.output.splitlines()) == 1


def test_xlsx_formula_without_cached_value_rejects_the_row(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    assert ws is not None
    ws.append(["email", "name", "population"])
    ws.append(["a@example.org", "Ann", 1000])
    ws.append(["b@example.org", "Ben", "=C2*2"])
    path = tmp_path / "list.xlsx"
    wb.save(path)
    result = run.ok("import", "contacts", str(path))
    assert (
        "list.xlsx:3: population: formula without a cached value in cell C3 "
        "(open and save the file in Excel/LibreOffice)"
    ) in result.output
    assert set(contacts(session_factory)) == {"a@example.org"}


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "Error: f.csv: empty file\n"),
        (b"\n\n", "Error: f.csv: empty file\n"),
        (b"email,name\r\n", "Error: f.csv: no data rows\n"),
        (
            b"name,city\nAnn,Lviv\n",
            "Error: f.csv: no email column (found: name, city); use --map COLUMN=email\n",
        ),
        (
            b'email,name\na@example.org,Ann\nb@example.org,"Ben\n',
            "Error: f.csv:3: a quoted cell is never closed (its opening quote is in this row)\n",
        ),
        (bytes(range(256)) * 40, "Error: f.csv: not a CSV or XLSX file (binary content)\n"),
        (
            b"PK\x03\x04" + os.urandom(200),
            "Error: f.csv: not a CSV or XLSX file (a ZIP archive that is not an Excel workbook)\n",
        ),
    ],
    ids=["empty", "blank-lines", "header-only", "no-email", "unclosed-quote", "binary", "zip"],
)
def test_unreadable_files_give_one_error_line(
    run: Cli, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(content)
    result = run("import", "contacts", str(path))
    assert result.exit_code == 1
    assert result.output == message


def test_wrong_encoding_names_line_and_byte(run: Cli, tmp_path: Path) -> None:
    path = write(tmp_path / "w.csv", WESTERN.replace(";", ","), "cp1252")
    result = run("import", "contacts", str(path), "--encoding", "utf-8")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == 1
    offset = WESTERN.encode("cp1252").index("ü".encode("cp1252"))
    assert lines[0] == (
        f"Error: w.csv: line 2, byte {offset}: 0xfc is not valid utf-8; "
        "give the file's real encoding with --encoding"
    )
    result = run("import", "contacts", str(path), "--encoding", "klingon")
    assert result.exit_code == 1 and "unknown encoding" in result.output


def test_bad_rows_are_rejected_with_file_row_column(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    big = "x" * 100_000
    rows = [
        ["email", "name", "city", "country", "language"],
        ["good@example.org", "Good", "Lviv", "UA", "uk"],  # 2
        ["no-at-sign", "A", "", "", ""],  # 3
        ["a@b", "B", "", "", ""],  # 4
        ["x@-bad-.org", "C", "", "", ""],  # 5
        ["inj@example.org", "Eve\r\nBcc: someone@example.com", "", "", ""],  # 6
        ["big@example.org", big, "", "", ""],  # 7
        ["Good@Example.org", "Again", "", "", ""],  # 8
        ["short@example.org", "Short"],  # 9
        ["long@example.org", "L", "", "", "", "extra"],  # 10
        ["c@example.org", "C", "", "Atlantis", ""],  # 11
        ["d@example.org", "D", "", "", "klingonese"],  # 12
        ["nul@example.org", "Nu\x00l", "", "", ""],  # 13
        ["idn@münchen.example", "International", "", "", ""],  # 14
    ]
    path = tmp_path / "bad.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    rejects_file = tmp_path / "rejects.csv"
    result = run.ok("import", "contacts", str(path), "--rejects", str(rejects_file))
    out = result.output
    assert "Traceback" not in out
    expected = [
        "bad.csv:3: email: 'no-at-sign': An email address must have an @-sign.",
        "bad.csv:4: email: 'a@b': The part after the @-sign is not valid. It should have a period.",
        "bad.csv:5: email: 'x@-bad-.org': An email address cannot have a hyphen immediately after the @-sign.",
        "bad.csv:6: name: contains a control character (CR); fields must be single-line text",
        "bad.csv:7: name: 100000 characters, more than 10000",
        "bad.csv:8: email: duplicate of row 2 (good@example.org)",
        "bad.csv:9: (row): 2 cells, the header has 5",
        "bad.csv:10: (row): 6 cells, the header has 5",
        "bad.csv:11: country: unknown country 'Atlantis'; use an ISO code like DE or an English name",
        "bad.csv:12: language: 'klingonese' is not a language code (use a BCP 47 tag such as en, de, uk, de-AT)",
        "bad.csv:13: name: contains a control character (NUL); fields must be single-line text",
    ]
    assert out.splitlines()[: len(expected)] == expected
    assert out.splitlines()[-1] == "bad.csv: 2 added, 0 updated, 0 unchanged, 11 rejected"
    assert set(contacts(session_factory)) == {"good@example.org", "idn@münchen.example"}
    with rejects_file.open(encoding="utf-8-sig", newline="") as fh:
        written = list(csv.reader(fh))
    assert written[0] == [*rows[0], "reject_reason"]
    assert written[1] == [*rows[2], "email: 'no-at-sign': An email address must have an @-sign."]
    assert len(written) == 12
    assert written[4][1] == "Eve\r\nBcc: someone@example.com"
    with session_factory() as session:
        record = session.scalars(select(ImportRecord)).one()
    assert (record.kind, record.added, record.rejected) == ("contacts", 2, 11)
    assert record.rejects[0] == {
        "row": 3,
        "column": "email",
        "reason": expected[0].split(": ", 2)[2],
    }
    assert record.file_name == str(path) and len(record.sha256) == 64


def test_malformed_csv_row_is_rejected_and_the_rest_imported(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(tmp_path / "m.csv", 'email,name\n"a@example.org"x,A\nb@example.org,B\n')
    rejects_file = tmp_path / "r.csv"
    result = run.ok("import", "contacts", str(path), "--rejects", str(rejects_file))
    assert result.output.splitlines()[0] == (
        "m.csv:2: (row): malformed CSV: text after a closing quote (write a quote inside a "
        'quoted cell as "")'
    )
    assert set(contacts(session_factory)) == {"b@example.org"}
    with rejects_file.open(encoding="utf-8-sig", newline="") as fh:
        assert list(csv.reader(fh))[1][:2] == ["", ""]


def test_many_rejects_are_capped_on_screen(run: Cli, tmp_path: Path) -> None:
    lines = ["email"] + [f"bad{i}" for i in range(30)] + ["ok@example.org"]
    path = write(tmp_path / "many.csv", "\n".join(lines) + "\n")
    result = run.ok("import", "contacts", str(path))
    out = result.output.splitlines()
    assert len(out) == 22
    assert out[20] == "... and 10 more rejected rows (all listed in the import record)"
    assert out[21] == "many.csv: 1 added, 0 updated, 0 unchanged, 30 rejected"


# --------------------------------------------------------------------------- upsert semantics


def test_strict_and_dry_run_write_nothing(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = write(tmp_path / "s.csv", "email,name,city\na@example.org,A,Lviv\nbroken,B,Kyiv\n")
    result = run("import", "contacts", str(path), "--strict")
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "s.csv:3: email: 'broken': An email address must have an @-sign.",
        "s.csv: 1 added, 0 updated, 0 unchanged, 1 rejected",
        "Error: s.csv: 1 row(s) rejected and --strict given: nothing was written",
    ]
    result = run.ok("import", "contacts", str(path), "--dry-run")
    assert result.output.splitlines()[-1] == (
        "s.csv: 1 added, 0 updated, 0 unchanged, 1 rejected (dry run: nothing written)"
    )
    for model in (Contact, City, ContactTag, ImportRecord):
        assert count(session_factory, model) == 0


def test_reimport_is_unchanged_and_update_merges(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    first = write(
        tmp_path / "a.csv",
        "email,name,title,city,country,tags,district\n"
        "a@example.org,Ann,Mayor,Lviv,UA,x,North\n"
        "b@example.org,Ben,,Kyiv,UA,,South\n",
    )
    assert "2 added, 0 updated, 0 unchanged" in run.ok("import", "contacts", str(first)).output
    assert "0 added, 0 updated, 2 unchanged" in run.ok("import", "contacts", str(first)).output
    second = write(
        tmp_path / "b.csv",
        "Email,Name,Tags,Phone\nA@EXAMPLE.ORG,Ann Smith,y,+38 000\nb@example.org,,,\nc@example.org,Cy,,\n",
    )
    result = run.ok("import", "contacts", str(second))
    assert "1 added, 1 updated, 1 unchanged, 0 rejected" in result.output
    ann = contacts(session_factory)["a@example.org"]
    assert ann.name == "Ann Smith" and ann.title == "Mayor"  # title not in the file: kept
    assert ann.city is not None and ann.city.name == "Lviv"
    assert ann.attributes == {"district": "North", "phone": "+38 000"}
    assert ann.tags == ["x", "y"]
    with session_factory() as session:
        assert set(
            session.scalars(select(ContactTag.tag).where(ContactTag.contact_id == ann.id))
        ) == {
            "x",
            "y",
        }
        assert session.scalar(select(func.count()).select_from(ImportRecord)) == 3
    assert count(session_factory, City) == 2


def test_suppressed_address_stays_suppressed(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    run.ok("suppress", "add", "Gone@Example.org", "--reason", "unsubscribed")
    path = write(tmp_path / "s.csv", "email,name\ngone@example.org,Gone\nstay@example.org,Stay\n")
    result = run.ok("import", "contacts", str(path))
    assert "2 added" in result.output and "1 of them suppressed" in result.output
    with session_factory() as session:
        rows = list(session.execute(select(Suppression.email, Suppression.reason)))
    assert rows == [("gone@example.org", "unsubscribed")]


def test_chunks_and_duplicates_across_chunks(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    lines = ["email,name"] + [f"user{i}@example.org,U{i}" for i in range(25)]
    lines.append("USER3@example.org,dup")
    path = write(tmp_path / "c.csv", "\n".join(lines) + "\n")
    summary = import_contacts(session_factory, path=path, chunk_rows=4)
    assert (summary.added, summary.rejected) == (25, 1)
    assert summary.rejects[0].reason == "duplicate of row 5 (user3@example.org)"
    again = import_contacts(session_factory, path=path, chunk_rows=7)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 25)


def test_rejects_stay_in_row_order_across_chunks(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    lines = ["email,name"]
    for i in range(40):
        if i % 7 == 3:
            lines.append(f"broken{i},X")
        elif i % 5 == 4:
            lines.append(f"USER{i - 4}@example.org,dup")
        else:
            lines.append(f"user{i}@example.org,U{i}")
    path = write(tmp_path / "o.csv", "\n".join(lines) + "\n")
    rejects_file = tmp_path / "r.csv"
    summary = import_contacts(session_factory, path=path, chunk_rows=3, rejects_path=rejects_file)
    rows = [r.row for r in summary.rejects]
    assert rows == sorted(rows) and len(rows) == summary.rejected > 8
    reasons = {r.row: r.reason for r in summary.rejects}
    assert reasons[6] == "duplicate of row 2 (user0@example.org)"
    assert reasons[5].startswith("'broken3'")
    with rejects_file.open(encoding="utf-8-sig", newline="") as fh:
        written = list(csv.reader(fh))[1:]
    assert [w[0] for w in written] == [lines[r - 1].split(",")[0] for r in rows]


def test_duplicates_of_stored_contacts_across_chunks(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    """Duplicates are found through the stored contacts too: a contact that was already in the
    database, met twice in one file, in different chunks; a third copy names the first row."""
    first = write(tmp_path / "a.csv", "email,name\nold@example.org,Old\nkeep@example.org,K\n")
    import_contacts(session_factory, path=first)
    lines = ["email,name"] + [f"new{i}@example.org,N{i}" for i in range(9)]
    lines[3] = "OLD@example.org,Changed"
    lines += ["old@example.org,Again", "new1@example.org,Again", "Old@Example.org,Third"]
    path = write(tmp_path / "b.csv", "\n".join(lines) + "\n")
    summary = import_contacts(session_factory, path=path, chunk_rows=2)
    assert (summary.added, summary.updated, summary.rejected) == (8, 1, 3)
    assert [(r.row, r.reason) for r in summary.rejects] == [
        (11, "duplicate of row 4 (old@example.org)"),
        (12, "duplicate of row 3 (new1@example.org)"),
        (13, "duplicate of row 4 (old@example.org)"),
    ]
    assert contacts(session_factory)["old@example.org"].name == "Changed"


def test_new_contacts_after_stored_ones_get_their_own_tags(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    """New contacts are numbered after the stored ones, and each tag row lands on its contact."""
    first = write(tmp_path / "a.csv", "email,tags\na@example.org,x\nb@example.org,y;z\n")
    import_contacts(session_factory, path=first)
    with session_factory() as session:
        gone = session.scalars(select(Contact).where(Contact.email == "b@example.org")).one()
        session.delete(gone)
        session.commit()
    lines = ["email,tags"] + [f"c{i}@example.org,t{i % 3};all" for i in range(7)]
    lines.append("a@example.org,w")
    path = write(tmp_path / "b.csv", "\n".join(lines) + "\n")
    summary = import_contacts(session_factory, path=path, chunk_rows=3, tags=["wave"])
    assert (summary.added, summary.updated) == (7, 1)
    with session_factory() as session:
        stored = list(session.scalars(select(Contact)))
        tag_rows = list(session.execute(select(ContactTag.contact_id, ContactTag.tag)))
    assert len({c.id for c in stored}) == len(stored) == 8
    by_id: dict[int, set[str]] = {}
    for contact_id, tag in tag_rows:
        by_id.setdefault(contact_id, set()).add(tag)
    for contact in stored:
        assert by_id[contact.id] == set(contact.tags), contact.email
    got = {c.email: c.tags for c in stored}
    assert got["c4@example.org"] == ["all", "t1", "wave"]
    assert got["a@example.org"] == ["w", "wave", "x"]


def test_reimport_tells_changed_from_unchanged(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    header = "email,name,tags,note\n"
    rows = [
        "same@example.org,Same,a;b,n1",
        "order@example.org,Order,a;b,n2",
        "name@example.org,Name,a,n3",
        "tag@example.org,Tag,a,n4",
        "attr@example.org,Attr,a,n5",
        "blank@example.org,Blank,a,n6",
    ]
    import_contacts(session_factory, path=write(tmp_path / "a.csv", header + "\n".join(rows)))
    again = [
        "same@example.org,Same,a;b,n1",
        "order@example.org,Order,b;a,n2",
        "name@example.org,Renamed,a,n3",
        "tag@example.org,Tag,c,n4",
        "attr@example.org,Attr,a,other",
        "blank@example.org,,,",
    ]
    summary = import_contacts(
        session_factory, path=write(tmp_path / "b.csv", header + "\n".join(again))
    )
    assert (summary.added, summary.updated, summary.unchanged) == (0, 3, 3)
    got = contacts(session_factory)
    assert got["name@example.org"].name == "Renamed"
    assert got["tag@example.org"].tags == ["a", "c"]
    assert got["attr@example.org"].attributes == {"note": "other"}
    assert (got["blank@example.org"].name, got["blank@example.org"].tags) == ("Blank", ["a"])
    assert count(session_factory, ContactTag) == 9


def test_unchanged_against_values_written_by_other_code(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    """JSON written through the ORM (other spacing, tags unsorted) still compares by value."""
    with session_factory() as session:
        session.add(
            Contact(email="orm@example.org", name="Orm", tags=["b", "a"], attributes={"k": "v"})
        )
        session.add(Contact(email="ok@example.org", name="Ok", tags=["a"], attributes={"k": "v"}))
        session.commit()
    path = write(
        tmp_path / "o.csv", "email,name,tags,k\norm@example.org,Orm,a,v\nok@example.org,Ok,a,v\n"
    )
    summary = import_contacts(session_factory, path=path)
    # ["b", "a"] is rewritten sorted, as the import always stores tags.
    assert (summary.updated, summary.unchanged) == (1, 1)
    assert contacts(session_factory)["orm@example.org"].tags == ["a", "b"]


def test_attributes_with_quotes_backslashes_and_non_ascii_round_trip(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    value = 'say "hi" \\ back/slash, Олена Müller \u00e9\u2603 {"not": "json"}'
    path = tmp_path / "q.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerow(["email", "Motto", 'Ключ "x"'])
        csv.writer(fh).writerow(["q@example.org", value, "значення"])
    import_contacts(session_factory, path=path)
    stored = contacts(session_factory)["q@example.org"].attributes
    assert stored == {"motto": value, "ключ_x": "значення"}
    with session_factory() as session:
        found = session.scalar(
            select(Contact.email).where(Contact.attributes["motto"].as_string() == value)
        )
    assert found == "q@example.org"
    again = import_contacts(session_factory, path=path)
    assert again.unchanged == 1


def test_file_unreadable_half_way_writes_nothing(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    good = "".join(f"user{i}@example.org,Name {i}\n" for i in range(60))
    path = tmp_path / "half.csv"
    path.write_bytes(b"email,name\n" + good.encode() + b"late@example.org,M\xfcller\n")
    with pytest.raises(ImportFileError, match=r"half.csv: line 62, byte \d+: 0xfc is not valid"):
        import_contacts(session_factory, path=path, encoding="utf-8", chunk_rows=10)
    assert count(session_factory, Contact) == 0
    assert count(session_factory, ImportRecord) == 0


# --------------------------------------------------------------------------- seeds & PostgreSQL


def test_seed_files_import_cleanly(run: Cli, session_factory: sessionmaker[Session]) -> None:
    for kind in ("partnerships", "signatories", "contacts"):
        seed = SEEDS / f"{kind}.csv"
        if not seed.exists():
            pytest.skip(f"{seed} not written yet")
        result = run.ok("import", kind, str(seed))
        assert result.output.splitlines()[-1].endswith(" 0 rejected"), result.output
        again = run.ok("import", kind, str(seed))
        assert " 0 added, 0 updated," in again.output
    assert count(session_factory, Contact) >= 60


def test_postgresql_import_and_reimport(tmp_path: Path, pg_url: str) -> None:
    runner = CliRunner()
    root = tmp_path / "pgws"
    assert runner.invoke(cli, ["--db", pg_url, "init", str(root)]).exit_code == 0
    base = ["-w", str(root), "--db", pg_url]
    assert runner.invoke(cli, [*base, "db", "upgrade"]).exit_code == 0
    path = write(tmp_path / "west.csv", WESTERN, "cp1252")
    result = runner.invoke(cli, [*base, "import", "contacts", str(path), "--tag", "pg"])
    assert result.exit_code == 0, result.output
    assert "west.csv: 5 added, 0 updated, 0 unchanged, 0 rejected" in result.output
    result = runner.invoke(cli, [*base, "import", "contacts", str(path), "--tag", "pg"])
    assert "west.csv: 0 added, 0 updated, 5 unchanged, 0 rejected" in result.output
    change = write(tmp_path / "c.csv", "email,name,tags\njose.pena@malaga.example.org,José,x\n")
    result = runner.invoke(cli, [*base, "import", "contacts", str(change)])
    assert "c.csv: 0 added, 1 updated, 0 unchanged, 0 rejected" in result.output
    engine = db.make_engine(pg_url)
    try:
        with db.session_factory(engine)() as session:
            jose = session.scalars(
                select(Contact).where(Contact.email == "jose.pena@malaga.example.org")
            ).one()
            assert (jose.name, jose.tags, jose.language) == ("José", ["pg", "x"], "es")
            assert jose.city is not None and jose.city.name == "Málaga"
            assert session.scalar(select(func.count()).select_from(ContactTag)) == 6
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- email fast path


@pytest.mark.parametrize(
    "address",
    [
        "plain@example.org",
        "First.Last+tag@Sub.Example.COM",
        "o'brien@example.org",
        "x@example.test",
        "a..b@example.org",
        ".a@example.org",
        "a.@example.org",
        "a@b",
        "a@example",
        "a@-x.org",
        "a@x-.org",
        "a@x_y.org",
        "a@example.invalid",
        "a@example.123",
        "a b@example.org",
        '"quoted"@example.org',
        "a@@example.org",
        "x" * 65 + "@example.org",
        "a@" + "x" * 64 + ".org",
        "a@" + ("y" * 60 + ".") * 5 + "org",
        "üser@example.org",
        "user@bücher.example",
        "Name <a@example.org>",
        "a@[127.0.0.1]",
        "a@localhost",
        "a@[IPv6:::1]",
        "a@[300.1.1.1]",
        '"a b"@example.org',
        '"a@b"@example.org',
        '""@example.org',
        "user@EXAMPLE.TEST",
        "user.name+tag@sub.example.test",
        "MiXeD.Case@ExAmPlE.OrG",
        "x@example.com.",
        "x@.example.com",
        "x@example..com",
        "-user@example.org",
        "user-@example.org",
        "a%b@example.org",
        "a/b=c?d^e{f}|~@example.org",
        "user@123.example.org",
        "user@example.c",
        "user@xn--bcher-kva.example",
        "user@xn--zz.example",
        "用户@例子.广告",
        "user@例え.テスト",
        "ÄÖ@example.org",
        "a\u200b@example.org",
        "a@example.org\u200b",
        "tab\t@example.org",
        "a@ex ample.org",
        "@example.org",
        "a@",
        "a@example.org@example.org",
        "a" * 64 + "@example.org",
        "a@" + "b" * 63 + ".example.org",
    ],
)
def test_fast_email_check_agrees_with_email_validator(address: str) -> None:
    try:
        expected: str | None = email_validator.validate_email(
            address, check_deliverability=False, test_environment=True
        ).normalized.lower()
    except email_validator.EmailNotValidError:
        expected = None
    try:
        got: str | None = EmailChecker()(address)
    except ValueError:
        got = None
    assert got == expected


def test_first_rows_by_id_stay_bounded_for_far_ids() -> None:
    """Duplicate bookkeeping is an array by contact id; ids far out (a PostgreSQL sequence
    moved on by rolled-back imports) must not make it huge."""
    first = _FirstRows()
    first.mark_all(range(10, 2010), list(range(2, 2002)))
    first.mark(10**12, 7)
    first.mark_all([3, 10**9], [8, 9])
    assert (first.get(10), first.get(2009), first.get(2010), first.get(3)) == (2, 2001, 0, 8)
    assert (first.get(10**12), first.get(10**9), first.get(10**9 + 1)) == (7, 9, 0)
    assert len(first._rows) <= first._DENSE


# --------------------------------------------------------------------------- SQLite JSON rows


def _stored_rows(factory: sessionmaker[Session]) -> tuple[list[Any], list[Any], list[Any]]:
    """Contacts (but for their timestamps), tag rows and cities as the driver returns them."""
    with factory() as session:
        connection = session.connection()
        return (
            [
                tuple(row)
                for row in connection.exec_driver_sql(
                    "SELECT id, email, name, title, salutation, language, organisation, city_id,"
                    " attributes, tags FROM contacts ORDER BY id"
                )
            ],
            [
                tuple(row)
                for row in connection.exec_driver_sql("SELECT * FROM contact_tags ORDER BY 1, 2")
            ],
            [tuple(row) for row in connection.exec_driver_sql("SELECT * FROM cities ORDER BY id")],
        )


MIXED = """\
email,name,title,language,city,country,region,tags,Motto,Ключ
known1@example.org,Known One,,,Lviv,UA,,k,,
new1@example.org,"Say ""hi"" \\ back/slash",Mayor,de,München,DE,,a;b,"{""not"": ""json""} </x>",значення
known2@example.org,,Renamed,,,,,,,
new2@example.org,Олена Müller 😀,,uk,Київ,UA,Kyiv oblast,,,
NEW1@example.org,dup,,,,,,,,
not-an-address,X,,,,,,,,
new3@example.org,,,,,FR,Bretagne,,tab-free,
new4@example.org,Four,,,München,DE,Bayern,c,,
new5@example.org,Five,,,muenchen,DE,,,,
known3@example.org,,,,Lviv,UA,Lviv oblast,k2,,
new6@example.org,Six,,,Lviv,UA,,,,
""" + "".join(f"new{i}@example.org,N{i},,,Lviv,UA,,,,\n" for i in range(7, 13))


@pytest.mark.parametrize("ahead", [True, False], ids=["rows-built-ahead", "rows-built-on-db"])
def test_json_rows_store_what_executemany_stores(
    tmp_path: Path,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    ahead: bool,
) -> None:
    """SQLite takes a chunk's new contacts as one JSON text; the same file through the driver's
    executemany (PostgreSQL's way, and a SQLite's without JSON functions) stores the very same
    rows and JSON text: duplicates, rejects, stored contacts among new ones, cities found and
    made and given a region across chunks."""
    with session_factory() as session:
        if not importers._sqlite_json_rows(session.connection()):
            pytest.skip("this SQLite has no JSON functions")
    if not ahead:
        # New rows then get built on the database thread, as in a re-import.
        prepare = importers._ContactImport.prepare

        def late(self: importers._ContactImport, *args: Any) -> importers._Chunk:
            self.expect_new = False
            return prepare(self, *args)

        monkeypatch.setattr(importers._ContactImport, "prepare", late)
    first = write(
        tmp_path / "first.csv",
        "email,name,city,country,tags\nknown1@example.org,K1,Lviv,UA,k\n"
        "known2@example.org,K2,,,\nknown3@example.org,K3,Lviv,UA,\n",
    )
    path = write(tmp_path / "mixed.csv", MIXED)
    other_engine = db.make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    db.upgrade(other_engine)
    other = db.session_factory(other_engine)
    try:
        summaries = []
        for factory in (session_factory, other):
            if factory is other:
                monkeypatch.setattr(importers, "_sqlite_json_rows", lambda connection: False)
            import_contacts(factory, path=first)
            summary = import_contacts(factory, path=path, chunk_rows=3, tags=["wave"])
            summaries.append((importers.format_counts(summary), summary.rejects))
        assert summaries[0] == summaries[1]
        assert summaries[0][0] == "mixed.csv: 12 added, 3 updated, 0 unchanged, 2 rejected"
        stored = _stored_rows(session_factory)
        assert stored == _stored_rows(other)
    finally:
        other_engine.dispose()
    contact_rows, tag_rows, _ = stored
    for row in contact_rows:
        for text in row[-2:]:
            assert text == json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    by_email = contacts(session_factory)
    new1 = by_email["new1@example.org"]
    assert new1.name == 'Say "hi" \\ back/slash'
    assert new1.attributes == {"motto": '{"not": "json"} </x>', "ключ": "значення"}
    assert by_email["new2@example.org"].name == "Олена Müller 😀"
    assert by_email["new3@example.org"].attributes == {
        "motto": "tab-free",
        "country": "FR",
        "region": "Bretagne",
    }
    for contact in by_email.values():
        assert contact.tags == sorted(tag for i, tag in tag_rows if i == contact.id)
    assert by_email["new1@example.org"].tags == ["a", "b", "wave"]
    monkeypatch.undo()
    assert import_contacts(session_factory, path=path, chunk_rows=3, tags=["wave"]).unchanged == 15


def test_import_gives_back_switch_interval_and_collector_thresholds(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    before = (sys.getswitchinterval(), gc.get_threshold())
    path = write(tmp_path / "a.csv", "email\na@example.org\nbroken\n")
    import_contacts(session_factory, path=path)
    with pytest.raises(StrictImportFailed):
        import_contacts(session_factory, path=path, strict=True)
    assert (sys.getswitchinterval(), gc.get_threshold()) == before
