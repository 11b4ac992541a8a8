"""A rendered letter has a size limit, enforced while rendering, so memory stays bounded.

`{{ 'x' * 300000000 }}` made `preview` take 3 GB. Every way a template can build a large text
(repetition, concatenation, padding and format widths, joins, buffers, the output itself) stops
at the limit with an error naming the file and line, before the text exists.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from conftest import Cli
from smtp_server import SmtpTestServer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from test_render import one, recipient, render

from mailer.models import Message
from mailer.render import MAX_LETTER_CHARS, LetterTooLarge, TemplateSet

HUGE = 300_000_000
EXPLOSIONS = [
    f"{{{{ 'x' * {HUGE} }}}}",
    f"{{{{ {HUGE} * 'x' }}}}",
    f"{{{{ ['x'] * {HUGE} }}}}",
    "{{ 'x' * 999999 ~ 'y' * 999999 }}",
    "{{ 'x' * 999999 + 'y' * 999999 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s=['x']) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    f"{{{{ 'x'.ljust({HUGE}) }}}}",
    f"{{{{ 'x'.zfill({HUGE}) }}}}",
    f"{{{{ 'x'|center({HUGE}) }}}}",
    f"{{{{ 'x\\ny'|indent({HUGE}) }}}}",
    f"{{{{ '%{HUGE}s'|format('x') }}}}",
    f"{{{{ '%{HUGE}s' % 'x' }}}}",
    "{{ '%*s' % (300000000, 'x') }}",
    f"{{{{ '{{:>{HUGE}}}'.format('x') }}}}",
    "{{ '{:>{w}}'.format('x', w=300000000) }}",
    "{{ ('x' * 999999)|replace('x', 'yyyy') }}",
    "{{ ('x' * 999999).replace('x', 'yyyy') }}",
    "{{ (range(100000)|list * 10)|join('xxxxxxxxxx') }}",
    "{{ 'xxxxxxxxxx'.join(range(100000)|map('string')|list * 10) }}",
    "{{ 2 ** 300000000 }}",
    # Each piece under the limit, but the letter over it: the output is counted as it streams.
    "{% for i in range(100000) %}{{ 'x' * 900000 }}{% endfor %}",
    # Buffers that never reach the output count too.
    "{% set s %}{% for i in range(100000) %}{{ 'x' * 999999 }}{% endfor %}{% endset %}{{ s|length }}",
    "{% macro m() %}{% for i in range(100000) %}{{ 'x' * 999999 }}{% endfor %}{% endmacro %}"
    "{{ m()|length }}",
]


@pytest.mark.parametrize("body", EXPLOSIONS)
def test_a_letter_larger_than_the_limit_stops_with_bounded_memory(body: str) -> None:
    template_set = one(body)
    tracemalloc.start()
    try:
        with pytest.raises(LetterTooLarge) as err:
            render(template_set, recipient())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "templates/t/en.txt.j2:3" in str(err.value)
    assert f"{MAX_LETTER_CHARS:,}" in str(err.value)
    # A few times the limit at most (a character is one to four bytes), never the 300 MB asked.
    assert peak < 40 * MAX_LETTER_CHARS, peak


def test_the_subject_and_the_html_variant_are_limited_too() -> None:
    template_set = one("fine\n", subject=f"{{{{ 'x' * {HUGE} }}}}")
    with pytest.raises(LetterTooLarge, match=r"en\.txt\.j2:1"):
        render(template_set, recipient())
    html = TemplateSet.from_sources(
        name="t",
        sources={
            "en.txt.j2": "Subject: Hello\n\nfine\n",
            "en.html.j2": "<p>{% for i in range(100000) %}{{ 'x' * 900000 }}{% endfor %}</p>\n",
        },
    )
    with pytest.raises(LetterTooLarge, match=r"en\.html\.j2:1"):
        render(html, recipient())


def test_a_large_letter_under_the_limit_renders() -> None:
    size = MAX_LETTER_CHARS - 1000
    template_set = one(
        f"{{{{ 'x' * {size // 2} ~ 'y' * {size // 2} }}}}\n"
        "{% set ns = namespace(items=[]) %}{% for i in range(1000) %}"
        "{% set ns.items = ns.items + [i] %}{% endfor %}{{ ns.items|length }}\n"
        "{{ '%5s|%-5s|{:>6}'|format('a', 'b') }} {{ '{:>6}'.format('c') }} {{ 2 ** 64 }}\n"
    )
    rendered = render(template_set, recipient())
    assert rendered.text.startswith("x" * (size // 2) + "y" * (size // 2) + "\n1000\n")
    assert "    a|b    |{:>6}      c 18446744073709551616" in rendered.text


# --------------------------------------------------------------------------- the commands


TEMPLATE = f"Subject: Hello\n\nDear {{{{ contact.name }}}},\n{{{{ 'x' * {HUGE} }}}}\n"


@pytest.fixture
def huge(run: Cli, tmp_path: Path) -> Cli:
    folder = run.workspace / "templates" / "huge"
    folder.mkdir()
    (folder / "en.txt.j2").write_text(TEMPLATE, encoding="utf-8")
    contacts = tmp_path / "contacts.csv"
    contacts.write_text("email,name\nmayor@example.org,Anna Berg\n", encoding="utf-8")
    run.ok("import", "contacts", str(contacts))
    run.ok("campaign", "create", "c", "--template", "huge", "--from", "office@example.org")
    return run


def test_check_and_preview_stop_at_the_limit(huge: Cli) -> None:
    check = huge("check", "c")
    assert check.exit_code == 1, check.output
    assert "templates/huge/en.txt.j2:4: the letter would be larger than" in check.output
    preview = huge("preview", "c")
    assert preview.exit_code == 1
    assert preview.output.startswith("Error: templates/huge/en.txt.j2:4: the letter would be")
    assert len(preview.output.splitlines()) == 1


def test_send_fails_the_letter_with_the_reason(huge: Cli, engine: Engine) -> None:
    with SmtpTestServer() as server:
        result = huge("send", "c", "--smtp", server.url(), "--yes")
        assert "Traceback" not in result.output
        assert server.received == []
    assert result.exit_code == 3, result.output
    with Session(engine) as session:
        status, reply = session.execute(select(Message.status, Message.smtp_reply)).one()
    assert status == "failed"
    assert reply is not None and "the letter would be larger than" in reply
