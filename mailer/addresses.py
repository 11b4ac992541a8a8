"""Email address rules, in one place: parse, normalise, validate, encode for the wire, display.

Every module that stores, looks up, checks or writes an address uses these functions, so an
address written one way (`Mayor@XN--GIEEN-NQA.DE`) is the same contact, suppression and
recipient as the same address written another (`mayor@gießen.de`).

- **Normalised** (storage and lookup): trimmed, NFC, lower-cased, the domain in its Unicode
  form (U-labels) under IDNA 2008 with the UTS #46 mapping.
- **Wire** (envelope and headers): the domain as A-labels (`xn--…`, IDNA 2008 + UTS #46 via the
  `idna` package: Python's own "idna" codec is IDNA 2003 and turns `gießen.de` into
  `giessen.de`, another domain). A non-ASCII local part cannot be encoded: it needs SMTPUTF8
  (RFC 6531) all the way to the recipient.
- **Display**: the Unicode form, as a person reads it.

Imports only `errors` (and email-validator for the import's detailed diagnostics).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

import idna

from mailer.errors import InvalidValueError

# `--reply-to signatory`: each letter's Reply-To is the signing mayor of the partner city.
REPLY_TO_SIGNATORY = "signatory"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LOCAL_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\u0080-\U0010ffff]+$")
_DOMAIN = re.compile(
    r"^(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]{0,61}"
    r"[A-Za-z0-9\u0080-\U0010ffff])?\.)+[A-Za-z\u0080-\U0010ffff][A-Za-z0-9\-\u0080-\U0010ffff]*$"
)
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
# The dot-atom local part email-validator accepts without further questions (the import's
# fast path: it is asked only once per distinct domain).
_ATEXT_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


class AddressError(ValueError):
    """An address the import refuses; the message quotes it and says why."""


# --------------------------------------------------------------------------- domains


@functools.lru_cache(maxsize=65536)
def _unicode_domain(domain: str) -> str | None:
    """The domain's normalised Unicode form, or None when IDNA 2008 refuses it."""
    try:
        return idna.decode(idna.encode(domain, uts46=True))
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


@functools.lru_cache(maxsize=65536)
def _ascii_domain(domain: str) -> str | None:
    """The domain as A-labels (`xn--…`), or None when IDNA 2008 refuses it."""
    if domain.isascii() and "xn--" not in domain.lower():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def encode_domain(domain: str) -> str:
    """A domain for the wire (A-labels); `InvalidValueError` when it is no valid IDN."""
    encoded = _ascii_domain(domain.strip())
    if encoded is None:
        raise InvalidValueError(f"domain {domain!r} is not a valid international domain name")
    return encoded


# --------------------------------------------------------------------------- normalised form


def normalise(address: str) -> str:
    """The form an address is stored and looked up in (never raises: an invalid address is
    only trimmed and lower-cased, so it matches nothing valid)."""
    lowered = address.strip().lower()
    if lowered.isascii() and "xn--" not in lowered:
        return lowered  # the common case: nothing to map
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return lowered
    if domain.isascii() and "xn--" not in domain.lower():
        domain = domain.lower()
    else:
        domain = _unicode_domain(domain) or domain.lower()
    if not local.isascii():
        local = unicodedata.normalize("NFC", local)
    return f"{local.lower()}@{domain}"


def validated(address: str) -> str:
    """The normalised address, or `AddressError` with the reason (the import's check).

    email-validator (no DNS) explains what is wrong; it costs ~60 µs a call, so plain ASCII
    local parts take a fast path that asks it about each distinct domain only once.
    """
    local, at, domain = address.rpartition("@")
    if (
        at
        and address.isascii()
        and len(address) <= 254
        and len(local) <= 64
        and _ATEXT_LOCAL.fullmatch(local)
    ):
        good = _domain_accepted(domain.lower())
        if good is not None:
            return f"{local.lower()}@{good}"
    return _validated_slowly(address)


