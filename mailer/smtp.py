"""SMTP: a pool of reused connections, each a pipelined session (RFC 2920) on a socket taken
over from aiosmtplib after its handshake; the URL, TLS and password rules of DESIGN §3.

aiosmtplib connects, negotiates TLS, authenticates and greets; after that `_Wire` reads the
socket itself, because aiosmtplib cannot take the replies to a pipelined group. That ties this
module to aiosmtplib's internals (`SMTP.transport`, `esmtp_extensions`): pyproject pins its
major version, and `tests/test_transport*.py` must be re-run on every upgrade.

Imports `transport` (the protocol and outcome types), never the reverse; knows nothing of
templates or the database.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiosmtplib

from mailer import secrets_source
from mailer.errors import (
    AuthenticationRefused,
    InvalidValueError,
    ServerUnreachable,
    TlsFailure,
    TransportError,
)
from mailer.secrets_source import is_loopback
from mailer.transport import Outcome, OutcomeKind

PASSWORD_ENV = "MAILER_SMTP_PASSWORD"
DEFAULT_TIMEOUT = 60.0
# A message's whole transaction (envelope, payload, verdict) must end within this many timeouts
# of its start, however each reply trickles in: a stalling server costs bounded time.
TRANSACTION_TIMEOUTS = 3
SCHEMES = {"smtp": 587, "smtps": 465, "smtp+plain": 25}

_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class SmtpSettings:
    scheme: str
    host: str
    port: int
    username: str | None = None
    # repr=False: a settings object may end up in a traceback or a log line.
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    local_hostname: str | None = None

    @property
    def via(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def display(self) -> str:
        """The URL as the user gave it, never with a password; a login in clear is named."""
        user = f"{self.username}@" if self.username else ""
        shown = f"{self.scheme}://{user}{self.host}:{self.port}"
        if self.plaintext_auth:
            shown += " (the password goes WITHOUT encryption: --allow-plaintext-auth)"
        return shown

    @property
    def plaintext_auth(self) -> bool:
        """A login to another machine without TLS (allowed only when asked for explicitly)."""
        return (
            self.scheme == "smtp+plain" and self.username is not None and not is_loopback(self.host)
        )

    def with_password(self, password: str | None) -> SmtpSettings:
        return replace(self, password=password)


def parse_smtp_url(
    url: str,
    *,
    ca_file: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    allow_plaintext_auth: bool = False,
) -> SmtpSettings:
    """`smtp://user@host:587` (STARTTLS), `smtps://user@host:465`, `smtp+plain://host:25`.

    A login over `smtp+plain://` would send the password in clear: refused unless the host is
    this machine (a local relay, a test server) or `allow_plaintext_auth` says the user wants
    exactly that."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise InvalidValueError(f"--smtp: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidValueError(
            f"--smtp: unknown scheme {scheme or '(none)'!r}; use smtp:// (STARTTLS), "
            "smtps:// (implicit TLS) or smtp+plain:// (no TLS, local relays only)"
        )
    if parts.password is not None:
        # The URL is in argv, the shell history and the process list: no place for a secret.
        raise InvalidValueError(
            f"--smtp: the URL must not contain a password; give it in ${PASSWORD_ENV} "
            "or [smtp] password_command in mailer.toml"
        )
    if not parts.hostname:
        raise InvalidValueError(f"--smtp {url}: no host name")
    if ca_file is not None and not ca_file.is_file():
        raise InvalidValueError(f"--ca-file {ca_file}: no such file")
    if (
        scheme == "smtp+plain"
        and parts.username
        and not is_loopback(parts.hostname)
        and not allow_plaintext_auth
    ):
        raise InvalidValueError(
            f"--smtp {scheme}://{parts.username}@{parts.hostname}: a login without TLS would "
            "send the password in clear to another machine; use smtp:// (STARTTLS) or smtps://, "
            "or add --allow-plaintext-auth if that network is really yours"
        )
    return SmtpSettings(
        scheme=scheme,
        host=parts.hostname,
        port=port or SCHEMES[scheme],
        username=unquote(parts.username) if parts.username else None,
        ca_file=ca_file,
        timeout=timeout,
    )


