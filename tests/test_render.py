"""Templates to letters: context, language fallback, Babel filters, errors that name file and line."""

from __future__ import annotations

import datetime as dt
import types
from pathlib import Path

import pytest

from mailer.errors import TemplateError
from mailer.render import (
    CampaignView,
    CityView,
    ContactView,
    MissingFieldError,
    PartnershipView,
    Recipient,
    Rendered,
    SignatoryView,
    TemplateSecurityError,
    TemplateSet,
    leftover_markup,
)

TODAY = dt.date(2026, 11, 26)
CAMPAIGN = CampaignView(slug="appeal", title="Appeal", default_language="en")
MAYOR_LVIV = SignatoryView(
    name="Andriy Sadovyi", title="Mayor of Lviv", city="Lviv", email="mayor@lviv.example.org"
)


def tie(
    city: str, *, since: int | None = 1995, signatory: SignatoryView | None = None
) -> PartnershipView:
    return PartnershipView(
        ukrainian_city=CityView(name=city, country="UA", region=None),
        kind="twin",
        since=since,
        years=TODAY.year - since if since else None,
        note=None,
        signatory=signatory,
    )


def recipient(
    *,
    name: str | None = "Zoë Müller",
    language: str | None = "en",
    city: str | None = "Freiburg",
    ties: tuple[PartnershipView, ...] = (),
    attributes: dict[str, object] | None = None,
) -> Recipient:
    return Recipient(
        contact_id=1,
        contact=ContactView(
            email="ob@freiburg.example.org",
            name=name,
            title="Mayor",
            salutation=None,
            language=language,
            organisation="Stadt Freiburg",
            attributes=types.MappingProxyType(attributes or {}),
            tags=("mayor",),
        ),
        city=CityView(name=city, country="DE", region=None) if city else None,
        partnerships=ties,
        signatories=(MAYOR_LVIV,),
    )


def render(
    template_set: TemplateSet,
    person: Recipient,
    *,
    campaign: CampaignView = CAMPAIGN,
    url: str | None = None,
) -> Rendered:
    return template_set.render(
        recipient=person,
        campaign=campaign,
        unsubscribe_url=url,
        unsubscribe_mailto="mailto:office@example.org?subject=unsubscribe",
        today=TODAY,
    )


def one(body: str, *, subject: str = "Hello", lang: str = "en") -> TemplateSet:
    return TemplateSet.from_sources(
        name="t", sources={f"{lang}.txt.j2": f"Subject: {subject}\n\n{body}"}
    )


def test_context_names_the_recipient_city_partner_and_signatory() -> None:
    template_set = one(
        "{{ contact.name }} in {{ city.name }}; {{ partner.ukrainian_city.name }} "
        "for {{ partner.years }} years; signed {{ signatory.name }}; "
        "{{ partnerships|length }} ties; {{ signatories[0].title }}; {{ campaign.slug }}; "
        "{{ unsubscribe_mailto }}; {{ today.year }}",
        subject="From {{ partner.ukrainian_city.name }} to {{ city.name }}",
    )
    person = recipient(ties=(tie("Lviv", since=1989, signatory=MAYOR_LVIV), tie("Odesa")))
    out = render(template_set, person)
    assert out.subject == "From Lviv to Freiburg"
    assert out.text == (
        "Zoë Müller in Freiburg; Lviv for 37 years; signed Andriy Sadovyi; 2 ties; "
        "Mayor of Lviv; appeal; mailto:office@example.org?subject=unsubscribe; 2026"
    )
    assert (out.language, out.requested_language, out.fell_back) == ("en", "en", False)
    assert out.html is None and out.headers == {}


def test_signatory_is_none_without_a_partner() -> None:
    template_set = one("{% if signatory %}{{ signatory.name }}{% else %}all of us{% endif %}")
    assert render(template_set, recipient()).text == "all of us"


def test_format_list_and_format_date_follow_the_message_language() -> None:
    body = (
        "{{ partnerships|map(attribute='ukrainian_city.name')|format_list }} / "
        "{{ today|format_date }} / {{ 1234567.5|format_number }}"
    )
    template_set = TemplateSet.from_sources(
        name="t",
        sources={"en.txt.j2": f"Subject: s\n\n{body}", "de.txt.j2": f"Subject: s\n\n{body}"},
    )
    ties = (tie("Lviv"), tie("Kharkiv"), tie("Odesa"))
    english = render(template_set, recipient(ties=ties, language="en")).text
    german = render(template_set, recipient(ties=ties, language="de")).text
    assert english == "Lviv, Kharkiv and Odesa / 26 November 2026 / 1,234,567.5"
    assert german == "Lviv, Kharkiv und Odesa / 26. November 2026 / 1.234.567,5"


