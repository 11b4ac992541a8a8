"""Letters by shape (mailer/shapes.py): every letter `check` builds from a shape is character for
character the letter rendering gives, whatever the template does with the values."""

from __future__ import annotations

import datetime as dt
import functools
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from mailer.render import (
    CampaignView,
    CityView,
    ContactView,
    LetterTooLarge,
    PartnershipView,
    Recipient,
    Rendered,
    RenderProblem,
    SignatoryView,
    TemplateSet,
    load_template_set,
)
from mailer.shapes import LetterShapes

TODAY = dt.date(2026, 12, 2)
CAMPAIGN = CampaignView(slug="c", title="Appeal", default_language="en")
MAILTO = "mailto:office@example.org?subject=unsubscribe"
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"

LVIV = CityView(name="Lviv", country="UA", region="Lviv Oblast", name_uk="Львів")
KYIV = CityView(name="Kyiv", country="UA", region=None, name_uk="Київ")
MAYOR = SignatoryView(
    name="Andriy Sadovyi", title="Mayor of Lviv", city="Lviv", email="m@lviv.test"
)
TIES = (
    PartnershipView(
        ukrainian_city=LVIV, kind="twin", since=1995, years=31, note=None, signatory=MAYOR
    ),
    PartnershipView(
        ukrainian_city=KYIV, kind="partner", since=None, years=None, note="n", signatory=None
    ),
)
CITIES = (
    CityView(name="Kraków", country="PL", region="małopolskie", name_uk="Краків"),
    CityView(name="Nürnberg", country="DE", region=None, name_uk=None),
    CityView(name="A<b>&'\"", country="FR", region="x", name_uk=None),
)
NAMES = (
    "Anna Berg",
    "Zoë Łukasiewicz-Müller",
    "Jean <Dupont> & Fils",
    "Anna",
    "",
    None,
    "Line\r\nbreak",
    "{{ contact.name }}",
    "x" * 30,
)


def recipients() -> list[Recipient]:
    out = []
    n = 0
    for name in NAMES:
        for city_index, city in enumerate((None, *CITIES)):
            for language in ("en", "de", "pl", "uk", "sv", None):
                n += 1
                ties = TIES[: (n % 3)] if city is not None else ()
                attributes: dict[str, object] = {"population": str(1000 * n)}
                if n % 4 == 0:
                    attributes["gender"] = "f"
                if n % 5 == 0:
                    attributes["rank"] = n
                if n % 7 == 0:
                    attributes["flag"] = n % 2 == 0
                out.append(
                    Recipient(
                        contact_id=n,
                        contact=ContactView(
                            email=f"c{n}@example.org",
                            name=name,
                            title=("Mayor", "Bürgermeisterin", None, "Prezydent")[n % 4],
                            salutation=("Pani", None, "Sehr geehrte Frau Berg")[n % 3],
                            language=language,
                            organisation=("City hall", None)[n % 2],
                            attributes=types.MappingProxyType(attributes),
                            tags=(("mayor",), (), ("press", "eu"))[city_index % 3],
                        ),
                        city=city,
                        partnerships=ties,
                        signatories=(MAYOR,),
                    )
                )
    return out


def outcome(call: Callable[[], Rendered]) -> object:
    """What a render gives: the letter, or the error's type and message."""
    try:
        return call()
    except RenderProblem as exc:
        return (type(exc).__name__, str(exc))


def assert_same_letters(template_set: TemplateSet, people: list[Recipient]) -> LetterShapes:
    shapes = LetterShapes(template_set, campaign=CAMPAIGN, unsubscribe_mailto=MAILTO, today=TODAY)
    for recipient in people:
        url = (
            f"https://example.org/u?t={recipient.contact_id}" if recipient.contact_id % 2 else None
        )
        built = outcome(functools.partial(shapes.render, recipient, unsubscribe_url=url))
        rendered = outcome(
            functools.partial(
                template_set.render,
                recipient=recipient,
                campaign=CAMPAIGN,
                unsubscribe_url=url,
                unsubscribe_mailto=MAILTO,
                today=TODAY,
            )
        )
        assert built == rendered, recipient
    return shapes


