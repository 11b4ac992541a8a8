"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, a free port, with fault injection.

Every envelope that reaches DATA is recorded (with its arrival time), so tests assert at the
server what was delivered. Faults are plain callables the test sets:

    server.on_rcpt = lambda address: "451 4.7.1 try later" if address == x else None
    server.on_data = lambda envelope: "550 5.7.1 no"     # or DROP, or Stall(seconds)
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

DROP = "DROP"
# ScriptedSmtpServer.on_rcpt: never answer again.
STALL = "STALL"


@dataclass(frozen=True)
class Stall:
    """Hold the reply to the DATA payload for this long (a client timeout makes it uncertain)."""

    seconds: float


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    at: float
    # The server closed the connection instead of answering: the client cannot know.
    dropped: bool = False
    mail_options: tuple[str, ...] = ()

    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


DataAction = str | Stall | None


class _Handler:
    def __init__(self, owner: SmtpTestServer) -> None:
        self.owner = owner

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.owner.pipelining:
            # aiosmtpd reads commands from a stream, so a pipelined group is handled in order;
            # it only needs to say so (RFC 2920).
            responses.insert(-1, "250-PIPELINING")
        with self.owner.lock:
            self.owner.ehlo_replies.append(list(responses))
        return responses

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        rule = self.owner.on_rcpt
        reply = rule(address) if rule is not None else None
        if reply is not None:
            if reply == DROP:
                server.transport.close()
                return "421 4.3.0 closing"
            if reply.startswith("421"):
                # A 421 means "closing": say it, then go, as a real server would.
                asyncio.get_running_loop().call_later(0.01, server.transport.close)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        rule = self.owner.on_data
        action: DataAction = rule(envelope) if rule is not None else None
        if isinstance(action, Awaitable):  # pragma: no cover - async rules are allowed too
            action = await action
        data: bytes = envelope.original_content or envelope.content
        record = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=data,
            at=time.monotonic(),
            dropped=action == DROP,
            mail_options=tuple(envelope.mail_options),
        )
        with self.owner.lock:
            # Every payload that came in whole, whatever the answer (if any) will be.
            self.owner.arrived.append(record)
        if self.owner.delay:
            await asyncio.sleep(self.owner.delay)
        if isinstance(action, Stall):
            with self.owner.lock:
                self.owner.stalled.append(record)
            await asyncio.sleep(action.seconds)
            return "250 2.0.0 accepted late"
        with self.owner.lock:
            self.owner.received.append(record)
        if action == DROP:
            server.transport.close()
            return "250 never seen"
        if isinstance(action, str):
            return action
        return f"250 2.0.0 Ok: queued as {len(self.owner.received)}"


class _Controller(Controller):  # type: ignore[misc]
    def factory(self) -> Any:
        with warnings.catch_warnings():
            # AUTH over plaintext is what the wrong-password test wants on a loopback server.
            warnings.simplefilter("ignore", UserWarning)
            return super().factory()

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        creating = super()._create_server()

        async def create() -> asyncio.AbstractServer:
            server: asyncio.AbstractServer = await creating
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            return server

        return create()


class SmtpTestServer:
    """`with SmtpTestServer() as server:` a server on 127.0.0.1:<free port>, stopped on exit."""

    def __init__(
        self,
        *,
        tls: str = "none",
        server_context: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None,
        delay: float = 0.0,
        pipelining: bool = False,
        smtputf8: bool = True,
    ) -> None:
        assert tls in ("none", "implicit", "starttls")
        self.received: list[Received] = []
        self.stalled: list[Received] = []
        # Every payload the server took in whole, answered or not (a client killed while the
        # server was still thinking never got the answer, but the server has the letter).
        self.arrived: list[Received] = []
        self.lock = threading.Lock()
        self.on_rcpt: Callable[[str], str | None] | None = None
        self.on_data: Callable[[Any], DataAction] | None = None
        self.delay = delay
        self.pipelining = pipelining
        self.ehlo_replies: list[list[str]] = []
        self.auth_attempts = 0
        kwargs: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": 0,
            "ready_timeout": 10,
            # aiosmtpd's Controller offers SMTPUTF8 (RFC 6531) unless told not to; many real
            # servers do not, which `smtputf8=False` plays.
            "enable_SMTPUTF8": smtputf8,
        }
        if tls == "implicit":
            kwargs["ssl_context"] = server_context
        elif tls == "starttls":
            kwargs["tls_context"] = server_context
            kwargs["require_starttls"] = True
        if auth is not None:
            kwargs["authenticator"] = self._authenticator(auth)
            kwargs["auth_require_tls"] = tls != "none"
            kwargs["auth_required"] = True
        self._controller = _Controller(_Handler(self), **kwargs)

    def _authenticator(self, expected: tuple[str, str]) -> Callable[..., AuthResult]:
        def check(
            server: Any, session: Any, envelope: Any, mechanism: str, data: Any
        ) -> AuthResult:
            self.auth_attempts += 1
            if isinstance(data, LoginPassword):
                given = (data.login.decode(), data.password.decode())
                if given == expected:
                    return AuthResult(success=True)
            return AuthResult(success=False, handled=False)

        return check

    @property
    def port(self) -> int:
        port: int = self._controller.port
        return port

    def url(self, scheme: str = "smtp+plain", *, user: str | None = None) -> str:
        who = f"{user}@" if user else ""
        return f"{scheme}://{who}127.0.0.1:{self.port}"

    def start(self) -> SmtpTestServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SmtpTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----- what arrived

    def accepted(self) -> list[Received]:
        with self.lock:
            return [r for r in self.received if not r.dropped]

    def recipients(self) -> list[str]:
        """Every envelope recipient the server took a payload for (dropped ones included)."""
        with self.lock:
            return [rcpt for r in self.received for rcpt in r.rcpt_tos]

    def arrived_recipients(self) -> list[str]:
        """Every envelope recipient whose payload reached the server, answered or not."""
        with self.lock:
            return [rcpt for r in self.arrived for rcpt in r.rcpt_tos]

    def wait_for(self, count: int, *, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)