@pytest.mark.parametrize(
    ("asked", "default", "used", "fell_back"),
    [
        ("de", "en", "de", False),
        ("de-AT", "en", "de", False),  # the primary subtag is the same language
        ("DE_at", "en", "de", False),
        ("uk", "fr", "fr", True),  # contact -> campaign default
        ("uk", "it", "en", True),  # -> en
        (None, "fr", "fr", False),  # no language: the campaign default is no fallback
        (None, "it", "en", True),
    ],
)
def test_language_fallback(asked: str | None, default: str, used: str, fell_back: bool) -> None:
    template_set = TemplateSet.from_sources(
        name="t",
        sources={
            f"{lang}.txt.j2": f"Subject: {lang}\n\n{lang} body" for lang in ("en", "de", "fr")
        },
    )
    campaign = CampaignView(slug="c", title=None, default_language=default)
    out = render(template_set, recipient(language=asked), campaign=campaign)
    assert (out.language, out.fell_back) == (used, fell_back)
    assert out.subject == used and out.text == f"{used} body"
    assert out.requested_language == (asked or default)
    assert template_set.languages == ("de", "en", "fr")


def test_syntax_error_names_file_and_line() -> None:
    with pytest.raises(TemplateError) as err:
        TemplateSet.from_sources(
            name="appeal",
            sources={"en.txt.j2": "Subject: s\n\nline 3\nline 4 {% if x %}\nline 5 {{ y }\n"},
        )
    assert str(err.value).startswith("templates/appeal/en.txt.j2:5: ")


def test_syntax_error_in_subject_and_html_name_their_file_and_line() -> None:
    with pytest.raises(TemplateError, match=r"templates/t/en\.txt\.j2:2: "):
        TemplateSet.from_sources(name="t", sources={"en.txt.j2": "{# c #}\nSubject: {{ x\n\nb"})
    with pytest.raises(TemplateError, match=r"templates/t/en\.html\.j2:3: "):
        TemplateSet.from_sources(
            name="t",
            sources={"en.txt.j2": "Subject: s\n\nb", "en.html.j2": "<p>\n</p>\n{% endif %}"},
        )


def test_template_from_directory_reads_every_variant(tmp_path: Path) -> None:
    folder = tmp_path / "note"
    folder.mkdir()
    (folder / "en.txt.j2").write_text("Subject: Hi\n\nHello {{ contact.name }}\n")
    (folder / "en.html.j2").write_text("<p>Hello {{ contact.name }}</p>\n")
    (folder / "pl.txt.j2").write_text("Subject: Cześć\n\nDzień dobry\n")
    template_set = TemplateSet.from_directory(folder, name="note")
    assert template_set.languages == ("en", "pl")
    assert set(template_set.sources) == {"en.txt.j2", "en.html.j2", "pl.txt.j2"}
    copy = TemplateSet.from_sources(name="note", sources=template_set.sources)
    assert render(copy, recipient()) == render(template_set, recipient())


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("Hello\n\nbody", r"templates/t/en\.txt\.j2:1: expected a header line"),
        ("\nbody", r"templates/t/en\.txt\.j2: no `Subject:` line"),
        ("Subject: a", r"templates/t/en\.txt\.j2: no blank line after the header"),
        (
            "Subject: a\nReply-To: x@example.org\n\nb",
            r"en\.txt\.j2:2: header 'Reply-To' is not allowed",
        ),
        ("Subject: a\nBcc: x@example.org\n\nb", r"en\.txt\.j2:2: header 'Bcc' is not allowed"),
        ("Subject: a\nSubject: b\n\nb", r"en\.txt\.j2:2: a second Subject line"),
    ],
)
def test_header_section_errors_name_the_file(source: str, expected: str) -> None:
    with pytest.raises(TemplateError, match=expected):
        TemplateSet.from_sources(name="t", sources={"en.txt.j2": source})


def test_template_without_text_variant_or_with_bad_names_is_refused() -> None:
    with pytest.raises(TemplateError, match="no variants"):
        TemplateSet.from_sources(name="t", sources={"README.md": "x"})
    with pytest.raises(TemplateError, match=r"needs its text variant de\.txt\.j2"):
        TemplateSet.from_sources(
            name="t", sources={"en.txt.j2": "Subject: s\n\nb", "de.html.j2": "<p>"}
        )
    with pytest.raises(TemplateError, match="not a language tag"):
        TemplateSet.from_sources(name="t", sources={"english!.txt.j2": "Subject: s\n\nb"})