def test_the_starter_appeal_by_shape_is_the_rendered_appeal() -> None:
    people = recipients()
    shapes = assert_same_letters(load_template_set(TEMPLATES, "appeal"), people)
    # Most letters were built, not rendered: that is the point.
    assert shapes.built > len(people) // 2
    assert shapes.built + shapes.rendered == len(people)


def one(source: str, html: str | None = None) -> TemplateSet:
    sources = {"en.txt.j2": source}
    if html is not None:
        sources["en.html.j2"] = html
    return TemplateSet.from_sources(name="t", sources=sources)


# Every way a template may look at a value, each with letters that differ by it.
LOOKS = [
    "{% if contact.name %}named{% else %}anonymous{% endif %} {{ contact.name or '' }}",
    "{{ contact.name|length if contact.name else 0 }}",
    "{{ contact.name|upper if contact.name else '' }}",
    "{{ (contact.name or '')[:4] }}",
    "{{ 'A' if (contact.name or '').startswith('A') else 'B' }}",
    "{{ {'Anna': 'hello Anna'}.get(contact.name, 'hello you') }}",
    "{{ 'yes' if contact.name in ['Anna', 'Anna Berg'] else 'no' }}",
    "{{ 'same' if contact.name == contact.organisation else 'differ' }}",
    "{{ (contact.name or '') ~ '!' }}",
    "{% set x %}{{ contact.name }}{% endset %}{{ x|length if contact.name is not none else 0 }}",
    "{% macro m(v) %}<{{ v }}>{% endmacro %}{% if contact.name %}{{ m(contact.name)|length }}{% endif %}",
    "{% if contact.name %}{% filter upper %}{{ contact.name }}{% endfilter %}{% endif %}",
    "{{ contact.name is string }} {{ contact.rank is number }} {{ contact.name is defined }}",
    "{{ contact.name|default('nobody', true) }}",
    "{{ '%s!'|format(contact.name) if contact.name else '' }}",
    "{{ '%s?' % contact.name if contact.name else '' }}",
    "{{ contact.attributes.population|int > 20000 }} {{ contact.attributes.get('rank', 0) }}",
    "{{ contact.attributes.rank + 1 if contact.attributes.rank else '' }}",
    "{{ contact.attributes.flag }} {{ 'on' if contact.attributes.flag else 'off' }}",
    "{% for k, v in contact.attributes|dictsort %}{{ k }}={{ v }};{% endfor %}",
    "{% for t in contact.tags %}[{{ t }}]{% endfor %} {{ 'mayor' in contact.tags }}",
    "{{ contact.tags|join(',') }} {{ contact.tags|length }}",
    "{{ contact }}",
    "{{ city }} {{ city.name if city else '' }} {{ city.name_uk or (city.name if city else '') }}",
    "{{ city.name|e if city else '' }} {{ (city.region or '-') if city else '' }}",
    "{{ partner }} | {{ signatory }} | {{ partnerships|length }} | {{ signatories|first }}",
    "{% for p in partnerships %}{{ p.ukrainian_city }} {{ p.since }} {{ loop.index }};{% endfor %}",
    "{{ partnerships|map(attribute='ukrainian_city.name')|list|format_list }}",
    "{{ greeting }} {{ greeting.address }} {{ greeting.gender }} {{ greeting.generic }}",
    "{% if greeting.gender == 'f' %}Liebe{% else %}Lieber{% endif %} {{ greeting.address }}",
    "{{ unsubscribe_url or 'none' }} {{ (unsubscribe_url or '')|length }}",
    "{% for c in (contact.name or '') %}{{ loop.changed(c) }}{% endfor %}",
    "{{ [contact.name, contact.title]|select|list|length }}",
    "{{ (contact.name, 1)|first is sameas contact.name }}",
    "{{ contact.name|string|wordcount if contact.name else 0 }}",
    "{% set ns = namespace(v='') %}{% set ns.v = contact.name %}{{ ns.v }}",
    "{% if contact.email.endswith('3@example.org') %}three{% endif %}",
]


@pytest.mark.parametrize("body", LOOKS)
def test_a_value_the_template_looks_at_is_never_stood_in_for(body: str) -> None:
    assert_same_letters(one(f"Subject: {{{{ contact.title or 'x' }}}}\n\n{body}\n"), recipients())


