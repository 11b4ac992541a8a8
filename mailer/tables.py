"""File bytes → rows: the one place that knows how spreadsheets come (DESIGN §9).

A pre-scan hashes the bytes, tells text from what is not text, and settles the encoding (BOMs,
UTF-8, a guess between cp1251 and cp1252); the delimiter is sniffed; then `csv.reader` runs over
a decoding text stream, or a streaming XML reader over the one worksheet of an XLSX workbook.
`Table` yields `RawRow`s, one per spreadsheet row, with bounded memory and bounded work for any
file, however hostile: a row, a header, an unpacked workbook and its shared strings all have a
documented limit, and going past one is one `ImportFileError` naming it.

One bad row never refuses a whole file: a row with bytes that do not decode (or a cell the
workbook cannot give a value for) comes with a `problem`, and the importer rejects that row only.

It knows no database and no contact fields: what a column means is `fields`' job, what a row
becomes is `importers`'. It must not import SQLAlchemy, `models`, `fields` or `importers`.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import functools
import hashlib
import io
import re
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO
from xml.parsers import expat

import charset_normalizer

from mailer.errors import ImportFileError, InvalidValueError, quoted

SAMPLE_BYTES = 64 * 1024
DELIMITERS = ",;\t|"
_SCAN_BLOCK = 1 << 20
# Limits on what one file may make us do (the README lists them). A contact list has a few dozen
# columns; 1,000 leaves room for any real export and keeps a hostile header cheap.
MAX_COLUMNS = 1_000
# One row of a CSV file, quoted line breaks included.
MAX_ROW_CHARS = 1_000_000
# XLSX: the parts read (workbook, styles, shared strings, worksheets), unpacked. Streamed, so
# this bounds time; the shared strings are held in memory, so they have their own limits.
MAX_XLSX_UNPACKED = 1 << 30
MAX_SHARED_STRINGS_UNPACKED = 64 << 20
MAX_SHARED_STRINGS = 1_000_000
_XML_BLOCK = 1 << 16
# Names a file with XLSX content must not have: the user thinks it is text.
_TEXT_SUFFIXES = frozenset({".csv", ".tsv", ".txt", ".tab"})
# Lone surrogates: bytes that did not decode (errors="surrogateescape").
_UNDECODED = re.compile("[\udc80-\udcff]")
_UTF8_TEXT = re.compile("[^\x00-\x7f\udc80-\udcff]")


@dataclass
class _Scan:
    sha256: str
    size: int
    head: bytes
    # Whether the whole file decodes as UTF-8; if not, whether some of it is real UTF-8 text
    # (multi-byte sequences that decode), which tells a UTF-8 file with a few damaged rows from
    # a file in another encoding.
    utf8_ok: bool
    utf8_text: bool
    non_ascii_sample: bytes


def _scan(path: Path) -> _Scan:
    """Hash the file and check it decodes as UTF-8, in one bounded-memory pass."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    utf8_ok = True
    # Bytes of multi-byte sequences that decode, and bytes that do not.
    utf8_weight = undecoded = 0
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
                ascii_block = block.isascii()
                if ascii_block:
                    # Nothing to decode: ASCII is ASCII in every encoding we read.
                    pass
                elif utf8_ok:
                    try:
                        utf8_weight += len(block) - len(decoder.decode(block))
                    except UnicodeDecodeError as exc:
                        utf8_ok = False
                        # From here on every block is weighed (damaged files only).
                        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
                        text = decoder.decode(exc.object)
                        undecoded += len(_UNDECODED.findall(text))
                        utf8_weight += len(exc.object) - len(text)
                else:
                    text = decoder.decode(block)
                    undecoded += len(_UNDECODED.findall(text))
                    utf8_weight += len(block) - len(text)
                if sample_size < SAMPLE_BYTES and not ascii_block:
                    # Only lines with non-ASCII bytes tell encodings apart; keep them whole.
                    for part in block.split(b"\n"):
                        if not part.isascii():
                            sample.append(part)
                            sample_size += len(part)
                            if sample_size >= SAMPLE_BYTES:
                                break
            if utf8_ok:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    utf8_ok = False
    except OSError as exc:
        raise ImportFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    # Real UTF-8 text with a few damaged rows, or another encoding whose bytes now and then
    # happen to form a UTF-8 sequence (cp1251 "Ці" is the bytes of UTF-8 "Ö³")?
    utf8_text = utf8_weight > 2 * undecoded
    return _Scan(digest.hexdigest(), size, head, utf8_ok, utf8_text, b"\n".join(sample))


