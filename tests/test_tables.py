"""`mailer.tables` on its own: real files written in tmp_path, no workspace, no database."""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import hashlib
from pathlib import Path

import openpyxl
import pytest

from mailer.errors import ImportFileError, InvalidValueError
from mailer.tables import Table, read_table

GERMAN = "Name;Stadt;E-Mail\nJürgen Müller;München;j@example.org\nÄnne Groß;Köln;a@example.org\n"
UKRAINIAN = "ім'я,місто,email\nОлена Пчілка,Гадяч,o@example.org\nЮрій Ткачук,Львів,y@example.org\n"


def rows_of(path: Path, **options: str) -> tuple[Table, list[str], list[tuple[int, list[str]]]]:
    with Table(path, **options) as table:
        return table, table.header, [(row.number, row.cells) for row in table]


# --------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    ("text", "encoding", "detected"),
    [
        (GERMAN, "utf-8", "utf-8"),
        (GERMAN, "cp1252", "cp1252"),
        (UKRAINIAN, "cp1251", "cp1251"),
        (UKRAINIAN, "utf-8", "utf-8"),
    ],
)
def test_encoding_is_detected(tmp_path: Path, text: str, encoding: str, detected: str) -> None:
    path = tmp_path / "list.csv"
    path.write_bytes(text.encode(encoding))
    table, header, rows = rows_of(path)
    assert table.encoding == detected
    expected = [line.split(table.delimiter or ",") for line in text.splitlines()]
    assert [header, *(cells for _, cells in rows)] == expected


@pytest.mark.parametrize(
    ("bom", "codec", "detected"),
    [
        (codecs.BOM_UTF8, "utf-8", "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16"),
        (codecs.BOM_UTF32_LE, "utf-32-le", "utf-32"),
    ],
    ids=["utf-8-bom", "utf-16-le", "utf-16-be", "utf-32-le"],
)
def test_a_bom_sets_the_encoding_and_never_sticks_to_the_header(
    tmp_path: Path, bom: bytes, codec: str, detected: str
) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(bom + GERMAN.encode(codec))
    table, header, rows = rows_of(path)
    assert table.encoding == detected
    assert header == ["Name", "Stadt", "E-Mail"]
    assert rows[0] == (2, ["Jürgen Müller", "München", "j@example.org"])


def test_explicit_utf8_with_a_bom_drops_the_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(codecs.BOM_UTF8 + b"email\na@example.org\n")
    table, header, _ = rows_of(path, encoding="UTF8")
    assert (table.encoding, header) == ("utf-8-sig", ["email"])


def test_unknown_encoding_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b"email\na@example.org\n")
    with pytest.raises(InvalidValueError, match="--encoding klingon: unknown encoding"):
        Table(path, encoding="klingon")


def test_ambiguous_legacy_bytes_ask_for_an_encoding(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_bytes(b"email,name\nx@example.org,\xb3\xf0\xaa\xbf\xb9q\xe4\xa6\xd7z\n")
    with pytest.raises(ImportFileError, match=r"odd\.csv: cannot tell the file's encoding"):
        Table(path)
    table, _, rows = rows_of(path, encoding="latin-1")
    assert table.encoding == "iso8859-1" and rows[0][1][1] == "³ðª¿¹qä¦×z"


def test_wrong_encoding_names_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    data = GERMAN.encode("cp1252")
    path.write_bytes(data)
    with pytest.raises(ImportFileError) as caught, Table(path, encoding="utf-8") as table:
        list(table)
    offset = data.index("ü".encode("cp1252"))
    assert str(caught.value) == (
        f"w.csv: line 2, byte {offset}: 0xfc is not valid utf-8; "
        "give the file's real encoding with --encoding"
    )


def test_sha256_is_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    data = GERMAN.encode("cp1252")
    path.write_bytes(data)
    with Table(path) as table:
        assert table.sha256 == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- delimiters and quoting


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_delimiter_is_sniffed(tmp_path: Path, delimiter: str) -> None:
    rows = [
        ["email", "name", "note"],
        ["a@example.org", "Anna, Maria; Smith", "with|pipe and\ttab"],
        ["b@example.org", "Bob", "plain"],
    ]
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, delimiter=delimiter).writerows(rows)
    table, header, got = rows_of(path)
    assert table.delimiter == delimiter
    assert [header, *(cells for _, cells in got)] == rows


