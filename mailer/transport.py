"""The way out, whatever moves the bytes: the `Transport` protocol, what became of a message
(`Outcome`), a Maildir outbox, a dry run, and the rate limit shared by every connection.

This module knows nothing of templates or the database. It takes bytes and an envelope and says
what became of them, as precisely as delivery allows: accepted, refused for now, refused for good,
or *uncertain* (the payload went out and no final answer came back). SMTP, the one transport that
talks to a server, lives in `smtp.py`, which imports this module (never the reverse).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mailer.errors import InvalidValueError, TransportError


class OutcomeKind(enum.StrEnum):
    ACCEPTED = "accepted"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    UNCERTAIN = "uncertain"


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    kind: OutcomeKind
    code: int | None
    reply: str
    via: str


# --------------------------------------------------------------------------- transports


class Transport(Protocol):
    @property
    def via(self) -> str: ...

    async def open(self) -> None:
        """Check the way out works before anything is claimed (raises TransportError)."""

    async def send(
        self,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        smtputf8: bool = False,
        ref: str | None = None,
        go: Callable[[], bool] | None = None,
        on_payload: Callable[[], None] | None = None,
    ) -> Outcome | None:
        """Deliver one message. `go` is asked at the last moment, once the transport could
        put the message on its way (e.g. a connection came free); False means it is not sent
        and None is returned: the run stopped while the message waited. `on_payload` is
        called just before the message itself leaves: from then on it may be delivered, so a
        send cut short after it is uncertain, and before it was never sent."""
        ...

    async def close(self) -> None: ...


class MaildirOutbox:
    """One `.eml` per message in a Maildir's `new/`, written to `tmp/` first and renamed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def via(self) -> str:
        return f"maildir:{self.directory}"

    async def open(self) -> None:
        try:
            for sub in ("tmp", "new", "cur"):
                (self.directory / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransportError(
                f"--outbox {self.directory}: cannot create: {exc.strerror}"
            ) from None

    async def send(
        self,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        smtputf8: bool = False,
        ref: str | None = None,
        go: Callable[[], bool] | None = None,
        on_payload: Callable[[], None] | None = None,
    ) -> Outcome | None:
        key = hashlib.sha256((ref or "").encode() or data).hexdigest()[:24]
        name = f"{key}.eml"
        if on_payload is not None:
            on_payload()
        try:
            await asyncio.to_thread(self._write, name, data)
        except OSError as exc:
            raise TransportError(
                f"--outbox {self.directory}: cannot write {name}: {exc.strerror}"
            ) from None
        return Outcome(kind=OutcomeKind.ACCEPTED, code=None, reply=f"new/{name}", via=self.via)

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.directory / "tmp" / f"{name}.{os.getpid()}.{time.monotonic_ns()}"
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.directory / "new" / name)

    async def close(self) -> None:
        return None


class DryRun:
    """Takes every message and keeps none of it."""

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0

    @property
    def via(self) -> str:
        return "dry-run"

    async def open(self) -> None:
        return None

    async def send(
        self,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        data: bytes,
        smtputf8: bool = False,
        ref: str | None = None,
        go: Callable[[], bool] | None = None,
        on_payload: Callable[[], None] | None = None,
    ) -> Outcome | None:
        if on_payload is not None:
            on_payload()
        self.count += 1
        self.bytes += len(data)
        return Outcome(kind=OutcomeKind.ACCEPTED, code=None, reply="dry run", via=self.via)

    async def close(self) -> None:
        return None


# --------------------------------------------------------------------------- rate limiting

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hr|hour)\s*$", re.I)
_UNIT_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}


def parse_rate(text: str) -> float:
    """`5/s`, `300/min`, `1000/h` -> messages per second."""
    match = _RATE.match(text)
    if not match:
        raise InvalidValueError(f"--rate {text!r}: expected N/s, N/min or N/h (e.g. 300/min)")
    count = float(match.group(1))
    unit = match.group(2).lower()
    seconds = _UNIT_SECONDS.get(unit, 3600)
    if count <= 0:
        raise InvalidValueError(f"--rate {text!r}: must be more than zero")
    return count / seconds


class TokenBucket:
    """A rate limit shared by every connection: `acquire()` waits for the next token."""

    def __init__(
        self,
        *,
        rate: float,
        capacity: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise InvalidValueError("a rate must be more than zero")
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._stamp = clock()
        self._lock: asyncio.Lock | None = None

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        # One waiter at a time keeps the order fair and the spacing exact.
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await self._sleep((1.0 - self._tokens) / self.rate)
