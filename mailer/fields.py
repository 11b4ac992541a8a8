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

from mailer.errors import ImportFileError, InvalidValueError, quoted

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
    "timezone",
)
# Header names in the languages we write in (cs, de, en, es, fr, it, lt, nl, pl, uk). A word that
# means one field in one language and another elsewhere (Polish "Kraj" is a country, Czech
# "Kraj" a region) is left out: --map says it.
CONTACT_SYNONYMS = synonyms(
    {
        "email": [
            "E-mail",
            "Email address",
            "E-mail address",
            "Mail",
            "E-Mail-Adresse",
            "Mailadresse",
            "Courriel",
            "Adresse e-mail",
            "Adresse électronique",
            "Correo",
            "Correo electrónico",
            "Adres e-mail",
            "Adres email",
            "Indirizzo email",
            "Indirizzo e-mail",
            "Posta elettronica",
            "E-mailadres",
            "E-mailová adresa",
            "El. paštas",
            "El. pašto adresas",
            "Пошта",
            "Електронна пошта",
            "Ел. пошта",
        ],
        "name": [
            "Full name",
            "Contact",
            "Contact name",
            "Mayor",
            "Bürgermeister",
            "Bürgermeisterin",
            "Oberbürgermeister",
            "Oberbürgermeisterin",
            "Vollständiger Name",
            "Nom complet",
            "Maire",
            "Imię i nazwisko",
            "Burmistrz",
            "Prezydent miasta",
            "Nome e cognome",
            "Sindaco",
            "Nombre",
            "Nombre completo",
            "Alcalde",
            "Alcaldesa",
            "Naam",
            "Burgemeester",
            "Jméno a příjmení",
            "Starosta",
            "Primátor",
            "Vardas ir pavardė",
            "Meras",
            "Ім'я",
            "ПІБ",
            "Мер",
            "Міський голова",
        ],
        "title": [
            "Position",
            "Office",
            "Function",
            "Job title",
            "Role",
            "Funktion",
            "Amt",
            "Titel",
            "Fonction",
            "Titre",
            "Poste",
            "Stanowisko",
            "Funkcja",
            "Funzione",
            "Carica",
            "Titolo",
            "Cargo",
            "Puesto",
            "Functie",
            "Funkce",
            "Pareigos",
            "Посада",
        ],
        "salutation": [
            "Greeting",
            "Anrede",
            "Briefanrede",
            "Formule d'appel",
            "Formule de politesse",
            "Zwrot grzecznościowy",
            "Saluto",
            "Saludo",
            "Tratamiento",
            "Aanhef",
            "Oslovení",
            "Kreipinys",
            "Звернення",
        ],
        "organisation": [
            "Org",
            "Organization",
            "Organisation name",
            "Institution",
            "Behörde",
            "Organisme",
            "Organizacja",
            "Instytucja",
            "Organizzazione",
            "Ente",
            "Organización",
            "Organisatie",
            "Organizace",
            "Organizacija",
            "Організація",
        ],
        "city": [
            "Municipality",
            "Town",
            "Stadt",
            "Gemeinde",
            "Ort",
            "Ville",
            "Commune",
            "Ciudad",
            "Municipio",
            "Miasto",
            "Gmina",
            "Città",
            "Comune",
            "Gemeente",
            "Stad",
            "Plaats",
            "Město",
            "Obec",
            "Miestas",
            "Savivaldybė",
            "Місто",
        ],
        "region": [
            "State",
            "Oblast",
            "Province",
            "Bundesland",
            "Région",
            "Département",
            "Województwo",
            "Regione",
            "Provincia",
            "Región",
            "Provincie",
            "Apskritis",
            "Область",
        ],
        "country": [
            "Land",
            "Country code",
            "Staat",
            "Pays",
            "País",
            "Państwo",
            "Paese",
            "Nazione",
            "Země",
            "Stát",
            "Šalis",
            "Країна",
        ],
        "language": [
            "Lang",
            "Locale",
            "Sprache",
            "Langue",
            "Idioma",
            "Lengua",
            "Język",
            "Lingua",
            "Taal",
            "Jazyk",
            "Kalba",
            "Мова",
        ],
        "tags": [
            "Tag",
            "Labels",
            "Groups",
            "Schlagwörter",
            "Étiquettes",
            "Tagi",
            "Etykiety",
            "Etichette",
            "Etiquetas",
            "Štítky",
            "Žymos",
            "Мітки",
        ],
        "timezone": [
            "Time zone",
            "TZ",
            "Zeitzone",
            "Fuseau horaire",
            "Zona horaria",
            "Huso horario",
            "Strefa czasowa",
            "Fuso orario",
            "Tijdzone",
            "Časové pásmo",
            "Laiko juosta",
            "Часовий пояс",
        ],
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
        "ukrainian_city": [
            "UA city",
            "City UA",
            "Ukrainian community",
            "Ukrainische Stadt",
            "Ville ukrainienne",
            "Miasto ukraińskie",
            "Українське місто",
            "Місто",
        ],
        "partner_city": [
            "Partner",
            "City abroad",
            "Foreign city",
            "Partnerstadt",
            "Ville partenaire",
            "Miasto partnerskie",
            "Città gemellata",
            "Ciudad hermana",
        ],
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
        "name": ["Full name", "Signatory", "Mayor", "Мер", "Міський голова", "Підписант"],
        "title": ["Position", "Office", "Function", "Посада"],
        "city": ["Municipality", "Town", "Community", "Місто", "Громада"],
        "email": ["E-mail", "Email address", "Mail", "Reply-to", "Reply to"],
        "region": ["Oblast", "State", "Область"],
    }
)
SUPPRESSION_SYNONYMS = synonyms(
    {"email": ["E-mail", "Email address", "Mail", "Address"], "reason": ["Why"]}
)
# How many header names an error line lists.
_LISTED = 12


