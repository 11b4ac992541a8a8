"""What one mail in the office's mailbox is: bytes in, a typed `Mail` out.

A delivery report (RFC 3464, and the non-standard formats `flufl.bounce` knows), a feedback-loop
complaint (RFC 5965), an unsubscribe request, an automatic answer (RFC 3834 headers, the usual
out-of-office subjects in the languages we write in, and the return date it names), or else a
candidate reply. Whether it answers one of *our* letters is decided later, against the database
(`inbox`); this module knows no database, no network and no mailbox.
"""

from __future__ import annotations

import datetime as dt
import email
import email.header
import email.utils
import enum
import functools
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from html.parser import HTMLParser

# The languages we write in: out-of-office subjects and return dates are understood in these.
LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "pl", "uk", "es", "it", "nl", "cs", "lt")

EXCERPT_LINES = 5
EXCERPT_CHARS = 500
# Text looked at for a return date, and for a bounce's diagnostic.
SCAN_CHARS = 4000
TEXT_LIMIT = 65536


class MailKind(enum.StrEnum):
    BOUNCE = "bounce"
    DELAY = "delay"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    AUTO_REPLY = "auto_reply"
    REPLY = "reply"
    # An automatic report that is none of the above (read receipt, delivered notice, a
    # delivery report naming no address).
    REPORT = "report"
    UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """One recipient a delivery report names."""

    recipient: str
    status: str
    diagnostic: str
    smtp_code: int | None
    permanent: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Mail:
    kind: MailKind
    digest: str
    message_id: str | None = None
    sender: str | None = None
    date: dt.datetime | None = None
    subject: str = ""
    # Message-IDs (lower-case, in brackets) of the letter it answers or returns, best first.
    refers_to: tuple[str, ...] = ()
    failures: tuple[Failure, ...] = ()
    # The server that reported a delivery failure.
    reporter: str | None = None
    excerpt: str = ""
    away_until: dt.date | None = None
    feedback_type: str = ""
    # The recipient a complaint names (ARF Original-Rcpt-To, or the returned copy's To).
    complainant: str | None = None
    # What made it this kind, in words for people.
    why: str = ""
    # Candidate VERP tokens (tokens.py) of the address it was delivered to: a bounce sent to
    # `office+TOKEN@…` names our letter whatever its content. Verified against the database.
    verp: tuple[str, ...] = ()


def classify_all(datas: Sequence[bytes]) -> list[Mail]:
    """`classify` for a batch: what the sync's worker process runs."""
    return [classify(data) for data in datas]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Head:
    """What every kind of mail carries."""

    digest: str
    message_id: str | None
    sender: str | None
    date: dt.datetime | None
    subject: str
    verp: tuple[str, ...] = ()

    def mail(
        self,
        *,
        kind: MailKind,
        why: str,
        refers_to: tuple[str, ...] = (),
        failures: tuple[Failure, ...] = (),
        reporter: str | None = None,
        excerpt: str = "",
        away_until: dt.date | None = None,
        feedback_type: str = "",
        complainant: str | None = None,
    ) -> Mail:
        return Mail(
            kind=kind,
            digest=self.digest,
            message_id=self.message_id,
            sender=self.sender,
            date=self.date,
            subject=self.subject,
            refers_to=refers_to,
            failures=failures,
            reporter=reporter,
            excerpt=excerpt,
            away_until=away_until,
            feedback_type=feedback_type,
            complainant=complainant,
            why=why,
            verp=self.verp,
        )


def classify(data: bytes) -> Mail:
    """Never raises: bytes that cannot be read as a mail are `unreadable`."""
    digest = mail_digest(data)
    try:
        msg = email.message_from_bytes(data)
        if not _looks_like_mail(msg):
            return Mail(kind=MailKind.UNREADABLE, digest=digest, why="no mail headers")
        return _classify(msg, digest)
    except Exception as exc:  # a parser or a detector tripping on hostile bytes: skip this one
        why = f"cannot parse: {type(exc).__name__}"
        return Mail(kind=MailKind.UNREADABLE, digest=digest, why=why)


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_DIGEST_HEADERS = (b"message-id", b"date", b"from", b"subject")


