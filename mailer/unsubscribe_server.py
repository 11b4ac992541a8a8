"""The unsubscribe endpoint behind `[campaign] unsubscribe_url`: `mailer unsubscribe serve`.

A small ASGI app (Starlette) served by uvicorn; both parse HTTP, this module only answers:

- `POST <path>?t=TOKEN` — RFC 8058 one-click: what a mail program sends when the reader presses
  its unsubscribe button (body `List-Unsubscribe=One-Click`), and what the confirmation page's
  button sends. Suppresses the address with an `unsubscribed` event; a repeat changes nothing.
- `GET <path>?t=TOKEN` — a confirmation page in the letter's language, with that button. A GET
  never unsubscribes: link scanners and previews fetch every URL in a mail.

The token is read from the query (`t`, `token`, or the name the configured URL puts `{token}`
under) or else from the last segment of the path, so `https://example.org/u/{token}` works as
well as `https://example.org/unsubscribe?t={token}`, behind any path prefix of a reverse proxy
(which terminates https: see the README).

A malformed, forged, tampered or foreign token gets a 4xx page; a database that cannot be
reached a 503 page; never a traceback. Keys are read for every request, so a rotated secret
is used at once. Writes go through `unsubscribe.unsubscribe` (the outbox).
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import uvicorn
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from mailer import audience, db, unsubscribe, workspace_secret
from mailer.clock import Clock, utcnow
from mailer.config import Workspace
from mailer.errors import DatabaseError, InvalidValueError, MailerError
from mailer.unsubscribe import BadToken, Page, Target

DEFAULT_LISTEN = "127.0.0.1:8025"
# The token is a URL's secret: no cache keeps it, no referrer carries it, no page runs a script.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
}
VIA = "web"


def token_parameter(workspace: Workspace) -> str | None:
    """The query parameter the configured unsubscribe URL puts `{token}` under, if any."""
    configured = workspace.setting("campaign", "unsubscribe_url")
    if not isinstance(configured, str):
        return None
    for name, value in parse_qsl(urlsplit(configured).query, keep_blank_values=True):
        if value == "{token}":
            return name
    return None


def token_from(request: Request, parameter: str | None) -> str | None:
    for name in (parameter, "t", "token"):
        if name and request.query_params.get(name):
            return request.query_params[name]
    last = request.url.path.rstrip("/").rpartition("/")[2]
    return last or None


@dataclass(frozen=True)
class _Answer:
    page: Page
    status: int
    target: Target | None = None


def create_app(*, workspace: Workspace, engine: Engine, clock: Clock = utcnow) -> Starlette:
    """The endpoint for one workspace's database."""
    factory = db.session_factory(engine)
    parameter = token_parameter(workspace)

    def answer(token: str | None, *, post: bool) -> _Answer:
        if not token:
            return _Answer(Page.INVALID, 400)
        try:
            keys = workspace_secret.keyring(workspace, engine=engine)
            with db.transaction(factory) as session:
                target = unsubscribe.resolve_token(session, keys, token)
                if post:
                    unsubscribe.unsubscribe(
                        session,
                        target,
                        at=clock(),
                        source="unsubscribe link (one-click POST, RFC 8058)",
                        via=VIA,
                    )
                    return _Answer(Page.DONE, 200, target)
                if audience.suppression_for(session, target.email) is not None:
                    return _Answer(Page.DONE, 200, target)
                return _Answer(Page.ASK, 200, target)
        except BadToken as exc:
            return _Answer(Page.INVALID, exc.problem.value)
        except (SQLAlchemyError, DatabaseError):
            return _Answer(Page.UNAVAILABLE, 503)

    async def endpoint(request: Request) -> Response:
        token = token_from(request, parameter)
        result = await run_in_threadpool(answer, token, post=request.method == "POST")
        target = result.target
        language = unsubscribe.page_language(
            target.language if target else None, request.headers.get("accept-language")
        )
        page = unsubscribe.format_page(
            result.page, language=language, email=target.email if target else None
        )
        headers = dict(SECURITY_HEADERS)
        if result.status == 503:
            headers["Retry-After"] = "60"
        return HTMLResponse(page, status_code=result.status, headers=headers)

    routes = [
        Route("/", endpoint, methods=["GET", "POST"]),
        Route("/{path:path}", endpoint, methods=["GET", "POST"]),
    ]
    return Starlette(routes=routes)


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or `PORT` (on 127.0.0.1)."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise InvalidValueError(f"--listen {value!r}: give HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, port


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        raise MailerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def server_for(app: Starlette) -> uvicorn.Server:
    # No access log: every line would carry a token (and so an address's right to unsubscribe).
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config)


def serve(
    *,
    workspace: Workspace,
    engine: Engine,
    listen: str,
    on_ready: Callable[[str], None],
) -> None:
    """Run the endpoint until interrupted (Ctrl-C or SIGTERM stop it cleanly)."""
    host, port = parse_listen(listen)
    # The keys exist before the first request (a new workspace's are made here).
    workspace_secret.ensure(workspace, engine=engine)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    on_ready(f"http://{shown}:{bound}/")
    server = server_for(create_app(workspace=workspace, engine=engine))
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])
        return
    # uvicorn stops gracefully on SIGTERM, then hands the signal to the handler it found: this
    # one lets `serve` return, so a service manager's stop is a clean exit. Ctrl-C stays an
    # interruption (exit 130).
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
