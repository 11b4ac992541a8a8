"""Greetings a mayor would not frown at, in every language of the starter appeal.

By office and form of address where they are known, by name where the language allows it, and
the generic greeting only when nothing is known (which `check` counts). Never "Dear Sir or
Madam" (SpamAssassin's DEAR_SOMETHING) and never "Dear Mayor Brooke Lindqvist".
"""

from __future__ import annotations

import datetime as dt
import types
from pathlib import Path

import pytest
from conftest import Cli

from mailer.config import data_path
from mailer.greetings import LANGUAGES, generic_greeting, greeting_for, name_parts
from mailer.render import (
    CampaignView,
    CityView,
    ContactView,
    Recipient,
    RenderProblem,
    TemplateSet,
)

APPEAL = TemplateSet.from_directory(data_path("templates") / "appeal", name="appeal")
CAMPAIGN = CampaignView(slug="appeal", title=None, default_language="en")


def letter(
    language: str,
    *,
    name: str | None = None,
    title: str | None = None,
    salutation: str | None = None,
    gender: str | None = None,
    tags: tuple[str, ...] = (),
    template: TemplateSet = APPEAL,
) -> tuple[str, str]:
    """(the greeting line of the starter appeal's letter, the whole text)."""
    attributes = {"gender": gender} if gender else {}
    rendered = template.render(
        recipient=Recipient(
            contact_id=1,
            contact=ContactView(
                email="office@example.org",
                name=name,
                title=title,
                salutation=salutation,
                language=language,
                organisation=None,
                attributes=types.MappingProxyType(attributes),
                tags=tags,
            ),
            city=CityView(name="Gießen", country="DE", region=None),
        ),
        campaign=CAMPAIGN,
        unsubscribe_url=None,
        unsubscribe_mailto="mailto:office@example.org?subject=unsubscribe",
        today=dt.date(2026, 11, 26),
    )
    assert rendered.language == language.split("-")[0]
    return rendered.text.split("\n", 1)[0], rendered.text


