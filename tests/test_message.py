"""The message builder: every shape parsed back with the standard library to prove it right."""

from __future__ import annotations

import base64
import datetime as dt
import email
import email.header
import email.policy
import hashlib
import re
from email.message import EmailMessage

import pytest

from mailer.addresses import Mailbox
from mailer.errors import InvalidValueError
from mailer.message import (
    BuiltMessage,
    build_message,
    encoded_words,
    make_message_id,
    parse,
    readable,
)
from mailer.render import Rendered

DATE = dt.datetime(2026, 11, 26, 12, 30, 5, tzinfo=dt.UTC)
MID = "<0123456789abcdef@example.org>"
SENDER = Mailbox("Campaign Office", "office@example.org")
REPLY_TO = Mailbox(None, "mayor@lviv.example.org")


def rendered(
    *,
    subject: str = "An appeal from Lviv to Freiburg",
    text: str = "Dear Mayor,\n\nplease help.\n",
    html: str | None = None,
) -> Rendered:
    return Rendered(
        language="en",
        requested_language="en",
        fell_back=False,
        subject=subject,
        headers={},
        text=text,
        html=html,
    )


def build(
    *,
    subject: str = "An appeal from Lviv to Freiburg",
    text: str = "Dear Mayor,\n\nplease help.\n",
    html: str | None = None,
    to_address: str = "ob@freiburg.example.org",
    to_name: str | None = "Zoë Müller",
    sender: Mailbox = SENDER,
    reply_to: Mailbox | None = REPLY_TO,
    url: str | None = None,
    test: bool = False,
) -> BuiltMessage:
    return build_message(
        rendered=rendered(subject=subject, text=text, html=html),
        sender=sender,
        to_address=to_address,
        to_name=to_name,
        reply_to=reply_to,
        message_id=MID,
        date=DATE,
        list_id="<appeal.example.org>",
        unsubscribe_mailto="mailto:office@example.org?subject=unsubscribe",
        unsubscribe_url=url,
        test=test,
    )


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def raw_header(data: bytes, name: str) -> str:
    """The raw (unfolded) value of one header."""
    unfolded = header_block(data).decode("utf-8").replace("\r\n ", " ")
    for line in unfolded.split("\r\n"):
        key, _, value = line.partition(":")
        if key.lower() == name.lower():
            return value.strip()
    raise KeyError(name)


def rfc2047_decode(value: str) -> str:
    """An RFC 2047 decoder that drops whitespace between adjacent encoded words, as §6.2 says.

    (The newer `email.headerregistry` parser keeps that whitespace inside a display name, a
    known CPython deviation; `email.header` follows the RFC.)
    """
    return str(email.header.make_header(email.header.decode_header(value)))


def display_name(data: bytes, header: str = "To") -> str:
    value = raw_header(data, header)
    phrase = value.rpartition("<")[0].strip() if value.endswith(">") else ""
    decoded = rfc2047_decode(phrase) if "=?" in phrase else phrase
    if decoded.startswith('"') and decoded.endswith('"'):
        decoded = re.sub(r"\\(.)", r"\1", decoded[1:-1])
    return decoded


def assert_well_formed(data: bytes) -> None:
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    for line in data.split(b"\r\n"):
        assert len(line) <= 998
    for line in header_block(data).split(b"\r\n"):
        if b"=?" in line:
            assert len(line) <= 76, line  # RFC 2047 §2
        else:
            assert len(line) <= 78 or b"@" in line, line
        assert line.strip() != b"", "whitespace-only header line"
    for word in re.findall(rb"=\?[^?]+\?[bqBQ]\?[^?]*\?=", header_block(data)):
        assert len(word) <= 75
    # No encoded words run together (RFC 2047 §5: separated by whitespace).
    assert not re.search(rb"\?==\?", data)


NAMES = [
    "Zoë Łukasiewicz-Müller",
    "Мер Львова",
    "Katrin Hartmann",
    "Mr. Smith, Jr. (Mayor)",
    'A "quoted" \\ name',
    "Jean-Marie Le Pen-Duval d'Estaing",
    "🇺🇦 Слава Україні 🌻",
    "Ігор Терехов, міський голова Харкова, від імені підписантів відкритого листа",
    "=?utf-8?q?not_an_encoded_word?=",
]


