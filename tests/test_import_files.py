"""Damaged and hostile files: one bad row never refuses a file; a file that is not a table, or
one that would make us do unbounded work, is one `Error:` line naming what it is or the limit.

Every file here is real, written in the test: XLSX workbooks and zip bombs are built with
`zipfile` part by part, so each can be broken exactly where a test needs it.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import openpyxl
import pytest
from conftest import Cli
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mailer import tables
from mailer.models import Contact
from mailer.tables import Table


def emails(factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        return set(session.scalars(select(Contact.email)))


def one_error(run: Cli, path: Path) -> str:
    """Import `path`, expecting one `Error:` line and exit 1; returns the line."""
    result = run("import", "contacts", str(path))
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


# --------------------------------------------------------------------------- a crafted workbook

SHEET_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
REL_NS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
REL_TYPE = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"


def sheet_xml(rows: list[list[str]], *, shared: bool = False) -> str:
    """A worksheet of text cells: inline strings, or indexes into `shared_strings_xml`."""
    out = []
    index = 0
    for number, row in enumerate(rows, start=1):
        cells = []
        for column, value in enumerate(row):
            ref = f"{chr(ord('A') + column)}{number}"
            if shared:
                cells.append(f'<c r="{ref}" t="s"><v>{index}</v></c>')
                index += 1
            else:
                cells.append(f'<c r="{ref}" t="inlineStr"><is><t>{value}</t></is></c>')
        out.append(f'<row r="{number}">{"".join(cells)}</row>')
    return f'<worksheet xmlns="{SHEET_NS}"><sheetData>{"".join(out)}</sheetData></worksheet>'


def shared_strings_xml(values: list[str]) -> str:
    items = "".join(f"<si><t>{v}</t></si>" for v in values)
    return f'<sst xmlns="{SHEET_NS}" count="{len(values)}">{items}</sst>'


def workbook(
    path: Path,
    sheet: str | bytes,
    *,
    strings: str | bytes | None = None,
    extra: Mapping[str, str | bytes] | None = None,
) -> Path:
    """An XLSX file with one worksheet (and shared strings), every part as given."""
    rels = [f'<Relationship Id="rId1" Type="{REL_TYPE}/worksheet" Target="worksheets/sheet1.xml"/>']
    if strings is not None:
        rels.append(
            f'<Relationship Id="rId2" Type="{REL_TYPE}/sharedStrings" Target="sharedStrings.xml"/>'
        )
    parts: dict[str, str | bytes] = {
        "[Content_Types].xml": '<Types xmlns="http://schemas.openxmlformats.org/package/2006/'
        'content-types"/>',
        "_rels/.rels": '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/'
        f'relationships"><Relationship Id="rId1" Type="{REL_TYPE}/officeDocument" '
        'Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<workbook xmlns="{SHEET_NS}" xmlns:r="{REL_NS}"><sheets>'
        '<sheet name="Mayors" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": '<Relationships xmlns="http://schemas.openxmlformats.org/'
        f'package/2006/relationships">{"".join(rels)}</Relationships>',
        "xl/worksheets/sheet1.xml": sheet,
    }
    if strings is not None:
        parts["xl/sharedStrings.xml"] = strings
    parts.update(extra or {})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in parts.items():
            zf.writestr(name, data)
    return path


def bomb(path: Path, *, part: str, head: str, unit: str, tail: str, size: int) -> Path:
    """A workbook whose `part` inflates to about `size` bytes from a few hundred kilobytes."""
    rows = sheet_xml([["email"], ["a@example.org"]])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        workbook_path = path.with_suffix(".seed.xlsx")
        workbook(workbook_path, rows, strings=shared_strings_xml(["x"]))
        with zipfile.ZipFile(workbook_path) as seed:
            for info in seed.infolist():
                if info.filename != part:
                    zf.writestr(info.filename, seed.read(info.filename))
        with zf.open(part, "w", force_zip64=True) as out:
            out.write(head.encode())
            block = (unit * (1 << 20 // len(unit) + 1)).encode()[: 1 << 20]
            for _ in range(size // len(block)):
                out.write(block)
            out.write(tail.encode())
    return path


# --------------------------------------------------------------------------- issue 13, item 2


def test_a_nul_byte_rejects_only_its_row(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = tmp_path / "nul.csv"
    path.write_bytes(
        b"email,name,city\n"
        b"a@example.org,Anna,Lviv\n"
        b"b@example.org,Bo\x00b,Kyiv\n"
        b"c@example.org,Carla,Odesa\n"
    )
    result = run.ok("import", "contacts", str(path))
    assert result.output.splitlines() == [
        "nul.csv:3: name: contains a control character (NUL); fields must be single-line text",
        "nul.csv: 2 added, 0 updated, 0 unchanged, 1 rejected",
    ]
    assert emails(session_factory) == {"a@example.org", "c@example.org"}


def test_a_row_that_does_not_decode_rejects_only_that_row(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    """A UTF-8 file with one row pasted from a Windows-1252 file."""
    path = tmp_path / "mixed.csv"
    rejects = tmp_path / "rejects.csv"
    path.write_bytes(
        "email,name,city\n"
        "a@example.org,Jürgen Müller,München\n"
        "o@example.org,Олена Пчілка,Гадяч\n".encode()
        + "b@example.org,Zoë Weiß,Köln\n".encode("cp1252")
        + "c@example.org,José Peña,Málaga\n".encode()
    )
    result = run.ok("import", "contacts", str(path), "--rejects", str(rejects))
    assert result.output.splitlines() == [
        "mixed.csv:4: name: byte 0xeb is not valid utf-8 (the rest of the file is read as "
        "utf-8; give --encoding if that is wrong)",
        "mixed.csv: 3 added, 0 updated, 0 unchanged, 1 rejected",
    ]
    stored = emails(session_factory)
    assert stored == {"a@example.org", "o@example.org", "c@example.org"}
    with session_factory() as session:
        jurgen = session.scalars(select(Contact).where(Contact.email == "a@example.org")).one()
    assert jurgen.name == "Jürgen Müller"
    # The rejected row is written out, its undecodable bytes shown as U+FFFD.
    written = rejects.read_text(encoding="utf-8-sig").splitlines()
    assert written[1].startswith("b@example.org,Zo\ufffd Wei\ufffd,K\ufffdln,name: byte 0xeb")


def test_a_file_in_another_encoding_is_still_read_whole(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = tmp_path / "de.csv"
    path.write_bytes("email;name\na@example.org;Jürgen Müller\n".encode("cp1252"))
    assert "1 added" in run.ok("import", "contacts", str(path)).output
    # Told it is UTF-8 when nothing in it is: the whole file is refused, as it should be.
    result = run("import", "contacts", str(path), "--encoding", "utf-8")
    assert result.exit_code == 1
    offset = path.read_bytes().index(b"\xfc")
    assert result.output.startswith(f"Error: de.csv: line 2, byte {offset}: 0xfc is not valid")


def test_utf16_without_a_bom_is_read(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = tmp_path / "u16.csv"
    path.write_bytes("email\tname\na@example.org\tÅsa\n".encode("utf-16-le"))
    run.ok("import", "contacts", str(path))
    assert emails(session_factory) == {"a@example.org"}


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + bytes(range(24)) for _ in range(8)))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_files_that_are_not_text_are_refused_saying_what_they_look_like(
    run: Cli, tmp_path: Path
) -> None:
    png = tmp_path / "photo.csv"
    png.write_bytes(_png())
    assert one_error(run, png).startswith(
        "Error: photo.csv: not a CSV or XLSX file (it looks like Portable Network Graphics"
    )
    nul = tmp_path / "zeros.csv"
    nul.write_bytes(b"email\n" + bytes(5000))
    assert one_error(run, nul) == "Error: zeros.csv: not a CSV or XLSX file (mostly NUL bytes)"


def test_an_xlsx_named_csv_is_refused_with_the_name_to_give_it(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    wb = openpyxl.Workbook()
    ws = wb.active
    assert ws is not None
    ws.append(["email"])
    ws.append(["a@example.org"])
    path = tmp_path / "mayors.csv"
    wb.save(path)
    assert one_error(run, path) == (
        "Error: mayors.csv: an Excel workbook (XLSX) with a .csv name; rename it to "
        "mayors.xlsx and import that"
    )
    renamed = path.rename(tmp_path / "mayors.xlsx")
    run.ok("import", "contacts", str(renamed))
    assert emails(session_factory) == {"a@example.org"}


# --------------------------------------------------------------------------- issue 11, item 10


def test_csv_header_with_too_many_columns_is_one_short_line(run: Cli, tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text("email," + ",".join(f"c{i}" for i in range(5000)) + "\n", encoding="utf-8")
    assert one_error(run, path) == (
        "Error: wide.csv:1: the header row: 5,001 cells, more than the 1,000 columns an import "
        "reads"
    )


def test_csv_row_of_millions_of_columns_stops_at_the_row_limit(run: Cli, tmp_path: Path) -> None:
    path = tmp_path / "huge.csv"
    path.write_bytes(b"email" + b"," * 3_000_000 + b"\n")
    line = one_error(run, path)
    assert line == (
        "Error: huge.csv:1: a row of more than 1,000,000 characters (is a quote never closed?)"
    )


def test_a_wide_data_row_is_rejected_alone(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    path = tmp_path / "w.csv"
    path.write_text(
        "email,name\n" + "x@example.org" + ",y" * 2000 + "\nb@example.org,B\n", encoding="utf-8"
    )
    result = run.ok("import", "contacts", str(path))
    assert result.output.splitlines()[0] == (
        "w.csv:2: (row): 2,001 cells, more than the 1,000 columns an import reads"
    )
    assert emails(session_factory) == {"b@example.org"}


def test_error_lines_quote_only_a_few_short_values(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    long_name = "Spalte" * 20_000
    path = tmp_path / "h.csv"
    path.write_text(
        ",".join([long_name, *(f"col{i}" for i in range(40))])
        + "\nx,"
        + ",".join("y" for _ in range(40))
        + "\n",
        encoding="utf-8",
    )
    line = one_error(run, path)
    assert line.startswith("Error: h.csv: no email column (found: SpalteSpalte")
    assert line.endswith("… (41 columns)); use --map COLUMN=email")
    assert len(line) < 400
    rows = tmp_path / "r.csv"
    rows.write_text(
        "email,country\n" + "a@example.org," + "Atlantis" * 1000 + "\nb@example.org,DE\n",
        encoding="utf-8",
    )
    result = run.ok("import", "contacts", str(rows))
    first = result.output.splitlines()[0]
    assert first.startswith("r.csv:2: country: unknown country 'AtlantisAtlantis")
    assert len(first) < 400


# --------------------------------------------------------------------------- issue 11, item 9


def test_crafted_workbook_with_shared_strings_imports(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    """The reader follows the parts as Excel writes them: shared strings, rich text runs."""
    values = ["email", "name", "a@example.org", "Åsa Lind", "b@example.org", "Bo"]
    strings = shared_strings_xml(values).replace(
        "<si><t>Bo</t></si>", '<si><r><t>B</t></r><r><t xml:space="preserve">o</t></r></si>'
    )
    path = workbook(
        tmp_path / "shared.xlsx",
        sheet_xml([values[0:2], values[2:4], values[4:6]], shared=True),
        strings=strings,
    )
    run.ok("import", "contacts", str(path))
    with session_factory() as session:
        names = {e: n for e, n in session.execute(select(Contact.email, Contact.name))}
    assert names == {"a@example.org": "Åsa Lind", "b@example.org": "Bo"}


def test_shared_strings_that_inflate_past_the_limit_are_refused(run: Cli, tmp_path: Path) -> None:
    path = bomb(
        tmp_path / "bomb.xlsx",
        part="xl/sharedStrings.xml",
        head=f'<sst xmlns="{SHEET_NS}"><si><t>',
        unit="AAAAAAAAAAAAAAAA",
        tail="</t></si></sst>",
        size=tables.MAX_SHARED_STRINGS_UNPACKED + (2 << 20),
    )
    assert path.stat().st_size < 1 << 20
    line = one_error(run, path)
    assert line == (
        "Error: bomb.xlsx: its xl/sharedStrings.xml unpacks to 66 MB, more than the 64 MB an "
        "import reads; save the sheet as CSV (UTF-8) and import that"
    )


def test_too_many_tiny_shared_strings_are_refused(
    run: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real limit is a million; a smaller one keeps the test quick, the bomb is the same.
    monkeypatch.setattr(tables, "MAX_SHARED_STRINGS", 10_000)
    path = bomb(
        tmp_path / "tiny.xlsx",
        part="xl/sharedStrings.xml",
        head=f'<sst xmlns="{SHEET_NS}">',
        unit="<si><t>a</t></si>",
        tail="</sst>",
        size=2 << 20,
    )
    assert one_error(run, path) == (
        "Error: tiny.xlsx: more than 10,000 shared strings in the workbook, the most an import "
        "reads; save the sheet as CSV (UTF-8) and import that"
    )


def test_a_workbook_that_unpacks_past_the_limit_is_refused(
    run: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tables, "MAX_XLSX_UNPACKED", 8 << 20)
    path = bomb(
        tmp_path / "big.xlsx",
        part="xl/worksheets/sheet1.xml",
        head=f'<worksheet xmlns="{SHEET_NS}"><sheetData>',
        unit='<row><c t="inlineStr"><is><t>x</t></is></c></row>',
        tail="</sheetData></worksheet>",
        size=12 << 20,
    )
    line = one_error(run, path)
    assert line.startswith(
        "Error: big.xlsx: the workbook unpacks to more than the 8 MB an import reads "
        "(xl/worksheets/sheet1.xml alone is 12 MB)"
    )


def test_a_part_that_inflates_past_its_declared_size_is_refused(run: Cli, tmp_path: Path) -> None:
    """The archive says 100 bytes, the data inflates to megabytes: zipfile stops at 100."""
    path = bomb(
        tmp_path / "liar.xlsx",
        part="xl/worksheets/sheet1.xml",
        head=f'<worksheet xmlns="{SHEET_NS}"><sheetData>',
        unit='<row><c t="inlineStr"><is><t>x</t></is></c></row>',
        tail="</sheetData></worksheet>",
        size=4 << 20,
    )
    data = bytearray(path.read_bytes())
    name = b"xl/worksheets/sheet1.xml"
    # The central directory's record of the member: its uncompressed size is at offset 24.
    at = next(
        i
        for i in range(len(data))
        if data.startswith(b"PK\x01\x02", i) and data[i + 46 : i + 46 + len(name)] == name
    )
    assert struct.unpack("<I", data[at + 24 : at + 28])[0] > 4 << 20
    data[at + 24 : at + 28] = struct.pack("<I", 100)
    path.write_bytes(bytes(data))
    line = one_error(run, path)
    assert "liar.xlsx" in line and ("damaged" in line or "not well-formed" in line), line


def test_cells_past_the_column_limit_reject_the_row_or_the_header(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    far = '<c r="ALM{n}" t="inlineStr"><is><t>x</t></is></c>'
    rows = (
        f'<row r="1"><c r="A1" t="inlineStr"><is><t>email</t></is></c></row>'
        f'<row r="2"><c r="A2" t="inlineStr"><is><t>a@example.org</t></is></c>{far.format(n=2)}'
        "</row>"
        f'<row r="3"><c r="A3" t="inlineStr"><is><t>b@example.org</t></is></c></row>'
    )
    path = workbook(
        tmp_path / "far.xlsx",
        f'<worksheet xmlns="{SHEET_NS}"><sheetData>{rows}</sheetData></worksheet>',
    )
    result = run.ok("import", "contacts", str(path))
    assert result.output.splitlines()[0] == (
        "far.xlsx:2: (row): a value in column ALM, past the 1,000 columns an import reads"
    )
    assert emails(session_factory) == {"b@example.org"}
    wide = workbook(
        tmp_path / "wide.xlsx",
        f'<worksheet xmlns="{SHEET_NS}"><sheetData><row r="1">'
        '<c r="A1" t="inlineStr"><is><t>email</t></is></c>'
        '<c r="XFD1" t="inlineStr"><is><t>x</t></is></c></row></sheetData></worksheet>',
    )
    assert one_error(run, wide) == (
        "Error: wide.xlsx:1: the header row: a value in column XFD, past the 1,000 columns an "
        "import reads"
    )


# --------------------------------------------------------------------------- issue 11, item 13

LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
    f'<worksheet xmlns="{SHEET_NS}"><sheetData><row r="1"><c r="A1" t="inlineStr"><is><t>'
    "&lol3;</t></is></c></row></sheetData></worksheet>"
)


@pytest.mark.parametrize(
    ("sheet", "expected"),
    [
        (
            LAUGHS,
            "Error: x.xlsx: xl/worksheets/sheet1.xml inside the workbook declares a DTD, which "
            "no spreadsheet needs; refused (open and save it in Excel or LibreOffice)",
        ),
        (
            sheet_xml([["email"], ["a@example.org"]]).replace(
                "a@example.org", "a@example.org&undefined;"
            ),
            "Error: x.xlsx: xl/worksheets/sheet1.xml inside the workbook is not well-formed XML "
            "(undefined entity, line 1); open and save it in Excel or LibreOffice",
        ),
        (
            sheet_xml([["email"], ["a@example.org"], ["b@example.org"]])[:-60],
            "Error: x.xlsx: xl/worksheets/sheet1.xml inside the workbook is not well-formed XML (",
        ),
    ],
    ids=["billion-laughs", "undefined-entity", "truncated-sheet"],
)
def test_broken_xml_in_a_workbook_is_one_error_line(
    run: Cli, tmp_path: Path, session_factory: sessionmaker[Session], sheet: str, expected: str
) -> None:
    path = workbook(tmp_path / "x.xlsx", sheet)
    line = one_error(run, path)
    assert line == expected or (expected.endswith("(") and line.startswith(expected)), line
    assert emails(session_factory) == set()


def test_broken_shared_strings_are_one_error_line(run: Cli, tmp_path: Path) -> None:
    path = workbook(
        tmp_path / "s.xlsx",
        sheet_xml([["email"]], shared=True),
        strings=LAUGHS.replace("worksheet", "sst"),
    )
    assert "xl/sharedStrings.xml inside the workbook declares a DTD" in one_error(run, path)


def test_table_reads_a_workbook_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each part is opened once: the data sheet is streamed, never parsed twice."""
    path = workbook(
        tmp_path / "once.xlsx",
        sheet_xml([["email", "name"], ["a@example.org", "Ann"], ["b@example.org", "Ben"]]),
    )
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def counting_open(self: zipfile.ZipFile, name: object, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        opened.append(getattr(name, "filename", name))  # type: ignore[arg-type]
        return real_open(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    with Table(path) as table:
        assert [row.cells for row in table] == [["a@example.org", "Ann"], ["b@example.org", "Ben"]]
    assert opened.count("xl/worksheets/sheet1.xml") == 1