def _utf16_without_bom(head: bytes) -> str | None:
    """UTF-16 text saved without a BOM: every other byte of ASCII text is NUL."""
    sample = head[: len(head) // 2 * 2]
    if len(sample) < 4:
        return None
    even, odd = sample[0::2], sample[1::2]
    if even.count(0) > len(even) * 0.9 and odd.count(0) < len(odd) * 0.1:
        return "utf-16-be"
    if odd.count(0) > len(odd) * 0.9 and even.count(0) < len(even) * 0.1:
        return "utf-16-le"
    return None


def _what_it_looks_like(head: bytes) -> str | None:
    """What a file that is not text looks like ("a PNG image"), or None if it looks like text.

    A NUL byte or a stray control in a row is a damaged row, rejected on its own; a file is not
    text when such bytes are a real share of its start.
    """
    window = head[:8192]
    if not window:
        return None
    nuls = window.count(0)
    controls = sum(1 for b in window if b < 32 and b not in (0, 9, 10, 12, 13, 26))
    if nuls * 2 > len(window):
        return "mostly NUL bytes"
    if (nuls + controls) * 20 <= len(window):
        return None
    import puremagic

    try:
        found = puremagic.magic_string(head)
    except (puremagic.PureError, ValueError):
        found = []
    if found:
        kind = found[0]
        extension = f" ({kind.extension})" if kind.extension else ""
        return f"it looks like {kind.name}{extension}"
    return "binary content"


def _choose_encoding(scan: _Scan, encoding: str | None, display: str) -> tuple[str, bool]:
    """The encoding to read the file with, and whether some rows may not decode in it."""
    head = scan.head
    if encoding:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise InvalidValueError(f"--encoding {encoding[:40]}: unknown encoding") from None
        # Excel's "CSV UTF-8" writes a BOM; don't let it stick to the first header name.
        if name == "utf-8" and head.startswith(codecs.BOM_UTF8):
            name = "utf-8-sig"
        if name in ("utf-8", "utf-8-sig"):
            return name, not scan.utf8_ok
        # A legacy code page may leave a few bytes undefined (cp1252: 0x81, 0x8D, ...).
        return name, not name.startswith("utf-")
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32", False
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig", not scan.utf8_ok
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16", False
    utf16 = _utf16_without_bom(head)
    if utf16 is not None:
        return utf16, False
    looks = _what_it_looks_like(head)
    if looks is not None:
        raise ImportFileError(f"{display}: not a CSV or XLSX file ({looks})")
    if scan.utf8_ok:
        return "utf-8", False
    if scan.utf8_text:
        # Real UTF-8 text with a few rows that are not: those rows are rejected, one by one.
        return "utf-8", True
    return _guess_legacy_encoding(scan.non_ascii_sample, display), True


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
    # A problem the reader found itself, that rejects this row only: (column, reason).
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
                    f"--delimiter {quoted(delimiter)}: give one character, e.g. ';' or tab"
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

    def _label(self, index: int) -> str:
        header: list[str] | None = getattr(self, "header", None)
        if header and index < len(header) and header[index].strip():
            return header[index]
        return f"column {index + 1}"

    # -- CSV

    def _open_csv(
        self, encoding: str | None, delimiter: str | None
    ) -> tuple[list[str], Iterator[RawRow]]:
        chosen, damaged = _choose_encoding(self._scan, encoding, self.display)
        if damaged and not self._scan.utf8_text and chosen in ("utf-8", "utf-8-sig"):
            # Nothing in the file decodes as UTF-8 text: it is in another encoding.
            raise _decode_error(self.path, chosen, self.display)
        self.encoding = chosen
        head_text = self._scan.head.decode(chosen, errors="replace").lstrip("\ufeff")
        self.delimiter = delimiter or _sniff_delimiter(head_text)
        raw = self._stack.enter_context(self.path.open("rb"))
        errors = "surrogateescape" if damaged else "strict"
        text = io.TextIOWrapper(raw, encoding=chosen, errors=errors, newline="")
        self._stack.callback(text.detach)
        rows = self._csv_rows(text, chosen, damaged=damaged)
        header: RawRow | None = None
        for row in rows:
            if row.problem is not None:
                raise ImportFileError(
                    f"{self.display}:{row.number}: the header row: {row.problem[1]}"
                )
            if any(cell.strip() for cell in row.cells):
                header = row
                break
        if header is None:
            raise ImportFileError(f"{self.display}: empty file")
        cells = header.cells
        cells[0] = cells[0].lstrip("\ufeff")
        return cells, rows

    def _csv_rows(self, text: IO[str], encoding: str, *, damaged: bool) -> Iterator[RawRow]:
        # A row's physical lines are counted as the reader takes them: a row (quoted line breaks
        # included) longer than MAX_ROW_CHARS stops the file before it can fill the memory.
        # `readline(limit)` keeps a single line bounded too.
        taken = [0]
        limit = MAX_ROW_CHARS

        def lines() -> Iterator[str]:
            for line in iter(functools.partial(text.readline, limit + 1), ""):
                taken[0] += len(line)
                if taken[0] > limit:
                    raise _RowTooLong
                yield line

        reader = csv.reader(lines(), delimiter=self.delimiter or ",", strict=True)
        number = 0
        while True:
            number += 1
            taken[0] = 0
            try:
                cells = next(reader)
            except StopIteration:
                return
            except _RowTooLong:
                raise ImportFileError(
                    f"{self.display}:{number}: a row of more than {MAX_ROW_CHARS:,} characters "
                    "(is a quote never closed?)"
                ) from None
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
                        f"{self.display}:{number}: a cell over {csv.field_size_limit():,} "
                        "characters, or a quote that is never closed"
                    ) from None
                if "expected after" in message:
                    message = (
                        'text after a closing quote (write a quote inside a quoted cell as "")'
                    )
                yield RawRow(number, [], ("(row)", f"malformed CSV: {message}"))
                continue
            if len(cells) > MAX_COLUMNS:
                reason = (
                    f"{len(cells):,} cells, more than the {MAX_COLUMNS:,} columns an import reads"
                )
                yield RawRow(number, [], ("(row)", reason))
                continue
            if damaged and _UNDECODED.search("".join(cells)):
                yield self._undecoded(number, cells, encoding)
                continue
            yield RawRow(number, cells)

    def _undecoded(self, number: int, cells: list[str], encoding: str) -> RawRow:
        """A row with bytes that are not `encoding`: rejected on its own, cells made printable."""
        index, cell = next((i, c) for i, c in enumerate(cells) if _UNDECODED.search(c))
        match = _UNDECODED.search(cell)
        assert match is not None
        byte = ord(match.group()) - 0xDC00
        shown = [_UNDECODED.sub("\ufffd", c) for c in cells]
        reason = (
            f"byte 0x{byte:02x} is not valid {encoding} (the rest of the file is read as "
            f"{encoding}; give --encoding if that is wrong)"
        )
        return RawRow(number, shown, (self._label(index), reason))

    # -- XLSX

    def _open_xlsx(self) -> tuple[list[str], Iterator[RawRow]]:
        book = _Workbook(self.path, display=self.display, stack=self._stack)
        suffix = self.path.suffix.lower()
        if suffix in _TEXT_SUFFIXES:
            raise ImportFileError(
                f"{self.display}: an Excel workbook (XLSX) with a {suffix} name; rename it to "
                f"{self.path.stem}.xlsx and import that"
            )
        found: list[tuple[str, Iterator[RawRow], RawRow]] = []
        for sheet, part in book.worksheets():
            rows = book.rows(part, label=self._label)
            first = next((row for row in rows if any(c.strip() for c in row.cells)), None)
            if first is not None:
                found.append((sheet, rows, first))
        if not found:
            raise ImportFileError(f"{self.display}: empty file")
        if len(found) > 1:
            names = ", ".join(quoted(sheet) for sheet, _, _ in found)
            raise ImportFileError(
                f"{self.display}: {len(found)} sheets hold data ({names}); save the sheet "
                "to import as its own file, or delete the other sheets"
            )
        _, rows, header = found[0]
        if header.problem is not None:
            raise ImportFileError(
                f"{self.display}:{header.number}: the header row: {header.problem[1]}"
            )
        cells = header.cells
        while cells and not cells[-1].strip():
            cells.pop()
        return cells, rows