CASES = [
    # English: the office and the surname, never the whole name after the office.
    ("en", {"name": "Brooke Lindqvist", "title": "Mayor"}, "Dear Mayor Lindqvist,"),
    ("en", {"name": "Mayor Brooke Lindqvist", "tags": ("mayor",)}, "Dear Mayor Lindqvist,"),
    ("en", {"name": "Brooke Lindqvist", "title": "Mayor of Gießen"}, "Dear Mayor Lindqvist,"),
    ("en", {"name": "Sam Smith", "title": "Lord Mayor"}, "Dear Lord Mayor,"),
    ("en", {"name": "Brooke Lindqvist", "gender": "female"}, "Dear Ms Lindqvist,"),
    ("en", {"name": "Hans van der Berg", "salutation": "Mr."}, "Dear Mr van der Berg,"),
    ("en", {"name": "Brooke Lindqvist"}, "Dear Brooke Lindqvist,"),
    ("en", {"tags": ("mayor",)}, "Dear Mayor,"),
    ("en", {"salutation": "Dear Councillor Brooke"}, "Dear Councillor Brooke,"),
    ("en", {}, "Dear colleagues,"),
    # German: Frau/Herr with the office as written, or a surname, or a neutral Guten Tag.
    (
        "de",
        {"name": "Petra Grünwald", "title": "Oberbürgermeisterin"},
        "Sehr geehrte Frau Oberbürgermeisterin Grünwald,",
    ),
    (
        "de",
        {"name": "Jan Weber", "title": "Bürgermeister"},
        "Sehr geehrter Herr Bürgermeister Weber,",
    ),
    (
        "de",
        {"name": "Brooke Lindqvist", "title": "Mayor", "gender": "w"},
        "Sehr geehrte Frau Bürgermeisterin Lindqvist,",
    ),
    ("de", {"name": "Dr. Anna Berg", "gender": "f"}, "Sehr geehrte Frau Dr. Berg,"),
    ("de", {"name": "Petra Grünwald", "salutation": "Frau"}, "Sehr geehrte Frau Grünwald,"),
    (
        "de",
        {"salutation": "Sehr geehrte Frau Oberbürgermeisterin Hartmann"},
        "Sehr geehrte Frau Oberbürgermeisterin Hartmann,",
    ),
    ("de", {"name": "Petra Grünwald", "title": "Mayor"}, "Guten Tag Petra Grünwald,"),
    ("de", {}, "Sehr geehrte Damen und Herren,"),
    # French: the office with Madame/Monsieur, never a surname.
    ("fr", {"name": "Anne Hidalgo", "title": "Maire", "gender": "f"}, "Madame la Maire,"),
    ("fr", {"title": "Maire"}, "Madame la Maire, Monsieur le Maire,"),
    ("fr", {"name": "Jean Dupont", "salutation": "Monsieur"}, "Monsieur,"),
    ("fr", {"name": "Jean Dupont"}, "Madame, Monsieur,"),
    # Polish: the office in the vocative.
    ("pl", {"title": "Prezydent Miasta", "gender": "k"}, "Szanowna Pani Prezydent,"),
    ("pl", {"title": "Burmistrz", "salutation": "Pan"}, "Szanowny Panie Burmistrzu,"),
    ("pl", {"gender": "f"}, "Szanowna Pani,"),
    ("pl", {"name": "Anna Nowak"}, "Szanowni Państwo,"),
    # Ukrainian.
    ("uk", {"title": "Mayor", "gender": "m"}, "Шановний пане міський голово!"),
    ("uk", {"title": "Мер", "gender": "ж"}, "Шановна пані міська голово!"),
    ("uk", {}, "Шановні пані та панове!"),
    # Spanish, Italian, Dutch, Czech, Lithuanian.
    ("es", {"title": "Alcaldesa"}, "Estimada señora alcaldesa:"),
    ("es", {"name": "Juan García", "gender": "m"}, "Estimado señor García:"),
    ("es", {}, "Señoras y señores:"),
    ("it", {"title": "Sindaca"}, "Gentile Signora Sindaca,"),
    ("it", {"name": "Brooke Lindqvist"}, "Gentile Brooke Lindqvist,"),
    ("it", {}, "Gentili Signore e Signori,"),
    ("nl", {"name": "Femke Halsema", "title": "Burgemeester"}, "Geachte burgemeester Halsema,"),
    ("nl", {"name": "Anna de Vries", "gender": "v"}, "Geachte mevrouw de Vries,"),
    ("nl", {}, "Geachte heer, mevrouw,"),
    ("cs", {"title": "Primátorka"}, "Vážená paní primátorko,"),
    ("cs", {"title": "Mayor", "gender": "m"}, "Vážený pane starosto,"),
    ("cs", {}, "Vážené dámy, vážení pánové,"),
    ("lt", {"title": "Merė"}, "Gerbiama ponia mere,"),
    ("lt", {"gender": "m"}, "Gerbiamas pone,"),
    ("lt", {}, "Gerbiamieji,"),
]


@pytest.mark.parametrize(("language", "known", "expected"), CASES)
def test_the_starter_appeal_greets_by_language_office_and_form_of_address(
    language: str, known: dict[str, object], expected: str
) -> None:
    line, text = letter(language, **known)  # type: ignore[arg-type]
    assert line == expected
    assert "Sir or Madam" not in text


def test_every_shipped_language_has_greeting_rules_and_the_template_uses_them() -> None:
    assert sorted(LANGUAGES) == sorted(APPEAL.languages)
    for language in LANGUAGES:
        line, _ = letter(language)
        assert line == generic_greeting(language)


def test_a_whole_salutation_is_used_only_in_its_own_language() -> None:
    german = {"salutation": "Sehr geehrte Frau Oberbürgermeisterin Hartmann", "name": "K. Hartmann"}
    line, _ = letter("de", **german)  # type: ignore[arg-type]
    assert line == "Sehr geehrte Frau Oberbürgermeisterin Hartmann,"
    # The same contact read in English: her form of address is kept, the German line is not.
    english = greeting_for(
        language="en",
        contact_language="de",
        salutation=german["salutation"],
        title="Oberbürgermeisterin",
        name="Katrin Hartmann",
        attributes={},
        tags=(),
    )
    assert str(english) == "Dear Mayor Hartmann,"
    assert english.gender == "f"