def mail_digest(data: bytes) -> str:
    """A digest that is the same wherever the mail was read from (Maildir, mbox, IMAP): the
    identifying headers and the body, without the trace headers each delivery adds."""
    match = _HEADER_END.search(data)
    head, body = (data[: match.start()], data[match.end() :]) if match else (data, b"")
    wanted: dict[bytes, bytes] = {}
    for line in re.split(rb"\r?\n(?![ \t])", head):
        name, sep, value = line.partition(b":")
        key = name.strip().lower()
        if sep and key in _DIGEST_HEADERS and key not in wanted:
            wanted[key] = b" ".join(value.split())
    hasher = hashlib.sha256()
    for key in _DIGEST_HEADERS:
        hasher.update(key + b":" + wanted.get(key, b"") + b"\n")
    hasher.update(body.replace(b"\r\n", b"\n").rstrip())
    return hasher.hexdigest()


def _looks_like_mail(msg: Message) -> bool:
    keys = {k.lower() for k in msg}
    return bool(keys & {"from", "message-id", "date", "subject", "to"})


def _classify(msg: Message, digest: str) -> Mail:
    head = _Head(
        digest=digest,
        message_id=_first_id(msg.get("message-id")),
        sender=_address(msg.get("from")),
        date=_date(msg.get("date")),
        subject=_text(msg.get("subject")),
        verp=verp_tokens(msg),
    )
    content_type = msg.get_content_type()
    report_type = str(msg.get_param("report-type", "") or "").lower()
    answers = _reference_ids(msg)

    if content_type == "multipart/report" and report_type == "feedback-report":
        return _complaint(msg, head)
    if content_type == "multipart/report" and report_type == "disposition-notification":
        return head.mail(kind=MailKind.REPORT, why="read receipt")
    if content_type == "multipart/report" or _has_part(msg, "message/delivery-status"):
        report = _dsn(msg, head)
        if report is not None:
            return report
    if _bounce_like(msg, head.sender, head.subject):
        return _heuristic_bounce(msg, head)

    if _UNSUBSCRIBE.match(head.subject):
        return head.mail(kind=MailKind.UNSUBSCRIBE, refers_to=answers, why="subject 'unsubscribe'")
    automatic = auto_reply_reason(msg, head.subject)
    if automatic is not None:
        reason, language = automatic
        away = return_date(
            _body_text(msg), sent=head.date, languages=_language_order(msg, language)
        )
        return head.mail(kind=MailKind.AUTO_REPLY, refers_to=answers, away_until=away, why=reason)
    return head.mail(
        kind=MailKind.REPLY,
        refers_to=answers,
        excerpt=excerpt(_body_text(msg)),
        why="a personal answer",
    )


# --------------------------------------------------------------------------- headers


_ID = re.compile(r"<([^<>\s]+)>")


def _ids(value: str | None) -> list[str]:
    return [f"<{m.lower()}>" for m in _ID.findall(str(value or ""))]


def _first_id(value: object) -> str | None:
    found = _ids(str(value) if value is not None else None)
    return found[0] if found else None


# Where the address a mail was delivered to shows: the delivering server's own headers first
# (Postfix, Exim, Gmail, Exchange), then To (a bounce is addressed to the envelope sender).
_DELIVERY_HEADERS = (
    "delivered-to",
    "x-original-to",
    "envelope-to",
    "x-envelope-to",
    "x-delivered-to",
    "original-recipient",
    "to",
)
# `local+TOKEN@`: a token is lower-case base32 (a server may have upper-cased it).
_VERP = re.compile(r"\+([A-Za-z2-7]{20,60})@")