def _listing(header: Sequence[str]) -> str:
    names = [h for h in header if h.strip()]
    shown = ", ".join(_clip(h) for h in names[:_LISTED])
    if len(names) > _LISTED:
        shown += f", … ({len(names):,} columns)"
    return shown or "nothing"


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class UnknownColumn:
    """A column that is no field: kept as an attribute (contacts) or not read at all."""

    label: str
    attribute: str | None
    # The field a --map would most likely mean, if one is near enough.
    suggestion: str | None


@dataclass
class Columns:
    header: list[str]
    fields: dict[str, int]
    # (cell index, attribute key) for columns that are no known field.
    extra: list[tuple[int, str]]
    # Cells that may hold line breaks (free text: attributes, notes).
    multiline: frozenset[int] = frozenset()
    # The fields this import knows that no column gave.
    missing: tuple[str, ...] = ()

    def label(self, index: int) -> str:
        if index < len(self.header) and self.header[index]:
            return _clip(self.header[index])
        return f"column {index + 1}"

    def unknown(self, *, synonyms: Mapping[str, str], kept: bool) -> list[UnknownColumn]:
        """The columns that are no field, each with the field a `--map` would likely mean."""
        out: list[UnknownColumn] = []
        for index, key in self.extra:
            label = self.label(index)
            out.append(
                UnknownColumn(
                    label=label,
                    attribute=key if kept else None,
                    suggestion=_likely_field(
                        normalise_header(self.header[index]), synonyms, self.missing
                    ),
                )
            )
        return out


def _likely_field(key: str, synonyms: Mapping[str, str], wanted: Sequence[str]) -> str | None:
    """The field among `wanted` whose synonyms `key` is nearest to, if near enough."""
    if not key or not wanted:
        return None
    from rapidfuzz import fuzz, process

    names = [name for name, target in synonyms.items() if target in wanted]
    best = process.extractOne(key, names, scorer=fuzz.WRatio, score_cutoff=86)
    return synonyms[best[0]] if best is not None else None


