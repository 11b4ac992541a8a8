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
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
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


def split_mailbox(value: str) -> tuple[str | None, str]:
    """`Name <addr>` or `addr` to (name or None, addr). The address is not validated here."""
    value = value.strip()
    if value.endswith(">") and "<" in value:
        name, _, rest = value[:-1].rpartition("<")
        name = name.strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            name = re.sub(r"\\(.)", r"\1", name[1:-1])
        return (name or None), rest.strip()
    return None, value


def check_mailbox(value: str, flag: str) -> None:
    """`InvalidValueError` naming `flag` unless `value` is a usable `Name <addr>` or `addr`."""
    _, address = split_mailbox(value)
    problem = address_problem(address)
    if problem:
        raise InvalidValueError(f"{flag} {value!r} is not a valid address: {problem}")


def reply_to_rule(value: str | None) -> str | None:
    """A campaign's Reply-To rule: None, `signatory`, or one checked mailbox."""
    if value is None:
        return None
    value = value.strip()
    if value.lower() == REPLY_TO_SIGNATORY:
        return REPLY_TO_SIGNATORY
    check_mailbox(value, "--reply-to")
    return value


def display(address: str) -> str:
    """The address as a person reads it: the domain in Unicode (`xn--…` decoded)."""
    local, at, domain = address.strip().rpartition("@")
    if not at or "xn--" not in domain.lower():
        return address.strip()
    return f"{local}@{_unicode_domain(domain) or domain}"