def verp_tokens(msg: Message) -> tuple[str, ...]:
    """The VERP tokens in the addresses the mail was delivered to (unverified candidates)."""
    found: list[str] = []
    for name in _DELIVERY_HEADERS:
        for value in msg.get_all(name) or ():
            found.extend(token.lower() for token in _VERP.findall(str(value)))
    return tuple(dict.fromkeys(found))


def _reference_ids(msg: Message) -> tuple[str, ...]:
    # In-Reply-To names the letter answered; References ends with it, oldest first.
    ordered = _ids(msg.get("in-reply-to")) + list(reversed(_ids(msg.get("references"))))
    return tuple(dict.fromkeys(ordered))


def _address(value: object) -> str | None:
    if value is None:
        return None
    _name, address = email.utils.parseaddr(str(value))
    address = address.strip().lower()
    return address if "@" in address else None


def _date(value: object) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def _text(value: object) -> str:
    """A header as text: RFC 2047 words decoded, raw 8-bit bytes read as UTF-8 where they are
    (else as Windows-1252, what undeclared 8-bit headers mostly are otherwise)."""
    if value is None:
        return ""
    try:
        parts = email.header.decode_header(value)  # type: ignore[arg-type]
    except (UnicodeError, LookupError, email.errors.HeaderParseError):
        return " ".join(str(value).split())
    chunks: list[str] = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            chunks.append(chunk)
            continue
        chunks.append(_decode_bytes(chunk, charset))
    return " ".join("".join(chunks).split())


def _decode_bytes(data: bytes, charset: str | None) -> str:
    if charset and charset != "unknown-8bit":
        try:
            return data.decode(charset, "replace")
        except LookupError:
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


# --------------------------------------------------------------------------- bodies


def _decoded(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        text = payload[:TEXT_LIMIT].decode(charset, "replace")
    except LookupError:
        text = payload[:TEXT_LIMIT].decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script", "head", "blockquote"):
            self.skip += 1
        elif tag in ("br", "p", "div", "tr", "li", "blockquote"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "head", "blockquote") and self.skip:
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def _html_to_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def _body_text(msg: Message) -> str:
    """The mail's own text: its first text/plain part, else its first HTML part as text."""
    html: Message | None = None
    for part in msg.walk():
        if part.get_content_maintype() == "message":
            break  # an attached or returned mail is not this mail's text
        if part.get_content_disposition() == "attachment":
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            return _decoded(part)
        if kind == "text/html" and html is None:
            html = part
    return _html_to_text(_decoded(html)) if html is not None else ""


def _all_text(msg: Message) -> str:
    """Every text part, returned copies included (non-standard bounces quote the original)."""
    chunks: list[str] = []
    size = 0
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            chunk = _decoded(part)
            chunks.append(chunk)
            size += len(chunk)
            if size > TEXT_LIMIT:
                break
    return "\n".join(chunks)


_QUOTE_STARTS = re.compile(
    r"^\s*(-{2,}\s*(original message|ursprüngliche nachricht|message d'origine|"
    r"oryginalna wiadomość|mensaje original|messaggio originale|oorspronkelijk bericht|"
    r"původní zpráva|вихідне повідомлення|исходное сообщение)\s*-{2,}|_{10,}|-- )\s*$",
    re.IGNORECASE,
)


def excerpt(text: str) -> str:
    """The first lines a person wrote: quoted text, the quote's header line and the signature
    are left out."""
    lines: list[str] = []
    for raw in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = raw.rstrip()
        if line.startswith(">") or _QUOTE_STARTS.match(raw):
            # "On ... wrote:" (in any language) is the line just before the quote.
            if lines and lines[-1].endswith(":"):
                lines.pop()
            break
        if line.strip():
            lines.append(" ".join(line.split()))
        if len(lines) > EXCERPT_LINES:
            break
    kept = "\n".join(lines[:EXCERPT_LINES])
    return kept if len(kept) <= EXCERPT_CHARS else kept[: EXCERPT_CHARS - 1] + "…"


# --------------------------------------------------------------------------- auto-replies

# RFC 3834, and the headers common autoresponders set instead. `X-Auto-Response-Suppress` is
# deliberately absent: Outlook puts it on ordinary mail too.
_AUTO_HEADERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("auto-submitted", re.compile(r"^(?!\s*no\b)\s*\S", re.IGNORECASE)),
    ("x-autoreply", re.compile(r"^(?!\s*(no|false)\b)", re.IGNORECASE)),
    ("x-autorespond", re.compile(r"")),
    ("x-autogenerated", re.compile(r"reply", re.IGNORECASE)),
    ("x-autoreply-from", re.compile(r"")),
    ("x-mail-autoreply", re.compile(r"")),
    ("x-fc-machinegenerated", re.compile(r"true", re.IGNORECASE)),
    ("x-post-messageclass", re.compile(r"autoresponder", re.IGNORECASE)),
    ("precedence", re.compile(r"^\s*(auto_reply|bulk|junk)\b", re.IGNORECASE)),
)

