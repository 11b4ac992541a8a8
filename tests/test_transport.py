"""The transports against real aiosmtpd servers: outcomes, TLS, credentials, rate limiting."""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from smtp_server import DROP, SmtpTestServer, Stall, server_context, write_ca

from mailer.errors import (
    AuthenticationRefused,
    InvalidValueError,
    ServerUnreachable,
    TlsFailure,
    TransportError,
)
from mailer.smtp import SmtpPool, SmtpSettings, parse_smtp_url, resolve_password
from mailer.transport import (
    DryRun,
    MaildirOutbox,
    Outcome,
    OutcomeKind,
    TokenBucket,
    parse_rate,
)

MESSAGE = (
    b"From: office@example.org\r\nTo: mayor@example.org\r\nSubject: hello\r\n\r\n"
    b"first line\r\n.starts with a dot\r\n..two dots\r\nlast line\r\n"
)


@pytest.fixture(params=[False, True], ids=["step-by-step", "pipelined"])
def server(request: pytest.FixtureRequest) -> Iterator[SmtpTestServer]:
    # Every outcome must come out the same whether the server offers PIPELINING or not.
    with SmtpTestServer(pipelining=request.param) as srv:
        yield srv


def send_all(pool: SmtpPool, rcpts: list[str], data: bytes = MESSAGE) -> list[Outcome]:
    async def go() -> list[Outcome]:
        try:
            return [
                await pool.send(mail_from="office@example.org", rcpt_to=[r], data=data)
                for r in rcpts
            ]
        finally:
            await pool.close()

    return asyncio.run(go())


def plain(server: SmtpTestServer, *, timeout: float = 10.0) -> SmtpPool:
    return SmtpPool(parse_smtp_url(server.url(), timeout=timeout), size=2)


# --------------------------------------------------------------------------- settings


def test_urls_parse_with_scheme_defaults() -> None:
    s = parse_smtp_url("smtp://office%40example.org@mail.example.org")
    assert (s.scheme, s.host, s.port, s.username) == (
        "smtp",
        "mail.example.org",
        587,
        "office@example.org",
    )
    assert parse_smtp_url("smtps://u@mail.example.org").port == 465
    assert parse_smtp_url("smtp+plain://127.0.0.1:2525").port == 2525
    assert parse_smtp_url("smtp+plain://relay.test").port == 25


