"""Address rules in one place: a contact stored in one form is found by any other form of it.

Domains are IDNA 2008 with UTS #46 (`gießen.de` is `xn--gieen-nqa.de`, never `giessen.de`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Cli

from mailer import addresses
from mailer.errors import InvalidValueError

# The same mailbox, in the forms people write it.
UNICODE = "buergermeister@gießen.de"
PUNYCODE = "buergermeister@xn--gieen-nqa.de"
SHOUTED = "Buergermeister@XN--GIEEN-NQA.DE"


@pytest.mark.parametrize(
    "written", [UNICODE, PUNYCODE, SHOUTED, f"  {UNICODE} ", "Buergermeister@GIEßEN.de"]
)
def test_every_form_normalises_alike(written: str) -> None:
    assert addresses.normalise(written) == UNICODE
    assert addresses.validated(written.strip()) == UNICODE


def test_idna_2008_keeps_the_sharp_s() -> None:
    # IDNA 2003 (Python's "idna" codec) maps ß to ss: another domain, someone else's mail.
    assert addresses.encode_domain("gießen.de") == "xn--gieen-nqa.de"
    assert addresses.wire_address(UNICODE, what="recipient") == (PUNYCODE, False)
    assert addresses.wire_address(PUNYCODE, what="recipient") == (PUNYCODE, False)


def test_a_non_ascii_local_part_needs_smtputf8() -> None:
    assert addresses.wire_address("büro@städte.de", what="From") == (
        "büro@xn--stdte-hra.de",
        True,
    )
    assert addresses.needs_smtputf8("büro@example.org")
    assert not addresses.needs_smtputf8(UNICODE)


def test_display_is_the_unicode_form() -> None:
    assert addresses.display(PUNYCODE) == UNICODE
    assert addresses.display("office@example.org") == "office@example.org"


def test_an_invalid_domain_is_refused_for_the_wire() -> None:
    with pytest.raises(InvalidValueError, match="not a valid international"):
        addresses.wire_address("x@a\u200db.example", what="recipient")


def test_the_import_check_explains_what_is_wrong() -> None:
    with pytest.raises(addresses.AddressError, match="'no-at-sign'"):
        addresses.validated("no-at-sign")
    with pytest.raises(ValueError):  # the import catches ValueError
        addresses.validated("a..b@example.org")


# --------------------------------------------------------------------------- lookups by any form


CONTACTS = f"email,name,city,country\n{UNICODE},Anna Berg,Gießen,DE\n"


@pytest.fixture
def stored(run: Cli, tmp_path: Path) -> Cli:
    file = tmp_path / "contacts.csv"
    file.write_text(CONTACTS, encoding="utf-8")
    run.ok("import", "contacts", str(file))
    return run


@pytest.mark.parametrize("asked", [UNICODE, PUNYCODE, SHOUTED])
def test_contacts_show_finds_the_contact_by_any_form(stored: Cli, asked: str) -> None:
    result = stored.ok("contacts", "show", asked)
    assert "Anna Berg" in result.output


def test_import_by_the_other_form_updates_the_same_contact(stored: Cli, tmp_path: Path) -> None:
    file = tmp_path / "again.csv"
    file.write_text(f"email,name\n{PUNYCODE},Anna Berg-Lind\n", encoding="utf-8")
    result = stored.ok("import", "contacts", str(file))
    assert "0 added, 1 updated" in result.output
    assert "Anna Berg-Lind" in stored.ok("contacts", "show", UNICODE).output


@pytest.mark.parametrize(("suppressed", "asked"), [(PUNYCODE, UNICODE), (UNICODE, SHOUTED)])
def test_a_suppression_in_one_form_holds_for_the_other(
    stored: Cli, suppressed: str, asked: str
) -> None:
    stored.ok("suppress", "add", suppressed, "--reason", "manual")
    again = stored.ok("suppress", "add", asked, "--reason", "manual")
    assert "0 address(es) suppressed, 1 already suppressed" in again.output
    shown = stored.ok("contacts", "show", asked).output
    assert "suppressed" in shown.lower()
    stored.ok("campaign", "create", "c", "--template", "appeal", "--from", "office@example.org")
    check = stored("check", "c")
    assert "suppressed addresses" in check.output
    assert UNICODE in check.output


@pytest.mark.parametrize("asked", [UNICODE, PUNYCODE, SHOUTED])
def test_preview_finds_the_contact_by_any_form(stored: Cli, asked: str) -> None:
    stored.ok("campaign", "create", "c", "--template", "appeal", "--from", "office@example.org")
    result = stored.ok("preview", "c", "--contact", asked)
    assert "Anna Berg" in result.output
    raw = stored.ok("preview", "c", "--contact", asked, "--raw").output
    assert f"<{PUNYCODE}>" in raw


# --------------------------------------------------------------------------- one mailbox (11.7)


@pytest.mark.parametrize(
    ("written", "name", "address"),
    [
        ("office@example.org", None, "office@example.org"),
        ("  Office <office@example.org> ", "Office", "office@example.org"),
        ('"Office, Kyiv" <office@example.org>', "Office, Kyiv", "office@example.org"),
        ('"Say \\"hi\\"" <office@example.org>', 'Say "hi"', "office@example.org"),
        ("J. R. Smith <j@example.org>", "J. R. Smith", "j@example.org"),
        ("Büro <buero@städte.de>", "Büro", "buero@städte.de"),
        ("<office@example.org>", None, "office@example.org"),
    ],
)
def test_one_mailbox_parses(written: str, name: str | None, address: str) -> None:
    assert addresses.parse_mailbox(written, what="--from") == (name, address)


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        ("Office <office@example.org>, Evil <x@evil.test>", "more than one address"),
        ("office@example.org, x@evil.test", "more than one address"),
        ("office@example.org; x@evil.test", "more than one address"),
        ("Office, Kyiv <office@example.org>", "more than one address"),
        ("<office@example.org> <x@evil.test>", "more than one address"),
        ("Office <office@example.org> x@evil.test", "write one mailbox"),
        ('"Office <office@example.org>', "not closed"),
        ("Office office@example.org>", "without its <"),
        ("Office: Kyiv <office@example.org>", "must be quoted"),
        ("Office <office@example.org>\r\nBcc: x@evil.test", "line break"),
        ("Office <office@>", "is not a valid address"),
        ("", "is empty"),
    ],
)
def test_anything_but_one_mailbox_is_refused(written: str, reason: str) -> None:
    with pytest.raises(InvalidValueError, match=reason):
        addresses.parse_mailbox(written, what="--from")


@pytest.mark.parametrize("flag", ["--from", "--reply-to"])
def test_the_cli_takes_exactly_one_address(run: Cli, flag: str) -> None:
    two = "Office <office@example.org>, Evil <x@evil.test>"
    args = {"--from": "office@example.org", "--reply-to": None}
    args[flag] = two
    command = ["campaign", "create", "c", "--template", "appeal"]
    for option, value in args.items():
        if value is not None:
            command += [option, value]
    result = run(*command)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: {flag} '{two}': more than one address")
    assert "No campaigns yet" in run.ok("campaign", "list").output
