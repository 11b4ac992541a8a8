"""File bytes → rows: the one place that knows how spreadsheets come (DESIGN §9).

A pre-scan hashes the bytes and settles the encoding (BOMs, UTF-8, a guess between cp1251 and
cp1252), the delimiter is sniffed, then `csv.reader` runs over a decoding text stream (or
openpyxl over a read-only workbook): `Table` yields `RawRow`s, one per spreadsheet row, with
bounded memory for any file size.

It knows no database and no contact fields: what a column means is `fields`' job, what a row
becomes is `importers`'. It must not import SQLAlchemy, `models`, `fields` or `importers`.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import hashlib
import io
import re
import unicodedata
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import charset_normalizer

from mailer.errors import ImportFileError, InvalidValueError

SAMPLE_BYTES = 64 * 1024
DELIMITERS = ",;\t|"
_SCAN_BLOCK = 1 << 20


@dataclass
class _Scan:
    sha256: str
    size: int
    head: bytes
    utf8_ok: bool
    non_ascii_sample: bytes


def _scan(path: Path) -> _Scan:
    """Hash the file and check it decodes as UTF-8, in one bounded-memory pass."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    utf8_ok = True
    head = b""
    sample: list[bytes] = []
    sample_size = 0
    size = 0
    try:
        with path.open("rb") as fh:
            while block := fh.read(_SCAN_BLOCK):
                if not head:
                    head = block[:SAMPLE_BYTES]
                size += len(block)
                digest.update(block)
                if utf8_ok:
                    try:
                        decoder.decode(block)
                    except UnicodeDecodeError:
                        utf8_ok = False
                if sample_size < SAMPLE_BYTES and not block.isascii():
                    # Only lines with non-ASCII bytes tell encodings apart; keep them whole.
                    for line in block.split(b"\n"):
                        if not line.isascii():
                            sample.append(line)
                            sample_size += len(line)
                            if sample_size >= SAMPLE_BYTES:
                                break
            if utf8_ok:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    utf8_ok = False
    except OSError as exc:
        raise ImportFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return _Scan(digest.hexdigest(), size, head, utf8_ok, b"\n".join(sample))