@pytest.mark.parametrize("body", LOOKS[:12] + LOOKS[22:30])
def test_html_letters_by_shape_escape_as_rendering_does(body: str) -> None:
    html = "<p>{{ contact.name or '' }} &amp; {{ city.name if city else '' }}</p>\n" + body
    assert_same_letters(one("Subject: x\n\n{{ contact.name }}\n", html), recipients())


def test_printed_values_stand_in_and_errors_stay_the_renders() -> None:
    template = one(
        "Subject: For {{ contact.email }}\n\nDear {{ contact.name }},\n"
        "{{ contact.attributes.population }} people in {{ city.name }}.\n"
    )
    people = recipients()
    shapes = assert_same_letters(template, people)
    # A missing name, a missing city: the render's own error, file and line. The others are
    # built: the template only prints.
    assert shapes.built > len(people) // 2


def test_markup_in_a_value_reaches_the_built_letter() -> None:
    from mailer.render import leftover_markup

    template = one("Subject: x\n\nDear {{ contact.name }},\n")
    people = [r for r in recipients() if r.contact.name == "{{ contact.name }}"][:2]
    shapes = LetterShapes(template, campaign=CAMPAIGN, unsubscribe_mailto=MAILTO, today=TODAY)
    letters = [shapes.render(r, unsubscribe_url=None) for r in people]
    assert shapes.built >= 1
    assert all(
        (leftover_markup(letter.text) or "").startswith("Dear {{ contact.name }}")
        for letter in letters
    )


def test_a_value_that_makes_a_letter_too_large_raises_where_the_template_stands() -> None:
    template = one("Subject: x\n\n{{ contact.name }}\n{{ contact.name }}\n")
    small = recipients()[0]
    huge = Recipient(
        contact_id=99,
        contact=ContactView(
            email="h@example.org",
            name="y" * 600_000,
            title=None,
            salutation=None,
            language="en",
            organisation=None,
        ),
        city=None,
    )
    shapes = LetterShapes(template, campaign=CAMPAIGN, unsubscribe_mailto=MAILTO, today=TODAY)
    shapes.render(small, unsubscribe_url=None)
    with pytest.raises(LetterTooLarge) as raised:
        shapes.render(huge, unsubscribe_url=None)
    assert "templates/t/en.txt.j2:4" in str(raised.value)


@pytest.mark.parametrize(
    "sources",
    [
        {"en.txt.j2": "Subject: x\n\n{% include 'part.j2' %}\n", "part.j2": "{{ contact.name }}"},
        {
            "en.txt.j2": "Subject: x\n\nb\n",
            "en.html.j2": "{% autoescape false %}{{ contact.name }}{% endautoescape %}",
        },
        {"en.txt.j2": "Subject: x\n\n{{ contact.name is sameas contact.title }}\n"},
    ],
)
def test_templates_shapes_cannot_speak_for_are_rendered_letter_by_letter(
    sources: dict[str, str],
) -> None:
    people = recipients()
    shapes = assert_same_letters(TemplateSet.from_sources(name="t", sources=sources), people)
    assert shapes.built == 0 and shapes.rendered == len(people)


def test_a_follow_up_letter_that_quotes_its_thread_is_the_rendered_one() -> None:
    # A follow-up's thread (first_letter, previous_letter) is not among a shape's values: a
    # template that asks whether it is there, or prints its date, must still build exactly the
    # letter rendering gives, for recipients with and without a first letter.
    import dataclasses

    from mailer.render import LetterView

    sent = dt.datetime(2026, 11, 2, 9, 30, tzinfo=dt.UTC)
    first = LetterView(sent_at=sent, date=sent.date(), subject="Appeal", message_id="<a@x.test>")
    people = [
        dataclasses.replace(r, first_letter=first, previous_letter=first) if i % 2 else r
        for i, r in enumerate(recipients()[:40])
    ]
    template = one(
        "Subject: x\n\n{% if first_letter is defined and first_letter %}On {{ first_letter.date }}"
        " we wrote: {{ first_letter }}{% else %}Hello{% endif %} {{ contact.email }}\n"
    )
    assert_same_letters(template, people)
