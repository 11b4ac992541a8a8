"""A local SMTP server that stores what it receives in a Maildir: for `mailer demo` and tests.

It listens on the loopback interface only, on a free port the system picks, and delivers one
copy per envelope recipient (as a real mail server would), each with `Return-Path` and
`Delivered-To` lines on top so the envelope can be checked afterwards.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ipaddress
import mailbox
import threading
from collections.abc import Awaitable
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller

from mailer.errors import MailerError


class DevServerError(MailerError):
    """The embedded SMTP server could not start."""


class _MaildirHandler:
    def __init__(self, maildir: mailbox.Maildir) -> None:
        self.maildir = maildir
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content or envelope.content
        keys = []
        for rcpt in envelope.rcpt_tos:
            trace = f"Return-Path: <{envelope.mail_from}>\r\nDelivered-To: {rcpt}\r\n"
            with self.lock:
                keys.append(self.maildir.add(trace.encode("utf-8") + content))
        return f"250 2.0.0 Ok: stored as {keys[0] if keys else 'nothing'}"


class _FreePortController(Controller):
    """aiosmtpd's Controller, but bound to port 0 so the system picks a free port."""

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        creating = super()._create_server()

        async def create() -> asyncio.AbstractServer:
            server: asyncio.AbstractServer = await creating
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1]
            return server

        return create()


class DevServer:
    """`with DevServer(maildir=path) as server: ... server.url ...`"""

    def __init__(self, *, maildir: Path, host: str = "127.0.0.1") -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise DevServerError(f"the embedded SMTP server listens on loopback only, not {host}")
        self.host = host
        self.maildir_path = Path(maildir)
        self.maildir = mailbox.Maildir(self.maildir_path, create=True)
        self._controller: _FreePortController | None = None

    @property
    def port(self) -> int:
        if self._controller is None:
            raise DevServerError("the embedded SMTP server is not running")
        port: int = self._controller.port
        return port

    @property
    def url(self) -> str:
        """The `--smtp` URL that reaches this server (plaintext: it never leaves this machine)."""
        return f"smtp+plain://{self.host}:{self.port}"

    def start(self) -> DevServer:
        controller = _FreePortController(
            _MaildirHandler(self.maildir),
            hostname=self.host,
            port=0,
            enable_SMTPUTF8=True,
            ready_timeout=10.0,
        )
        try:
            controller.start()
        except (OSError, TimeoutError, RuntimeError) as exc:
            raise DevServerError(
                f"cannot start the embedded SMTP server on {self.host}: {exc}"
            ) from exc
        self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def count(self) -> int:
        return len(self.maildir.keys())

    def messages(self) -> list[EmailMessage]:
        """Every stored message, parsed (in no particular order)."""
        out = []
        for key in self.maildir.iterkeys():
            raw = self.maildir.get_bytes(key)
            out.append(email.message_from_bytes(raw, policy=email.policy.default))
        return [m for m in out if isinstance(m, EmailMessage)]

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