def resolve_password(
    *,
    settings: SmtpSettings,
    password_command: str | None,
    prompt: Callable[[str], str] | None = None,
) -> str | None:
    """`MAILER_SMTP_PASSWORD`, then `[smtp] password_command`, then `prompt` (the CLI's, on a TTY)."""
    if settings.username is None:
        return None
    return secrets_source.resolve_password(
        kind="SMTP",
        login=f"{settings.username}@{settings.via}",
        env_var=PASSWORD_ENV,
        section="smtp",
        password_command=password_command,
        prompt=prompt,
        error=TransportError,
    )


def tls_context(*, ca_file: Path | None) -> ssl.SSLContext:
    # Verification and hostname checks stay on whatever the file: a private CA is trusted, not
    # "no CA".
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def _stuffed(data: bytes) -> bytes:
    """The DATA payload: CRLF line endings, leading dots doubled, the final dot line."""
    # The builder's bytes already end every line in CRLF and rarely start one with a dot: two
    # counts and a search are much cheaper than two regular-expression passes.
    lines = data.count(b"\n")
    if not (lines == data.count(b"\r\n") == data.count(b"\r") and data.endswith(b"\r\n")):
        data = _LINE_ENDINGS.sub(b"\r\n", data)
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    return data + b".\r\n"


def _classify_code(code: int, reply: str, via: str) -> Outcome:
    if 200 <= code < 300:
        return Outcome(kind=OutcomeKind.ACCEPTED, code=code, reply=reply, via=via)
    if 400 <= code < 500:
        return Outcome(kind=OutcomeKind.TRANSIENT, code=code, reply=reply, via=via)
    return Outcome(kind=OutcomeKind.PERMANENT, code=code, reply=reply, via=via)


class SmtpPool:
    """N reused SMTP connections, opened lazily and reopened when a server drops one."""

    def __init__(self, settings: SmtpSettings, *, size: int = 4) -> None:
        if size < 1:
            raise InvalidValueError("--concurrency must be at least 1")
        self.settings = settings
        self.size = size
        self._context = (
            tls_context(ca_file=settings.ca_file) if settings.scheme != "smtp+plain" else None
        )
        self._idle: asyncio.Queue[_Connection] | None = None
        self._all: list[_Connection] = []

    @property
    def via(self) -> str:
        return self.settings.via

    @property
    def sends_per_connection(self) -> int:
        """How many messages may be under way on one connection: two where the server offers
        PIPELINING (the next envelope goes out while the message before awaits its verdict,
        see _Connection.transact), else one. Known once `open` has greeted the server."""
        return 2 if any(conn.pipelining for conn in self._all) else 1

    def _pool(self) -> asyncio.Queue[_Connection]:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self.size):
                conn = _Connection(self.settings, self._context)
                self._all.append(conn)
                self._idle.put_nowait(conn)
        return self._idle

    async def open(self) -> None:
        pool = self._pool()
        conn = await pool.get()
        try:
            await conn.ensure_connected()
        finally:
            pool.put_nowait(conn)

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
        pool = self._pool()
        conn = await pool.get()
        if go is not None and not go():
            pool.put_nowait(conn)
            return None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                pool.put_nowait(conn)

        try:
            return await conn.transact(
                _Outgoing(
                    mail_from=mail_from,
                    rcpt_to=rcpt_to,
                    data=data,
                    smtputf8=smtputf8,
                    release=release,
                    on_payload=on_payload,
                )
            )
        finally:
            release()

    async def close(self) -> None:
        await asyncio.gather(*(conn.close() for conn in self._all), return_exceptions=True)
        # Connections and the queue belong to this event loop; a later run opens new ones.
        self._idle = None
        self._all = []


