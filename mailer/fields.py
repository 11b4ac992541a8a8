"""What a column means and what a value may be: header synonyms, countries, languages, tags.

Value rules only, shared by every import: `resolve_columns` maps a file's header to fields
(case, spaces and punctuation ignored, usual synonyms in the languages we write in), the
`parse_*` functions turn a cell into a stored value or raise `ValueError` with the reason, and
`clean_cells` applies the checks every row gets. It knows no database and no file format: it
must not import SQLAlchemy, `models`, `tables` or `importers`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from babel import Locale, UnknownLocaleError

from mailer.errors import ImportFileError, InvalidValueError

MAX_CELL = 10_000

# Any C0/C1 control (tab included: every field is single-line) and the Unicode line separators:
# a CR/LF in a name is how a header injection ("\r\nBcc: ...") gets in.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# --------------------------------------------------------------------------- columns


def normalise_header(name: str) -> str:
    """Header key for matching: case, spaces and punctuation ignored ("E-Mail" -> "email")."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def attribute_key(name: str) -> str:
    """The attribute a free column is kept under: snake_case of the header name."""
    key = re.sub(r"\W+", "_", name.strip().casefold()).strip("_")
    return key


def synonyms(table: Mapping[str, Iterable[str]]) -> dict[str, str]:
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
CONTACT_SYNONYMS = synonyms(
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
PARTNERSHIP_SYNONYMS = synonyms(
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
SIGNATORY_SYNONYMS = synonyms(
    {
        "name": ["Full name", "Signatory", "Mayor"],
        "title": ["Position", "Office", "Function"],
        "city": ["Municipality", "Town", "Community", "Місто"],
        "email": ["E-mail", "Email address", "Mail", "Reply-to", "Reply to"],
        "region": ["Oblast", "State"],
    }
)
SUPPRESSION_SYNONYMS = synonyms(
    {"email": ["E-mail", "Email address", "Mail", "Address"], "reason": ["Why"]}
)


@dataclass
class Columns:
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


def resolve_columns(
    *,
    header: Sequence[str],
    display: str,
    fields: Sequence[str],
    synonyms: Mapping[str, str],
    mapping: Mapping[str, str],
    required: Sequence[str],
) -> Columns:
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
    return Columns(list(header), found, extra)


def parse_mapping(items: Iterable[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items:
        source, sep, target = item.rpartition("=")
        if not sep or not source.strip() or not target.strip():
            raise InvalidValueError(f"--map {item!r}: expected SOURCE=FIELD, e.g. 'E-Post=email'")
        mapping[source.strip()] = target.strip()
    return mapping


# --------------------------------------------------------------------------- values


class RowRejected(Exception):
    """One row refused: the column it is about (or "(row)") and why."""

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


def clean_cells(cells: Sequence[str], *, columns: Columns) -> list[str]:
    """Checks every importer applies, then the cells stripped. Raises `RowRejected`."""
    joined = "".join(cells)
    if CONTROL.search(joined):
        for index, cell in enumerate(cells):
            match = CONTROL.search(cell)
            if match:
                char = match.group()
                raise RowRejected(
                    columns.label(index),
                    f"contains a control character ({_char_name(char)}); "
                    "fields must be single-line text",
                )
    if len(joined) > MAX_CELL:
        for index, cell in enumerate(cells):
            if len(cell) > MAX_CELL:
                raise RowRejected(
                    columns.label(index), f"{len(cell)} characters, more than {MAX_CELL}"
                )
    return list(map(str.strip, cells))


def _char_name(char: str) -> str:
    names = {"\r": "CR", "\n": "LF", "\t": "tab", "\x00": "NUL"}
    return names.get(char, f"U+{ord(char):04X}")


def check_length(column: str, value: str, limit: int) -> str:
    """`value`, or `RowRejected` naming `column` when it is longer than `limit`."""
    if len(value) > limit:
        raise RowRejected(column, f"{len(value)} characters, more than {limit}")
    return value


class Tags(frozenset[str]):
    too_long: str | None = None


@functools.lru_cache(maxsize=4096)
def split_tags(value: str) -> Tags:
    tags = Tags(t.strip() for t in re.split(r"[;,]", value) if t.strip())
    tags.too_long = next((t for t in tags if len(t) > 100), None)
    return tags
