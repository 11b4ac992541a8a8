"""Reading lists as they come from real spreadsheets, and upserting them (DESIGN §9).

One pass over the file with bounded memory: a pre-scan hashes the bytes and settles the encoding,
then `csv.reader` runs over a decoding text stream (or openpyxl over a read-only workbook) and
rows are validated and written in chunks. The whole import is one transaction, so `--strict`,
`--dry-run`, a file that turns out unreadable half-way, and Ctrl-C all leave nothing written.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import functools
import gc
import hashlib
import io
import json
import operator
import re
import sys
import unicodedata
import zipfile
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import charset_normalizer
from babel import Locale, UnknownLocaleError
from sqlalchemy import Table as SqlTable
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from mailer import addresses
from mailer.audience import Audience, contacts_query, suppressed_among
from mailer.errors import ImportFileError, InvalidValueError, StrictImportError
from mailer.models import (
    PARTNERSHIP_KINDS,
    City,
    Contact,
    ContactTag,
    ImportRecord,
    Partnership,
    Signatory,
    Suppression,
    SuppressionReason,
    city_key,
    utcnow,
)

MAX_CELL = 10_000
SAMPLE_BYTES = 64 * 1024
CHUNK_ROWS = 2_000
# How `import_contacts` runs its two threads (see there).
_SWITCH_INTERVAL = 0.0002
_GC_THRESHOLD = 20_000
_QUEUED_CHUNKS = 1
DELIMITERS = ",;\t|"
_SCAN_BLOCK = 1 << 20

# Any C0/C1 control (tab included: every field is single-line) and the Unicode line separators:
# a CR/LF in a name is how a header injection ("\r\nBcc: ...") gets in.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class StrictImportFailed(StrictImportError):
    """`--strict` refused the file; carries the summary so the caller can list the rejects."""

    def __init__(self, message: str, *, summary: ImportSummary) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class Reject:
    row: int
    column: str
    reason: str

    def line(self, file: str) -> str:
        return f"{file}:{self.row}: {self.column}: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "column": self.column, "reason": self.reason}


@dataclass(kw_only=True)
class ImportSummary:
    file: str
    kind: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    rejects: list[Reject] = field(default_factory=list)
    suppressed: int = 0
    dry_run: bool = False
    encoding: str | None = None
    delimiter: str | None = None

    @property
    def rejected(self) -> int:
        return len(self.rejects)

    def line(self) -> str:
        text = (
            f"{self.file}: {self.added} added, {self.updated} updated, "
            f"{self.unchanged} unchanged, {self.rejected} rejected"
        )
        if self.suppressed:
            text += f"; {self.suppressed} of them suppressed (they stay suppressed)"
        if self.dry_run:
            text += " (dry run: nothing written)"
        return text


# --------------------------------------------------------------------------- reading files


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


# --------------------------------------------------------------------------- columns


def normalise_header(name: str) -> str:
    """Header key for matching: case, spaces and punctuation ignored ("E-Mail" -> "email")."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def attribute_key(name: str) -> str:
    """The attribute a free column is kept under: snake_case of the header name."""
    key = re.sub(r"\W+", "_", name.strip().casefold()).strip("_")
    return key