def resolve_columns(
    *,
    header: Sequence[str],
    display: str,
    fields: Sequence[str],
    synonyms: Mapping[str, str],
    mapping: Mapping[str, str],
    required: Sequence[str],
    multiline: Sequence[str] = (),
    attributes: bool = True,
) -> Columns:
    """Which cell holds which field. `multiline`: fields whose cells may hold line breaks;
    `attributes`: whether other columns are kept (their cells may then hold line breaks too)."""
    keys = [normalise_header(h) for h in header]
    found: dict[str, int] = {}
    mapped_indexes: set[int] = set()
    for source, target in mapping.items():
        shown = f"--map {_clip(source)}={_clip(target)}"
        target_field = target.strip().lower().replace("-", "_").replace(" ", "_")
        if target_field not in fields:
            raise InvalidValueError(
                f"{shown}: unknown field {_clip(target)!r}; valid fields: " + ", ".join(fields)
            )
        source_key = normalise_header(source)
        if source_key not in keys:
            raise InvalidValueError(
                f"{shown}: {display} has no column {_clip(source)!r} (found: {_listing(header)})"
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
                f"{display}: columns {_clip(header[found[meaning]])!r} and "
                f"{_clip(header[index])!r} both mean {meaning}; rename one or pick with "
                f"--map COLUMN={meaning}"
            )
        found[meaning] = index
    for name in required:
        if name not in found:
            raise ImportFileError(
                f"{display}: no {name} column (found: {_listing(header)}); use --map COLUMN={name}"
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
    free = {found[name] for name in multiline if name in found}
    if attributes:
        free.update(index for index, _ in extra)
    missing = tuple(name for name in fields if name not in found)
    return Columns(list(header), found, extra, frozenset(free), missing)


def parse_mapping(items: Iterable[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items:
        source, sep, target = item.rpartition("=")
        if not sep or not source.strip() or not target.strip():
            raise InvalidValueError(
                f"--map {quoted(item)}: expected SOURCE=FIELD, e.g. 'E-Post=email'"
            )
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
        raise ValueError(
            f"unknown country {quoted(value)}; use an ISO code like DE or an English name"
        )
    return code


# The languages we write in: their names for languages are read too ("Deutsch", "Polski").
_LANGUAGE_LOCALES = ("en", "cs", "de", "es", "fr", "it", "lt", "nl", "pl", "uk")


@functools.cache
def _language_names() -> dict[str, str]:
    names: dict[str, str] = {}
    # English first so it wins where two languages name different ones alike.
    for locale in _LANGUAGE_LOCALES:
        for code, name in Locale(locale).languages.items():
            if "_" not in code:
                names.setdefault(name.casefold(), code)
    return names


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
            f"{quoted(value)} is not a language code (use a BCP 47 tag such as en, de, uk, de-AT)"
        ) from None
    parts = [locale.language]
    if locale.script:
        parts.append(locale.script)
    if locale.territory:
        parts.append(locale.territory)
    return "-".join(parts)


# What a line break is in a cell that may hold one (Excel's Alt+Enter writes LF).
_LINE_BREAK = re.compile("\r\n?")
_CONTROL_BUT_BREAKS = re.compile("[\x00-\x09\x0b-\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")


def clean_cells(cells: Sequence[str], *, columns: Columns) -> list[str]:
    """Checks every importer applies, then the cells stripped. Raises `RowRejected`.

    A line break is kept (as LF) in a cell of `columns.multiline` (a postal address written with
    Alt+Enter); anywhere else it is refused, as is every other control character: a CR/LF in a
    name is how a header injection gets in.
    """
    joined = "".join(cells)
    if CONTROL.search(joined):
        multiline = columns.multiline
        cleaned = list(cells)
        for index, cell in enumerate(cells):
            match = (_CONTROL_BUT_BREAKS if index in multiline else CONTROL).search(cell)
            if match:
                char = match.group()
                raise RowRejected(
                    columns.label(index),
                    f"contains a control character ({_char_name(char)}); "
                    + (
                        "only line breaks are kept in this column"
                        if index in multiline
                        else "fields must be single-line text"
                    ),
                )
            if index in multiline and ("\r" in cell or "\n" in cell):
                cleaned[index] = _LINE_BREAK.sub("\n", cell)
        cells = cleaned
    if len(joined) > MAX_CELL:
        for index, cell in enumerate(cells):
            if len(cell) > MAX_CELL:
                raise RowRejected(
                    columns.label(index), f"{len(cell)} characters, more than {MAX_CELL}"
                )
    return list(map(str.strip, cells))


# A "?" standing for a letter: inside a word, or opening one ("?ód?" for Łódź, "Wroc?aw").
_LOST_LETTER = re.compile(r"\w\?\w|(?<![\w?])\?\w")


def lost_letter(cells: Sequence[str]) -> int | None:
    """The index of the first cell with a "?" where a letter was (a file saved in an encoding
    that could not hold a letter writes "?" instead), or None."""
    if "?" not in "".join(cells):
        # Nearly every row: one search in C instead of a loop over the cells.
        return None
    for index, cell in enumerate(cells):
        if "?" in cell and _LOST_LETTER.search(cell):
            return index
    return None


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


# --------------------------------------------------------------------------- Ukrainian cities

# How the letters of a Ukrainian name are written in the spellings met in the offices' files
# (English, German, Polish, French, Czech, Russian-style), each group written one way, so that
# Kharkiv, Charkiw, Kharkov, Charków and Харків (after `anyascii`) come to one skeleton. "ch" is
# Х in German and Ч in English, so it is read both ways ("H"). Vowels are one letter: Ukrainian
# і is o in the Russian and Polish names (Kharkov, Lwów) and y/i/e/ie vary everywhere.
_SOUNDS = {
    "schtsch": "s",
    "shch": "s",
    "szcz": "s",
    "tsch": "s",
    "sch": "s",
    "tch": "s",
    "sz": "s",
    "sh": "s",
    "cz": "s",
    "zh": "s",
    "rz": "s",
    "ts": "s",
    "tz": "s",
    "kh": "h",
    "ch": "H",
    "ck": "k",
    "c": "s",
    "z": "s",
    "x": "h",
    "g": "h",
    "w": "v",
    "j": "i",
    "y": "i",
    "e": "i",
    "o": "i",
    "u": "i",
    "a": "i",
}
_SOUND = re.compile("|".join(sorted(_SOUNDS, key=len, reverse=True)))
_DOUBLED = re.compile(r"(.)\1+")


def _latin(name: str) -> str:
    from anyascii import anyascii

    text = re.sub(r"[^a-z0-9]", "", anyascii(name).casefold())
    return text


def name_skeletons(name: str) -> frozenset[str]:
    """The spelling-free skeletons of a (Ukrainian) place name: equal for its transliterations."""
    text = _SOUND.sub(lambda m: _SOUNDS[m.group()], _latin(name))
    return frozenset(_DOUBLED.sub(r"\1", text.replace("H", sound)) for sound in ("h", "s"))


@dataclass(frozen=True)
class KnownCity:
    """A Ukrainian city of the known list, with its other spellings (its Ukrainian name)."""

    name: str
    region: str | None = None
    spellings: tuple[str, ...] = ()


class UkrainianCities:
    """Matches a Ukrainian city name, in any usual spelling, to the known cities.

    A name matches a city when their skeletons meet (`name_skeletons`); a name that matches
    none is refused with the nearest known city (rapidfuzz) as a suggestion.
    """

    def __init__(self, cities: Iterable[KnownCity] = ()) -> None:
        self._by_skeleton: dict[str, list[KnownCity]] = {}
        self._cities: list[KnownCity] = []
        for city in cities:
            self.add(city)

    def add(self, city: KnownCity) -> None:
        """Know `city`, unless a city already known has its skeleton (that one wins)."""
        skeletons = {
            s for spelling in (city.name, *city.spellings) for s in name_skeletons(spelling)
        }
        if any(s in self._by_skeleton for s in name_skeletons(city.name)):
            return
        self._cities.append(city)
        for skeleton in skeletons:
            self._by_skeleton.setdefault(skeleton, []).append(city)

    def match(self, name: str) -> KnownCity:
        """The known city `name` spells; `ValueError` saying why not (with a suggestion)."""
        found: list[KnownCity] = []
        for skeleton in name_skeletons(name):
            for city in self._by_skeleton.get(skeleton, ()):
                if city not in found:
                    found.append(city)
        if len(found) == 1:
            return found[0]
        if found:
            both = " and ".join(city.name for city in found[:3])
            raise ValueError(f"{quoted(name)} could be {both}; write the city as the list does")
        suggestion = self.nearest(name)
        hint = f"; did you mean {suggestion}?" if suggestion else ""
        raise ValueError(
            f"unknown Ukrainian city {quoted(name)}{hint} (give --new-city to add it as a new city)"
        )

    def nearest(self, name: str) -> str | None:
        from rapidfuzz import fuzz

        best: tuple[float, str] | None = None
        for city in self._cities:
            for spelling in (city.name, *city.spellings):
                for mine in name_skeletons(name):
                    for theirs in name_skeletons(spelling):
                        score = fuzz.ratio(mine, theirs)
                        if score >= 70 and (best is None or score > best[0]):
                            best = (score, city.name)
        return best[1] if best is not None else None