@pytest.mark.parametrize("url", ["http://mail.example.org", "mail.example.org", "smtp://"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidValueError):
        parse_smtp_url(url)


@pytest.mark.parametrize(
    "url", ["smtp+plain://office@relay.test", "smtp+plain://office@192.0.2.10:2525"]
)
def test_a_login_in_clear_to_another_machine_is_refused(url: str) -> None:
    with pytest.raises(InvalidValueError) as info:
        parse_smtp_url(url)
    assert "in clear" in str(info.value)
    assert "--allow-plaintext-auth" in str(info.value)
    # Asked for explicitly, it is allowed, and the settings say so wherever they are shown.
    allowed = parse_smtp_url(url, allow_plaintext_auth=True)
    assert allowed.plaintext_auth
    assert "WITHOUT encryption" in allowed.display


@pytest.mark.parametrize(
    "url",
    [
        "smtp+plain://office@127.0.0.1:1025",
        "smtp+plain://office@localhost:1025",
        "smtp+plain://office@[::1]:1025",
        "smtp+plain://relay.test",  # no login: nothing secret travels
        "smtp://office@mail.example.org",  # STARTTLS is required before the login
    ],
)
def test_logins_that_stay_on_this_machine_or_go_over_tls_need_no_flag(url: str) -> None:
    settings = parse_smtp_url(url)
    assert not settings.plaintext_auth
    assert "WITHOUT" not in settings.display


def test_a_password_in_the_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(InvalidValueError) as info:
        parse_smtp_url("smtp://u:hunter2secret@mail.example.org")
    assert "hunter2secret" not in str(info.value)
    assert "MAILER_SMTP_PASSWORD" in str(info.value)


def test_the_password_never_shows_in_repr() -> None:
    s = parse_smtp_url("smtp://u@mail.example.org").with_password("hunter2secret")
    assert "hunter2secret" not in repr(s)
    assert "hunter2secret" not in s.display


def test_password_sources_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse_smtp_url("smtp://u@mail.example.org")
    command = f"{sys.executable} -c \"print('from-command')\""
    assert resolve_password(settings=s, password_command=command) == "from-command"
    monkeypatch.setenv("MAILER_SMTP_PASSWORD", "from-env")
    assert resolve_password(settings=s, password_command=command) == "from-env"
    monkeypatch.delenv("MAILER_SMTP_PASSWORD")
    assert resolve_password(settings=s, password_command=None, prompt=lambda _: "typed") == "typed"
    with pytest.raises(TransportError, match="MAILER_SMTP_PASSWORD"):
        resolve_password(settings=s, password_command=None)
    anonymous = parse_smtp_url("smtp+plain://relay.test")
    assert resolve_password(settings=anonymous, password_command=command) is None


def test_a_failing_password_command_never_shows_its_output() -> None:
    s = parse_smtp_url("smtp://u@mail.example.org")
    command = f"{sys.executable} -c \"print('leaked-secret'); raise SystemExit(2)\""
    with pytest.raises(TransportError) as info:
        resolve_password(settings=s, password_command=command)
    assert "leaked-secret" not in str(info.value)
    assert "status 2" in str(info.value)


@pytest.mark.parametrize(
    ("text", "per_second"), [("5/s", 5.0), ("300/min", 5.0), ("1800/h", 0.5), ("2 / sec", 2.0)]
)
def test_rates_parse(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["5", "fast", "0/s", "5/day"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(InvalidValueError):
        parse_rate(text)


# --------------------------------------------------------------------------- outcomes


def test_bytes_arrive_exactly_as_built_over_a_reused_connection(server: SmtpTestServer) -> None:
    pool = plain(server)
    outcomes = send_all(pool, [f"mayor{i}@example.org" for i in range(5)])
    assert [o.kind for o in outcomes] == [OutcomeKind.ACCEPTED] * 5
    assert outcomes[0].code == 250 and outcomes[0].via == f"127.0.0.1:{server.port}"
    got = server.accepted()
    assert [r.rcpt_tos for r in got] == [(f"mayor{i}@example.org",) for i in range(5)]
    # The server un-stuffs dots: what it stored is byte for byte what was built.
    assert all(r.data == MESSAGE for r in got)
    assert got[0].mail_from == "office@example.org"


def test_4xx_is_transient_and_5xx_permanent_per_recipient(server: SmtpTestServer) -> None:
    replies = {"later@example.org": "451 4.7.1 greylisted", "nobody@example.org": "550 5.1.1 no"}
    server.on_rcpt = replies.get
    outcomes = send_all(
        plain(server), ["later@example.org", "nobody@example.org", "fine@example.org"]
    )
    assert [(o.kind, o.code) for o in outcomes] == [
        (OutcomeKind.TRANSIENT, 451),
        (OutcomeKind.PERMANENT, 550),
        (OutcomeKind.ACCEPTED, 250),
    ]
    assert outcomes[1].reply == "5.1.1 no"
    assert server.recipients() == ["fine@example.org"]


def test_a_5xx_reply_to_the_payload_is_definite(server: SmtpTestServer) -> None:
    server.on_data = lambda env: "554 5.7.1 content refused"
    (outcome,) = send_all(plain(server), ["mayor@example.org"])
    assert (outcome.kind, outcome.code) == (OutcomeKind.PERMANENT, 554)


def test_421_closes_and_the_next_message_reconnects(server: SmtpTestServer) -> None:
    server.on_rcpt = lambda a: "421 4.3.2 shutting down" if a == "first@example.org" else None
    outcomes = send_all(plain(server), ["first@example.org", "second@example.org"])
    assert (outcomes[0].kind, outcomes[0].code) == (OutcomeKind.TRANSIENT, 421)
    assert outcomes[1].kind is OutcomeKind.ACCEPTED
    assert server.recipients() == ["second@example.org"]


def test_a_drop_before_data_is_transient(server: SmtpTestServer) -> None:
    server.on_rcpt = lambda a: DROP if a == "first@example.org" else None
    outcomes = send_all(plain(server), ["first@example.org", "second@example.org"])
    assert outcomes[0].kind is OutcomeKind.TRANSIENT and outcomes[0].code is None
    assert outcomes[1].kind is OutcomeKind.ACCEPTED


def test_a_drop_after_the_payload_is_uncertain(server: SmtpTestServer) -> None:
    server.on_data = lambda env: DROP if env.rcpt_tos == ["first@example.org"] else None
    outcomes = send_all(plain(server), ["first@example.org", "second@example.org"])
    assert outcomes[0].kind is OutcomeKind.UNCERTAIN
    assert outcomes[1].kind is OutcomeKind.ACCEPTED
    assert server.recipients() == ["first@example.org", "second@example.org"]


def test_a_stall_after_the_payload_is_uncertain(server: SmtpTestServer) -> None:
    server.on_data = lambda env: Stall(3.0)
    (outcome,) = send_all(plain(server, timeout=0.3), ["mayor@example.org"])
    assert outcome.kind is OutcomeKind.UNCERTAIN
    assert "no reply after the message was sent" in outcome.reply
    assert [r.rcpt_tos for r in server.stalled] == [("mayor@example.org",)]


def test_smtputf8_is_asked_for_when_needed(server: SmtpTestServer) -> None:
    data = "From: office@example.org\r\nTo: bürgermeister@example.org\r\n\r\nhi\r\n".encode()

    async def go() -> Outcome:
        pool = plain(server)
        try:
            return await pool.send(
                mail_from="office@example.org",
                rcpt_to=["bürgermeister@example.org"],
                data=data,
                smtputf8=True,
            )
        finally:
            await pool.close()

    assert asyncio.run(go()).kind is OutcomeKind.ACCEPTED
    (got,) = server.accepted()
    assert "SMTPUTF8" in got.mail_options
    assert got.rcpt_tos == ("bürgermeister@example.org",)


# --------------------------------------------------------------------------- systemic failures


def test_wrong_password_is_a_clear_systemic_error() -> None:
    with SmtpTestServer(auth=("office", "right-password")) as srv:
        settings = parse_smtp_url(srv.url(user="office")).with_password("wrong-password")
        pool = SmtpPool(settings, size=1)
        with pytest.raises(AuthenticationRefused) as info:
            asyncio.run(pool.open())
        assert f"127.0.0.1:{srv.port}" in str(info.value)
        assert "wrong-password" not in str(info.value)
        # and the right one works
        good = SmtpPool(settings.with_password("right-password"), size=1)
        assert send_all(good, ["mayor@example.org"])[0].kind is OutcomeKind.ACCEPTED


def test_an_unreachable_server_is_a_clear_systemic_error() -> None:
    with SmtpTestServer() as srv:
        port = srv.port
    pool = SmtpPool(parse_smtp_url(f"smtp+plain://127.0.0.1:{port}", timeout=2), size=1)
    with pytest.raises(ServerUnreachable, match=f"127.0.0.1:{port}"):
        asyncio.run(pool.open())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_self_signed_tls_is_refused_by_default_and_trusted_with_ca_file(
    ca: trustme.CA, tmp_path: Path
) -> None:
    with SmtpTestServer(tls="implicit", server_context=server_context(ca)) as srv:
        url = srv.url("smtps")
        with pytest.raises(TlsFailure, match="certificate") as info:
            asyncio.run(SmtpPool(parse_smtp_url(url, timeout=5), size=1).open())
        assert "--ca-file" in str(info.value)
        trusted = SmtpPool(parse_smtp_url(url, ca_file=write_ca(ca, tmp_path)), size=1)
        assert send_all(trusted, ["mayor@example.org"])[0].kind is OutcomeKind.ACCEPTED
        assert srv.recipients() == ["mayor@example.org"]


def test_starttls_with_a_private_ca_and_login(ca: trustme.CA, tmp_path: Path) -> None:
    with SmtpTestServer(
        tls="starttls", server_context=server_context(ca), auth=("office", "pw")
    ) as srv:
        settings = parse_smtp_url(srv.url("smtp", user="office"), ca_file=write_ca(ca, tmp_path))
        with pytest.raises(TlsFailure):
            asyncio.run(SmtpPool(parse_smtp_url(srv.url("smtp"), timeout=5), size=1).open())
        pool = SmtpPool(settings.with_password("pw"), size=1)
        assert send_all(pool, ["mayor@example.org"])[0].kind is OutcomeKind.ACCEPTED


def test_smtp_scheme_refuses_a_server_without_starttls(server: SmtpTestServer) -> None:
    pool = SmtpPool(parse_smtp_url(server.url("smtp")), size=1)
    with pytest.raises(TlsFailure, match="does not offer STARTTLS"):
        asyncio.run(pool.open())
    assert server.received == []


# --------------------------------------------------------------------------- other transports


def test_maildir_outbox_writes_one_file_per_message(tmp_path: Path) -> None:
    outbox = MaildirOutbox(tmp_path / "out")

    async def go() -> list[Outcome]:
        await outbox.open()
        return [
            await outbox.send(
                mail_from="office@example.org",
                rcpt_to=[f"m{i}@example.org"],
                data=MESSAGE,
                ref=f"<{i}@example.org>",
            )
            for i in (1, 2, 1)
        ]

    outcomes = asyncio.run(go())
    assert all(o.kind is OutcomeKind.ACCEPTED for o in outcomes)
    files = sorted((tmp_path / "out" / "new").iterdir())
    # The same Message-ID written twice is one file: a re-send cannot duplicate it.
    assert len(files) == 2 and all(f.suffix == ".eml" for f in files)
    assert files[0].read_bytes() == MESSAGE
    assert list((tmp_path / "out" / "tmp").iterdir()) == []


def test_dry_run_keeps_nothing() -> None:
    dry = DryRun()
    outcome = asyncio.run(dry.send(mail_from="a@example.org", rcpt_to=["b@example.org"], data=b"x"))
    assert outcome.kind is OutcomeKind.ACCEPTED and dry.count == 1


# --------------------------------------------------------------------------- rate limiting


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(("rate", "workers"), [(5.0, 1), (5.0, 4), (0.5, 3)])
def test_token_bucket_spaces_acquires_across_workers(rate: float, workers: int) -> None:
    fake = FakeTime()
    bucket = TokenBucket(rate=rate, clock=fake.clock, sleep=fake.sleep)
    stamps: list[float] = []
    total = 40

    async def worker(n: int) -> None:
        for _ in range(n):
            await bucket.acquire()
            stamps.append(fake.now)

    async def go() -> None:
        await asyncio.gather(*(worker(total // workers) for _ in range(workers)))

    asyncio.run(go())
    start = stamps[0]
    per_second: dict[int, int] = {}
    for t in stamps:
        per_second[int((t - start) // 1)] = per_second.get(int((t - start) // 1), 0) + 1
    assert max(per_second.values()) <= max(1, round(rate))
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) >= 1 / rate - 1e-9
    assert stamps[-1] - stamps[0] == pytest.approx((len(stamps) - 1) / rate)


def test_smtp_settings_display_has_no_password() -> None:
    s = SmtpSettings(scheme="smtp", host="h.example.org", port=587, username="u", password="pw")
    assert s.display == "smtp://u@h.example.org:587"
    assert "pw" not in repr(s).replace("port", "")