@functools.lru_cache(maxsize=65536)
def _domain_accepted(domain: str) -> str | None:
    """The domain's normalised form when email-validator accepts it, else None."""
    import email_validator

    try:
        email_validator.validate_email(
            f"x@{domain}", check_deliverability=False, test_environment=True
        )
    except email_validator.EmailNotValidError:
        return None
    return _unicode_domain(domain)


def _validated_slowly(address: str) -> str:
    import email_validator

    try:
        result = email_validator.validate_email(
            address, check_deliverability=False, test_environment=True
        )
    except email_validator.EmailNotValidError as exc:
        raise AddressError(f"{address!r}: {exc}") from None
    return normalise(result.normalized)


# --------------------------------------------------------------------------- validity


def address_problem(address: str) -> str | None:
    """Why `address` cannot be put on an envelope or in a header, or None when it can."""
    # The common case (plain ASCII dot-atom) in one regex; the rest explains what is wrong.
    if _PLAIN_ADDRESS.fullmatch(address) and len(address) <= 254 and address.index("@") <= 64:
        return None
    if not address:
        return "empty address"
    if len(address) > 320:
        return "longer than 320 characters"
    if _CONTROL.search(address) or any(ch.isspace() for ch in address):
        return "contains a space or line break"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "no @ with a local part and a domain"
    if len(local.encode()) > 64:
        return "local part longer than 64 octets"
    if local.startswith(".") or local.endswith("."):
        return "the local part starts or ends with a dot"
    if not _LOCAL_ATEXT.match(local):
        return "the local part has characters not allowed unquoted"
    if ".." in local:
        return "two dots in a row"
    if not _DOMAIN.match(domain):
        return "the domain is not a domain name"
    return None


def needs_smtputf8(address: str) -> bool:
    """Whether the address can only travel with SMTPUTF8 (RFC 6531): a non-ASCII local part."""
    return not address.rpartition("@")[0].isascii()


def wire_address(address: str, *, what: str) -> tuple[str, bool]:
    """(the address for the envelope and headers, whether it needs SMTPUTF8).

    The domain goes out as A-labels; a non-ASCII local part stays as it is and needs SMTPUTF8.
    `InvalidValueError` (naming `what`) for an address that cannot be sent at all.
    """
    address = address.strip()
    problem = address_problem(address)
    if problem:
        raise InvalidValueError(f"{what} address {address!r} is not valid: {problem}")
    if address.isascii():
        return address, False
    local, _, domain = address.rpartition("@")
    if not domain.isascii():
        encoded = _ascii_domain(domain)
        if encoded is None:
            raise InvalidValueError(
                f"{what} address {address!r}: domain is not a valid international name"
            )
        domain = encoded
    return f"{local}@{domain}", not local.isascii()


# --------------------------------------------------------------------------- mailboxes


class Mailbox(NamedTuple):
    """One mailbox: an optional display name and an address (as written, trimmed)."""

    name: str | None
    address: str

    def __str__(self) -> str:
        return f"{self.name} <{self.address}>" if self.name else self.address


# Outside a quoted name these end a mailbox or start another: a second address, never a name.
_LIST_SEPARATORS = frozenset(",;")
_ANGLES = frozenset("<>")


def parse_mailbox(value: str, *, what: str) -> Mailbox:
    """Exactly one mailbox: `addr`, `Name <addr>` or `"Name, with specials" <addr>`.

    `InvalidValueError` naming `what` (e.g. `--from`) for a list of addresses, a stray bracket
    or comma, an unclosed quote, or an address that cannot be sent.
    """
    text = value.strip()
    if not text:
        raise InvalidValueError(f"{what} is empty: give one address, e.g. office@example.org")
    if _CONTROL.search(text):
        raise InvalidValueError(f"{what} {value!r} contains a line break or control character")
    name: str | None = None
    address = text
    if text.endswith(">"):
        name_part, address = _split_angle(text, value, what)
        name = _phrase(name_part, value, what)
    elif '"' in text or any(ch in _ANGLES for ch in text):
        raise InvalidValueError(
            f"{what} {value!r}: write one mailbox as Name <address> or as address"
        )
    if any(ch in _LIST_SEPARATORS for ch in address):
        raise _more_than_one(value, what)
    problem = address_problem(address)
    if problem:
        raise InvalidValueError(f"{what} {value!r} is not a valid address: {problem}")
    return Mailbox(name=name, address=address)


