"""Greetings: how a letter addresses its reader, by language, office, form of address and name.

A letter to a mayor opens as a letter from a mayor would: "Dear Mayor Lindqvist,", "Sehr geehrte
Frau Oberbürgermeisterin Grünwald,", "Estimado señor alcalde:". What is known about a contact
decides, in this order:

1. `salutation` written as a whole greeting ("Sehr geehrte Frau Oberbürgermeisterin Hartmann")
   is used as it is, when the contact's language is the letter's.
2. The office (`title`: Mayor, Oberbürgermeisterin, Maire, Burmistrz...; or the tag `mayor`)
   with the form of address (`gender` column: f/m; or a `salutation` of one word such as Frau,
   Mr, Madame, Pani; or a title that says it, such as Bürgermeisterin or alcaldesa).
3. The form of address with the surname ("Dear Ms Lindqvist,", "Sehr geehrter Herr Weber,").
4. The name, where the language has a neutral form ("Dear Brooke Lindqvist,", "Guten Tag ...").
5. Only when nothing is known, the language's generic greeting ("Sehr geehrte Damen und Herren,"),
   which `check` counts. Never "Dear Sir or Madam" (spam filters score it).

Surnames come from `nameparser` ("Mayor Brooke Lindqvist" → Lindqvist, "Hans van der Berg" →
van der Berg), not from splitting on spaces. Pure: knows nothing of the database or Jinja.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

FEMALE = "f"
MALE = "m"

# The languages with greeting rules (the starter template's languages).
LANGUAGES = ("en", "de", "fr", "pl", "uk", "es", "it", "nl", "cs", "lt")


@dataclass(frozen=True, slots=True)
class Greeting:
    """`text` is the whole line, punctuation included; `address` the form of address inside a
    sentence (French closes "veuillez agréer, Madame la Maire, ..."); `gender` the form of
    address used (f, m or None), for languages whose body agrees with it."""

    text: str
    address: str
    gender: str | None
    generic: bool

    def __str__(self) -> str:
        return self.text


class NoGreetingRules(ValueError):
    """A template variant in a language without greeting rules printed `greeting`."""


@dataclass(frozen=True, slots=True)
class UnknownGreeting:
    """The `greeting` of a variant in a language without rules: printing it is an error."""

    language: str

    def __str__(self) -> str:
        raise NoGreetingRules(
            f"no greeting rules for the language {self.language!r} (there are rules for "
            f"{', '.join(LANGUAGES)}); write the greeting in this variant instead"
        )


# --------------------------------------------------------------------------- what is known

_GENDER_VALUES = {
    FEMALE: (
        "f female w weiblich frau woman femme féminin k kobieta ž žena moteris ж жінка donna "
        "mujer vrouw v"
    ),
    MALE: "m male männlich mann man homme masculin mężczyzna muž vyras ч чоловік uomo hombre",
}
_GENDERS = {word: g for g, words in _GENDER_VALUES.items() for word in words.split()}

# A salutation of one word (or two) is a form of address, not a greeting.
_FORMS = {
    FEMALE: (
        "frau|mrs|ms|miss|madam|madame|mme|pani|señora|sra|signora|sig.ra|sigra|mevrouw|mevr|"
        "paní|ponia|пані|dame"
    ),
    MALE: "herr|mr|sir|monsieur|m|pan|panie|señor|sr|signor|signore|sig|heer|de heer|dhr|pane|ponas|pone|пан|пане",
}
_FORM_WORDS = {word: g for g, words in _FORMS.items() for word in words.split("|")}

# Offices: the title as written (lower case, "of X" dropped) -> (office, gender it says, its
# language). The office is `mayor` or the two English ones greeted by their title alone.
_MAYOR = "mayor"
_OFFICES: dict[str, tuple[str, str | None, str]] = {
    "mayor": (_MAYOR, None, "en"),
    "city mayor": (_MAYOR, None, "en"),
    "lord mayor": ("Lord Mayor", None, "en"),
    "lord provost": ("Lord Provost", None, "en"),
    "bürgermeister": (_MAYOR, MALE, "de"),
    "bürgermeisterin": (_MAYOR, FEMALE, "de"),
    "oberbürgermeister": (_MAYOR, MALE, "de"),
    "oberbürgermeisterin": (_MAYOR, FEMALE, "de"),
    "erster bürgermeister": (_MAYOR, MALE, "de"),
    "erste bürgermeisterin": (_MAYOR, FEMALE, "de"),
    "stadtpräsident": (_MAYOR, MALE, "de"),
    "stadtpräsidentin": (_MAYOR, FEMALE, "de"),
    "maire": (_MAYOR, None, "fr"),
    "mairesse": (_MAYOR, FEMALE, "fr"),
    "bourgmestre": (_MAYOR, None, "fr"),
    "burmistrz": (_MAYOR, None, "pl"),
    "prezydent": (_MAYOR, None, "pl"),
    "prezydent miasta": (_MAYOR, None, "pl"),
    "prezydentka": (_MAYOR, FEMALE, "pl"),
    "prezydentka miasta": (_MAYOR, FEMALE, "pl"),
    "wójt": (_MAYOR, None, "pl"),
    "міський голова": (_MAYOR, None, "uk"),
    "мер": (_MAYOR, None, "uk"),
    "голова громади": (_MAYOR, None, "uk"),
    "alcalde": (_MAYOR, MALE, "es"),
    "alcaldesa": (_MAYOR, FEMALE, "es"),
    "sindaco": (_MAYOR, MALE, "it"),
    "sindaca": (_MAYOR, FEMALE, "it"),
    "burgemeester": (_MAYOR, None, "nl"),
    "starosta": (_MAYOR, MALE, "cs"),
    "starostka": (_MAYOR, FEMALE, "cs"),
    "primátor": (_MAYOR, MALE, "cs"),
    "primátorka": (_MAYOR, FEMALE, "cs"),
    "meras": (_MAYOR, MALE, "lt"),
    "merė": (_MAYOR, FEMALE, "lt"),
    "borgmester": (_MAYOR, None, "da"),
    "ordfører": (_MAYOR, None, "no"),
    "pormestari": (_MAYOR, None, "fi"),
    "polgármester": (_MAYOR, None, "hu"),
    "primar": (_MAYOR, MALE, "ro"),
    "primăriță": (_MAYOR, FEMALE, "ro"),
    "prefeito": (_MAYOR, MALE, "pt"),
    "prefeita": (_MAYOR, FEMALE, "pt"),
    "presidente da câmara": (_MAYOR, None, "pt"),
    "gradonačelnik": (_MAYOR, MALE, "hr"),
    "gradonačelnica": (_MAYOR, FEMALE, "hr"),
    "mērs": (_MAYOR, None, "lv"),
    "linnapea": (_MAYOR, None, "et"),
}
_OF = re.compile(r"\s+(?:of|von|de|du|des|di|del|van|z|miasta|města|м\.)\s.*$")


def _office(title: str) -> tuple[str, str | None, str] | None:
    key = " ".join(title.lower().replace(",", " ").split())
    found = _OFFICES.get(key)
    if found is None:
        found = _OFFICES.get(_OF.sub("", key))
    return found


def _gender_of(value: str) -> str | None:
    return _GENDERS.get(value.strip().lower().rstrip("."))


def _form_of(salutation: str) -> str | None:
    """The gender of a one-word salutation (Frau, Mr., Madame...), else None."""
    return _FORM_WORDS.get(" ".join(salutation.lower().rstrip(".,:;! ").split()))


def _gender_in(salutation: str) -> str | None:
    """The gender a whole greeting says ("Sehr geehrte Frau ..." says f)."""
    for word in re.findall(r"[^\W\d_]+(?:\.[^\W\d_]+)?", salutation.lower()):
        gender = _FORM_WORDS.get(word)
        if gender is not None and word not in ("m", "sig", "sr"):
            return gender
    return None


# --------------------------------------------------------------------------- surnames

_PLAIN_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


@functools.lru_cache(maxsize=1)
def _special_words() -> frozenset[str]:
    """Words nameparser gives a role of their own (titles, particles, suffixes, conjunctions)."""
    from nameparser.config import CONSTANTS

    words: set[str] = set()
    for group in (
        CONSTANTS.titles,
        CONSTANTS.prefixes,
        CONSTANTS.conjunctions,
        CONSTANTS.suffix_acronyms,
        CONSTANTS.suffix_not_acronyms,
    ):
        words.update(str(word).lower() for word in group)
    return frozenset(words)


@functools.lru_cache(maxsize=65536)
def name_parts(name: str) -> tuple[str | None, str | None]:
    """(academic or other title, surname) of a full name, as nameparser reads it.

    A name of two to four plain words none of which nameparser treats specially is read the way
    it would read it (the last word is the surname) without the ~25 µs it takes.
    """
    words = name.split()
    if 2 <= len(words) <= 4:
        special = _special_words()
        if all(_PLAIN_WORD.fullmatch(w) and w.lower() not in special for w in words):
            return None, words[-1]
    from nameparser import HumanName

    parsed = HumanName(name)
    return (str(parsed.title) or None), (str(parsed.last) or None)


# --------------------------------------------------------------------------- the rules


class _Known:
    """What is known about the reader; the surname is parsed only when a rule asks for it."""

    __slots__ = ("gender", "name", "office", "office_word")

    def __init__(
        self,
        *,
        office: str | None,
        office_word: str | None,
        gender: str | None,
        name: str | None,
    ) -> None:
        self.office = office  # "mayor", "Lord Mayor", "Lord Provost"
        self.office_word = office_word  # the title as written, in the letter's language
        self.gender = gender
        self.name = name

    @property
    def surname(self) -> str | None:
        return name_parts(self.name)[1] if self.name else None

    @property
    def title(self) -> str | None:
        """A title in the name itself: Dr., Prof. Dr."""
        return name_parts(self.name)[0] if self.name else None


def _closing(text: str, mark: str) -> str:
    return text if text[-1:] in ",:;!" else text + mark


def _en(k: _Known) -> tuple[str, bool]:
    if k.office in ("Lord Mayor", "Lord Provost"):
        return f"Dear {k.office},", False
    if k.office == _MAYOR:
        return (f"Dear Mayor {k.surname}," if k.surname else "Dear Mayor,"), False
    if k.gender and k.surname:
        return f"Dear {'Ms' if k.gender == FEMALE else 'Mr'} {k.surname},", False
    if k.name:
        return f"Dear {k.name},", False
    return "Dear colleagues,", True


def _de(k: _Known) -> tuple[str, bool]:
    if k.gender:
        opening = "Sehr geehrte Frau" if k.gender == FEMALE else "Sehr geehrter Herr"
        word = k.office_word
        if word is None and k.office is not None:
            word = "Bürgermeisterin" if k.gender == FEMALE else "Bürgermeister"
        if word:
            return f"{opening} {word}{' ' + k.surname if k.surname else ''},", False
        if k.surname:
            academic = "Dr. " if k.title and "dr" in k.title.lower() else ""
            return f"{opening} {academic}{k.surname},", False
    if k.name:
        return f"Guten Tag {k.name},", False
    return "Sehr geehrte Damen und Herren,", True


def _fr(k: _Known) -> tuple[str, bool]:
    if k.office is not None:
        address = {
            FEMALE: "Madame la Maire",
            MALE: "Monsieur le Maire",
        }.get(k.gender or "", "Madame la Maire, Monsieur le Maire")
        return address + ",", False
    if k.gender:
        return ("Madame," if k.gender == FEMALE else "Monsieur,"), False
    return "Madame, Monsieur,", True


_PL_OFFICES = {
    "prezydent": ("Prezydent", "Prezydencie"),
    "prezydent miasta": ("Prezydent", "Prezydencie"),
    "prezydentka": ("Prezydent", "Prezydencie"),
    "prezydentka miasta": ("Prezydent", "Prezydencie"),
    "wójt": ("Wójt", "Wójcie"),
}


def _pl(k: _Known) -> tuple[str, bool]:
    if k.gender:
        if k.office is not None:
            her, him = _PL_OFFICES.get((k.office_word or "").lower(), ("Burmistrz", "Burmistrzu"))
            return (
                f"Szanowna Pani {her}," if k.gender == FEMALE else f"Szanowny Panie {him},"
            ), False
        return ("Szanowna Pani," if k.gender == FEMALE else "Szanowny Panie,"), False
    return "Szanowni Państwo,", True


def _uk(k: _Known) -> tuple[str, bool]:
    if k.gender:
        if k.office is not None:
            return (
                "Шановна пані міська голово!"
                if k.gender == FEMALE
                else "Шановний пане міський голово!"
            ), False
        return ("Шановна пані!" if k.gender == FEMALE else "Шановний пане!"), False
    return "Шановні пані та панове!", True


def _es(k: _Known) -> tuple[str, bool]:
    if k.gender:
        opening = "Estimada señora" if k.gender == FEMALE else "Estimado señor"
        if k.office is not None:
            return f"{opening} {'alcaldesa' if k.gender == FEMALE else 'alcalde'}:", False
        return f"{opening}{' ' + k.surname if k.surname else ''}:", False
    return "Señoras y señores:", True


def _it(k: _Known) -> tuple[str, bool]:
    opening = {FEMALE: "Gentile Signora", MALE: "Egregio Signor"}.get(k.gender or "")
    if opening and k.office is not None:
        return f"{opening} {'Sindaca' if k.gender == FEMALE else 'Sindaco'},", False
    if opening and k.surname:
        return f"{opening} {k.surname},", False
    if k.name:
        return f"Gentile {k.name},", False
    if k.office is not None:
        return "Gentile Sindaco,", False
    if opening:
        return ("Gentile Signora," if k.gender == FEMALE else "Egregio Signore,"), False
    return "Gentili Signore e Signori,", True


def _nl(k: _Known) -> tuple[str, bool]:
    if k.office is not None:
        return f"Geachte burgemeester{' ' + k.surname if k.surname else ''},", False
    if k.gender and k.surname:
        return f"Geachte {'mevrouw' if k.gender == FEMALE else 'heer'} {k.surname},", False
    if k.name:
        return f"Geachte {k.name},", False
    return "Geachte heer, mevrouw,", True


def _cs(k: _Known) -> tuple[str, bool]:
    if k.gender:
        if k.office is not None:
            mayor = (k.office_word or "").lower().startswith("primátor")
            if k.gender == FEMALE:
                return f"Vážená paní {'primátorko' if mayor else 'starostko'},", False
            return f"Vážený pane {'primátore' if mayor else 'starosto'},", False
        return ("Vážená paní," if k.gender == FEMALE else "Vážený pane,"), False
    return "Vážené dámy, vážení pánové,", True


def _lt(k: _Known) -> tuple[str, bool]:
    if k.gender:
        if k.office is not None:
            return ("Gerbiama ponia mere," if k.gender == FEMALE else "Gerbiamas pone mere,"), False
        return ("Gerbiama ponia," if k.gender == FEMALE else "Gerbiamas pone,"), False
    return "Gerbiamieji,", True


_RULES: dict[str, tuple[Callable[[_Known], tuple[str, bool]], str]] = {
    "en": (_en, ","),
    "de": (_de, ","),
    "fr": (_fr, ","),
    "pl": (_pl, ","),
    "uk": (_uk, "!"),
    "es": (_es, ":"),
    "it": (_it, ","),
    "nl": (_nl, ","),
    "cs": (_cs, ","),
    "lt": (_lt, ","),
}


@functools.lru_cache(maxsize=256)
def _base(language: str | None) -> str:
    return (language or "").strip().lower().replace("_", "-").split("-", 1)[0]


@functools.lru_cache(maxsize=64)
def generic_greeting(language: str) -> str | None:
    """The greeting a letter in `language` falls back to when nothing is known, if it has rules."""
    rule = _RULES.get(_base(language))
    if rule is None:
        return None
    return rule[0](_Known(office=None, office_word=None, gender=None, name=None))[0]


def greeting_for(
    *,
    language: str,
    contact_language: str | None,
    salutation: str | None,
    title: str | None,
    name: str | None,
    attributes: Mapping[str, object],
    tags: tuple[str, ...],
) -> Greeting | UnknownGreeting:
    """How a letter in `language` greets this contact (see the module's docstring)."""
    gender = attributes.get("gender")
    # The raw values are the cache's key: the work of reading them is done once per contact.
    return _greeting(
        language,
        contact_language,
        salutation,
        title,
        name,
        gender if isinstance(gender, str) else None,
        "mayor" in tags,
    )


@functools.lru_cache(maxsize=16384)
def _greeting(
    variant_language: str,
    contact_language: str | None,
    salutation: str | None,
    title: str | None,
    name: str | None,
    gender_value: str | None,
    mayor_tag: bool,
) -> Greeting | UnknownGreeting:
    language = _base(variant_language)
    rule = _RULES.get(language)
    if rule is None:
        return UnknownGreeting(language=language)
    # A contact with no language reads English, as the starter template has always assumed.
    own = (_base(contact_language) or "en") == language
    salutation = (salutation or "").strip()
    title = (title or "").strip()
    name = " ".join((name or "").split())
    gender_value = (gender_value or "").strip()
    rules, mark = rule
    office = _office(title) if title else None
    gender = _gender_of(gender_value) if gender_value else None
    whole = None
    if salutation:
        form = _form_of(salutation)
        if form is None:
            whole = salutation
            gender = gender or _gender_in(salutation)
        else:
            gender = gender or form
    if office is not None:
        gender = gender or office[1]
    elif mayor_tag:
        office = (_MAYOR, None, "")
    if whole is not None and own:
        text = _closing(whole, mark)
        return Greeting(text=text, address=text.rstrip(",:;! "), gender=gender, generic=False)
    known = _Known(
        office=office[0] if office else None,
        office_word=title if office and office[2] == language else None,
        gender=gender,
        name=name or None,
    )
    text, generic = rules(known)
    address = text.rstrip(",:;! ")
    for opening in ("Dear ", "Sehr geehrte ", "Sehr geehrter ", "Guten Tag "):
        address = address.removeprefix(opening)
    return Greeting(text=text, address=address, gender=gender, generic=generic)
