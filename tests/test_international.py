"""International addresses end to end: IDNA 2008 domains on the wire, SMTPUTF8 only where needed.

A domain with non-ASCII letters travels as A-labels (`xn--…`) in the envelope and in every
header; a non-ASCII local part cannot be encoded and needs SMTPUTF8 (RFC 6531), which `check`
reports and `send` asks for only for the letters that need it. Real aiosmtpd servers, with and
without SMTPUTF8, take the letters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Cli
from smtp_server import SmtpTestServer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from mailer.message import parse
from mailer.models import Contact, Message

IDN = "buergermeister@gießen.de"
IDN_WIRE = "buergermeister@xn--gieen-nqa.de"
UTF8_LOCAL = "zoë@freiburg.example.org"
PLAIN = "mayor@leeds.example.org"
CONTACTS = (
    "email,name,city,country,language\n"
    f"{IDN},Anna Berg,Gießen,DE,de\n"
    f"{UTF8_LOCAL},Zoë Müller,Freiburg im Breisgau,DE,de\n"
    f"{PLAIN},Sam Smith,Leeds,GB,en\n"
)


@pytest.fixture
def office(run: Cli, tmp_path: Path) -> Cli:
    file = tmp_path / "contacts.csv"
    file.write_text(CONTACTS, encoding="utf-8")
    run.ok("import", "contacts", str(file))
    return run


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def raw_preview(run: Cli, slug: str, contact: str) -> bytes:
    result = run.ok("preview", slug, "--contact", contact, "--raw")
    return result.stdout_bytes


def statuses(engine: Engine) -> dict[str, tuple[str, str | None]]:
    with Session(engine) as session:
        rows = session.execute(
            select(Contact.email, Message.status, Message.smtp_reply).join(
                Contact, Contact.id == Message.contact_id
            )
        ).all()
    return {email: (status, reply) for email, status, reply in rows}


def with_setting(run: Cli, section: str, line: str) -> None:
    """`line` added under `[section]` of the workspace's mailer.toml."""
    config = run.workspace / "mailer.toml"
    text = config.read_text(encoding="utf-8").replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)
    config.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- recipients (13.3)


def test_an_international_recipient_domain_goes_out_as_a_labels(office: Cli) -> None:
    office.ok("campaign", "create", "c", "--template", "appeal", "--from", "office@example.org")
    data = raw_preview(office, "c", IDN)
    head = header_block(data)
    assert head.isascii()
    assert f"<{IDN_WIRE}>".encode() in head
    # IDNA 2003 would have written giessen.de: another domain, someone else's mailbox.
    assert b"giessen" not in data
    with SmtpTestServer() as server:
        result = office("send", "c", "--smtp", server.url(), "--yes")
        assert result.exit_code in (0, 3), result.output
        assert IDN_WIRE in server.recipients()
        delivered = {r.rcpt_tos[0]: r for r in server.accepted()}
    assert "SMTPUTF8" not in delivered[IDN_WIRE].mail_options
    assert delivered[IDN_WIRE].message()["To"].addresses[0].domain == "xn--gieen-nqa.de"


# --------------------------------------------------------------------------- the sender (13.4)

SENDER = "Büro <buero@städte.de>"
SENDER_WIRE = "buero@xn--stdte-hra.de"