@dataclass(frozen=True, slots=True, kw_only=True)
class _Outgoing:
    """One message on its way through a connection (see _Connection.transact)."""

    mail_from: str
    rcpt_to: Sequence[str]
    data: bytes
    smtputf8: bool
    # Hands the connection to the next message (PIPELINING: once the payload is written).
    release: Callable[[], None]
    on_payload: Callable[[], None] | None


class _Reply:
    __slots__ = ("code", "text")

    def __init__(self, code: int, text: str) -> None:
        self.code = code
        self.text = text


class _WireError(Exception):
    """The connection broke (or the server spoke gibberish) while a reply was awaited."""


# A reply longer than this is not SMTP: the connection is dropped rather than the buffer grown.
_MAX_REPLY = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PLAIN_ADDRESS = re.compile(r"[^\x00-\x20\x7f<>()\[\]\\,;:\"]+@[^\x00-\x20\x7f<>()\[\]\\,;:\"@]+\Z")


class _Wire(asyncio.Protocol):
    """A session after its handshake: commands out, replies in, several in flight if need be.

    aiosmtplib parses one reply per read and drops what arrives while no command waits, so it
    cannot take the replies to a pipelined group (RFC 2920); once connected, authenticated and
    greeted, the socket is handed to this reader, which queues every complete reply it sees.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.replies: collections.deque[_Reply] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.broken: str | None = None
        # Written, not yet handed to the socket (see write_soon).
        self.held: list[bytes] = []
        # Transactions overlap on a PIPELINING session (see _Connection.transact): each reads
        # its replies after the one before it has read all of its own. Done once the latest
        # transaction on this session has read its last reply.
        self.last_turn: asyncio.Future[None] | None = None

    @property
    def open(self) -> bool:
        return self.broken is None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.open:
            raise _WireError(self.broken or "connection closed")
        if self.held:
            self.held.append(data)
        else:
            self.transport.write(data)

    def write_soon(self, data: bytes) -> None:
        """Write at the end of this turn of the event loop, with whatever else is written by
        then: a payload and the next message's envelope (written by the transaction that
        takes the connection next) leave in one segment, which saves a system call and a
        wake-up of the server for every message."""
        if not self.open:
            raise _WireError(self.broken or "connection closed")
        if not self.held:
            self.loop.call_soon(self._flush)
        self.held.append(data)

    def _flush(self) -> None:
        held, self.held = self.held, []
        if held and self.open:
            self.transport.write(b"".join(held))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buffer[start:end]).rstrip(b"\r")
            if line[3:4] == b"-":
                start = end + 1
                continue
            # The last line of a reply: everything from the reply's first line up to here.
            block = bytes(buffer[:end]).split(b"\n")
            del buffer[: end + 1]
            start = 0
            code_text = block[0][:3]
            if not code_text.isdigit():
                self._break(
                    f"not an SMTP reply: {_one_line(bytes(block[0][:80]).decode('utf-8', 'replace'))}"
                )
                return
            text = "\n".join(
                b[4:].strip(b" \t\r").decode("utf-8", "surrogateescape") for b in block
            )
            self.replies.append(_Reply(int(code_text), text))
        if len(buffer) > _MAX_REPLY:
            self._break("a reply too long to be SMTP")
            return
        self._wake()

    def eof_received(self) -> bool:
        self._break("the server closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(f"connection lost ({exc})" if exc else "connection lost")

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
        if not self.transport.is_closing():
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def reply(self, timeout: float, *, deadline: float | None = None) -> _Reply:
        """The next complete reply, within `timeout` seconds of asking and before `deadline`
        (the event loop's clock). Both are fixed when asked: a server that trickles bytes (a
        `250-` line a second, forever) wakes this reader on each, but never buys more time."""
        until = self.loop.time() + timeout
        if deadline is not None:
            until = min(until, deadline)
        while not self.replies:
            if self.broken is not None:
                raise _WireError(self.broken)
            left = until - self.loop.time()
            if left <= 0:
                raise TimeoutError("timed out waiting for the server's reply")
            waiter = self.waiter = self.loop.create_future()
            timer = self.loop.call_later(left, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
        return self.replies.popleft()

    @property
    def idle(self) -> bool:
        """No transaction is waiting for a reply on this session."""
        return self.last_turn is None or self.last_turn.done()

    def take_turn(self) -> tuple[asyncio.Future[None] | None, asyncio.Future[None]]:
        """The turn of the transaction before (to await before reading) and a new one."""
        previous, mine = self.last_turn, self.loop.create_future()
        self.last_turn = mine
        return previous, mine

    def abort(self) -> None:
        self.broken = self.broken or "closed by the client"
        self.transport.abort()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("timed out waiting for the server's reply"))


class _Connection:
    def __init__(self, settings: SmtpSettings, context: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.context = context
        self.wire: _Wire | None = None
        self.extensions: frozenset[str] = frozenset()
        self.sent_on_this = 0
        # Transactions under way (e.g. cancelled while waiting for a reply): a QUIT would only
        # wait.
        self.busy = 0

    @property
    def connected(self) -> bool:
        return self.wire is not None and self.wire.open

    @property
    def wire_idle(self) -> bool:
        return self.wire is None or self.wire.idle

    @property
    def pipelining(self) -> bool:
        return "pipelining" in self.extensions

    async def ensure_connected(self) -> _Wire:
        wire = self.wire
        if wire is not None and wire.open:
            if not wire.replies or not wire.idle:
                return wire
            # The server spoke between transactions (typically "421 idle timeout" before it
            # hangs up): its state is unknown, and a stray reply would be paired with the
            # next command, so this session is dropped for a fresh one.
            wire.abort()
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout,
            use_tls=s.scheme == "smtps",
            start_tls=False,
            tls_context=self.context if s.scheme == "smtps" else None,
            local_hostname=s.local_hostname or _local_hostname(),
        )
        where = f"SMTP server {s.via}"
        try:
            await smtp.connect()
            if s.scheme == "smtp":
                await smtp.ehlo()
                if not smtp.supports_extension("starttls"):
                    smtp.close()
                    raise TlsFailure(
                        f"{where} does not offer STARTTLS, which smtp:// requires; use "
                        "smtps:// for implicit TLS, or smtp+plain:// for a local relay "
                        "without TLS"
                    )
                assert self.context is not None
                await smtp.starttls(tls_context=self.context)
            if s.username is not None:
                await smtp.login(s.username, s.password or "")
            # The extensions (SMTPUTF8, 8BITMIME, PIPELINING) must be known before the first MAIL.
            if smtp.is_ehlo_or_helo_needed:
                await smtp.ehlo()
        except TransportError:
            raise
        except aiosmtplib.SMTPAuthenticationError as exc:
            smtp.close()
            raise AuthenticationRefused(
                f"{where} refused the login of {s.username!r}: {exc.code} {_one_line(exc.message)}"
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            tls = _ssl_cause(exc)
            if tls is not None:
                # --ca-file helps a certificate from a private CA, not one made out for
                # another name, and never when it was given already.
                hint = (
                    " (for a private CA give --ca-file)"
                    if isinstance(tls, ssl.SSLCertVerificationError) and s.ca_file is None
                    else ""
                )
                raise TlsFailure(f"TLS with {where} failed: {_ssl_text(tls)}{hint}") from None
            if isinstance(exc, aiosmtplib.SMTPResponseException):
                raise ServerUnreachable(
                    f"{where} refused the session: {exc.code} {_one_line(exc.message)}"
                ) from None
            raise ServerUnreachable(f"cannot reach {where}: {_exc_text(exc)}") from None
        transport = smtp.transport
        if not isinstance(transport, asyncio.Transport) or transport.is_closing():
            smtp.close()
            raise ServerUnreachable(f"{where} closed the connection after the greeting")
        # From here on the socket is read by _Wire (see there); aiosmtplib's object is dropped.
        self.extensions = frozenset(smtp.esmtp_extensions)
        wire = _Wire(transport)
        transport.set_protocol(wire)
        self.wire = wire
        self.sent_on_this = 0
        return wire

    async def transact(self, message: _Outgoing) -> Outcome:
        """One message. On a PIPELINING session `release` is called as soon as the payload is
        written: the next transaction's envelope may then go out while this one waits for the
        server's verdict (RFC 2920 lets message content open a command group), so each
        message costs one round trip instead of two."""
        # A session that has carried a message, or has one in flight ahead of this one, may be
        # dropped under us for reasons that are not this message's (idle timeout, the message
        # ahead timed out): then one more try on a fresh session is safe and usually works.
        reused = self.connected and (self.sent_on_this > 0 or not self.wire_idle)
        self.busy += 1
        try:
            while True:
                outcome = await self._transact_once(message)
                # Nothing of this message went out when the session closed (421, possibly
                # announced unasked after the message ahead) or broke before the payload: one
                # more try on a fresh connection is safe.
                again = outcome.kind is OutcomeKind.TRANSIENT and (
                    outcome.code == 421
                    or (outcome.code is None and outcome.reply.startswith("connection lost before"))
                )
                if not (reused and again):
                    return outcome
                reused = False
        finally:
            self.busy -= 1

    def _envelope(
        self, *, mail_from: str, rcpt_to: Sequence[str], data: bytes, smtputf8: bool
    ) -> list[bytes] | str:
        """MAIL, the RCPTs and DATA as command lines, or why they cannot be sent."""
        options = ""
        if smtputf8:
            if "smtputf8" not in self.extensions:
                return "the message needs SMTPUTF8, which the server does not offer"
            options += " SMTPUTF8"
        if not data.isascii() and "8bitmime" in self.extensions:
            options += " BODY=8BITMIME"
        encoding = "utf-8" if smtputf8 else "ascii"
        try:
            lines = [f"MAIL FROM:{_quoted(mail_from)}{options}\r\n".encode(encoding)]
            lines.extend(f"RCPT TO:{_quoted(r)}\r\n".encode(encoding) for r in rcpt_to)
        except (UnicodeEncodeError, ValueError) as exc:
            return f"cannot put the envelope on the wire: {exc}"
        lines.append(b"DATA\r\n")
        return lines

    async def _transact_once(self, message: _Outgoing) -> Outcome:
        via = self.settings.via
        # Connected first: the envelope depends on what the server offers.
        wire = await self.ensure_connected()
        envelope = self._envelope(
            mail_from=message.mail_from,
            rcpt_to=message.rcpt_to,
            data=message.data,
            smtputf8=message.smtputf8,
        )
        if isinstance(envelope, str):
            return Outcome(kind=OutcomeKind.PERMANENT, code=None, reply=envelope, via=via)
        previous, turn = wire.take_turn()
        finished = False
        try:
            outcome = await self._exchange(wire, envelope, previous=previous, message=message)
            finished = True
            return outcome
        finally:
            if not finished:
                # Cancelled mid-exchange: replies of ours may still come, and the next
                # transaction would take them for its own.
                wire.abort()
            if not turn.done():
                turn.set_result(None)

    async def _exchange(
        self,
        wire: _Wire,
        envelope: list[bytes],
        *,
        previous: asyncio.Future[None] | None,
        message: _Outgoing,
    ) -> Outcome:
        via = self.settings.via
        timeout = self.settings.timeout
        pipelined = self.pipelining
        stages = ["MAIL", *(["RCPT"] * len(message.rcpt_to)), "DATA"]
        stage = "MAIL"
        refusal: _Reply | None = None
        try:
            if pipelined:
                # RFC 2920: the envelope and DATA in one write, their replies read in order.
                wire.write(b"".join(envelope))
            if previous is not None:
                # The transaction before ours on this session reads its verdict first. It
                # never fails: it always ends its turn, however it ends (within its own
                # deadline, so ours starts after it).
                await previous
            deadline = asyncio.get_running_loop().time() + timeout * TRANSACTION_TIMEOUTS
            for index, line in enumerate(envelope):
                stage = stages[index]
                if not pipelined:
                    wire.write(line)
                reply = await wire.reply(timeout, deadline=deadline)
                if reply.code == 421:
                    wire.abort()
                    first = refusal or reply
                    return _classify_code(first.code, first.text, via)
                wanted = 354 if stage == "DATA" else None
                ok = reply.code == wanted if wanted else 200 <= reply.code < 300
                if ok or refusal is not None:
                    if stage == "DATA" and reply.code == 354 and refusal is not None:
                        # The server wants a payload for an envelope it refused in part: only
                        # dropping the connection ends that without delivering anything.
                        wire.abort()
                        return _classify_code(refusal.code, refusal.text, via)
                    continue
                refusal = reply
                if refusal.code < 400:
                    # A success where a refusal or 354 belongs (e.g. DATA answered 250): the
                    # server is out of step, and nothing of this message was delivered.
                    refusal = _Reply(451, f"unexpected reply to {stage}: {reply.code} {reply.text}")
                if not pipelined:
                    break
            if refusal is not None:
                await self._reset(wire)
                return _classify_code(refusal.code, refusal.text, via)
            # From here on the server may have the whole message: only its reply says whether
            # it took it, so any failure to read that reply leaves the outcome uncertain.
            stage = "payload"
            if message.on_payload is not None:
                message.on_payload()
            if pipelined:
                # Released first, so the next transaction's envelope joins the payload.
                message.release()
                wire.write_soon(_stuffed(message.data))
            else:
                wire.write(_stuffed(message.data))
            reply = await wire.reply(timeout, deadline=deadline)
        except (_WireError, OSError, TimeoutError) as exc:
            wire.abort()
            if stage == "payload":
                return Outcome(
                    kind=OutcomeKind.UNCERTAIN,
                    code=None,
                    reply=f"no reply after the message was sent: {_exc_text(exc)}",
                    via=via,
                )
            if refusal is not None:
                # The refusal is definite; only the replies after it were lost.
                return _classify_code(refusal.code, refusal.text, via)
            return Outcome(
                kind=OutcomeKind.TRANSIENT,
                code=None,
                reply=f"connection lost before {stage}: {_exc_text(exc)}",
                via=via,
            )
        self.sent_on_this += 1
        if reply.code == 421:
            wire.abort()
        return _classify_code(reply.code, reply.text, via)

    async def _reset(self, wire: _Wire) -> None:
        try:
            wire.write(b"RSET\r\n")
            reply = await wire.reply(self.settings.timeout)
        except (_WireError, OSError, TimeoutError):
            wire.abort()
            return
        if reply.code != 250:
            wire.abort()

    async def close(self) -> None:
        wire, self.wire = self.wire, None
        if wire is None or not wire.open:
            return
        if self.busy:
            wire.abort()
            return
        try:
            wire.write(b"QUIT\r\n")
            await wire.reply(2.0)
        except (_WireError, OSError, TimeoutError):
            pass
        wire.transport.close()


def _quoted(address: str) -> str:
    """`<addr>` for MAIL/RCPT, refusing anything that could smuggle a second command in."""
    if _PLAIN_ADDRESS.match(address):
        # The builder's envelope addresses are bare addr-specs: no need for the full parser.
        return f"<{address}>"
    if _CONTROL.search(address):
        raise ValueError(f"the address {address!r} contains a control character")
    parsed = email.utils.parseaddr(address)[1] or address.strip()
    return f"<{parsed}>"


_HOSTNAME: str | None = None


def _local_hostname() -> str:
    # socket.getfqdn() can take seconds on a machine with slow DNS: once per process is enough.
    global _HOSTNAME
    if _HOSTNAME is None:
        name = socket.gethostname() or "localhost"
        _HOSTNAME = name if name.isascii() else "localhost"
    return _HOSTNAME


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _ssl_text(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate refused ({exc.verify_message})"
    return exc.reason or str(exc)


def _exc_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return _one_line(text)


def _one_line(text: str) -> str:
    return " ".join(text.split())