def test_statements_before_the_subject_line_serve_the_subject_and_keep_line_numbers() -> None:
    source = (
        "{% set names = {'Lviv': 'Lwiw',\n"
        "                'Kyiv': 'Kyjiw'} -%}\n"
        "Subject: Von {{ names.get(partner.ukrainian_city.name) }}\n"
        "\n"
        "{{ contact.attributes.population }}\n"
    )
    template_set = TemplateSet.from_sources(name="t", sources={"de.txt.j2": source})
    person = recipient(language="de", ties=(tie("Lviv"),))
    with pytest.raises(MissingFieldError) as err:
        render(template_set, person)
    assert err.value.line == 5
    out = render(
        template_set, recipient(language="de", ties=(tie("Lviv"),), attributes={"population": "1"})
    )
    assert out.subject == "Von Lwiw" and out.text == "1\n"


def test_undefined_field_names_the_dotted_field() -> None:
    template_set = one("Line two\n{{ contact.attributes.population }} people")
    with pytest.raises(MissingFieldError) as err:
        render(template_set, recipient())
    assert err.value.field == "contact.attributes.population"
    assert err.value.line == 4
    assert str(err.value).startswith("templates/t/en.txt.j2:4: contact.attributes.population")
    out = render(template_set, recipient(attributes={"population": "230000"}))
    assert out.text == "Line two\n230000 people"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("{{ contact.name }}", "contact.name"),  # None would print "None": a missing field
        ("{{ city.name }}", "city.name"),  # no city at all
        ("{{ partner.ukrainian_city.name }}", "partner.ukrainian_city"),
        ("{{ contact.nickname }}", "contact.nickname"),
        ("{{ mayor }}", "mayor"),
        ("{% for p in partnerships %}{{ p.note }}{% endfor %}", "p.note"),
    ],
)
def test_missing_values_are_missing_fields(body: str, field: str) -> None:
    template_set = one(body)
    person = recipient(name=None, city=None if "city.name" in body else "Freiburg")
    if "p.note" in body:
        person = recipient(ties=(tie("Lviv"),))
    with pytest.raises(MissingFieldError) as err:
        render(template_set, person)
    assert err.value.field == field


def test_guarded_optional_fields_render() -> None:
    template_set = one(
        "{{ contact.name or 'Sir or Madam' }}{% if contact.salutation %}x{% endif %}"
    )
    assert render(template_set, recipient(name=None)).text == "Sir or Madam"


@pytest.mark.parametrize(
    "body",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ contact.__class__.__init__.__globals__ }}",
        "{{ contact.attributes.__class__ }}",
        "{{ '{0.__class__}'.format(contact) }}",
        "{% set x = partnerships.__len__ %}{{ x() }}",
    ],
)
def test_sandbox_escapes_are_refused(body: str) -> None:
    template_set = one(body)
    with pytest.raises(TemplateSecurityError) as err:
        render(template_set, recipient())
    assert "templates/t/en.txt.j2:3" in str(err.value)


def test_templates_cannot_modify_the_shared_data() -> None:
    template_set = one("{{ contact.attributes.update({'x': 1}) }}")
    with pytest.raises(TemplateError):
        render(template_set, recipient(attributes={"population": "1"}))


def test_script_in_a_name_is_escaped_in_html_and_plain_in_text() -> None:
    template_set = TemplateSet.from_sources(
        name="t",
        sources={
            "en.txt.j2": "Subject: For {{ contact.name }}\n\nDear {{ contact.name }},\n",
            "en.html.j2": "<p>Dear {{ contact.name }},</p>\n",
        },
    )
    out = render(template_set, recipient(name="<script>alert(1)</script>"))
    assert out.text == "Dear <script>alert(1)</script>,\n"
    assert out.subject == "For <script>alert(1)</script>"
    assert out.html == "<p>Dear &lt;script&gt;alert(1)&lt;/script&gt;,</p>\n"


def test_line_breaks_in_data_never_reach_the_subject_header() -> None:
    template_set = one("body", subject="Appeal to {{ city.name }}")
    out = render(template_set, recipient(city="Freiburg\r\nBcc: x@example.com\u2028next"))
    assert out.subject == "Appeal to Freiburg Bcc: x@example.com next"
    assert "\n" not in out.subject and "\r" not in out.subject


def test_includes_resolve_inside_the_template_set_only() -> None:
    sources = {
        "en.txt.j2": "Subject: s\n\n{% include 'signature.j2' %}",
        "signature.j2": "-- {{ campaign.title }}",
    }
    assert (
        render(TemplateSet.from_sources(name="t", sources=sources), recipient()).text == "-- Appeal"
    )
    sources["en.txt.j2"] = "Subject: s\n\n{% include '../../etc/passwd' %}"
    with pytest.raises(TemplateError, match="passwd"):
        render(TemplateSet.from_sources(name="t", sources=sources), recipient())


