"""The one message builder: a rendered letter to the exact bytes that go on the wire.

Preview, check and the sender all use `build_message`, so what `preview --raw` shows is what is
sent. The bytes are assembled directly instead of through `email.message.EmailMessage`, which is
several times slower; tests parse every shape back with the standard library to prove the
encoding right.

Header safety: display names and subjects have every run of whitespace (CR, LF, tabs, U+2028...)
and control character collapsed to one space, so contact data can never start a header line of its
own. Addresses go through addresses.wire_address: a domain is written as A-labels (IDNA 2008),
a non-ASCII local part marks the message as needing SMTPUTF8, and an address with a line break,
a space or brackets is refused (`InvalidValueError`); every header but such an address is ASCII.
Imports only `addresses`, `errors` and `render` (for the Rendered type).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email
import email.header
import email.policy
import email.utils
import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage

from mailer.addresses import Mailbox, display, encode_domain, wire_address
from mailer.errors import InvalidValueError
from mailer.render import Rendered

# RFC 2047 §2 limits a line holding encoded words to 76 characters (stricter than RFC 5322's 78).
MAX_LINE = 76
HARD_LINE = 998  # RFC 5322 "MUST"
# The longest header name carrying encoded words is "Reply-To: " (10): 10 + 66 = 76.
_EW_MAX = MAX_LINE - len("Reply-To: ")
_EW_PAYLOAD = _EW_MAX - len("=?utf-8?q??=")
_PIECES = re.compile(r"\S+\s*|\s+")
# RFC 2047 §5(3): the only characters an encoded word inside a phrase may carry as themselves.
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_Q_BYTE = {b: (chr(b) if b in _Q_SAFE else "_" if b == 0x20 else f"={b:02X}") for b in range(256)}
_ATEXT_PHRASE = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_URL_BAD = re.compile(r"[\s<>\"\x00-\x1f\x7f]")


@dataclass(frozen=True, kw_only=True, slots=True)
class BuiltMessage:
    data: bytes
    message_id: str
    mail_from: str
    rcpt_to: str
    smtputf8: bool
    body_hash: str


# --------------------------------------------------------------------------- header text


def clean_text(value: str) -> str:
    """One line of text fit for a header: controls and line breaks become single spaces."""
    return " ".join(_CONTROL.sub(" ", value).split())


# --------------------------------------------------------------------------- RFC 2047


@functools.lru_cache(maxsize=8192)
def encoded_words(text: str) -> tuple[str, ...]:
    """`text` as RFC 2047 encoded words that fit a 76-character line, never splitting a character.

    Q when that is shorter (mostly Latin text), B otherwise (Cyrillic, emoji). Decoders drop the
    whitespace between adjacent encoded words, so spaces travel inside the words; words are cut
    after a space where possible, so even a decoder that keeps the gap shows whole words.
    """
    data = text.encode("utf-8")
    use_q = sum(len(_Q_BYTE[b]) for b in data) <= (len(data) + 2) // 3 * 4
    limit = _EW_PAYLOAD if use_q else _EW_PAYLOAD // 4 * 3

    def encode(raw: bytes) -> str:
        if use_q:
            return "".join(_Q_BYTE[b] for b in raw)
        return base64.b64encode(raw).decode("ascii")

    def size(raw: bytes) -> int:
        return sum(len(_Q_BYTE[b]) for b in raw) if use_q else len(raw)

    chunks: list[bytes] = []
    current = b""
    for piece in _PIECES.findall(text):
        raw = piece.encode("utf-8")
        if size(current + raw) <= limit:
            current += raw
            continue
        if current:
            chunks.append(current)
            current = b""
        if size(raw) <= limit:
            current = raw
            continue
        for ch in piece:  # one word longer than an encoded word: cut between characters
            encoded = ch.encode("utf-8")
            if current and size(current + encoded) > limit:
                chunks.append(current)
                current = b""
            current += encoded
    if current:
        chunks.append(current)
    tag = "q" if use_q else "b"
    return tuple(f"=?utf-8?{tag}?{encode(chunk)}?=" for chunk in chunks)


def _needs_encoding(text: str) -> bool:
    # "=?" would be read as the start of an encoded word; overlong words cannot be folded.
    return (
        not text.isascii() or "=?" in text or any(len(word) > _EW_MAX for word in text.split(" "))
    )


def _fold(name: str, tokens: list[str] | tuple[str, ...]) -> str:
    """`Name: tok tok ...` folded at token boundaries before column 78."""
    out = [name, ":"]
    length = len(name) + 1
    for token in tokens:
        if length + 1 + len(token) > MAX_LINE and length > len(name) + 1:
            out.append("\r\n ")
            length = 1
        else:
            out.append(" ")
            length += 1
        out.append(token)
        length += len(token)
    return "".join(out)


def _unstructured_tokens(text: str) -> list[str] | tuple[str, ...]:
    return encoded_words(text) if _needs_encoding(text) else text.split(" ")


def _phrase_tokens(name: str) -> list[str] | tuple[str, ...]:
    if _needs_encoding(name):
        return encoded_words(name)
    if _ATEXT_PHRASE.match(name):
        return name.split(" ")
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if len(quoted) <= _EW_MAX:
        return [quoted]
    # A long name full of specials: encoded words fold where a quoted string cannot.
    return encoded_words(name)


@functools.lru_cache(maxsize=1024)
def _mailbox_header(header: str, name: str | None, address: str) -> tuple[str, str, bool]:
    """(folded header, envelope address, smtputf8) for a constant mailbox (From, Reply-To)."""
    envelope, utf8 = wire_address(address, what=header)
    # The A-label form in the header too: a header is read by every hop, not only SMTPUTF8 ones.
    return _mailbox_line(header, name, envelope), envelope, utf8


def _mailbox_line(header: str, name: str | None, shown: str) -> str:
    cleaned = clean_text(name) if name else ""
    if not cleaned:
        return f"{header}: {shown}"
    return _fold(header, [*_phrase_tokens(cleaned), f"<{shown}>"])


# --------------------------------------------------------------------------- bodies


def _encode_body(text: str) -> tuple[bytes, str]:
    """(CRLF body bytes, transfer encoding): quoted-printable for mostly-ASCII text, else base64."""
    data = text.encode("utf-8")
    extra = len(data) - len(text)  # roughly the non-ASCII bytes
    if extra * 4 > len(data) // 3:
        raw = binascii.b2a_base64(data, newline=False)
        lines = [raw[i : i + 76] for i in range(0, len(raw), 76)]
        return b"\r\n".join(lines) + b"\r\n", "base64"
    encoded = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
    if not encoded.endswith(b"\n"):
        encoded += b"\n"
    return encoded.replace(b"\n", b"\r\n"), "quoted-printable"


def _normalise_text(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def _part(content_type: str, text: str) -> bytes:
    body, cte = _encode_body(_normalise_text(text))
    head = (
        f'Content-Type: {content_type}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    )
    return head.encode("ascii") + body


# --------------------------------------------------------------------------- the builder


def make_message_id(*, campaign_slug: str, contact_email: str, domain: str) -> str:
    """The same campaign and contact always give the same Message-ID (`<hash@domain>`)."""
    key = f"{campaign_slug}\0{contact_email.strip().lower()}".encode()
    digest = hashlib.sha256(key).hexdigest()[:32]
    return f"<{digest}@{encode_domain(domain)}>"


def _checked_url(value: str, what: str) -> str:
    value = value.strip()
    if not value or _URL_BAD.search(value):
        raise InvalidValueError(f"{what} {value!r} is not a usable URL (spaces or brackets)")
    if not value.isascii():
        raise InvalidValueError(
            f"{what} {value!r} is not ASCII: percent-encode it, with the domain as xn--… "
            "(addresses.mailto_url)"
        )
    return value


@functools.lru_cache(maxsize=256)
def _list_headers(list_id: str, mailto: str, url: str | None) -> str:
    list_id = list_id.strip()
    if _CONTROL.search(list_id) or not list_id.isascii():
        raise InvalidValueError(f"List-Id {list_id!r} is not one line of ASCII")
    if not list_id.endswith(">"):
        list_id = f"<{list_id}>"
    if not mailto.lower().startswith("mailto:"):
        mailto = "mailto:" + mailto
    tokens = [f"<{_checked_url(mailto, 'unsubscribe address')}>"]
    post = ""
    if url:
        tokens[0] += ","
        tokens.append(f"<{_checked_url(url, 'unsubscribe URL')}>")
        if url.lower().startswith("https://"):
            post = "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    return f"List-Id: {list_id}\r\n" + _fold("List-Unsubscribe", tokens) + "\r\n" + post


def build_message(
    *,
    rendered: Rendered,
    sender: Mailbox,
    to_address: str,
    to_name: str | None,
    reply_to: Mailbox | None,
    message_id: str,
    date: dt.datetime,
    list_id: str,
    unsubscribe_mailto: str,
    unsubscribe_url: str | None,
    test: bool = False,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
) -> BuiltMessage:
    from_line, mail_from, utf8 = _mailbox_header("From", sender.name, sender.address)
    rcpt_to, to_utf8 = wire_address(to_address, what="recipient")
    to_line = _mailbox_line("To", to_name, rcpt_to)
    utf8 = utf8 or to_utf8
    lines = [
        "Date: " + _date_value(date),
        "Message-ID: " + _message_id_value(message_id),
        from_line,
        to_line,
    ]
    if reply_to is not None:
        reply_line, _, reply_utf8 = _mailbox_header("Reply-To", reply_to.name, reply_to.address)
        lines.append(reply_line)
        utf8 = utf8 or reply_utf8
    subject = clean_text(rendered.subject)
    if test:
        subject = "[TEST] " + subject
    lines.append(_fold("Subject", _unstructured_tokens(subject)) if subject else "Subject:")
    if in_reply_to:
        # A follow-up, in the thread of the letters before it (RFC 5322 §3.6.4).
        lines.append("In-Reply-To: " + _message_id_value(in_reply_to))
    if references:
        lines.append(_fold("References", [_message_id_value(r) for r in references]))
    for name, value in rendered.headers.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name):
            raise InvalidValueError(f"header name {name!r} is not allowed")
        lines.append(_fold(name, _unstructured_tokens(clean_text(value))))
    lines.append("MIME-Version: 1.0")
    head = "\r\n".join(lines) + "\r\n" + _list_headers(list_id, unsubscribe_mailto, unsubscribe_url)
    if test:
        head += "X-Mailer-Test: yes\r\n"
    if rendered.html is None:
        body = _part("text/plain", rendered.text)
    else:
        boundary = "=_" + hashlib.sha256(message_id.encode()).hexdigest()[:24]
        # "=_" never occurs in quoted-printable or base64 output, so the boundary is safe.
        body = (
            f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n--{boundary}\r\n'
        ).encode("ascii")
        # The CRLF before a delimiter belongs to the delimiter (RFC 2046 §5.1.1), hence the extra one.
        body += _part("text/plain", rendered.text)
        body += f"\r\n--{boundary}\r\n".encode("ascii")
        body += _part("text/html", rendered.html)
        body += f"\r\n--{boundary}--\r\n".encode("ascii")
    data = head.encode("utf-8" if utf8 else "ascii") + body
    return BuiltMessage(
        data=data,
        message_id=_message_id_value(message_id),
        mail_from=mail_from,
        rcpt_to=rcpt_to,
        smtputf8=utf8,
        body_hash=hashlib.sha256(data).hexdigest(),
    )


def _date_value(date: dt.datetime) -> str:
    # Messages built in the same second share the formatted date (formatting is not free).
    aware = date if date.tzinfo else date.replace(tzinfo=dt.UTC)
    return _format_date(aware.replace(microsecond=0))


@functools.lru_cache(maxsize=64)
def _format_date(date: dt.datetime) -> str:
    return email.utils.format_datetime(date)


def _message_id_value(message_id: str) -> str:
    value = message_id.strip()
    if not value.startswith("<"):
        value = f"<{value}>"
    if not value.isascii() or _URL_BAD.search(value[1:-1]) or "@" not in value:
        raise InvalidValueError(f"Message-ID {message_id!r} is not valid")
    return value


# --------------------------------------------------------------------------- reading back


def parse(data: bytes) -> EmailMessage:
    """Built bytes as a standard library message (for preview and tests)."""
    policy = email.policy.default.clone(utf8=True)
    if data.isascii():
        message = email.message_from_bytes(data, policy=policy)
    else:
        # Raw UTF-8 headers (SMTPUTF8): the bytes parser would read them as ASCII with escapes.
        # The bodies are always 7-bit (quoted-printable or base64), so decoding all is safe.
        message = email.message_from_string(data.decode("utf-8"), policy=policy)
    assert isinstance(message, EmailMessage)
    return message


def readable(data: bytes) -> str:
    """Decoded headers, a blank line and the text part, as a person would read the message."""
    message = parse(data)
    lines = [
        f"{name}: {_decoded(name, value)}"
        for name, value in message.raw_items()
        if name.lower()
        not in (
            "content-type",
            "content-transfer-encoding",
            "mime-version",
        )
    ]
    text_part = message.get_body(preferencelist=("plain",))
    text = text_part.get_content().replace("\r\n", "\n") if text_part is not None else ""
    lines.append("")
    lines.append(text.rstrip("\n"))
    html_part = message.get_body(preferencelist=("html",))
    if html_part is not None and message.is_multipart():
        lines.append("")
        lines.append(
            f"[an HTML alternative is included ({len(html_part.get_content())} characters); "
            "see it with --raw]"
        )
    return "\n".join(lines) + "\n"


_ADDRESS_HEADERS = frozenset({"from", "to", "reply-to", "sender", "cc"})
_ANGLE_ADDRESS = re.compile(r"<([^<>\s]+@[^<>\s]+)>")


def _decoded(name: str, raw: str) -> str:
    """A header value as a person reads it: unfolded, encoded words joined as RFC 2047 says
    (the standard library's address parser leaves gaps between them and splits words), and
    addresses with their Unicode domain."""
    value = _FOLD.sub(r"\1", raw).strip()
    if "=?" in value:
        value = str(email.header.make_header(email.header.decode_header(value)))
    if name.lower() in _ADDRESS_HEADERS:
        if "<" in value:
            value = _ANGLE_ADDRESS.sub(lambda m: f"<{display(m.group(1))}>", value)
        else:
            value = display(value)
    return value


_FOLD = re.compile(r"\r?\n([ \t])")
