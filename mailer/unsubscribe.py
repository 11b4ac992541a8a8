"""Unsubscribe tokens: made for each letter's one-click URL, and verified where they come back.

A token is HMAC-SHA256 of "slug NUL address" (the address normalised, see addresses.normalise),
keyed with `[campaign] unsubscribe_secret`, or with the slug alone when no secret is set (which
is then merely a hash), cut to 32 hex digits.

Imports only `addresses`.
"""

from __future__ import annotations

import hashlib
import hmac

from mailer.addresses import normalise


def key_for(*, slug: str, secret: str | None) -> bytes:
    """The HMAC key of a campaign's tokens."""
    return secret.encode() if secret else slug.encode()


def make_token(*, key: bytes, slug: str, email: str) -> str:
    message = f"{slug}\0{normalise(email)}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def verify_token(token: str, *, key: bytes, slug: str, email: str) -> bool:
    """Whether `token` is the one made for this campaign and address (in constant time)."""
    return hmac.compare_digest(token.strip().lower(), make_token(key=key, slug=slug, email=email))