def test_leftover_markup_is_found() -> None:
    assert leftover_markup("Dear Zoë, all fine") is None
    assert leftover_markup("Dear {{ name }}") == "Dear {{ name }}"
    assert leftover_markup("x {% if %}") is not None
    template_set = one("{{ '{{' }} contact.name }}")
    assert leftover_markup(render(template_set, recipient()).text) is not None


def test_render_many_reuses_the_compiled_templates() -> None:
    template_set = one("Hello {{ contact.name }}")
    variant = template_set._variants["en"]
    people = [recipient(name=f"Mayor {i}") for i in range(50)]
    texts = [render(template_set, person).text for person in people]
    assert texts == [f"Hello Mayor {i}" for i in range(50)]
    assert template_set._variants["en"] is variant


# --------------------------------------------------------------------------- the starter template

STARTER_LANGUAGES = ("en", "de", "fr", "pl", "uk")


@pytest.mark.parametrize("language", STARTER_LANGUAGES)
def test_starter_appeal_renders_for_a_partner_city_with_its_mayor(
    workspace: Path, language: str
) -> None:
    template_set = TemplateSet.from_directory(workspace / "templates" / "appeal", name="appeal")
    person = recipient(
        name="Zoë Müller",
        language=language,
        city="Freiburg im Breisgau",
        ties=(tie("Lviv", since=1989, signatory=MAYOR_LVIV), tie("Kharkiv", since=2001)),
    )
    out = render(template_set, person, url="https://example.org/u?t=abc")
    assert out.language == language and not out.fell_back
    assert out.subject and len(out.subject) <= 120
    assert leftover_markup(out.subject + out.text + (out.html or "")) is None
    assert "Freiburg im Breisgau" in out.text
    # The Ukrainian letter writes the mayor's name in Cyrillic.
    assert ("Садовий" if language == "uk" else "Andriy Sadovyi") in out.text
    assert "None" not in out.text
    assert "https://example.org/u?t=abc" in out.text


@pytest.mark.parametrize("language", STARTER_LANGUAGES)
def test_starter_appeal_reads_well_without_a_partner_city(workspace: Path, language: str) -> None:
    template_set = TemplateSet.from_directory(workspace / "templates" / "appeal", name="appeal")
    for person in (
        recipient(name=None, language=language, city="Lille"),
        recipient(name="Jean Dupont", language=language, city=None),
    ):
        out = render(template_set, person)
        assert out.language == language
        assert out.subject
        assert leftover_markup(out.subject + out.text + (out.html or "")) is None
        assert "None" not in out.text
        assert "mailto:office@example.org?subject=unsubscribe" in out.text


def test_a_body_opening_with_whitespace_control_keeps_its_text() -> None:
    template_set = one("{%- if contact.name %}Dear {{ contact.name }}{% endif %}\nbody\n")
    assert render(template_set, recipient()).text == "Dear Zoë Müller\nbody\n"
    template_set = one("\n\nDear all\n")
    assert render(template_set, recipient()).text == "\n\nDear all\n"


def test_html_variant_may_repeat_the_header_lines() -> None:
    template_set = TemplateSet.from_sources(
        name="t",
        sources={
            "en.txt.j2": "Subject: Text subject\n\nDear {{ contact.name }},\n",
            "en.html.j2": (
                "{% set x = 1 %}\nSubject: ignored {{ city.name }}\n\n"
                "{#- a comment -#}\n<p>Dear {{ contact.name }},</p>\n{{ contact.attributes.population }}\n"
            ),
        },
    )
    out = render(template_set, recipient(attributes={"population": "5"}))
    assert out.subject == "Text subject"
    assert out.html == "<p>Dear Zoë Müller,</p>\n5\n"
    with pytest.raises(MissingFieldError) as err:
        render(template_set, recipient())
    assert (err.value.file, err.value.line) == ("templates/t/en.html.j2", 6)


def test_starter_html_alternative_is_only_html(workspace: Path) -> None:
    template_set = TemplateSet.from_directory(workspace / "templates" / "appeal", name="appeal")
    out = render(template_set, recipient(ties=(tie("Lviv", signatory=MAYOR_LVIV),)))
    assert out.html is not None
    assert out.html.lstrip().startswith("<")
    assert "Subject:" not in out.html
    assert "&lt;" not in out.html  # the template's own markup is not escaped