# Out-of-office subjects, per language (compared case- and accent-insensitively, whole words).
OUT_OF_OFFICE: dict[str, tuple[str, ...]] = {
    "en": (
        "out of office",
        "out of the office",
        "automatic reply",
        "auto reply",
        "auto-reply",
        "autoreply",
        "auto response",
        "autoresponse",
        "away from the office",
        "away from office",
        "on vacation",
        "on holiday",
        "on leave",
        "absence notice",
    ),
    "de": (
        "abwesenheitsnotiz",
        "automatische antwort",
        "abwesenheit",
        "abwesend",
        "nicht im buro",
        "ausser haus",
        "ausser buro",
        "urlaubsabwesenheit",
    ),
    "fr": (
        "reponse automatique",
        "absence du bureau",
        "absent du bureau",
        "absente du bureau",
        "message d'absence",
        "absent",
        "absente",
        "en conge",
    ),
    "pl": (
        "odpowiedz automatyczna",
        "automatyczna odpowiedz",
        "autoodpowiedz",
        "poza biurem",
        "nieobecnosc",
        "nieobecny",
        "nieobecna",
    ),
    "uk": (
        "автоматична вiдповiдь",
        "автоматична відповідь",
        "автовідповідь",
        "поза офісом",
        "відсутній",
        "відсутня",
        "відсутність",
        "у відпустці",
        "автоматический ответ",
        "вне офиса",
    ),
    "es": (
        "respuesta automatica",
        "fuera de la oficina",
        "fuera de oficina",
        "ausente",
        "ausencia",
        "de vacaciones",
    ),
    "it": (
        "risposta automatica",
        "fuori sede",
        "fuori ufficio",
        "fuori dall'ufficio",
        "assente",
        "assenza",
        "in ferie",
    ),
    "nl": (
        "automatisch antwoord",
        "afwezigheidsbericht",
        "afwezig",
        "niet aanwezig",
        "buiten kantoor",
    ),
    "cs": (
        "automaticka odpoved",
        "mimo kancelar",
        "nepritomnost",
        "nepritomen",
        "nepritomna",
        "dovolena",
    ),
    "lt": (
        "automatinis atsakymas",
        "ne biure",
        "nera biure",
        "atostogos",
        "atostogauju",
        "isvykes",
        "isvykusi",
    ),
}


def _fold(text: str) -> str:
    """Case- and accent-folded, so "Réponse", "reponse" and "RÉPONSE" compare equal. Cyrillic
    letters keep their identity (й, ї are letters, not accented и, і)."""
    out: list[str] = []
    for ch in unicodedata.normalize("NFD", text.casefold()):
        if unicodedata.combining(ch):
            # Cyrillic breve/diaeresis make distinct letters; elsewhere a mark is an accent.
            if out and "\u0400" <= out[-1] <= "\u04ff":
                out.append(ch)
            continue
        out.append(ch)
    return unicodedata.normalize("NFC", "".join(out)).replace("ß", "ss").replace("ł", "l")