def test_french_closes_with_the_same_form_of_address() -> None:
    _, text = letter("fr", title="Maire", gender="f")
    assert "Nous vous prions d'agréer, Madame la Maire, l'expression" in text


def test_polish_body_agrees_with_the_form_of_address() -> None:
    _, text = letter("pl", title="Burmistrz", gender="f")
    assert "Piszemy do Pani osobiście" in text and "Państwa" not in text
    _, text = letter("pl")
    assert "Piszemy do Państwa osobiście" in text


def test_the_html_alternative_greets_alike_and_escapes_the_name() -> None:
    rendered = APPEAL.render(
        recipient=Recipient(
            contact_id=1,
            contact=ContactView(
                email="office@example.org",
                name="Brooke <b>Lindqvist</b>",
                title=None,
                salutation=None,
                language="en",
                organisation=None,
            ),
            city=None,
        ),
        campaign=CAMPAIGN,
        unsubscribe_url=None,
        unsubscribe_mailto="mailto:office@example.org",
        today=dt.date(2026, 11, 26),
    )
    assert rendered.html is not None
    assert "Dear Brooke &lt;b&gt;Lindqvist&lt;/b&gt;," in rendered.html


def test_a_language_without_rules_says_so_where_the_template_prints_the_greeting() -> None:
    swedish = TemplateSet.from_sources(
        name="t", sources={"sv.txt.j2": "Subject: Hej\n\n{{ greeting }}\n"}
    )
    with pytest.raises(RenderProblem, match=r"sv\.txt\.j2:3: .*no greeting rules for .*'sv'"):
        letter("sv", template=swedish)


@pytest.mark.parametrize(
    "name",
    [
        "Brooke Lindqvist",
        "Katrin Hartmann",
        "Zoë Łukasiewicz-Müller",
        "Anna Maria Berg",
        "Jean-Pierre de la Fontaine",
        "Hans van der Berg",
        "Mayor Brooke Lindqvist",
        "Dr. Anna Berg",
        "John Smith Jr.",
        "Smith, John",
        "Maria e Silva",
        "Sir Sadiq Khan",
        "Олександр Олександрович Костянтинопольський",
        "O'Brien Patrick",
        "Ana de Jesús",
        "Ahmed bin Rashid",
        "Juan y Pérez",
        "Lord Provost Jane Doe",
        "Madame Anne Hidalgo",
        "Zoë Müller 12",
        "Anna 2nd Berg",
    ],
)
def test_surnames_are_nameparsers(name: str) -> None:
    from nameparser import HumanName

    parsed = HumanName(name)
    assert name_parts(name) == ((str(parsed.title) or None), (str(parsed.last) or None))


# --------------------------------------------------------------------------- check counts them


def test_check_counts_letters_that_fall_back_to_the_generic_greeting(
    run: Cli, tmp_path: Path
) -> None:
    contacts = tmp_path / "contacts.csv"
    contacts.write_text(
        "email,name,title,language,gender\n"
        "a@example.org,Petra Grünwald,Oberbürgermeisterin,de,\n"
        "b@example.org,,,de,\n"
        "c@example.org,,,fr,\n"
        "d@example.org,Jean Dupont,,fr,m\n"
        "e@example.org,,,de,\n",
        encoding="utf-8",
    )
    run.ok("import", "contacts", str(contacts))
    run.ok("campaign", "create", "c", "--template", "appeal", "--from", "office@example.org")
    result = run("check", "c")
    assert result.exit_code == 0, result.output
    assert (
        "letters with the generic greeting 'Sehr geehrte Damen und Herren,' "
        "(no name, office or form of address known; de variant): 2"
    ) in result.output
    assert "e.g. b@example.org, e@example.org" in result.output
    assert "'Madame, Monsieur,' (no name, office or form of address known; fr variant): 1" in (
        result.output
    )