def test_a_sender_reply_to_and_unsubscribe_address_with_an_international_domain(
    office: Cli,
) -> None:
    with_setting(office, "campaign", 'unsubscribe_mailto = "abmelden@städte.de"')
    office.ok(
        "campaign",
        "create",
        "c",
        "--template",
        "appeal",
        "--from",
        SENDER,
        "--reply-to",
        "Sekretariat <post@städte.de>",
    )
    check = office("check", "c")
    assert check.exit_code == 0, check.output
    data = raw_preview(office, "c", PLAIN)
    head = header_block(data)
    assert head.isascii(), head
    message = parse(data)
    assert message["From"].addresses[0].addr_spec == SENDER_WIRE
    assert message["From"].addresses[0].display_name == "Büro"
    assert message["Reply-To"].addresses[0].addr_spec == "post@xn--stdte-hra.de"
    assert message["Message-ID"].endswith("@xn--stdte-hra.de>")
    assert message["List-Id"] == "<c.xn--stdte-hra.de>"
    assert message["List-Unsubscribe"] == "<mailto:abmelden@xn--stdte-hra.de?subject=unsubscribe>"
    # What a person reads: the Unicode form.
    shown = office.ok("preview", "c", "--contact", PLAIN).output
    assert "From: Büro <buero@städte.de>" in shown
    assert "Reply-To: Sekretariat <post@städte.de>" in shown
    with SmtpTestServer() as server:
        result = office("send", "c", "--smtp", server.url(), "--yes")
        assert "Traceback" not in result.output
        senders = {r.mail_from for r in server.accepted()}
    assert senders == {SENDER_WIRE}