@functools.cache
def _out_of_office_patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    return tuple(
        (
            language,
            re.compile(r"(?<!\w)(" + "|".join(re.escape(_fold(p)) for p in phrases) + r")(?!\w)"),
        )
        for language, phrases in OUT_OF_OFFICE.items()
    )


def auto_reply_reason(msg: Message, subject: str) -> tuple[str, str | None] | None:
    """Why this mail is an automatic answer, and the language its subject is in (if that told)."""
    for name, pattern in _AUTO_HEADERS:
        value = msg.get(name)
        if value is not None and pattern.search(str(value)):
            return f"{_header_name(msg, name)}: {_text(value)}", _subject_language(subject)
    language = _subject_language(subject)
    if language is not None:
        return f"out-of-office subject ({language}): {subject}", language
    return None


def _header_name(msg: Message, wanted: str) -> str:
    for key in msg:
        if key.lower() == wanted:
            return key
    return wanted


def _subject_language(subject: str) -> str | None:
    folded = _fold(subject)
    for language, pattern in _out_of_office_patterns():
        if pattern.search(folded):
            return language
    return None


def _language_order(msg: Message, hint: str | None) -> tuple[str, ...]:
    first: list[str] = [hint] if hint else []
    declared = str(msg.get("content-language") or "").split(",")[0].strip().lower()[:2]
    if declared in LANGUAGES:
        first.append(declared)
    return tuple(dict.fromkeys([*first, *LANGUAGES]))


_HAS_DIGIT = re.compile(r"\d")
# Beyond this, "back on 3 March" is more likely last year's text than a return date.
_AWAY_AT_MOST = dt.timedelta(days=366)


def return_date(
    text: str, *, sent: dt.datetime | None, languages: Sequence[str] = LANGUAGES
) -> dt.date | None:
    """The day an out-of-office answer says its reader is back: the latest date it names after
    the day it was sent, read by `dateparser` in the given languages (the first that finds one).

    Only lines with a digit are read: a date with day and month is what a follow-up can wait for.
    """
    from dateparser.search import search_dates

    lines = [line for line in text[:SCAN_CHARS].splitlines() if _HAS_DIGIT.search(line)]
    if not lines:
        return None
    base = (sent or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).replace(tzinfo=None)
    settings = {
        "PREFER_DATES_FROM": "future",
        "RELATIVE_BASE": base,
        "REQUIRE_PARTS": ["day", "month"],
        "RETURN_AS_TIMEZONE_AWARE": False,
    }
    chunk = "\n".join(lines)
    for language in languages:
        try:
            found = search_dates(chunk, languages=[language], settings=settings)
        except Exception:  # dateparser on odd text: this language found nothing usable
            continue
        days: list[dt.date] = [
            when.date()
            for _words, when in found or ()
            if base.date() <= when.date() <= (base + _AWAY_AT_MOST).date()
        ]
        if days:
            return max(days)
    return None


# --------------------------------------------------------------------------- unsubscribe

_UNSUBSCRIBE = re.compile(r"^\s*\[?\s*unsubscribe\b", re.IGNORECASE)


# --------------------------------------------------------------------------- delivery reports

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_SMTP_CODE = re.compile(r"(?<!\d)([245]\d\d)(?![\d.])")


def _status_code(text: str) -> str | None:
    found = _ENHANCED.search(text)
    return ".".join(found.groups()) if found else None


def _smtp_code(text: str) -> int | None:
    found = _SMTP_CODE.search(text)
    return int(found.group(1)) if found else None


def _field_address(value: object) -> str | None:
    """`rfc822; user@example.org` (RFC 3464 address fields) -> the address."""
    if value is None:
        return None
    text = str(value)
    kind, sep, address = text.partition(";")
    if not sep:
        address = kind
    return _address(address.strip().strip("<>") if "<" not in address else address)