class _RowTooLong(Exception):
    pass


class _Refused(Exception):
    """Raised inside an XML handler: the part uses what a workbook never needs (a DTD)."""


def _local(name: str) -> str:
    """The local name of a namespaced XML name ("uri|c" -> "c")."""
    return name.rpartition("|")[2]


class _Workbook:
    """The parts of an XLSX file an import needs, read once, streaming, each within its limit.

    Parsed with expat directly: no DTD is accepted (so no entity expansion, the billion laughs
    included), each part is fed in blocks, and every malformed part, truncated stream or bad
    checksum is one `ImportFileError` naming the part.
    """

    def __init__(self, path: Path, *, display: str, stack: ExitStack) -> None:
        self.display = display
        self._budget = MAX_XLSX_UNPACKED
        try:
            self._zip = stack.enter_context(zipfile.ZipFile(path))
            names = set(self._zip.namelist())
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            raise self._not_a_workbook() from None
        root = self._relationships("_rels/.rels", base="") if "_rels/.rels" in names else {}
        self._book = next(
            (t for kind, t in root.values() if kind.endswith("/officeDocument")),
            "xl/workbook.xml",
        )
        if self._book not in names:
            raise self._not_a_workbook()
        folder = PurePosixPath(self._book).parent
        rels_name = str(folder / "_rels" / (PurePosixPath(self._book).name + ".rels"))
        self._rels = self._relationships(rels_name, base=str(folder)) if rels_name in names else {}
        self._sheets: list[tuple[str, str]] = []
        self._date1904 = False
        self._parse_workbook()
        self._strings: list[str] = []
        self._date_styles: dict[int, bool] = {}
        for kind, target in self._rels.values():
            if kind.endswith("/sharedStrings") and target in names:
                self._parse_strings(target)
            elif kind.endswith("/styles") and target in names:
                self._parse_styles(target)

    def _not_a_workbook(self) -> ImportFileError:
        return ImportFileError(
            f"{self.display}: not a CSV or XLSX file (a ZIP archive that is not an Excel workbook)"
        )

    # -- reading parts

    def _open(self, name: str, *, limit: int | None = None) -> IO[bytes]:
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise ImportFileError(
                f"{self.display}: the workbook names a part {quoted(name)} it does not hold; "
                "open and save it in Excel or LibreOffice"
            ) from None
        mib = 1 << 20
        if limit is not None and info.file_size > limit:
            raise ImportFileError(
                f"{self.display}: its {name} unpacks to {info.file_size / mib:,.0f} MB, more than "
                f"the {limit / mib:,.0f} MB an import reads; save the sheet as CSV (UTF-8) and "
                "import that"
            )
        if info.file_size > self._budget:
            raise ImportFileError(
                f"{self.display}: the workbook unpacks to more than the "
                f"{MAX_XLSX_UNPACKED / mib:,.0f} MB an import reads ({name} alone is "
                f"{info.file_size / mib:,.0f} MB); save the sheet as CSV (UTF-8) and import that"
            )
        # zipfile never inflates past the size the archive declares (and checks the CRC).
        self._budget -= info.file_size
        return self._zip.open(info)

    def _parse(
        self,
        name: str,
        *,
        start: Callable[[str, dict[str, str]], None],
        end: Callable[[str], None] | None = None,
        text: Callable[[str], None] | None = None,
        limit: int | None = None,
    ) -> Iterator[None]:
        """Feed part `name` to expat block by block, yielding after each block."""
        parser = expat.ParserCreate(namespace_separator="|")
        parser.buffer_text = True
        parser.buffer_size = _XML_BLOCK

        def refuse(*_: object) -> None:
            raise _Refused

        parser.StartDoctypeDeclHandler = refuse
        parser.EntityDeclHandler = refuse
        parser.StartElementHandler = start
        if end is not None:
            parser.EndElementHandler = end
        if text is not None:
            parser.CharacterDataHandler = text
        try:
            with self._open(name, limit=limit) as stream:
                while block := stream.read(_XML_BLOCK):
                    parser.Parse(block, False)
                    yield
                parser.Parse(b"", True)
        except expat.ExpatError as exc:
            raise ImportFileError(
                f"{self.display}: {name} inside the workbook is not well-formed XML "
                f"({expat.ErrorString(exc.code)}, line {exc.lineno}); open and save it in "
                "Excel or LibreOffice"
            ) from None
        except _Refused:
            raise ImportFileError(
                f"{self.display}: {name} inside the workbook declares a DTD, which no "
                "spreadsheet needs; refused (open and save it in Excel or LibreOffice)"
            ) from None
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            # zlib.error is an Exception subclass zipfile lets through: caught below.
            raise ImportFileError(
                f"{self.display}: the workbook is damaged ({name}: {exc}); open and save it "
                "in Excel or LibreOffice"
            ) from None
        except Exception as exc:
            if type(exc).__module__ == "zlib":
                raise ImportFileError(
                    f"{self.display}: the workbook is damaged ({name}: {exc}); open and save "
                    "it in Excel or LibreOffice"
                ) from None
            raise

    def _run(
        self,
        name: str,
        *,
        start: Callable[[str, dict[str, str]], None],
        end: Callable[[str], None] | None = None,
        text: Callable[[str], None] | None = None,
        limit: int | None = None,
    ) -> None:
        for _ in self._parse(name, start=start, end=end, text=text, limit=limit):
            pass

    def _relationships(self, name: str, *, base: str) -> dict[str, tuple[str, str]]:
        """{Id: (Type, part name)} of a .rels part; targets resolved against `base`."""
        found: dict[str, tuple[str, str]] = {}

        def start(tag: str, attrs: dict[str, str]) -> None:
            if _local(tag) == "Relationship" and attrs.get("TargetMode") != "External":
                target = attrs.get("Target", "")
                if target.startswith("/"):
                    target = target[1:]
                else:
                    target = _normalise(f"{base}/{target}" if base else target)
                found[attrs.get("Id", "")] = (attrs.get("Type", ""), target)

        self._run(name, start=start)
        return found

    def _parse_workbook(self) -> None:
        def start(tag: str, attrs: dict[str, str]) -> None:
            local = _local(tag)
            if local == "sheet":
                rel = next((v for k, v in attrs.items() if _local(k) == "id"), "")
                kind, target = self._rels.get(rel, ("", ""))
                if kind.endswith("/worksheet"):
                    self._sheets.append((attrs.get("name", target), target))
            elif local == "workbookPr":
                self._date1904 = attrs.get("date1904", "").lower() in ("1", "true")

        self._run(self._book, start=start)

    def _parse_strings(self, name: str) -> None:
        strings = self._strings
        parts: list[str] = []
        state = {"t": False, "phonetic": 0}

        def start(tag: str, attrs: dict[str, str]) -> None:
            local = _local(tag)
            if local == "si":
                parts.clear()
            elif local == "t":
                state["t"] = not state["phonetic"]
            elif local == "rPh":
                state["phonetic"] += 1

        def end(tag: str) -> None:
            local = _local(tag)
            if local == "t":
                state["t"] = False
            elif local == "rPh":
                state["phonetic"] -= 1
            elif local == "si":
                if len(strings) >= MAX_SHARED_STRINGS:
                    raise ImportFileError(
                        f"{self.display}: more than {MAX_SHARED_STRINGS:,} shared strings in "
                        "the workbook, the most an import reads; save the sheet as CSV (UTF-8) "
                        "and import that"
                    )
                strings.append("".join(parts))

        def text(data: str) -> None:
            if state["t"]:
                parts.append(data)

        self._run(name, start=start, end=end, text=text, limit=MAX_SHARED_STRINGS_UNPACKED)

    def _parse_styles(self, name: str) -> None:
        from openpyxl.styles.numbers import BUILTIN_FORMATS, is_date_format, is_timedelta_format

        formats: dict[int, str] = dict(BUILTIN_FORMATS)
        styles: list[int] = []
        where = {"cellXfs": False}

        def start(tag: str, attrs: dict[str, str]) -> None:
            local = _local(tag)
            if local == "numFmt":
                formats[_int(attrs.get("numFmtId"))] = attrs.get("formatCode", "")
            elif local == "cellXfs":
                where["cellXfs"] = True
            elif local == "xf" and where["cellXfs"]:
                styles.append(_int(attrs.get("numFmtId")))

        def end(tag: str) -> None:
            if _local(tag) == "cellXfs":
                where["cellXfs"] = False

        self._run(name, start=start, end=end)
        for index, format_id in enumerate(styles):
            code = formats.get(format_id, "")
            if code and is_date_format(code):
                self._date_styles[index] = bool(is_timedelta_format(code))

    # -- rows

    def worksheets(self) -> list[tuple[str, str]]:
        """(sheet name, part name) of every worksheet, in the workbook's order."""
        return list(self._sheets)

    def rows(self, part: str, *, label: Callable[[int], str]) -> Iterator[RawRow]:
        """The rows of one worksheet as they are parsed; `label(index)` names a column."""
        from openpyxl.utils.cell import column_index_from_string, get_column_letter
        from openpyxl.utils.datetime import MAC_EPOCH, WINDOWS_EPOCH

        epoch = MAC_EPOCH if self._date1904 else WINDOWS_EPOCH
        strings = self._strings
        date_styles = self._date_styles
        # Finished rows, with their problem as (column index or -1, reason): the column's label
        # is asked for when the row is handed out, once the header is known.
        done: list[tuple[int, list[str], tuple[int, str] | None]] = []
        cells: list[str] = []
        value: list[str] = []
        # The current row and cell: number, problem; column, type, style, formula, collecting.
        row: dict[str, int] = {"number": 0, "column": -1}
        problem: list[tuple[int, str]] = []
        cell: dict[str, str] = {}
        collecting = [False]

        def start(tag: str, attrs: dict[str, str]) -> None:
            local = _local(tag)
            if local == "c":
                ref = attrs.get("r")
                if ref:
                    letters = ref.rstrip("0123456789")
                    try:
                        row["column"] = column_index_from_string(letters) - 1
                    except ValueError:
                        row["column"] += 1
                else:
                    row["column"] += 1
                cell.clear()
                cell["t"] = attrs.get("t", "n")
                cell["s"] = attrs.get("s", "")
                value.clear()
            elif local == "v" or (local == "t" and cell.get("t") == "inlineStr"):
                collecting[0] = True
            elif local == "f":
                cell["f"] = "1"
            elif local == "rPh":
                cell["phonetic"] = "1"
            elif local == "row":
                ref = attrs.get("r")
                row["number"] = _int(ref) if ref and ref.isdigit() else row["number"] + 1
                row["column"] = -1
                cells.clear()
                problem.clear()

        def end(tag: str) -> None:
            local = _local(tag)
            if local in ("v", "t"):
                collecting[0] = False
            elif local == "rPh":
                cell.pop("phonetic", None)
            elif local == "c":
                index = row["column"]
                if index >= MAX_COLUMNS:
                    if not problem:
                        problem.append(
                            (
                                -1,
                                f"a value in column {get_column_letter(min(index + 1, 16384))}, "
                                f"past the {MAX_COLUMNS:,} columns an import reads",
                            )
                        )
                    return
                text, trouble = self._value(cell, "".join(value), strings, date_styles, epoch)
                if trouble and not problem:
                    where = f"{get_column_letter(index + 1)}{row['number']}"
                    problem.append(
                        (
                            index,
                            f"{trouble} in cell {where} (open and save the file in "
                            "Excel/LibreOffice)",
                        )
                    )
                if index >= len(cells):
                    cells.extend([""] * (index + 1 - len(cells)))
                cells[index] = text
            elif local == "row":
                done.append((row["number"], list(cells), problem[0] if problem else None))

        def text(data: str) -> None:
            if collecting[0] and "phonetic" not in cell:
                value.append(data)

        def hand_out() -> Iterator[RawRow]:
            for number, values, trouble in done:
                if trouble is None:
                    yield RawRow(number, values)
                else:
                    index, reason = trouble
                    yield RawRow(number, values, (label(index) if index >= 0 else "(row)", reason))
            done.clear()

        for _ in self._parse(part, start=start, end=end, text=text):
            if done:
                yield from hand_out()
        yield from hand_out()

    @staticmethod
    def _value(
        cell: dict[str, str],
        raw: str,
        strings: list[str],
        date_styles: dict[int, bool],
        epoch: dt.datetime,
    ) -> tuple[str, str | None]:
        """A cell's text, and what is wrong with it (None when nothing)."""
        from openpyxl.utils.datetime import from_excel

        kind = cell.get("t", "n")
        if not raw:
            if "f" in cell:
                return "", "formula without a cached value"
            return "", None
        if kind == "s":
            index = _int(raw, -1)
            if not 0 <= index < len(strings):
                return "", "a shared string the workbook does not hold"
            return strings[index], None
        if kind in ("inlineStr", "str", "e"):
            return raw, None
        if kind == "b":
            return ("TRUE" if raw.strip() in ("1", "true") else "FALSE"), None
        if kind == "d":
            try:
                return _cell_text(dt.datetime.fromisoformat(raw)), None
            except ValueError:
                return raw, None
        try:
            number: float = int(raw)
        except ValueError:
            try:
                number = float(raw)
            except ValueError:
                return raw, None
        style = _int(cell.get("s", ""), -1)
        if style in date_styles:
            try:
                return _cell_text(from_excel(number, epoch, timedelta=date_styles[style])), None
            except (ValueError, OverflowError):
                return raw, None
        return _cell_text(number), None


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text or "")
    except ValueError:
        return default


def _normalise(name: str) -> str:
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


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
    if isinstance(value, dt.timedelta):
        return str(value)
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