def test_an_unsubscribe_url_on_an_international_host_goes_as_a_labels(office: Cli) -> None:
    with_setting(office, "campaign", 'unsubscribe_url = "https://städte.de/abmelden?t={token}"')
    office.ok("campaign", "create", "c", "--template", "appeal", "--from", SENDER)
    data = raw_preview(office, "c", PLAIN)
    assert header_block(data).isascii()
    unsubscribe = parse(data)["List-Unsubscribe"]
    assert ", <https://xn--stdte-hra.de/abmelden?t=" in unsubscribe
    assert parse(data)["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_the_default_unsubscribe_mailto_is_the_senders_a_label_address(office: Cli) -> None:
    office.ok("campaign", "create", "c", "--template", "appeal", "--from", SENDER)
    message = parse(raw_preview(office, "c", PLAIN))
    assert message["List-Unsubscribe"] == f"<mailto:{SENDER_WIRE}?subject=unsubscribe>"
    assert (
        f"mailto:{SENDER_WIRE}?subject=unsubscribe"
        in message.get_body(preferencelist=("plain",)).get_content()
    )


# --------------------------------------------------------------------------- SMTPUTF8 (13.5)

UTF8_SENDER = "Büro <büro@städte.de>"


def test_check_blocks_a_sender_that_needs_smtputf8_unless_the_server_is_known_to_take_it(
    office: Cli,
) -> None:
    office.ok("campaign", "create", "c", "--template", "appeal", "--from", UTF8_SENDER)
    blocked = office("check", "c")
    assert blocked.exit_code == 1, blocked.output
    assert "Traceback" not in blocked.output
    assert "the From address büro@städte.de has a non-ASCII local part" in blocked.output
    assert "[smtp] smtputf8 = true" in blocked.output
    with_setting(office, "smtp", "smtputf8 = true")
    allowed = office("check", "c")
    assert allowed.exit_code == 0, allowed.output
    assert "every letter needs SMTPUTF8" in allowed.output
    # It still builds: raw UTF-8 in the address, an ASCII List-Id and a percent-encoded mailto.
    data = raw_preview(office, "c", PLAIN)
    message = parse(data)
    assert message["From"].addresses[0].addr_spec == "büro@xn--stdte-hra.de"
    assert message["List-Id"] == "<c.xn--stdte-hra.de>"
    assert message["List-Unsubscribe"] == (
        "<mailto:b%C3%BCro@xn--stdte-hra.de?subject=unsubscribe>"
    )


def test_check_blocks_a_fixed_reply_to_that_needs_smtputf8(office: Cli) -> None:
    office.ok(
        "campaign",
        "create",
        "c",
        "--template",
        "appeal",
        "--from",
        "office@example.org",
        "--reply-to",
        "Sekretariat <sekretariat-für-partnerschaften@example.org>",
    )
    result = office("check", "c")
    assert result.exit_code == 1, result.output
    assert "the Reply-To address sekretariat-für-partnerschaften@example.org" in result.output


def test_check_counts_recipients_that_need_smtputf8(office: Cli) -> None:
    office.ok("campaign", "create", "c", "--template", "appeal", "--from", "office@example.org")
    result = office("check", "c")
    assert result.exit_code == 0, result.output
    assert (
        "addresses with a non-ASCII local part need SMTPUTF8 (RFC 6531); sent only through "
        "a server that offers it, failed otherwise: 1"
    ) in result.output
    assert f"e.g. {UTF8_LOCAL}" in result.output


def test_send_asks_for_smtputf8_only_for_the_letters_that_need_it(
    office: Cli, engine: Engine
) -> None:
    office.ok("campaign", "create", "c", "--template", "appeal", "--from", "office@example.org")
    with SmtpTestServer() as server:
        result = office("send", "c", "--smtp", server.url(), "--yes")
        assert result.exit_code == 0, result.output
        delivered = {r.rcpt_tos[0]: r for r in server.accepted()}
    assert sorted(delivered) == sorted([IDN_WIRE, UTF8_LOCAL, PLAIN])
    assert "SMTPUTF8" in delivered[UTF8_LOCAL].mail_options
    assert "SMTPUTF8" not in delivered[PLAIN].mail_options
    assert "SMTPUTF8" not in delivered[IDN_WIRE].mail_options
    assert delivered[PLAIN].data.isascii()
    received = parse(delivered[UTF8_LOCAL].data)
    assert received["To"].addresses[0].addr_spec == UTF8_LOCAL
    assert {s for s, _ in statuses(engine).values()} == {"sent"}


def test_send_fails_only_those_letters_with_a_clear_reason_when_the_server_lacks_smtputf8(
    office: Cli, engine: Engine
) -> None:
    office.ok("campaign", "create", "c", "--template", "appeal", "--from", "office@example.org")
    with SmtpTestServer(smtputf8=False) as server:
        result = office("send", "c", "--smtp", server.url(), "--yes")
        assert "Traceback" not in result.output
        assert result.exit_code == 3, result.output
        delivered = sorted(r.rcpt_tos[0] for r in server.accepted())
    assert delivered == sorted([IDN_WIRE, PLAIN])
    outcome = statuses(engine)
    assert outcome[UTF8_LOCAL] == (
        "failed",
        "the message needs SMTPUTF8, which the server does not offer",
    )
    assert outcome[PLAIN][0] == outcome[IDN][0] == "sent"


# --------------------------------------------------------------------------- preview (13.10)

LONG_NAMES = [
    "Олександр Олександрович Костянтинопольський-Дніпропетровський",
    "Αλέξανδρος Παπαδόπουλος-Χατζηγεωργίου Κωνσταντινουπολίτης",
    "Μαρία Κωνσταντοπούλου-Παπαγεωργίου του Δήμου Θεσσαλονίκης",
]


@pytest.mark.parametrize("name", LONG_NAMES)
def test_preview_shows_long_non_latin_names_decoded(run: Cli, tmp_path: Path, name: str) -> None:
    file = tmp_path / "contacts.csv"
    file.write_text(f"email,name,language\nx@example.org,{name},uk\n", encoding="utf-8")
    run.ok("import", "contacts", str(file))
    run.ok(
        "campaign",
        "create",
        "c",
        "--template",
        "appeal",
        "--from",
        f"{name} <office@example.org>",
    )
    raw = raw_preview(run, "c", "x@example.org")
    assert b"=?utf-8?" in header_block(raw)  # folded encoded words on the wire...
    shown = run.ok("preview", "c", "--contact", "x@example.org").output
    # ...and the names, exactly, for the person reading the preview.
    assert f"To: {name} <x@example.org>" in shown
    assert f"From: {name} <office@example.org>" in shown
    assert "=?utf-8?" not in shown