def write_ca(ca: Any, directory: Path) -> Path:
    path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(
    ca: Any, *, names: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> ssl.SSLContext:
    cert = ca.issue_cert(*names)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


# --------------------------------------------------------------------------- campaign data

PLAIN_TEMPLATE = """Subject: An appeal to {{ contact.name }}

Dear {{ contact.name }},

the mayors of Ukraine ask you to stand with them.
.a line that starts with a dot must arrive intact
With respect,
the campaign office
"""


def seed_campaign(
    engine: Any,
    workspace: Path,
    *,
    count: int,
    slug: str = "appeal",
    domain: str = "example.org",
    start: int = 0,
    create: bool = True,
) -> list[str]:
    """`count` fictional contacts and a campaign addressing all of them; returns the addresses."""
    import datetime as dt

    from sqlalchemy import insert
    from sqlalchemy.orm import Session

    from mailer import campaigns
    from mailer.audience import Audience
    from mailer.models import Contact

    folder = workspace / "templates" / "plain"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "en.txt.j2").write_text(PLAIN_TEMPLATE, encoding="utf-8")
    now = dt.datetime.now(dt.UTC)
    emails = [f"mayor{i:06d}@{domain}" for i in range(start, start + count)]
    rows = [
        {
            "email": e,
            "name": f"Mayor {i}",
            "language": "en",
            "attributes": {},
            "tags": [],
            "created_at": now,
            "updated_at": now,
        }
        for i, e in enumerate(emails, start)
    ]
    with engine.begin() as conn:
        for first in range(0, len(rows), 5000):
            conn.execute(insert(Contact), rows[first : first + 5000])
    if create:
        with Session(engine) as session, session.begin():
            campaigns.create_campaign(
                session,
                slug=slug,
                template="plain",
                from_address="Campaign Office <office@example.org>",
                reply_to=None,
                audience=Audience(),
                title="Test appeal",
                default_language="en",
                templates_dir=workspace / "templates",
            )
    return emails


# --------------------------------------------------------------------------- a scripted server