@pytest.mark.parametrize("name", NAMES)
def test_display_names_round_trip(name: str) -> None:
    built = build(to_name=name)
    assert_well_formed(built.data)
    message = parse(built.data)
    assert message["To"].addresses[0].addr_spec == "ob@freiburg.example.org"
    assert display_name(built.data) == name
    if len(name) < 30:  # one encoded word: the stdlib's header registry agrees exactly
        assert message["To"].addresses[0].display_name == name


SUBJECTS = [
    "An appeal from Lviv to Freiburg",
    "Von Charkiw nach Nürnberg: ein Appell der Bürgermeister der Ukraine",
    "Від Харкова до Нюрнберга: звернення мерів України",
    "🇺🇦🌻 " * 30,
    "Lwów – Kraków: apel merów miast Ukrainy " * 6,
    "A long English subject that goes on and on " * 8,
    "x" * 300,
    "Price =?utf-8?q?x?= literal",
    "tabs\tand  double  spaces",
]


@pytest.mark.parametrize("subject", SUBJECTS)
def test_subjects_round_trip(subject: str) -> None:
    built = build(subject=subject)
    assert_well_formed(built.data)
    expected = " ".join(subject.split())
    assert str(parse(built.data)["Subject"]) == expected
    assert rfc2047_decode(raw_header(built.data, "Subject")) == expected


def test_encoded_words_never_split_a_character() -> None:
    for text in ("🇺🇦" * 50, "Мер Львова " * 20, "Zoë " * 40):
        words = encoded_words(text)
        assert all(len(w) <= 66 for w in words)
        decoded = b""
        for word in words:
            _charset, kind, payload = word[2:-2].split("?")
            part = (
                base64.b64decode(payload) if kind == "b" else email.header.decode_header(word)[0][0]
            )
            assert isinstance(part, bytes)
            part.decode("utf-8")  # each word is whole characters
            decoded += part
        assert decoded.decode("utf-8") == text


def test_all_headers_present_and_in_order() -> None:
    built = build(url="https://example.org/u?t=abc")
    message = parse(built.data)
    names = [name for name, _ in message.items()]
    assert names == [
        "Date",
        "Message-ID",
        "From",
        "To",
        "Reply-To",
        "Subject",
        "MIME-Version",
        "List-Id",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "Content-Type",
        "Content-Transfer-Encoding",
    ]
    assert message["Date"].datetime == DATE
    assert message["Message-ID"] == MID
    assert str(message["From"]) == "Campaign Office <office@example.org>"
    assert str(message["Reply-To"]) == "mayor@lviv.example.org"
    assert message["List-Id"] == "<appeal.example.org>"
    assert raw_header(built.data, "List-Unsubscribe") == (
        "<mailto:office@example.org?subject=unsubscribe>, <https://example.org/u?t=abc>"
    )
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "X-Mailer-Test" not in message
    assert (built.message_id, built.mail_from, built.rcpt_to) == (
        MID,
        "office@example.org",
        "ob@freiburg.example.org",
    )
    assert built.body_hash == hashlib.sha256(built.data).hexdigest()
    assert not built.smtputf8


def test_no_https_url_means_no_one_click_header() -> None:
    message = parse(build(url=None).data)
    assert message["List-Unsubscribe"] == "<mailto:office@example.org?subject=unsubscribe>"
    assert "List-Unsubscribe-Post" not in message
    message = parse(build(url="http://example.org/u?t=1").data)
    assert "List-Unsubscribe-Post" not in message


def test_no_reply_to_when_none() -> None:
    assert "Reply-To" not in parse(build(reply_to=None).data)


def test_test_messages_are_marked() -> None:
    message = parse(build(test=True).data)
    assert message["X-Mailer-Test"] == "yes"
    assert str(message["Subject"]) == "[TEST] An appeal from Lviv to Freiburg"


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("Dear Mayor,\n\nplease help.\n", "quoted-printable"),
        (
            "Dear Zoë,\n" + "a long line of words that goes on " * 40 + "\n.\nend  \n",
            "quoted-printable",
        ),
        ("Шановний пане міський голово,\n" + "Ми звертаємося до вас особисто. " * 30, "base64"),
        ("no final newline and a = sign", "quoted-printable"),
        ("old\r\nstyle\rline ends\n", "quoted-printable"),
    ],
)
def test_body_round_trips(text: str, encoding: str) -> None:
    built = build(text=text)
    assert_well_formed(built.data)
    message = parse(built.data)
    assert message["Content-Transfer-Encoding"] == encoding
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    expected = expected if expected.endswith("\n") else expected + "\n"
    # On the wire every line ends in CRLF; the text is the same.
    assert message.get_content().replace("\r\n", "\n") == expected