@pytest.mark.parametrize("given", ["tab", "\\t", "TAB"])
def test_tab_can_be_named(tmp_path: Path, given: str) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("email\tname\na@example.org\tAnn\n", encoding="utf-8")
    table, header, _ = rows_of(path, delimiter=given)
    assert (table.delimiter, header) == ("\t", ["email", "name"])


def test_a_delimiter_is_one_character(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("email\n", encoding="utf-8")
    with pytest.raises(InvalidValueError, match="give one character"):
        Table(path, delimiter=";;")


def test_row_numbers_are_spreadsheet_rows(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    path.write_text(
        '\n\nemail,address\na@example.org,"one\r\ntwo"\n\nb@example.org,x\n', encoding="utf-8"
    )
    with Table(path) as table:
        assert table.header == ["email", "address"]
        rows = [(row.number, row.cells) for row in table if any(row.cells)]
    assert rows == [(4, ["a@example.org", "one\r\ntwo"]), (6, ["b@example.org", "x"])]


def test_malformed_row_is_a_problem_of_that_row(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text('email,name\n"a@example.org"x,A\nb@example.org,B\n', encoding="utf-8")
    with Table(path) as table:
        rows = list(table)
    assert rows[0].number == 2 and rows[0].problem is not None
    assert rows[0].problem[1].startswith("malformed CSV: text after a closing quote")
    assert (rows[1].number, rows[1].cells, rows[1].problem) == (3, ["b@example.org", "B"], None)


def test_read_table_gives_dicts_and_refuses_ragged_rows(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("email;reason\na@example.org;manual\n\nb@example.org\n", encoding="utf-8")
    got = read_table(path)
    assert next(got) == (2, {"email": "a@example.org", "reason": "manual"})
    with pytest.raises(ImportFileError, match=r"r\.csv:4: 1 cells, the header has 2"):
        next(got)


# --------------------------------------------------------------------------- not tables


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "f.csv: empty file"),
        (b"\r\n \n", "f.csv: empty file"),
        (b"\xd0\xcf\x11\xe0" + bytes(100), "f.csv: an old Excel .xls file"),
        (bytes(range(256)) * 8, "f.csv: not a CSV or XLSX file"),
    ],
    ids=["empty", "blank", "xls", "binary"],
)
def test_files_that_are_not_tables(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(content)
    with pytest.raises(ImportFileError, match=message):
        Table(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImportFileError, match="no such file"):
        Table(tmp_path / "absent.csv")


# --------------------------------------------------------------------------- XLSX


def test_xlsx_values_as_text(tmp_path: Path) -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    assert ws is not None
    ws.append(["Email", "Since", "Population", "Share", "Met", "Active"])
    ws.append(
        ["a@example.org", dt.date(1990, 5, 1), 357377, 0.25, dt.datetime(2022, 3, 14, 9, 30), True]
    )
    ws.append([None] * 6)
    ws.append(["b@example.org", 1995, 800000.0, None, None, False])
    path = tmp_path / "book.bin"  # the kind comes from the content, not the name
    wb.save(path)
    table, header, rows = rows_of(path)
    assert (table.kind, table.encoding, table.delimiter) == ("xlsx", None, None)
    assert header == ["Email", "Since", "Population", "Share", "Met", "Active"]
    data = [(n, cells) for n, cells in rows if any(cells)]
    assert data == [
        (2, ["a@example.org", "1990-05-01", "357377", "0.25", "2022-03-14 09:30:00", "TRUE"]),
        (4, ["b@example.org", "1995", "800000", "", "", "FALSE"]),
    ]


def test_xlsx_formula_without_a_cached_value_is_a_problem(tmp_path: Path) -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    assert ws is not None
    ws.append(["email", "population"])
    ws.append(["a@example.org", "=1+1"])
    path = tmp_path / "f.xlsx"
    wb.save(path)
    _, _, rows = rows_of(path)
    assert rows[0][0] == 2
    with Table(path) as table:
        row = next(iter(table))
    assert row.problem == (
        "population",
        "formula without a cached value in cell B2 (open and save the file in Excel/LibreOffice)",
    )


def test_xlsx_with_two_sheets_of_data_is_refused(tmp_path: Path) -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    assert ws is not None
    ws.title = "Mayors"
    ws.append(["email"])
    wb.create_sheet("Notes").append(["x"])
    wb.create_sheet("Empty")
    path = tmp_path / "two.xlsx"
    wb.save(path)
    with pytest.raises(
        ImportFileError, match=r"two.xlsx: 2 sheets hold data \('Mayors', 'Notes'\)"
    ):
        Table(path)