class ScriptedSmtpServer:
    """A small SMTP server that offers PIPELINING and checks the client really pipelines.

    aiosmtpd answers each command as it reads it, so it cannot tell a pipelining client from a
    step-by-step one; this one can hold every reply of a group until DATA arrives
    (`hold_until_data`), answer DATA with 354 even after refusing every recipient
    (`data_after_refusal`, as RFC 2920 warns a server may), dribble its replies out one byte
    per write (`dribble`) to check the client reassembles them, and say something unasked
    after each message (`stray`), and hold each message's verdict until the client's next
    command (`hold_verdict`, to see a client overlap transactions). It records every command
    line and every payload it takes.
    """

    def __init__(
        self,
        *,
        hold_until_data: bool = True,
        data_after_refusal: str = "554 5.5.1 no valid recipients",
        dribble: bool = False,
        stray: str | None = None,
        hold_verdict: bool = False,
        data_reply: str = "354 end with <CRLF>.<CRLF>",
        drip: tuple[float, int] | None = None,
        slow_replies: float = 0.0,
    ) -> None:
        # (interval, lines): the verdict on a payload comes as up to `lines` continuation lines
        # `250-` one every `interval` seconds before the final line; `dripped` counts those sent
        # (a client that gives up stops the drip by hanging up).
        self.drip = drip
        self.dripped = 0
        # Every reply of the session waits this long first: each reply on its own is in time.
        self.slow_replies = slow_replies
        # The answer to DATA when there are recipients (anything but 354 is a broken server).
        self.data_reply = data_reply
        self.hold_until_data = hold_until_data
        # Hold a message's final reply until the next command arrives (or half a second): a
        # client that overlaps transactions has the next envelope out by then.
        self.hold_verdict = hold_verdict
        # Final replies that went out in one write with the next message's replies.
        self.verdicts_overlapped = 0
        # A line sent, unasked, right after each final reply (some servers announce a shutdown).
        self.stray = stray
        self.data_after_refusal = data_after_refusal
        self.dribble = dribble
        self.on_rcpt: Callable[[str], str | None] | None = None
        self.on_data: Callable[[tuple[str, ...]], str | None] | None = None
        self.commands: list[str] = []
        self.received: list[Received] = []
        self.connections = 0
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def url(self) -> str:
        return f"smtp+plain://127.0.0.1:{self.port}"

    def __enter__(self) -> ScriptedSmtpServer:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._session, "127.0.0.1", 0), self._loop
        )
        self._server = started.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def recipients(self) -> list[str]:
        with self.lock:
            return [rcpt for r in self.received for rcpt in r.rcpt_tos]

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.connections += 1
        held: list[str] = []
        verdict_held = False
        mail_from = ""
        rcpts: list[str] = []
        refused_all = False

        async def reply(*texts: str, flush: bool = True) -> None:
            nonlocal verdict_held
            held.extend(texts)
            if not flush:
                return
            if verdict_held and len(held) > 1:
                with self.lock:
                    self.verdicts_overlapped += 1
            verdict_held = False
            if self.slow_replies:
                await asyncio.sleep(self.slow_replies)
            out = "".join(f"{t}\r\n" for t in held).encode()
            held.clear()
            if self.dribble:
                for i in range(len(out)):
                    writer.write(out[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0)
            else:
                writer.write(out)
                await writer.drain()

        try:
            await reply("220 scripted ESMTP")
            while True:
                if verdict_held:
                    try:
                        line = await asyncio.wait_for(reader.readline(), 0.5)
                    except TimeoutError:
                        await reply()
                        continue
                else:
                    line = await reader.readline()
                if not line:
                    break
                command = line.decode().rstrip("\r\n")
                with self.lock:
                    self.commands.append(command)
                verb = command[:4].upper()
                hold = self.hold_until_data
                if verb == "EHLO":
                    await reply("250-scripted", "250-PIPELINING", "250-8BITMIME", "250 SMTPUTF8")
                elif verb == "MAIL":
                    mail_from, rcpts, refused_all = command[10:].split(" ")[0].strip("<>"), [], True
                    await reply("250 2.1.0 sender ok", flush=not hold)
                elif verb == "RCPT":
                    address = command[8:].strip("<>")
                    answer = self.on_rcpt(address) if self.on_rcpt is not None else None
                    if answer == STALL:
                        await asyncio.sleep(3600)
                    if answer is None:
                        rcpts.append(address)
                        refused_all = False
                        answer = "250 2.1.5 recipient ok"
                    await reply(answer, flush=not hold)
                elif verb == "DATA":
                    if refused_all or not rcpts:
                        await reply(self.data_after_refusal)
                        if not self.data_after_refusal.startswith("354"):
                            continue
                    else:
                        await reply(self.data_reply)
                    payload = bytearray()
                    while (part := await reader.readline()) not in (b".\r\n", b""):
                        payload += part[1:] if part.startswith(b".") else part
                    if not part:
                        break
                    if not rcpts:
                        await reply("554 5.5.1 nobody to deliver to")
                        continue
                    answer = self.on_data(tuple(rcpts)) if self.on_data is not None else None
                    if answer == DROP:
                        with self.lock:
                            self.received.append(
                                Received(
                                    mail_from,
                                    tuple(rcpts),
                                    bytes(payload),
                                    time.monotonic(),
                                    dropped=True,
                                )
                            )
                        break
                    with self.lock:
                        self.received.append(
                            Received(mail_from, tuple(rcpts), bytes(payload), time.monotonic())
                        )
                    if self.drip is not None:
                        interval, lines = self.drip
                        for _ in range(lines):
                            writer.write(b"250-still thinking\r\n")
                            await writer.drain()
                            with self.lock:
                                self.dripped += 1
                            await asyncio.sleep(interval)
                    await reply(
                        answer or "250 2.0.0 queued",
                        *([self.stray] if self.stray else []),
                        flush=not self.hold_verdict,
                    )
                    verdict_held = self.hold_verdict
                elif verb == "RSET":
                    rcpts, refused_all = [], False
                    await reply("250 2.0.0 reset")
                elif verb == "QUIT":
                    await reply("221 2.0.0 bye")
                    break
                else:
                    await reply("502 5.5.2 not implemented")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