def _has_part(msg: Message, content_type: str) -> bool:
    return any(part.get_content_type() == content_type for part in msg.walk())


def _returned_headers(msg: Message) -> Iterator[Message]:
    """The headers of the copy a report returns (message/rfc822 or text/rfc822-headers)."""
    for part in msg.walk():
        kind = part.get_content_type()
        if kind == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                yield payload[0]
        elif kind == "text/rfc822-headers":
            yield HeaderParser().parsestr(_decoded(part) or str(part.get_payload()))


_QUOTED_ID = re.compile(r"(?im)^\s*message-id:\s*(<[^<>\s]+>)")


def _returned_ids(msg: Message, own_id: str | None) -> tuple[str, ...]:
    ids: list[str] = []
    for headers in _returned_headers(msg):
        ids.extend(_ids(headers.get("message-id")))
    # Non-standard reports quote the original's headers as text.
    ids.extend(m.lower() for m in _QUOTED_ID.findall(_all_text(msg)))
    ids.extend(_reference_ids(msg))
    return tuple(i for i in dict.fromkeys(ids) if i != own_id)


def _dsn(msg: Message, head: _Head) -> Mail | None:
    failures: list[Failure] = []
    reporter: str | None = None
    delivered = 0
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()
        if not isinstance(blocks, list):
            continue
        for block in blocks:
            if not isinstance(block, Message):
                continue
            if block.get("reporting-mta") and reporter is None:
                reporter = _field_value(block.get("reporting-mta"))
            recipient = _field_address(block.get("original-recipient")) or _field_address(
                block.get("final-recipient")
            )
            if recipient is None:
                continue
            action = str(block.get("action") or "").strip().lower()
            status = _status_code(str(block.get("status") or "")) or ""
            diagnostic = " ".join(str(block.get("diagnostic-code") or "").split())
            if action.startswith(("delivered", "relayed", "expanded")):
                delivered += 1
                continue
            permanent = action.startswith(("fail", "error")) or status.startswith("5")
            if action.startswith("delayed") or status.startswith("4"):
                permanent = False
            failures.append(
                Failure(
                    recipient=recipient,
                    status=status or ("5.0.0" if permanent else "4.0.0"),
                    diagnostic=_clip(_diagnostic_text(diagnostic), 500),
                    smtp_code=_smtp_code(diagnostic),
                    permanent=permanent,
                )
            )
    if not failures:
        if delivered:
            return head.mail(kind=MailKind.REPORT, why="delivery notice")
        return None
    return _report_mail(msg, head, failures, reporter, why="delivery status (RFC 3464)")


def _field_value(value: object) -> str:
    kind, sep, rest = str(value).partition(";")
    return (rest if sep else kind).strip()


def _diagnostic_text(diagnostic: str) -> str:
    kind, sep, rest = diagnostic.partition(";")
    return (
        rest.strip()
        if sep and kind.strip().lower() in ("smtp", "x-unix", "x-postfix")
        else diagnostic
    )


def _report_mail(
    msg: Message, head: _Head, failures: Sequence[Failure], reporter: str | None, *, why: str
) -> Mail:
    permanent = any(f.permanent for f in failures)
    return head.mail(
        kind=MailKind.BOUNCE if permanent else MailKind.DELAY,
        refers_to=_returned_ids(msg, head.message_id),
        failures=tuple(failures),
        reporter=reporter or head.sender,
        why=why,
    )


