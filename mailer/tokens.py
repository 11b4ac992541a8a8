"""Signed tokens that name one letter: in its unsubscribe URL and in its VERP envelope sender.

A token is `base32(version | campaign id | contact id | MAC)` in lower case without padding
(about 31 characters): short enough for a URL, a header and an address's local part, and
case-insensitive, because some mail servers lower-case the local part of a bounce address.

- `version` names the key (one byte): 1–127 are the workspace's generated secrets
  (workspace_secret.py), 128–255 a secret configured in mailer.toml (derived from its value). A
  token keeps verifying after the key that signs new letters changes, as long as its key is
  still known.
- The ids let whoever receives the token find the letter; the MAC binds them to the campaign's
  slug, the contact's normalised address and the token's purpose, so a token cannot be forged
  (the key is a random secret that is never printed), moved to another address, or turned from
  a bounce address (which travels in Return-Path headers) into an unsubscribe link.
- The MAC is HMAC-SHA256 cut to 12 bytes (96 bits): ample against an online guesser.

Imports only `addresses`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
from dataclasses import dataclass

from mailer.addresses import normalise

MAC_BYTES = 12
# Ids are 32-bit integer columns: a token naming a larger one is no token (and never reaches SQL).
MAX_ID = 2**31 - 1
# Generated secrets take versions 1..GENERATED_MAX; configured ones the versions above.
GENERATED_MAX = 127
_B32 = frozenset("abcdefghijklmnopqrstuvwxyz234567")
# The longest token: version, two 5-byte varints (31-bit ids) and the MAC.
MAX_TOKEN_CHARS = (1 + 5 + 5 + MAC_BYTES) * 8 // 5 + 1


class Purpose(enum.Enum):
    """What a token is for; part of its MAC, so one kind cannot stand in for the other."""

    UNSUBSCRIBE = b"unsubscribe"
    VERP = b"verp"


@dataclass(frozen=True, slots=True)
class Key:
    version: int
    secret: bytes = b""

    def __repr__(self) -> str:  # never the secret, in a traceback or a log
        return f"Key(version={self.version})"


@dataclass(frozen=True)
class KeyRing:
    """The key that signs new tokens and every key a token may have been signed with."""

    signing: Key
    known: tuple[Key, ...]

    def candidates(self, version: int) -> list[bytes]:
        return [k.secret for k in (self.signing, *self.known) if k.version == version]


def configured_key(secret: str) -> Key:
    """A secret from mailer.toml as a key: its version is derived from its value, so letters
    signed with an earlier configured secret still name theirs."""
    digest = hashlib.sha256(b"mailer key version\0" + secret.encode()).digest()
    return Key(
        version=GENERATED_MAX + 1 + digest[0] % (255 - GENERATED_MAX), secret=secret.encode()
    )


@dataclass(frozen=True, slots=True)
class TokenIds:
    """What a token says before it is verified: which key, campaign and contact."""

    version: int
    campaign_id: int
    contact_id: int


def _varint(n: int) -> bytes:
    if not 0 <= n <= MAX_ID:
        raise ValueError(f"id {n} is out of range")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while at < len(data) and shift <= 28:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    raise ValueError("truncated")


def _mac(secret: bytes, purpose: Purpose, payload: bytes, slug: str, email: str) -> bytes:
    message = b"\0".join((purpose.value, payload, slug.encode(), normalise(email).encode()))
    return hmac.new(secret, message, hashlib.sha256).digest()[:MAC_BYTES]


def make(
    keys: KeyRing,
    *,
    purpose: Purpose,
    campaign_id: int,
    contact_id: int,
    slug: str,
    email: str,
) -> str:
    key = keys.signing
    payload = bytes((key.version,)) + _varint(campaign_id) + _varint(contact_id)
    raw = payload + _mac(key.secret, purpose, payload, slug, email)
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def _raw(token: str) -> bytes | None:
    text = token.strip().lower()
    if not 8 <= len(text) <= MAX_TOKEN_CHARS or not set(text) <= _B32:
        return None
    try:
        return base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return None


def decode(token: str) -> TokenIds | None:
    """The ids a token names, or None when it is no token at all. Not yet verified: look the
    campaign and contact up, then `verify`."""
    raw = _raw(token)
    if raw is None or len(raw) < 3 + MAC_BYTES:
        return None
    try:
        campaign_id, at = _read_varint(raw, 1)
        contact_id, at = _read_varint(raw, at)
    except ValueError:
        return None
    if at + MAC_BYTES != len(raw) or campaign_id > MAX_ID or contact_id > MAX_ID:
        return None
    return TokenIds(version=raw[0], campaign_id=campaign_id, contact_id=contact_id)


def verify(keys: KeyRing, token: str, *, purpose: Purpose, slug: str, email: str) -> bool:
    """Whether `token` was made by one of our keys for this purpose, campaign and address
    (compared in constant time)."""
    raw = _raw(token)
    if raw is None or decode(token) is None:
        return False
    payload, given = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    return any(
        hmac.compare_digest(given, _mac(secret, purpose, payload, slug, email))
        for secret in keys.candidates(raw[0])
    )