def _synonyms(table: Mapping[str, Iterable[str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for target, names in table.items():
        out[normalise_header(target)] = target
        for name in names:
            out[normalise_header(name)] = target
    return out


CONTACT_FIELDS = (
    "email",
    "name",
    "title",
    "salutation",
    "organisation",
    "city",
    "region",
    "country",
    "language",
    "tags",
)
_CONTACT_SYNONYMS = _synonyms(
    {
        "email": [
            "E-mail",
            "Email address",
            "E-mail address",
            "Mail",
            "E-Mail-Adresse",
            "Courriel",
            "Correo",
            "Correo electrónico",
            "Пошта",
            "Електронна пошта",
        ],
        "name": ["Full name", "Contact", "Contact name", "Mayor", "Ім'я", "ПІБ", "Nombre"],
        "title": ["Position", "Office", "Function", "Job title", "Role", "Funktion", "Посада"],
        "salutation": ["Greeting", "Anrede", "Saludo", "Звернення"],
        "organisation": [
            "Org",
            "Organization",
            "Organisation name",
            "Institution",
        ],
        "city": [
            "Municipality",
            "Town",
            "Stadt",
            "Gemeinde",
            "Ville",
            "Ciudad",
            "Місто",
        ],
        "region": ["State", "Oblast", "Province", "Bundesland", "Область"],
        "country": ["Land", "Country code", "Pays", "País", "Країна"],
        "language": ["Lang", "Locale", "Sprache", "Langue", "Idioma", "Мова"],
        "tags": ["Tag", "Labels", "Groups"],
    }
)
PARTNERSHIP_FIELDS = (
    "ukrainian_city",
    "partner_city",
    "partner_country",
    "kind",
    "since",
    "note",
    "ukrainian_region",
    "partner_region",
)
_PARTNERSHIP_SYNONYMS = _synonyms(
    {
        "ukrainian_city": ["UA city", "City UA", "Ukrainian community", "Місто"],
        "partner_city": ["Partner", "City abroad", "Foreign city"],
        "partner_country": ["Country", "Partner country code"],
        "kind": ["Type", "Relationship", "Tie"],
        "since": ["Year", "Since year", "Established"],
        "note": ["Notes", "Comment", "Remarks"],
        "ukrainian_region": ["Oblast", "Region UA"],
        "partner_region": ["Region", "State"],
    }
)
SIGNATORY_FIELDS = ("name", "title", "city", "email", "region")
_SIGNATORY_SYNONYMS = _synonyms(
    {
        "name": ["Full name", "Signatory", "Mayor"],
        "title": ["Position", "Office", "Function"],
        "city": ["Municipality", "Town", "Community", "Місто"],
        "email": ["E-mail", "Email address", "Mail", "Reply-to", "Reply to"],
        "region": ["Oblast", "State"],
    }
)
_SUPPRESSION_SYNONYMS = _synonyms(
    {"email": ["E-mail", "Email address", "Mail", "Address"], "reason": ["Why"]}
)


@dataclass
class _Columns:
    header: list[str]
    fields: dict[str, int]
    # (cell index, attribute key) for columns that are no known field.
    extra: list[tuple[int, str]]

    def label(self, index: int) -> str:
        return (
            self.header[index]
            if index < len(self.header) and self.header[index]
            else (f"column {index + 1}")
        )


def _resolve_columns(
    *,
    header: Sequence[str],
    display: str,
    fields: Sequence[str],
    synonyms: Mapping[str, str],
    mapping: Mapping[str, str],
    required: Sequence[str],
) -> _Columns:
    keys = [normalise_header(h) for h in header]
    found: dict[str, int] = {}
    mapped_indexes: set[int] = set()
    for source, target in mapping.items():
        target_field = target.strip().lower().replace("-", "_").replace(" ", "_")
        if target_field not in fields:
            raise InvalidValueError(
                f"--map {source}={target}: unknown field {target!r}; valid fields: "
                + ", ".join(fields)
            )
        source_key = normalise_header(source)
        if source_key not in keys:
            raise InvalidValueError(
                f"--map {source}={target}: {display} has no column {source!r} "
                f"(found: {', '.join(h for h in header if h)})"
            )
        index = keys.index(source_key)
        found[target_field] = index
        mapped_indexes.add(index)
    for index, key in enumerate(keys):
        if index in mapped_indexes:
            continue
        meaning = synonyms.get(key)
        if meaning is None or (meaning in found and found[meaning] in mapped_indexes):
            continue
        if meaning in found:
            raise ImportFileError(
                f"{display}: columns {header[found[meaning]]!r} and {header[index]!r} "
                f"both mean {meaning}; rename one or pick with --map COLUMN={meaning}"
            )
        found[meaning] = index
    for name in required:
        if name not in found:
            listing = ", ".join(h for h in header if h) or "nothing"
            raise ImportFileError(
                f"{display}: no {name} column (found: {listing}); use --map COLUMN={name}"
            )
    used = set(found.values())
    extra: list[tuple[int, str]] = []
    seen_keys: set[str] = set()
    for index, name in enumerate(header):
        if index in used:
            continue
        key = attribute_key(name) or f"column_{index + 1}"
        if key in seen_keys:
            key = f"{key}_{index + 1}"
        seen_keys.add(key)
        extra.append((index, key))
    return _Columns(list(header), found, extra)


def parse_mapping(items: Iterable[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items:
        source, sep, target = item.rpartition("=")
        if not sep or not source.strip() or not target.strip():
            raise InvalidValueError(f"--map {item!r}: expected SOURCE=FIELD, e.g. 'E-Post=email'")
        mapping[source.strip()] = target.strip()
    return mapping


# --------------------------------------------------------------------------- field validation


class _RowRejected(Exception):
    def __init__(self, column: str, reason: str) -> None:
        super().__init__(reason)
        self.column = column
        self.reason = reason


@functools.cache
def _country_names() -> dict[str, str]:
    names: dict[str, str] = {}
    # English first so it wins; a few endonyms help with lists from partner cities themselves.
    for locale in ("en", "de", "fr", "es", "it", "pl", "uk", "nl", "pt"):
        for code, name in Locale(locale).territories.items():
            if len(code) == 2 and code.isalpha() and code not in _PSEUDO_TERRITORIES:
                names.setdefault(_fold(name), code)
    for code in list(names.values()):
        names.setdefault(code.casefold(), code)
    names.update(
        {
            "uk": "GB",
            "great britain": "GB",
            "britain": "GB",
            "england": "GB",
            "scotland": "GB",
            "wales": "GB",
            "northern ireland": "GB",
            "usa": "US",
            "u s a": "US",
            "u s": "US",
            "united states of america": "US",
            "america": "US",
            "the netherlands": "NL",
            "holland": "NL",
            "czech republic": "CZ",
            "turkey": "TR",
            "republic of korea": "KR",
            "korea": "KR",
            "ivory coast": "CI",
            "russian federation": "RU",
            "republic of moldova": "MD",
            "macedonia": "MK",
        }
    )
    return names


_PSEUDO_TERRITORIES = frozenset({"EU", "EZ", "UN", "QO", "XA", "XB", "ZZ"})


def _fold(text: str) -> str:
    return " ".join(re.sub(r"[.\-_,()]", " ", text.casefold()).split())


@functools.lru_cache(maxsize=4096)
def parse_country(value: str) -> str:
    code = _country_names().get(_fold(value))
    if code is None:
        raise ValueError(f"unknown country {value!r}; use an ISO code like DE or an English name")
    return code


@functools.cache
def _language_names() -> dict[str, str]:
    return {
        name.casefold(): code for code, name in Locale("en").languages.items() if "_" not in code
    }


@functools.cache
def parse_language(value: str) -> str:
    """A BCP 47 tag, normalised (`de`, `de-AT`, `sr-Latn`); English names like German accepted."""
    tag = value.strip()
    by_name = _language_names().get(tag.casefold())
    if by_name:
        tag = by_name
    try:
        locale = Locale.parse(tag.replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        raise ValueError(
            f"{value!r} is not a language code (use a BCP 47 tag such as en, de, uk, de-AT)"
        ) from None
    parts = [locale.language]
    if locale.script:
        parts.append(locale.script)
    if locale.territory:
        parts.append(locale.territory)
    return "-".join(parts)


class EmailChecker:
    """The import's address check: `addresses.validated` (email-validator with a fast path)."""

    def __call__(self, address: str) -> str:
        """The normalised address; `ValueError` with the reason otherwise."""
        return addresses.validated(address)


def _clean(cells: Sequence[str], columns: _Columns, header_len: int) -> list[str]:
    """Checks every importer applies, then the cells stripped. Raises `_RowRejected`."""
    joined = "".join(cells)
    if _CONTROL.search(joined):
        for index, cell in enumerate(cells):
            match = _CONTROL.search(cell)
            if match:
                char = match.group()
                raise _RowRejected(
                    columns.label(index),
                    f"contains a control character ({_char_name(char)}); "
                    "fields must be single-line text",
                )
    if len(joined) > MAX_CELL:
        for index, cell in enumerate(cells):
            if len(cell) > MAX_CELL:
                raise _RowRejected(
                    columns.label(index), f"{len(cell)} characters, more than {MAX_CELL}"
                )
    return list(map(str.strip, cells))


def _char_name(char: str) -> str:
    names = {"\r": "CR", "\n": "LF", "\t": "tab", "\x00": "NUL"}
    return names.get(char, f"U+{ord(char):04X}")


def _limit_at(columns: _Columns, index: int | None, value: str, limit: int) -> str:
    if len(value) > limit:
        raise _RowRejected(
            columns.label(index) if index is not None else "tags",
            f"{len(value)} characters, more than {limit}",
        )
    return value


def _limit(column: str, value: str, limit: int) -> str:
    if len(value) > limit:
        raise _RowRejected(column, f"{len(value)} characters, more than {limit}")
    return value


class _Tags(frozenset[str]):
    too_long: str | None = None


@functools.lru_cache(maxsize=4096)
def _split_tags(value: str) -> _Tags:
    tags = _Tags(t.strip() for t in re.split(r"[;,]", value) if t.strip())
    tags.too_long = next((t for t in tags if len(t) > 100), None)
    return tags


# --------------------------------------------------------------------------- shared machinery


class _FirstRows:
    """The file row that first named each contact in this import, kept by contact id.

    Duplicates inside a file are found through the database's own unique email index: every
    row is looked up there anyway, and a contact this import has already met is a duplicate.
    Ids are dense, so 4 bytes a contact (4 MB at a million) replace a set of addresses (a
    Python dict of a million costs ~115 MB); ids past `_DENSE` (a PostgreSQL sequence that
    many rolled-back imports moved far ahead) go to a dict, so memory stays bounded.
    """

    _DENSE = 1 << 24

    def __init__(self) -> None:
        self._rows = array("I")
        self._far: dict[int, int] = {}

    def get(self, contact_id: int) -> int:
        rows = self._rows
        if contact_id < len(rows):
            return rows[contact_id]
        return self._far.get(contact_id, 0) if contact_id >= self._DENSE else 0

    def mark(self, contact_id: int, number: int) -> None:
        rows = self._rows
        if contact_id >= len(rows):
            if contact_id >= self._DENSE:
                self._far[contact_id] = number
                return
            grow = min(max(contact_id + 1, 2 * len(rows), 1024), self._DENSE) - len(rows)
            rows.frombytes(bytes(grow * rows.itemsize))
        rows[contact_id] = number

    def mark_all(self, contact_ids: Sequence[int], numbers: Sequence[int]) -> None:
        if (
            isinstance(contact_ids, range)
            and contact_ids.step == 1
            and contact_ids
            and contact_ids[-1] < self._DENSE
        ):
            # New SQLite contacts: one slice instead of a call per row.
            self.mark(contact_ids[-1], 0)
            self._rows[contact_ids[0] : contact_ids[-1] + 1] = array("I", numbers)
            return
        for contact_id, number in zip(contact_ids, numbers, strict=True):
            self.mark(contact_id, number)


class _RejectSink:
    """Collects rejects (sorted per chunk) and writes them to `--rejects FILE` as they come."""

    def __init__(self, *, stack: ExitStack, path: Path | None, header: Sequence[str]) -> None:
        self.rejects: list[Reject] = []
        self._pending: list[tuple[Reject, Sequence[str]]] = []
        self._writer: Any = None
        self._width = len(header)
        if path is not None:
            try:
                # utf-8-sig: Excel opens it with the right characters.
                fh = stack.enter_context(path.open("w", encoding="utf-8-sig", newline=""))
            except OSError as exc:
                raise ImportFileError(f"{path}: cannot write: {exc.strerror}") from exc
            self._writer = csv.writer(fh)
            self._writer.writerow([*header, "reject_reason"])

    def add(self, row: int, column: str, reason: str, cells: Sequence[str]) -> None:
        self._pending.append((Reject(row, column, reason), cells))

    def flush(self, upto: int | None = None) -> None:
        """Record (and write) the rejects collected so far, in row order; with `upto`, only
        those of rows up to that one."""
        self._pending.sort(key=lambda item: item[0].row)
        keep = []
        for reject, cells in self._pending:
            if upto is not None and reject.row > upto:
                keep.append((reject, cells))
                continue
            self.rejects.append(reject)
            if self._writer is not None:
                # A row the CSV reader could not split has no cells: keep the columns aligned.
                shown = cells or [""] * self._width
                self._writer.writerow([*shown, f"{reject.column}: {reject.reason}"])
        self._pending = keep


_INSERT_CITY = insert(City).returning(City.id)
_LOOKUP_COLUMNS = (
    "id",
    "email",
    "name",
    "title",
    "salutation",
    "organisation",
    "language",
    "city_id",
    "attributes",
    "tags",
)
# Where each column is in a row that `_ContactImport._existing` returns.
_OLD = {name: index for index, name in enumerate(_LOOKUP_COLUMNS)}
_OLD_ID, _OLD_EMAIL, _OLD_CITY = _OLD["id"], _OLD["email"], _OLD["city_id"]
_OLD_ATTRIBUTES, _OLD_TAGS = _OLD["attributes"], _OLD["tags"]


class _Cities:
    """Find-or-create cities by (folded name, country), cached for the whole import."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._ids: dict[tuple[str, str | None], int] = {}
        # Same spelling as a row seen before: skip folding the name again.
        self._spelled: dict[tuple[str, str | None], int] = {}
        self._regions: dict[int, str | None] = {}
        for city_id, key, country, region in session.execute(
            select(City.id, City.name_key, City.country, City.region)
        ):
            self._ids.setdefault((key, country), city_id)
            self._regions[city_id] = region

    def cached(self, city: tuple[str, str | None, str | None]) -> int | None:
        """What `get(*city)` returns where that needs no database, else None. Also called from
        the validating thread: the dicts only gain entries and regions, so an id found here is
        the one `get` gives later on the database thread."""
        name, country, region = city
        city_id = self._spelled.get((name, country))
        if city_id is not None and (not region or self._regions.get(city_id)):
            return city_id
        return None

    def get(self, name: str, country: str | None, region: str | None) -> int:
        city_id = self._spelled.get((name, country))
        if city_id is not None and (not region or self._regions.get(city_id)):
            return city_id
        city_id = self._get(name, country, region)
        self._spelled[name, country] = city_id
        return city_id

    def _get(self, name: str, country: str | None, region: str | None) -> int:
        key = (city_key(name), country)
        city_id = self._ids.get(key)
        if city_id is None:
            city_id = self._session.execute(
                _INSERT_CITY,
                {"name": name, "name_key": key[0], "country": country, "region": region or None},
            ).scalar_one()
            self._ids[key] = city_id
            self._regions[city_id] = region or None
        elif region and not self._regions.get(city_id):
            self._session.execute(update(City).where(City.id == city_id).values(region=region))
            self._regions[city_id] = region
        return city_id


def _executemany(session: Session, statement: Any, rows: list[dict[str, Any]]) -> None:
    """Many rows of already-converted values straight to the driver's executemany.

    SQLAlchemy's own executemany costs ~20 µs a row in parameter processing, most of an
    import's budget; the statement is still compiled by SQLAlchemy for the right dialect.
    """
    connection = session.connection()
    compiled = statement.compile(dialect=connection.dialect, column_keys=list(rows[0]))
    if compiled.positional:
        order = compiled.positiontup or []
        getter = operator.itemgetter(*order)
        if len(order) == 1:
            connection.exec_driver_sql(compiled.string, [(getter(row),) for row in rows])
        else:
            connection.exec_driver_sql(compiled.string, [getter(row) for row in rows])
    else:
        connection.exec_driver_sql(compiled.string, rows)


def _large_sqlite_cache(session: Session) -> Callable[[], None]:
    """A big import touches the email index all over: 32 MB of page cache (instead of SQLite's
    2 MB) keeps it from re-reading spilled pages. Returns how to give the pooled connection its
    default back."""
    connection = session.connection()
    if connection.dialect.name != "sqlite":
        return lambda: None
    raw: Any = connection.connection.driver_connection
    before = int(raw.execute("PRAGMA cache_size").fetchone()[0])
    raw.execute("PRAGMA cache_size=-32768")
    return lambda: raw.execute(f"PRAGMA cache_size={before}").close()


def _finish(
    session: Session,
    *,
    summary: ImportSummary,
    table: Table,
    path: Path,
    strict: bool,
    dry_run: bool,
) -> None:
    if strict and summary.rejects:
        session.rollback()
        raise StrictImportFailed(
            f"{summary.file}: {summary.rejected} row(s) rejected and --strict given: "
            "nothing was written",
            summary=summary,
        )
    if dry_run:
        session.rollback()
        return
    session.add(
        ImportRecord(
            file_name=str(path),
            sha256=table.sha256,
            kind=summary.kind,
            added=summary.added,
            updated=summary.updated,
            unchanged=summary.unchanged,
            rejected=summary.rejected,
            rejects=[r.to_json() for r in summary.rejects],
            dry_run=False,
        )
    )
    session.commit()


# --------------------------------------------------------------------------- contacts

_CONTACTS = cast(SqlTable, Contact.__table__)
_CONTACT_TAGS = cast(SqlTable, ContactTag.__table__)
# The same tables without column types: rows are written with values converted once by the real
# types' processors (JSON per row, the timestamp once per import) instead of per row and column,
# which triples the insert rate.
_CONTACTS_RAW = sa_table(_CONTACTS.name, *(sa_column(col.name) for col in _CONTACTS.c))
_CONTACT_TAGS_RAW = sa_table(_CONTACT_TAGS.name, sa_column("contact_id"), sa_column("tag"))
# In the table's column order, so new rows go to the driver as they are.
_CONTACT_SCALARS = ("name", "title", "salutation", "language", "organisation")
_LANGUAGE_SLOT = _CONTACT_SCALARS.index("language")
# The order of the tuples new contacts are written as (SQLite puts the id in front).
_NEW_CONTACT_COLUMNS = (
    "email",
    *_CONTACT_SCALARS,
    "city_id",
    "attributes",
    "tags",
    "created_at",
    "updated_at",
)
# For SQLite, whose JSON columns are plain text: the C encoder called directly, compact, with
# non-ASCII kept, is about 4x cheaper than the JSON type's `json.dumps` per value, and reads back
# the same (json.loads, SQLite's json_extract). What it is given is built afresh, without
# cycles: no need to track every list and dict it meets.
_SQLITE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
# A JSON string literal, non-ASCII kept (the C function behind ensure_ascii=False).
_json_string = json.encoder.encode_basestring


def _sqlite_json_strings(mapping: dict[str, str]) -> str:
    """`_SQLITE_JSON.encode` of a dict of strings (a row's attributes) at a third of the cost."""
    string = _json_string
    return "{" + ",".join([f"{string(k)}:{string(v)}" for k, v in mapping.items()]) + "}"


# SQLite: a chunk's new contacts go in as one JSON array of rows, a statement per table, so that
# SQLite does the whole chunk in C with the GIL released (the driver's executemany takes it back
# for every row) while the other thread validates the next chunk. A row is these values in this
# order; ids are the first new id (?2) plus the row's index. Attributes and tags are nested in the
# row as they are: json_extract gives a nested object or array back as the very text it was
# given (each value's text as is, compact), which is what `_SQLITE_JSON` writes for the column.
# MATERIALIZED: each row's JSON is rendered and parsed once, not once a column.
_SQLITE_ROW = ("email", *_CONTACT_SCALARS, "attributes", "tags", "city_id")
_SQLITE_CITY = _SQLITE_ROW.index("city_id")
_SQLITE_INSERT_CONTACTS = (
    "WITH r AS MATERIALIZED (SELECT key, value FROM json_each(?1)) "
    f"INSERT INTO {_CONTACTS.name} (id, {', '.join(_SQLITE_ROW)}, created_at, updated_at) "
    "SELECT ?2 + key, "
    + ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(_SQLITE_ROW)))
    + ", ?3, ?3 FROM r"
)
# The tag rows of the contacts just inserted (ids ?1 to ?2), from their tags column: cheaper
# than the chunk's JSON again.
_SQLITE_INSERT_TAGS = (
    f"INSERT INTO {_CONTACT_TAGS.name} (contact_id, tag) SELECT c.id, t.value "
    f"FROM {_CONTACTS.name} AS c, json_each(c.tags) AS t WHERE c.id BETWEEN ?1 AND ?2"
)
_SQLITE_LOOKUP = (
    f"SELECT {', '.join(_LOOKUP_COLUMNS)} FROM {_CONTACTS.name} "
    "WHERE email IN (SELECT value FROM json_each(?))"
)


def _sqlite_json_rows(connection: Connection) -> bool:
    """Whether this SQLite takes JSON rows: it has the JSON functions (built in from 3.38, an
    option before) and AS MATERIALIZED (3.35)."""
    raw: Any = connection.connection.driver_connection
    try:
        raw.execute(
            "WITH r AS MATERIALIZED (SELECT key, value FROM json_each('[[1]]')) "
            "SELECT json_extract(value, '$[0]') FROM r"
        ).fetchall()
    except connection.dialect.loaded_dbapi.OperationalError:
        return False
    return True


_SCALAR_LIMITS = {
    "name": 300,
    "title": 300,
    "salutation": 300,
    "organisation": 300,
    "language": 35,
}


@dataclass(slots=True)
class _ContactRow:
    number: int
    cells: list[str]
    email: str
    # One per _CONTACT_SCALARS field: None where the file gives no value.
    scalars: list[str | None]
    attributes: dict[str, str]
    tags: frozenset[str]
    city: tuple[str, str | None, str | None] | None


class _DriverStatement:
    """A statement compiled once by SQLAlchemy for the dialect, run with the driver's
    executemany on rows given as tuples in `keys` order.

    SQLAlchemy's own executemany costs ~20 µs a row in parameter processing, most of an
    import's budget; tuples cost less to build than dicts, and a positional driver (sqlite3)
    takes them as they are.
    """

    def __init__(self, connection: Connection, statement: Any, keys: Sequence[str]) -> None:
        compiled = statement.compile(dialect=connection.dialect, column_keys=list(keys))
        self.sql = compiled.string
        self.keys = tuple(keys)
        self.named = not compiled.positional
        order = [self.keys.index(name) for name in compiled.positiontup or []]
        self.order = None if self.named or order == list(range(len(keys))) else order

    def run(self, connection: Connection, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        params: Any = rows
        if self.named:
            params = [dict(zip(self.keys, row, strict=True)) for row in rows]
        elif self.order is not None:
            order = self.order
            params = [tuple(row[i] for i in order) for row in rows]
        connection.exec_driver_sql(self.sql, params)


class _SortedTags(dict[frozenset[str], list[str]]):
    """Each tag set as a sorted list, made once: a file has few distinct ones."""

    def __missing__(self, tags: frozenset[str]) -> list[str]:
        value = self[tags] = sorted(tags)
        return value


class _ContactValidator:
    """Checks one row of a contacts file (no database needed)."""

    def __init__(self, *, table: Table, columns: _Columns, tags: Sequence[str]) -> None:
        self.table = table
        self.columns = columns
        self.extra_tags = frozenset(t.strip() for t in tags if t.strip())
        self.check_email = EmailChecker()
        f = columns.fields
        self.i_email = f["email"]
        self.scalars = [
            (slot, f[name], _SCALAR_LIMITS[name])
            for slot, name in enumerate(_CONTACT_SCALARS)
            if name in f
        ]
        self.i_city = f.get("city")
        self.i_country = f.get("country")
        self.i_region = f.get("region")
        self.i_tags = f.get("tags")

    def validate(self, number: int, raw: list[str]) -> _ContactRow:
        columns = self.columns
        width = len(columns.header)
        if self.table.kind == "csv":
            if len(raw) != width:
                raise _RowRejected("(row)", f"{len(raw)} cells, the header has {width}")
        else:
            if any(c.strip() for c in raw[width:]):
                raise _RowRejected("(row)", "a value in a column that has no header")
            raw = raw[:width] + [""] * (width - len(raw))
        cells = _clean(raw, columns, width)
        label = columns.label
        address = cells[self.i_email]
        if not address:
            raise _RowRejected(label(self.i_email), "no address")
        try:
            email = self.check_email(address)
        except ValueError as exc:
            raise _RowRejected(label(self.i_email), str(exc)) from None
        scalars: list[str | None] = [None] * len(_CONTACT_SCALARS)
        for slot, index, limit in self.scalars:
            value = cells[index]
            if not value:
                continue
            if len(value) > limit:
                raise _RowRejected(label(index), f"{len(value)} characters, more than {limit}")
            if slot == _LANGUAGE_SLOT:
                try:
                    value = parse_language(value)
                except ValueError as exc:
                    raise _RowRejected(label(index), str(exc)) from None
            scalars[slot] = value
        country: str | None = None
        if self.i_country is not None and cells[self.i_country]:
            try:
                country = parse_country(cells[self.i_country])
            except ValueError as exc:
                raise _RowRejected(label(self.i_country), str(exc)) from None
        region = cells[self.i_region] if self.i_region is not None else ""
        if len(region) > 200:
            _limit_at(columns, self.i_region, region, 200)
        attributes: dict[str, str] = {}
        for i, key in columns.extra:
            value = cells[i]
            if value:
                attributes[key] = value
        city = None
        city_name = cells[self.i_city] if self.i_city is not None else ""
        if city_name:
            if len(city_name) > 200:
                _limit_at(columns, self.i_city, city_name, 200)
            city = (city_name, country, region or None)
        else:
            # Without a city there is no row to hang country/region on: keep them for templates.
            if country:
                attributes["country"] = country
            if region:
                attributes["region"] = region
        tags = self.extra_tags
        if self.i_tags is not None and cells[self.i_tags]:
            split = _split_tags(cells[self.i_tags])
            if split.too_long:
                raise _RowRejected(
                    label(self.i_tags), f"a tag over 100 characters: {split.too_long!r}"
                )
            tags = tags | split if tags else split
        return _ContactRow(number, raw, email, scalars, attributes, tags, city)


class _ContactImport(_ContactValidator):
    """Writes validated rows: one instance, used on the database thread only."""

    def __init__(
        self,
        *,
        session: Session,
        table: Table,
        columns: _Columns,
        tags: Sequence[str],
        summary: ImportSummary,
    ) -> None:
        super().__init__(table=table, columns=columns, tags=tags)
        self.session = session
        self.summary = summary
        self.cities = _Cities(session)
        self.first_rows = _FirstRows()
        self.update_columns = sorted(
            {_CONTACT_SCALARS[slot] for slot, _, _ in self.scalars}
            | ({"city_id"} if self.i_city is not None else set())
            | {"attributes", "tags"}
        )
        # Only a count for the summary: skip the look-ups when nobody is suppressed at all.
        self.any_suppressed = session.scalar(select(Suppression.id).limit(1)) is not None
        connection = session.connection()
        dialect = connection.dialect
        sqlite = dialect.name == "sqlite"
        # New contacts as JSON rows, a statement a chunk (see `_SQLITE_ROW`); elsewhere (and on
        # a SQLite without the JSON functions built in) the driver's executemany.
        self.json_rows = sqlite and _sqlite_json_rows(connection)
        # With JSON rows, this import gives new contacts their ids itself (see `_insert_rows`).
        self.next_id: int | None = None
        # Set by the database thread, read by `prepare`: whether to build new rows ahead.
        self.expect_new = True
        self.insert_contacts = _DriverStatement(
            connection, insert(_CONTACTS_RAW), _NEW_CONTACT_COLUMNS
        )
        self.insert_tags = _DriverStatement(
            connection, insert(_CONTACT_TAGS_RAW), ("contact_id", "tag")
        )
        json_processor = _CONTACTS.c.attributes.type.dialect_impl(dialect).bind_processor(dialect)
        self.to_json: Callable[[Any], Any] = json_processor or (lambda value: value)
        self.attributes_json: Callable[[dict[str, str]], Any] = self.to_json
        if sqlite:
            self.to_json = _SQLITE_JSON.encode
            self.attributes_json = _sqlite_json_strings
        json_reader = _CONTACTS.c.attributes.type.dialect_impl(dialect).result_processor(
            dialect, None
        )
        self.from_json: Callable[[Any], Any] = json_reader or (lambda value: value)
        self._lookup_statements: dict[int, Any] = {}
        self._tags_json: dict[frozenset[str], Any] = {}
        # Each tag set sorted, for `sqlite_values` (also on the validating thread).
        self._tag_lists = _SortedTags()
        time_processor = _CONTACTS.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
        now = utcnow()
        self.now_param = time_processor(now) if time_processor else now

    def prepare(
        self,
        rows: list[_ContactRow],
        rejects: list[tuple[int, str, str, list[str]]],
        upto: int | None,
    ) -> _Chunk:
        """All of a chunk's work that needs no database, done on the validating thread: the
        database thread holds the GIL as little as possible, so the two run side by side."""
        firsts: list[_ContactRow] = []
        repeats: list[tuple[_ContactRow, int]] = []
        first_of: dict[str, int] = {}
        for row in rows:
            first = first_of.setdefault(row.email, row.number)
            if first == row.number:
                firsts.append(row)
            else:
                repeats.append((row, first))
        if not self.json_rows:
            return _Chunk(rejects, upto, firsts, repeats, list(first_of))
        chunk = _Chunk(rejects, upto, firsts, repeats, _SQLITE_JSON.encode(list(first_of)))
        # A re-import finds (nearly) every row stored: new rows are built only where the last
        # chunk had mostly new rows, and on the database thread otherwise.
        if self.expect_new:
            values = chunk.values = self.sqlite_values(firsts)
            pairs = zip(values, firsts, strict=True)
            if not any(v[_SQLITE_CITY] is None and row.city is not None for v, row in pairs):
                chunk.data = _SQLITE_JSON.encode(values)
        return chunk

    def sqlite_values(self, rows: list[_ContactRow]) -> list[list[Any]]:
        """New rows as `_SQLITE_ROW`; the city id is None where only the database can tell it."""
        tags = self._tag_lists
        city = self.cities.cached
        return [
            [
                row.email,
                *row.scalars,
                row.attributes,
                tags[row.tags],
                None if row.city is None else city(row.city),
            ]
            for row in rows
        ]

    def flush(self, chunk: _Chunk) -> list[tuple[int, str, str, list[str]]]:
        """Write one chunk; returns the rows rejected as duplicates (row, column, reason, cells)."""
        rejects: list[tuple[int, str, str, list[str]]] = []
        if not chunk.firsts:
            return rejects
        existing = self._existing(chunk.emails)
        first_rows = self.first_rows
        fresh = chunk.firsts
        known: list[tuple[_ContactRow, Sequence[Any]]] = []
        if existing:
            fresh = []
            for row in chunk.firsts:
                old = existing.get(row.email)
                if old is None:
                    fresh.append(row)
                    continue
                first = first_rows.get(old[_OLD_ID])
                if first:
                    rejects.append(self._duplicate(row, first))
                else:
                    first_rows.mark(old[_OLD_ID], row.number)
                    known.append((row, old))
        for row, first in chunk.repeats:
            old = existing.get(row.email)
            # A stored contact's first row may be in an earlier chunk.
            rejects.append(self._duplicate(row, first_rows.get(old[_OLD_ID]) if old else first))
        self.expect_new = len(fresh) * 2 >= len(chunk.firsts)
        tag_rows: list[tuple[int, str]] = []
        if fresh:
            ids: Sequence[int]
            if self.json_rows:
                ids = self._insert_rows(chunk, fresh, all_fresh=not existing)
            else:
                ids = self._insert(fresh, tag_rows)
            first_rows.mark_all(ids, [row.number for row in fresh])
        if known:
            self._update(known, tag_rows)
        self.insert_tags.run(self.session.connection(), tag_rows)
        self.summary.added += len(fresh)
        if self.any_suppressed:
            emails = [row.email for row in fresh] + [row.email for row, _ in known]
            self.summary.suppressed += len(suppressed_among(self.session, emails))
        return rejects

    def _duplicate(self, row: _ContactRow, first: int) -> tuple[int, str, str, list[str]]:
        return (
            row.number,
            self.columns.label(self.i_email),
            f"duplicate of row {first} ({row.email})",
            row.cells,
        )

    def _insert(self, rows: list[_ContactRow], tag_rows: list[tuple[int, str]]) -> Sequence[int]:
        """Insert new contacts with the driver's executemany and add their tags to `tag_rows`;
        returns their ids in order."""
        cities = self.cities
        city_ids = [None if row.city is None else cities.get(*row.city) for row in rows]
        to_json = self.attributes_json
        tags_json = self.tags_json
        now = self.now_param
        self.insert_contacts.run(
            self.session.connection(),
            [
                (
                    row.email,
                    *row.scalars,
                    city_id,
                    to_json(row.attributes),
                    tags_json(row.tags),
                    now,
                    now,
                )
                for row, city_id in zip(rows, city_ids, strict=True)
            ],
        )
        found = self._existing([row.email for row in rows])
        ids = [found[row.email][_OLD_ID] for row in rows]
        tag_rows.extend(
            (contact_id, tag) for contact_id, row in zip(ids, rows, strict=True) for tag in row.tags
        )
        return ids

    def _insert_rows(self, chunk: _Chunk, rows: list[_ContactRow], *, all_fresh: bool) -> range:
        """Insert new contacts and their tags as JSON rows, a statement a table; returns their
        ids in order. `rows` are the new ones among `chunk.firsts` (all of them: `all_fresh`)."""
        connection = self.session.connection()
        # The import is one write transaction, and SQLite has one writer: no other connection
        # can add a contact until it commits (a write that began before ours makes our first
        # write fail rather than interleave), so the ids after the largest are ours to give.
        # Knowing them, tag rows need no look-up by address.
        if self.next_id is None:
            self.next_id = int(
                connection.exec_driver_sql(
                    "SELECT coalesce(max(id), 0) + 1 FROM contacts"
                ).scalar_one()
            )
        first_id = self.next_id
        self.next_id += len(rows)
        data = chunk.data if all_fresh else None
        if data is None:
            if chunk.values is None:
                values = self.sqlite_values(rows)
            elif all_fresh:
                values = chunk.values
            else:
                built = dict(zip([row.number for row in chunk.firsts], chunk.values, strict=True))
                values = [built[row.number] for row in rows]
            # The cities the validating thread could not tell, in row order as ever.
            cities = self.cities
            for row, row_values in zip(rows, values, strict=True):
                if row.city is not None and row_values[_SQLITE_CITY] is None:
                    row_values[_SQLITE_CITY] = cities.get(*row.city)
            data = _SQLITE_JSON.encode(values)
        now = self.now_param
        connection.exec_driver_sql(_SQLITE_INSERT_CONTACTS, (data, first_id, now))
        connection.exec_driver_sql(_SQLITE_INSERT_TAGS, (first_id, self.next_id - 1))
        return range(first_id, self.next_id)

    def _update(
        self, known: list[tuple[_ContactRow, Sequence[Any]]], tag_rows: list[tuple[int, str]]
    ) -> None:
        """Merge rows into stored contacts; most of a re-import is unchanged, so that is
        settled before anything is built: stored JSON is decoded only where the stored text
        differs from what this row would write."""
        cities = self.cities
        to_json = self.to_json
        from_json = self.from_json
        tags_json = self.tags_json
        attributes_json = self.attributes_json
        update_columns = self.update_columns
        checks = [(slot, _OLD[_CONTACT_SCALARS[slot]]) for slot, _, _ in self.scalars]
        updates: list[dict[str, Any]] = []
        for row, old in known:
            scalars = row.scalars
            changed = False
            for slot, at in checks:
                value = scalars[slot]
                if value is not None and value != old[at]:
                    changed = True
                    break
            city_id = old[_OLD_CITY]
            if row.city is not None:
                city_id = cities.get(*row.city)
                changed = changed or city_id != old[_OLD_CITY]
            old_tags: list[Any] | None = None
            if old[_OLD_TAGS] != tags_json(row.tags):
                old_tags = from_json(old[_OLD_TAGS])
                changed = changed or sorted({*(old_tags or []), *row.tags}) != old_tags
            old_attributes: dict[str, Any] | None = None
            stored = old[_OLD_ATTRIBUTES]
            # Stored as the very text of this row's attributes: the same values, nothing to merge.
            if (row.attributes and stored != attributes_json(row.attributes)) or stored is None:
                old_attributes = from_json(stored)
                changed = changed or {**(old_attributes or {}), **row.attributes} != (
                    old_attributes
                )
            if not changed:
                self.summary.unchanged += 1
                continue
            if old_tags is None:
                old_tags = from_json(old[_OLD_TAGS])
            if old_attributes is None:
                old_attributes = from_json(old[_OLD_ATTRIBUTES])
            merged: dict[str, Any] = {name: old[_OLD[name]] for name in update_columns}
            for slot, _ in checks:
                if scalars[slot] is not None:
                    merged[_CONTACT_SCALARS[slot]] = scalars[slot]
            if row.city is not None:
                merged["city_id"] = city_id
            old_tag_set = set(old_tags or [])
            merged["attributes"] = to_json({**(old_attributes or {}), **row.attributes})
            merged["tags"] = to_json(sorted(old_tag_set | row.tags))
            merged["b_id"] = old[_OLD_ID]
            merged["updated_at"] = self.now_param
            updates.append(merged)
            tag_rows.extend((old[_OLD_ID], tag) for tag in row.tags - old_tag_set)
        if updates:
            raw = _CONTACTS_RAW.c
            statement = (
                update(_CONTACTS_RAW)
                .where(raw.id == bindparam("b_id"))
                .values({name: bindparam(name) for name in [*update_columns, "updated_at"]})
            )
            _executemany(self.session, statement, updates)
        self.summary.updated += len(updates)

    def tags_json(self, tags: frozenset[str]) -> Any:
        # Few distinct tag sets in a file: serialise each once.
        cached = self._tags_json.get(tags)
        if cached is None:
            cached = self._tags_json[tags] = self.to_json(sorted(tags))
        return cached

    def _existing(self, emails: list[str] | str) -> dict[str, Sequence[Any]]:
        """Stored contacts among `emails` (on SQLite, a JSON array of them) as driver rows
        (`_LOOKUP_COLUMNS`, JSON undecoded).

        SQLAlchemy's result rows cost ~20 µs each here; the statement is still compiled by
        SQLAlchemy for the dialect.
        """
        connection = self.session.connection()
        if isinstance(emails, str):
            # The driver's own rows: SQLAlchemy's cost 1-2 µs more a row, a re-import's every row.
            raw: Any = connection.connection.driver_connection
            return {values[_OLD_EMAIL]: values for values in raw.execute(_SQLITE_LOOKUP, (emails,))}
        compiled = self._lookup_statements.get(len(emails))
        if compiled is None:
            c = _CONTACTS.c
            statement = select(*(c[name] for name in _LOOKUP_COLUMNS)).where(
                c.email.in_([bindparam(f"e{i}") for i in range(len(emails))])
            )
            compiled = statement.compile(dialect=connection.dialect)
            self._lookup_statements[len(emails)] = compiled
        if compiled.positional:
            params: Any = tuple(emails)
        else:
            params = {f"e{i}": email for i, email in enumerate(emails)}
        result = connection.exec_driver_sql(compiled.string, params)
        return {values[_OLD_EMAIL]: values for values in result}


@dataclass(slots=True)
class _Chunk:
    """A chunk of validated rows, ready for `_ContactImport.flush`."""

    # The rejects among its rows (row, column, reason, cells).
    rejects: list[tuple[int, str, str, list[str]]]
    # The number of its last row (None for the file's last chunk).
    upto: int | None
    # The first row of each address in the chunk, and the later ones with their first's number.
    firsts: list[_ContactRow]
    repeats: list[tuple[_ContactRow, int]]
    # The addresses to look up (on SQLite, as one JSON array).
    emails: list[str] | str
    # SQLite: `firsts` as new rows (`_SQLITE_ROW`), unless left to the database thread, and as
    # the JSON array to insert where every city id was known.
    values: list[list[Any]] | None = None
    data: str | None = None


def _validated_chunks(importer: _ContactImport, chunk_rows: int) -> Iterator[_Chunk]:
    table = importer.table
    validate = importer.validate
    prepare = importer.prepare
    rows: list[_ContactRow] = []
    rejects: list[tuple[int, str, str, list[str]]] = []
    has_data = False
    for raw in table:
        if raw.problem is None and not "".join(raw.cells).strip():
            continue
        has_data = True
        try:
            if raw.problem is not None:
                raise _RowRejected(*raw.problem)
            rows.append(validate(raw.number, raw.cells))
        except _RowRejected as exc:
            rejects.append((raw.number, exc.column, exc.reason, raw.cells))
        if len(rows) >= chunk_rows:
            yield prepare(rows, rejects, raw.number)
            rows, rejects = [], []
    if not has_data:
        raise ImportFileError(f"{table.display}: no data rows")
    yield prepare(rows, rejects, None)


def import_contacts(
    session_factory: sessionmaker[Session],
    *,
    path: Path,
    encoding: str | None = None,
    delimiter: str | None = None,
    mapping: Mapping[str, str] | None = None,
    tags: Sequence[str] = (),
    strict: bool = False,
    dry_run: bool = False,
    rejects_path: Path | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> ImportSummary:
    """Upsert contacts from a CSV/XLSX file by normalised email.

    Only fields present in the file (and non-empty in a row) overwrite stored values; attributes
    and tags merge. Suppressions are never touched. Raises `StrictImportFailed` with `strict`
    when any row is rejected, `ImportFileError` when the file cannot be read.
    """
    for tag in tags:
        if not tag.strip() or len(tag.strip()) > 100 or _CONTROL.search(tag):
            raise InvalidValueError(f"--tag {tag!r}: a tag is 1 to 100 characters of plain text")
    with ExitStack() as stack:
        table = stack.enter_context(Table(path, encoding=encoding, delimiter=delimiter))
        columns = _resolve_columns(
            header=table.header,
            display=table.display,
            fields=CONTACT_FIELDS,
            synonyms=_CONTACT_SYNONYMS,
            mapping=mapping or {},
            required=("email",),
        )
        summary = ImportSummary(
            file=table.display,
            kind="contacts",
            dry_run=dry_run,
            encoding=table.encoding,
            delimiter=table.delimiter,
        )
        sink = _RejectSink(stack=stack, path=rejects_path, header=table.header)
        # Writing (one database thread that owns the session from start to end) overlaps with
        # reading and validating (this thread) where the driver releases the GIL: on SQLite, for
        # the whole of each chunk's inserts.
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="mailer-import"))
        # A thread back from SQLite waits for the GIL up to the switch interval (5 ms by
        # default) while the other one runs Python: a few times a statement, that left the
        # database thread idle for much of each chunk.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, _SWITCH_INTERVAL))
        stack.callback(sys.setswitchinterval, switch_interval)
        # Every row makes several containers that live until its chunk is written: with the
        # default threshold (700) the collector ran every ~100 rows, a quarter of the
        # validating thread's time.
        thresholds = gc.get_threshold()
        gc.set_threshold(max(thresholds[0], _GC_THRESHOLD), *thresholds[1:])
        stack.callback(gc.set_threshold, *thresholds)

        def on_db(call: Callable[[], Any]) -> Any:
            return pool.submit(call).result()

        session: Session = on_db(session_factory)
        stack.callback(lambda: pool.submit(session.close).result())
        restore_cache = on_db(lambda: _large_sqlite_cache(session))
        stack.callback(lambda: pool.submit(restore_cache).result())
        importer: _ContactImport = on_db(
            lambda: _ContactImport(
                session=session, table=table, columns=columns, tags=tags, summary=summary
            )
        )
        chunks = _validated_chunks(importer, chunk_rows)
        # Chunks handed to the database thread and not yet settled, oldest first, with the
        # number of their last row.
        writing: deque[tuple[Future[list[tuple[int, str, str, list[str]]]], int | None]] = deque()

        def collect(*, keep: int) -> None:
            while len(writing) > keep:
                future, upto = writing.popleft()
                for reject in future.result():
                    sink.add(*reject)
                # Rows up to the chunk's end are all settled now: their rejects go out in order.
                sink.flush(upto=upto)

        for chunk in chunks:
            for reject in chunk.rejects:
                sink.add(*reject)
            # One chunk queued behind the one being written: either thread can have a slow
            # chunk (a cache spill, a garbage collection) without the other waiting for it.
            collect(keep=_QUEUED_CHUNKS)
            writing.append((pool.submit(importer.flush, chunk), chunk.upto))
        collect(keep=0)
        sink.flush()
        summary.rejects = sink.rejects
        on_db(
            lambda: _finish(
                session, summary=summary, table=table, path=path, strict=strict, dry_run=dry_run
            )
        )
        return summary


# --------------------------------------------------------------------------- partnerships


def _parse_kind(value: str) -> str:
    folded = " ".join(value.casefold().replace("-", " ").replace("_", " ").split())
    kind = {
        "": "partner",
        "twinning": "twin",
        "twin town": "twin",
        "twin city": "twin",
        "twinned": "twin",
        "sister city": "sister",
        "sister cities": "sister",
        "partner city": "partner",
        "partnership": "partner",
        "friendship city": "friendship",
        "friends": "friendship",
    }.get(folded, folded)
    if kind not in PARTNERSHIP_KINDS:
        raise ValueError(f"unknown kind {value!r}; use one of {', '.join(PARTNERSHIP_KINDS)}")
    return kind


def _parse_year(value: str) -> int | None:
    if not value:
        return None
    this_year = dt.date.today().year
    try:
        year = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a year") from None
    if not 1900 <= year <= this_year:
        raise ValueError(f"{year} is not a year between 1900 and {this_year}")
    return year


def _small_import(
    session_factory: sessionmaker[Session],
    *,
    kind: str,
    path: Path,
    fields: Sequence[str],
    synonyms: Mapping[str, str],
    required: Sequence[str],
    encoding: str | None,
    delimiter: str | None,
    mapping: Mapping[str, str] | None,
    strict: bool,
    dry_run: bool,
    rejects_path: Path | None,
    handle: Callable[[Session, _Cities, dict[str, str], Callable[[str], str], int], str],
) -> ImportSummary:
    """Row-at-a-time import for the small tables; `handle` returns added/updated/unchanged."""
    with ExitStack() as stack:
        table = stack.enter_context(Table(path, encoding=encoding, delimiter=delimiter))
        columns = _resolve_columns(
            header=table.header,
            display=table.display,
            fields=fields,
            synonyms=synonyms,
            mapping=mapping or {},
            required=required,
        )
        summary = ImportSummary(
            file=table.display,
            kind=kind,
            dry_run=dry_run,
            encoding=table.encoding,
            delimiter=table.delimiter,
        )
        sink = _RejectSink(stack=stack, path=rejects_path, header=table.header)
        session = stack.enter_context(session_factory())
        cities = _Cities(session)
        width = len(table.header)
        has_data = False

        def label(name: str) -> str:
            return columns.label(columns.fields[name]) if name in columns.fields else name

        for raw in table:
            if not any(c.strip() for c in raw.cells) and raw.problem is None:
                continue
            has_data = True
            try:
                if raw.problem is not None:
                    raise _RowRejected(*raw.problem)
                cells = raw.cells
                if table.kind == "csv" and len(cells) != width:
                    raise _RowRejected("(row)", f"{len(cells)} cells, the header has {width}")
                cells = cells[:width] + [""] * (width - len(cells))
                cleaned = _clean(cells, columns, width)
                values = {name: cleaned[i] for name, i in columns.fields.items()}
                outcome = handle(session, cities, values, label, raw.number)
            except _RowRejected as exc:
                sink.add(raw.number, exc.column, exc.reason, raw.cells)
                continue
            if outcome == "added":
                summary.added += 1
            elif outcome == "updated":
                summary.updated += 1
            else:
                summary.unchanged += 1
        if not has_data:
            raise ImportFileError(f"{table.display}: no data rows")
        sink.flush()
        summary.rejects = sink.rejects
        _finish(session, summary=summary, table=table, path=path, strict=strict, dry_run=dry_run)
        return summary


def _required(values: Mapping[str, str], name: str, label: Callable[[str], str]) -> str:
    value = values.get(name, "")
    if not value:
        raise _RowRejected(label(name), "empty")
    return _limit(label(name), value, 200)


def import_partnerships(
    session_factory: sessionmaker[Session],
    *,
    path: Path,
    encoding: str | None = None,
    delimiter: str | None = None,
    mapping: Mapping[str, str] | None = None,
    strict: bool = False,
    dry_run: bool = False,
    rejects_path: Path | None = None,
) -> ImportSummary:
    """Partner-city ties, upserted on (Ukrainian city, partner city); cities made as needed."""
    seen: dict[tuple[int, int], int] = {}

    def handle(
        session: Session,
        cities: _Cities,
        values: dict[str, str],
        label: Callable[[str], str],
        number: int,
    ) -> str:
        ua_name = _required(values, "ukrainian_city", label)
        partner_name = _required(values, "partner_city", label)
        country_text = _required(values, "partner_country", label)
        try:
            country = parse_country(country_text)
        except ValueError as exc:
            raise _RowRejected(label("partner_country"), str(exc)) from None
        try:
            kind = _parse_kind(values.get("kind", ""))
        except ValueError as exc:
            raise _RowRejected(label("kind"), str(exc)) from None
        try:
            since = _parse_year(values.get("since", ""))
        except ValueError as exc:
            raise _RowRejected(label("since"), str(exc)) from None
        note = values.get("note") or None
        ua_id = cities.get(ua_name, "UA", values.get("ukrainian_region") or None)
        partner_id = cities.get(partner_name, country, values.get("partner_region") or None)
        if (ua_id, partner_id) in seen:
            raise _RowRejected(label("partner_city"), f"duplicate of row {seen[ua_id, partner_id]}")
        seen[ua_id, partner_id] = number
        existing = session.scalar(
            select(Partnership).where(
                Partnership.ukrainian_city_id == ua_id, Partnership.partner_city_id == partner_id
            )
        )
        if existing is None:
            session.add(
                Partnership(
                    ukrainian_city_id=ua_id,
                    partner_city_id=partner_id,
                    kind=kind,
                    since=since,
                    note=note,
                )
            )
            session.flush()
            return "added"
        new = {
            "kind": kind if values.get("kind") else existing.kind,
            "since": since if since is not None else existing.since,
            "note": note if note is not None else existing.note,
        }
        if all(getattr(existing, k) == v for k, v in new.items()):
            return "unchanged"
        for key, value in new.items():
            setattr(existing, key, value)
        session.flush()
        return "updated"

    return _small_import(
        session_factory,
        kind="partnerships",
        path=path,
        fields=PARTNERSHIP_FIELDS,
        synonyms=_PARTNERSHIP_SYNONYMS,
        required=("ukrainian_city", "partner_city", "partner_country"),
        encoding=encoding,
        delimiter=delimiter,
        mapping=mapping,
        strict=strict,
        dry_run=dry_run,
        rejects_path=rejects_path,
        handle=handle,
    )


# --------------------------------------------------------------------------- signatories


def import_signatories(
    session_factory: sessionmaker[Session],
    *,
    path: Path,
    encoding: str | None = None,
    delimiter: str | None = None,
    mapping: Mapping[str, str] | None = None,
    strict: bool = False,
    dry_run: bool = False,
    rejects_path: Path | None = None,
) -> ImportSummary:
    """The letter's signatories, upserted on (name, Ukrainian city); the address is optional."""
    seen: dict[tuple[str, int], int] = {}
    check_email = EmailChecker()

    def handle(
        session: Session,
        cities: _Cities,
        values: dict[str, str],
        label: Callable[[str], str],
        number: int,
    ) -> str:
        name = _limit(label("name"), _required(values, "name", label), 300)
        city_name = _required(values, "city", label)
        title = _limit(label("title"), values.get("title", ""), 300) or None
        email = None
        if values.get("email"):
            try:
                email = check_email(values["email"])
            except ValueError as exc:
                raise _RowRejected(label("email"), str(exc)) from None
        city_id = cities.get(city_name, "UA", values.get("region") or None)
        key = (name.casefold(), city_id)
        if key in seen:
            raise _RowRejected(label("name"), f"duplicate of row {seen[key]}")
        seen[key] = number
        existing = next(
            (
                s
                for s in session.scalars(select(Signatory).where(Signatory.city_id == city_id))
                if s.name.casefold() == name.casefold()
            ),
            None,
        )
        if existing is None:
            session.add(Signatory(name=name, title=title, city_id=city_id, email=email))
            session.flush()
            return "added"
        new = {
            "name": name,
            "title": title if title is not None else existing.title,
            "email": email if email is not None else existing.email,
        }
        if all(getattr(existing, k) == v for k, v in new.items()):
            return "unchanged"
        for k, v in new.items():
            setattr(existing, k, v)
        session.flush()
        return "updated"

    return _small_import(
        session_factory,
        kind="signatories",
        path=path,
        fields=SIGNATORY_FIELDS,
        synonyms=_SIGNATORY_SYNONYMS,
        required=("name", "city"),
        encoding=encoding,
        delimiter=delimiter,
        mapping=mapping,
        strict=strict,
        dry_run=dry_run,
        rejects_path=rejects_path,
        handle=handle,
    )


# --------------------------------------------------------------------------- suppressions


def import_suppressions(
    session_factory: sessionmaker[Session],
    *,
    path: Path,
    reason: SuppressionReason = SuppressionReason.MANUAL,
    encoding: str | None = None,
    delimiter: str | None = None,
) -> ImportSummary:
    """Suppress every address of a file (`email` column, optional `reason`).

    `added` counts newly suppressed addresses, `unchanged` those suppressed already.
    """
    from mailer.audience import parse_reason, suppress

    check_email = EmailChecker()
    with ExitStack() as stack:
        table = stack.enter_context(Table(path, encoding=encoding, delimiter=delimiter))
        columns = _resolve_columns(
            header=table.header,
            display=table.display,
            fields=("email", "reason"),
            synonyms=_SUPPRESSION_SYNONYMS,
            mapping={},
            required=("email",),
        )
        summary = ImportSummary(file=table.display, kind="suppressions", encoding=table.encoding)
        sink = _RejectSink(stack=stack, path=None, header=table.header)
        by_reason: dict[SuppressionReason, set[str]] = {}
        width = len(table.header)
        has_data = False
        i_email = columns.fields["email"]
        i_reason = columns.fields.get("reason")
        for raw in table:
            if not any(c.strip() for c in raw.cells) and raw.problem is None:
                continue
            has_data = True
            try:
                if raw.problem is not None:
                    raise _RowRejected(*raw.problem)
                if table.kind == "csv" and len(raw.cells) != width:
                    raise _RowRejected("(row)", f"{len(raw.cells)} cells, the header has {width}")
                cells = _clean(raw.cells[:width] + [""] * (width - len(raw.cells)), columns, width)
                try:
                    email = check_email(cells[i_email])
                except ValueError as exc:
                    raise _RowRejected(columns.label(i_email), str(exc)) from None
                row_reason = reason
                if i_reason is not None and cells[i_reason]:
                    try:
                        row_reason = parse_reason(cells[i_reason])
                    except InvalidValueError as exc:
                        raise _RowRejected(columns.label(i_reason), str(exc)) from None
            except _RowRejected as exc:
                sink.add(raw.number, exc.column, exc.reason, raw.cells)
                continue
            by_reason.setdefault(row_reason, set()).add(email)
        if not has_data:
            raise ImportFileError(f"{table.display}: no data rows")
        sink.flush()
        summary.rejects = sink.rejects
        total = 0
        with session_factory() as session, session.begin():
            for row_reason, emails in by_reason.items():
                total += len(emails)
                summary.added += suppress(
                    session, emails=sorted(emails), reason=row_reason, source=f"import:{path.name}"
                )
        summary.unchanged = total - summary.added
        return summary


# --------------------------------------------------------------------------- listing contacts

LIST_COLUMNS = (
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
)


def contact_records(
    session_factory: sessionmaker[Session], *, audience: Audience, page: int = 1000
) -> Iterator[dict[str, Any]]:
    """One plain dict per matching contact (LIST_COLUMNS plus `attributes`), streamed."""
    with session_factory() as session:
        query = contacts_query(session, audience).execution_options(yield_per=page)
        batch: list[Contact] = []

        def emit(contacts: list[Contact]) -> Iterator[dict[str, Any]]:
            suppressed = suppressed_among(session, [c.email for c in contacts])
            for c in contacts:
                yield {
                    "email": c.email,
                    "name": c.name,
                    "title": c.title,
                    "organisation": c.organisation,
                    "language": c.language,
                    "city": c.city.name if c.city else None,
                    "region": c.city.region if c.city else None,
                    "country": c.city.country if c.city else None,
                    "tags": list(c.tags or []),
                    "suppressed": c.email in suppressed,
                    "attributes": dict(c.attributes or {}),
                }

        for contact in session.scalars(query):
            batch.append(contact)
            if len(batch) >= page:
                yield from emit(batch)
                batch = []
        yield from emit(batch)


def spreadsheet_safe(value: str) -> str:
    """A cell a spreadsheet will show as text, never run as a formula."""
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value