def test_html_makes_multipart_alternative() -> None:
    html = "<p>Dear Zoë &amp; team,</p>\n<p>" + "Слава Україні " * 40 + "</p>\n"
    built = build(html=html)
    assert_well_formed(built.data)
    message = parse(built.data)
    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().replace("\r\n", "\n") == "Dear Mayor,\n\nplease help.\n"
    assert parts[1].get_content().replace("\r\n", "\n") == html
    assert not message.defects and not any(p.defects for p in parts)


def test_header_injection_through_a_name_is_impossible() -> None:
    built = build(to_name="Mayor\r\nBcc: spy@example.com", subject="Hi\r\nBcc: spy@example.com")
    message = parse(built.data)
    assert "Bcc" not in message
    assert b"\r\nBcc:" not in built.data
    assert display_name(built.data) == "Mayor Bcc: spy@example.com"
    assert str(message["Subject"]) == "Hi Bcc: spy@example.com"
    assert len(message.keys()) == len(set(message.keys()))


@pytest.mark.parametrize(
    "evil",
    [
        "x@example.org\r\nBcc: spy@example.com",
        "x@example.org\nBcc: spy@example.com",
        "a b@example.org",
    ],
)
def test_header_injection_through_an_address_is_refused(evil: str) -> None:
    with pytest.raises(InvalidValueError, match="not valid"):
        build(to_address=evil)
    with pytest.raises(InvalidValueError, match="not valid"):
        build(reply_to=Mailbox(None, evil))
    with pytest.raises(InvalidValueError, match="not valid"):
        build(sender=Mailbox("Office", evil))


def test_non_ascii_local_part_needs_smtputf8() -> None:
    built = build(to_address="zoë@freiburg.example.org", to_name="Zoë")
    assert built.smtputf8
    assert built.rcpt_to == "zoë@freiburg.example.org"
    assert "zoë@freiburg.example.org".encode() in header_block(built.data)
    message = parse(built.data)
    assert message["To"].addresses[0].addr_spec == "zoë@freiburg.example.org"
    assert not build().smtputf8


def test_international_domain_uses_punycode_without_smtputf8() -> None:
    built = build(to_address="rathaus@müllheim.example")
    assert not built.smtputf8
    assert built.rcpt_to == "rathaus@xn--mllheim-n2a.example"
    assert header_block(built.data).isascii()


def test_message_id_is_deterministic() -> None:
    one = make_message_id(
        campaign_slug="appeal", contact_email="A@Example.org", domain="example.org"
    )
    assert one == make_message_id(
        campaign_slug="appeal", contact_email="a@example.org ", domain="Example.org"
    )
    assert re.fullmatch(r"<[0-9a-f]{32}@example\.org>", one)
    assert one != make_message_id(
        campaign_slug="other", contact_email="a@example.org", domain="example.org"
    )
    assert one != make_message_id(
        campaign_slug="appeal", contact_email="b@example.org", domain="example.org"
    )


def test_same_input_same_bytes() -> None:
    assert build(html="<p>x</p>").data == build(html="<p>x</p>").data


def test_agrees_with_email_message() -> None:
    """What EmailMessage would say about the same letter, we say too."""
    ours = parse(build(subject=SUBJECTS[1], to_name=NAMES[0], html="<p>ok</p>").data)
    theirs = EmailMessage()
    theirs["Subject"] = SUBJECTS[1]
    theirs["To"] = f"{NAMES[0]} <ob@freiburg.example.org>"
    parsed = email.message_from_bytes(
        theirs.as_bytes(policy=email.policy.SMTP), policy=email.policy.default
    )
    assert str(ours["Subject"]) == str(parsed["Subject"])
    assert ours["To"].addresses == parsed["To"].addresses


def test_readable_shows_decoded_headers_and_text() -> None:
    shown = readable(build(to_name="Мер Львова", html="<p>x</p>").data)
    assert "To: Мер Львова <ob@freiburg.example.org>" in shown
    assert "Dear Mayor,\n\nplease help." in shown
    assert "HTML alternative" in shown
    assert "Content-Transfer-Encoding" not in shown