def _looks_binary(head: bytes) -> bool:
    if b"\x00" in head:
        return True
    controls = sum(1 for b in head[:8192] if b < 32 and b not in (9, 10, 13))
    return controls > max(2, len(head[:8192]) // 100)


def _implausible_words(text: str) -> float:
    """Share of non-ASCII words that look like a wrong decoding ("Mьnchen", "Êè¿â")."""
    words = [w for w in re.split(r"[\s,;|\t\"'@.()/]+", text) if w and not w.isascii()]
    if not words:
        return 0.0
    bad = 0
    for word in words:
        latin = cyrillic = non_ascii_latin = 0
        symbol_inside = False
        for i, ch in enumerate(word):
            if ch.isascii():
                if ch.isalpha():
                    latin += 1
                continue
            name = unicodedata.name(ch, "")
            category = unicodedata.category(ch)
            if "CYRILLIC" in name:
                cyrillic += 1
            elif category.startswith("L"):
                latin += 1
                non_ascii_latin += 1
            elif (
                category[0] in "NSP"
                and category not in ("Pd", "Pi", "Pf")
                and 0 < i < len(word) - 1
                and word[i - 1].isalpha()
                and word[i + 1].isalpha()
            ):
                symbol_inside = True
        letters = latin + cyrillic
        if (
            (latin and cyrillic)
            or symbol_inside
            or (not cyrillic and letters >= 3 and non_ascii_latin * 2 > letters)
        ):
            bad += 1
    return bad / len(words)


def _guess_legacy_encoding(sample: bytes, display: str) -> str:
    """Not UTF-8: tell Cyrillic (cp1251) from Western European (cp1252), or ask."""
    plausible = []
    for encoding in ("cp1251", "cp1252"):
        try:
            text = sample.decode(encoding)
        except UnicodeDecodeError:
            continue
        if _implausible_words(text) <= 0.1:
            plausible.append(encoding)
    if len(plausible) == 1:
        return plausible[0]
    best = charset_normalizer.from_bytes(
        sample, cp_isolation=plausible or None, explain=False
    ).best()
    if len(plausible) == 2 and best is not None and best.encoding in plausible:
        return str(best.encoding)
    hint = f" (it may be {best.encoding})" if best is not None else ""
    raise ImportFileError(
        f"{display}: cannot tell the file's encoding with confidence: it is not UTF-8{hint}; "
        "give it with --encoding, e.g. --encoding cp1252 (Western European) or "
        "--encoding cp1251 (Cyrillic)"
    )


def _choose_encoding(scan: _Scan, encoding: str | None, display: str) -> str:
    head = scan.head
    if encoding:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise InvalidValueError(f"--encoding {encoding}: unknown encoding") from None
        # Excel's "CSV UTF-8" writes a BOM; don't let it stick to the first header name.
        if name == "utf-8" and head.startswith(codecs.BOM_UTF8):
            return "utf-8-sig"
        return name
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if _looks_binary(head):
        raise ImportFileError(f"{display}: not a CSV or XLSX file (binary content)")
    if scan.utf8_ok:
        return "utf-8"
    return _guess_legacy_encoding(scan.non_ascii_sample, display)


def _sniff_delimiter(text: str) -> str:
    header_line = re.split(r"[\r\n]", text, maxsplit=1)[0]
    cut = text.rfind("\n", 0, 8192)
    sample = text[: cut if cut > 0 else 8192]
    try:
        sniffed = csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
        if sniffed in header_line:
            return sniffed
    except csv.Error:
        pass
    counts = {d: header_line.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _decode_error(path: Path, encoding: str, display: str) -> ImportFileError:
    """Find where the bytes stop decoding (only on the error path, so a second pass is fine)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0
    lines = 1
    with path.open("rb") as fh:
        while block := fh.read(_SCAN_BLOCK):
            try:
                lines += decoder.decode(block).count("\n")
            except UnicodeDecodeError as exc:
                good = exc.object[: exc.start]
                lines += good.decode(encoding, errors="replace").count("\n")
                at = offset + exc.start - (len(exc.object) - len(block))
                byte = exc.object[exc.start : exc.start + 1].hex()
                return ImportFileError(
                    f"{display}: line {lines}, byte {max(at, 0)}: 0x{byte} is not valid "
                    f"{encoding}; give the file's real encoding with --encoding"
                )
            offset += len(block)
    return ImportFileError(
        f"{display}: the file ends in the middle of a {encoding} character; "
        "give the file's real encoding with --encoding"
    )


@dataclass(slots=True)
class RawRow:
    number: int
    cells: list[str]
    # A problem the reader found itself (an XLSX formula without a value): (column, reason).
    problem: tuple[str, str] | None = None


class Table:
    """An open CSV or XLSX file: `header`, then iterate `RawRow`s. Use as a context manager."""

    def __init__(self, path: Path, *, encoding: str | None = None, delimiter: str | None = None):
        self.path = path
        self.display = path.name
        self.encoding: str | None = None
        self.delimiter: str | None = None
        self.kind = "csv"
        self._stack = ExitStack()
        if not path.is_file():
            raise ImportFileError(f"{path}: no such file")
        if delimiter is not None:
            delimiter = {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(delimiter, delimiter)
            if len(delimiter) != 1:
                raise InvalidValueError(
                    f"--delimiter {delimiter!r}: give one character, e.g. ';' or tab"
                )
        self._scan = _scan(path)
        self.sha256 = self._scan.sha256
        head = self._scan.head
        if self._scan.size == 0:
            raise ImportFileError(f"{self.display}: empty file")
        if head.startswith(b"\xd0\xcf\x11\xe0"):
            raise ImportFileError(
                f"{self.display}: an old Excel .xls file; save it as .xlsx or CSV first"
            )
        try:
            if head.startswith(b"PK\x03\x04"):
                self.kind = "xlsx"
                self.header, self._rows = self._open_xlsx()
            else:
                self.header, self._rows = self._open_csv(encoding, delimiter)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def __iter__(self) -> Iterator[RawRow]:
        return self._rows

    # -- CSV

    def _open_csv(
        self, encoding: str | None, delimiter: str | None
    ) -> tuple[list[str], Iterator[RawRow]]:
        chosen = _choose_encoding(self._scan, encoding, self.display)
        self.encoding = chosen
        head_text = self._scan.head.decode(chosen, errors="replace").lstrip("\ufeff")
        self.delimiter = delimiter or _sniff_delimiter(head_text)
        raw = self._stack.enter_context(self.path.open("rb"))
        text = io.TextIOWrapper(raw, encoding=chosen, errors="strict", newline="")
        self._stack.callback(text.detach)
        reader = csv.reader(text, delimiter=self.delimiter, strict=True)
        rows = self._csv_rows(reader, chosen)
        header: RawRow | None = None
        for row in rows:
            if any(cell.strip() for cell in row.cells):
                header = row
                break
        if header is None:
            raise ImportFileError(f"{self.display}: empty file")
        cells = header.cells
        cells[0] = cells[0].lstrip("\ufeff")
        return cells, rows

    def _csv_rows(self, reader: Iterator[list[str]], encoding: str) -> Iterator[RawRow]:
        number = 0
        while True:
            number += 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise _decode_error(self.path, encoding, self.display) from None
            except csv.Error as exc:
                message = str(exc)
                if "end of data" in message:
                    raise ImportFileError(
                        f"{self.display}:{number}: a quoted cell is never closed "
                        "(its opening quote is in this row)"
                    ) from None
                if "field larger than field limit" in message:
                    raise ImportFileError(
                        f"{self.display}:{number}: a cell over {csv.field_size_limit()} "
                        "characters, or a quote that is never closed"
                    ) from None
                if "expected after" in message:
                    message = (
                        'text after a closing quote (write a quote inside a quoted cell as "")'
                    )
                yield RawRow(number, [], ("(row)", f"malformed CSV: {message}"))
                continue
            yield RawRow(number, cells)

    # -- XLSX

    def _open_xlsx(self) -> tuple[list[str], Iterator[RawRow]]:
        import openpyxl
        from openpyxl.utils.exceptions import InvalidFileException

        try:
            # File objects, not the path: openpyxl would refuse a name not ending in .xlsx.
            values_wb = openpyxl.load_workbook(
                self._stack.enter_context(self.path.open("rb")), read_only=True, data_only=True
            )
            self._stack.callback(values_wb.close)
            formulas_wb = openpyxl.load_workbook(
                self._stack.enter_context(self.path.open("rb")), read_only=True, data_only=False
            )
            self._stack.callback(formulas_wb.close)
        except (zipfile.BadZipFile, InvalidFileException, KeyError, OSError, ValueError):
            self.close()
            raise ImportFileError(
                f"{self.display}: not a CSV or XLSX file (a ZIP archive that is not an "
                "Excel workbook)"
            ) from None
        sheets = [ws for ws in values_wb.worksheets if _sheet_has_data(ws)]
        if not sheets:
            self.close()
            raise ImportFileError(f"{self.display}: empty file")
        if len(sheets) > 1:
            names = ", ".join(repr(ws.title) for ws in sheets)
            self.close()
            raise ImportFileError(
                f"{self.display}: {len(sheets)} sheets hold data ({names}); save the sheet "
                "to import as its own file, or delete the other sheets"
            )
        values = sheets[0]
        formulas = formulas_wb[values.title]
        rows = self._xlsx_rows(values, formulas)
        for row in rows:
            if any(cell.strip() for cell in row.cells):
                cells = row.cells
                while cells and not cells[-1].strip():
                    cells.pop()
                return cells, rows
        self.close()
        raise ImportFileError(f"{self.display}: empty file")

    def _xlsx_rows(self, values: Any, formulas: Any) -> Iterator[RawRow]:
        from openpyxl.utils import get_column_letter

        header: list[str] | None = None
        pairs = zip(
            values.iter_rows(values_only=True), formulas.iter_rows(values_only=True), strict=False
        )
        for number, (value_row, formula_row) in enumerate(pairs, start=1):
            cells = [_cell_text(v) for v in value_row]
            problem = None
            for index, (value, formula) in enumerate(zip(value_row, formula_row, strict=False)):
                if value is None and formula is not None and _is_formula(formula):
                    column = header[index] if header and index < len(header) else ""
                    label = column or get_column_letter(index + 1)
                    problem = (
                        label,
                        f"formula without a cached value in cell {get_column_letter(index + 1)}"
                        f"{number} (open and save the file in Excel/LibreOffice)",
                    )
                    break
            row = RawRow(number, cells, problem)
            if header is None and any(c.strip() for c in cells):
                header = cells
            yield row


def _sheet_has_data(ws: Any) -> bool:
    for row in ws.iter_rows(values_only=True):
        if any(v is not None and str(v).strip() for v in row):
            return True
    return False


def _is_formula(value: object) -> bool:
    if isinstance(value, str):
        return value.startswith("=")
    return type(value).__name__ in ("ArrayFormula", "DataTableFormula")


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        # Postcodes and years come out of Excel as 1990.0.
        return str(int(value))
    if isinstance(value, dt.datetime):
        if value.time() == dt.time(0):
            return value.date().isoformat()
        return value.isoformat(sep=" ")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return str(value)


def read_table(
    path: Path, *, encoding: str | None = None, delimiter: str | None = None
) -> Iterator[tuple[int, dict[str, str]]]:
    """(row number, {header: cell}) for every non-empty row; header is row 1 as in a spreadsheet.

    Rows with more or fewer cells than the header raise `ImportFileError`; importers that want
    to reject such rows instead use `Table` directly.
    """
    with Table(path, encoding=encoding, delimiter=delimiter) as table:
        header = table.header
        for row in table:
            if not any(c.strip() for c in row.cells):
                continue
            if row.problem:
                raise ImportFileError(f"{table.display}:{row.number}: {': '.join(row.problem)}")
            if table.kind == "csv" and len(row.cells) != len(header):
                raise ImportFileError(
                    f"{table.display}:{row.number}: {len(row.cells)} cells, "
                    f"the header has {len(header)}"
                )
            yield row.number, dict(zip(header, row.cells, strict=False))