_DAEMON = re.compile(
    r"^(mailer-daemon|mailer_daemon|mail-daemon|maildaemon|postmaster|mail\.delivery|"
    r"mdaemon|bounces?|nobody)(@|$)",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|not (been )?delivered|delivery (status|failure|failed|has failed|problem|report|"
    r"notification)|mail delivery|returned mail|failure notice|non[- ]?delivery|nondeliverable|"
    r"could not be delivered|delivery to the following|warning: could not send|delayed mail|"
    r"unzustellbar|nicht zugestellt|non remis|non distribu|niedostarczon|не доставлен|"
    r"недоставлен|no se (ha )?(podido|puede) entregar|non recapitat|onbestelbaar|"
    r"nedoručiteln|nepristatyt",
    re.IGNORECASE,
)


def _bounce_like(msg: Message, sender: str | None, subject: str) -> bool:
    if msg.get("x-failed-recipients"):
        return True
    if sender is not None and _DAEMON.match(sender):
        return True
    return bool(_BOUNCE_SUBJECT.search(subject)) and not _reference_ids(msg)


def _heuristic_bounce(msg: Message, head: _Head) -> Mail:
    from flufl.bounce import all_failures

    temporary, permanent = all_failures(msg)
    if not temporary and not permanent:
        return head.mail(
            kind=MailKind.REPORT, why="a delivery report naming no address we could read"
        )
    text = _all_text(msg)
    hard = set(_decoded_addresses(permanent))
    failures = [
        _heuristic_failure(address, text, permanent=address in hard)
        for address in _decoded_addresses(permanent | temporary)
    ]
    return _report_mail(msg, head, failures, None, why="delivery report (flufl.bounce)")


def _decoded_addresses(addresses: Iterable[bytes]) -> list[str]:
    out = []
    for raw in addresses:
        address = raw.decode("ascii", "replace").strip().strip("<>").lower()
        if "@" in address:
            out.append(address)
    return sorted(set(out))


# A blank line, or the marker line before the returned copy, ends a report's paragraph.
_PARAGRAPH_END = re.compile(r"\n\s*\n|\n\s*-{3,}")


def _heuristic_failure(address: str, text: str, *, permanent: bool) -> Failure:
    """Status and diagnostic of a non-standard report: the paragraph that names the address."""
    lowered = text.lower()
    diagnostic = ""
    at = lowered.find(address)
    while at >= 0:
        start = lowered.rfind("\n", 0, at) + 1
        end = _PARAGRAPH_END.search(lowered, at)
        paragraph = " ".join(text[start : end.start() if end else start + 600].split())
        if _SMTP_CODE.search(paragraph.replace(address, "")) or _ENHANCED.search(paragraph):
            diagnostic = paragraph
            break
        diagnostic = diagnostic or paragraph
        at = lowered.find(address, at + len(address))
    if not diagnostic:
        diagnostic = " ".join(text[:300].split())
    status = _status_code(diagnostic)
    if status is None or (status[0] == "5") != permanent:
        status = "5.0.0" if permanent else "4.0.0"
    return Failure(
        recipient=address,
        status=status,
        diagnostic=_clip(diagnostic, 500),
        smtp_code=_smtp_code(diagnostic.replace(address, "")),
        permanent=permanent,
    )


# --------------------------------------------------------------------------- complaints


def _complaint(msg: Message, head: _Head) -> Mail:
    feedback_type = ""
    complainant: str | None = None
    for part in msg.walk():
        if part.get_content_type() != "message/feedback-report":
            continue
        payload = part.get_payload()
        fields: Message | None = None
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            fields = payload[0]
        elif isinstance(payload, str):
            fields = HeaderParser().parsestr(payload)
        if fields is not None:
            feedback_type = str(fields.get("feedback-type") or "").strip().lower()
            complainant = _address(fields.get("original-rcpt-to"))
    if complainant is None:
        for headers in _returned_headers(msg):
            complainant = _address(headers.get("to"))
            if complainant:
                break
    return head.mail(
        kind=MailKind.COMPLAINT,
        refers_to=_returned_ids(msg, head.message_id),
        feedback_type=feedback_type or "abuse",
        complainant=complainant,
        why="feedback-loop report (RFC 5965)",
    )


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