def _more_than_one(value: str, what: str) -> InvalidValueError:
    return InvalidValueError(
        f"{what} {value!r}: more than one address; {what} takes exactly one "
        '(quote a name that has a comma: "Office, Kyiv" <office@example.org>)'
    )


def _split_angle(text: str, value: str, what: str) -> tuple[str, str]:
    """(the part before `<`, the address inside `<…>`), quotes respected."""
    quoted = False
    escaped = False
    opening = None
    for index, ch in enumerate(text[:-1]):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "<":
            if opening is not None:
                raise _more_than_one(value, what)
            opening = index
        elif ch == ">" or (ch in _LIST_SEPARATORS and opening is None):
            raise _more_than_one(value, what)
    if quoted:
        raise InvalidValueError(f"{what} {value!r}: a quote in the name is not closed")
    if opening is None:
        raise InvalidValueError(f"{what} {value!r}: a > without its <")
    return text[:opening].strip(), text[opening + 1 : -1].strip()


def _phrase(text: str, value: str, what: str) -> str | None:
    """A display name: quoted parts unquoted, unquoted parts free of address punctuation."""
    out: list[str] = []
    quoted = False
    escaped = False
    for ch in text:
        if escaped:
            out.append(ch)
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and (ch in _LIST_SEPARATORS or ch in _ANGLES):
            raise _more_than_one(value, what)
        elif not quoted and ch in "@:":
            raise InvalidValueError(
                f"{what} {value!r}: a name with {ch!r} must be quoted "
                '(e.g. "Office: Kyiv" <office@example.org>)'
            )
        else:
            out.append(ch)
    name = " ".join("".join(out).split())
    return name or None


def reply_to_rule(value: str | None) -> str | None:
    """A campaign's Reply-To rule: None, `signatory`, or one checked mailbox (as written)."""
    if value is None:
        return None
    value = value.strip()
    if value.lower() == REPLY_TO_SIGNATORY:
        return REPLY_TO_SIGNATORY
    parse_mailbox(value, what="--reply-to")
    return value


def mailto_url(address: str, *, query: str = "") -> str:
    """A `mailto:` URL fit for a header: A-label domain, non-ASCII local part percent-encoded
    (RFC 6068), `query` appended as given (e.g. `subject=unsubscribe`)."""
    local, _, domain = address.strip().rpartition("@")
    url = f"mailto:{quote(local, safe=_MAILTO_SAFE)}@{encode_domain(domain)}"
    return f"{url}?{query}" if query else url


def ascii_url(url: str) -> str:
    """An http(s) URL fit for a header: the host as A-labels, other non-ASCII percent-encoded
    (UTF-8). `InvalidValueError` for a host that is no valid international domain name."""
    if url.isascii():
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = parts.netloc
    if host and not host.isascii():
        userinfo = netloc.rpartition("@")[0]
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            raise InvalidValueError(f"URL {url!r}: the port is not a number") from None
        netloc = (f"{userinfo}@" if userinfo else "") + encode_domain(host) + port
    safe = "/?&=#%:@!$'()*+,;~-._"
    return urlunsplit(
        (
            parts.scheme,
            quote(netloc, safe=safe),
            quote(parts.path, safe=safe),
            quote(parts.query, safe=safe + "{}"),
            quote(parts.fragment, safe=safe),
        )
    )


# RFC 6068 `some-delims` and unreserved characters may stay as they are in a mailto local part.
_MAILTO_SAFE = "!$'()*+,;=.-_~"


def display(address: str) -> str:
    """The address as a person reads it: the domain in Unicode (`xn--…` decoded)."""
    local, at, domain = address.strip().rpartition("@")
    if not at or "xn--" not in domain.lower():
        return address.strip()
    return f"{local}@{_unicode_domain(domain) or domain}"
