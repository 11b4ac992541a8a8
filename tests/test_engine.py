"""The delivery engine end to end: a real workspace, a real SQLite file, a real SMTP server."""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from conftest import Cli
from smtp_server import DROP, SmtpTestServer, Stall, seed_campaign
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from mailer import audience
from mailer import engine as send_engine
from mailer.config import Workspace, find_workspace
from mailer.errors import AuthenticationRefused, TransportError
from mailer.models import Campaign, Event, Message, SuppressionReason
from mailer.policy import SendPolicy
from mailer.send_report import SendReport
from mailer.smtp import SmtpPool, parse_smtp_url

SLUG = "appeal"


@pytest.fixture(params=[False, True], ids=["step-by-step", "pipelined"])
def server(request: pytest.FixtureRequest) -> Iterator[SmtpTestServer]:
    # The promises hold whether or not the server offers PIPELINING (the client uses it if so).
    with SmtpTestServer(pipelining=request.param) as srv:
        yield srv


@pytest.fixture
def ws(workspace: Path) -> Workspace:
    return find_workspace(start=workspace)


def statuses(engine: Engine) -> dict[str, int]:
    with Session(engine) as s:
        rows = s.execute(select(Message.status, func.count()).group_by(Message.status)).all()
    return {status: n for status, n in rows}


def by_email(engine: Engine) -> dict[str, Message]:
    from mailer.models import Contact

    with Session(engine) as s:
        rows = s.execute(select(Contact.email, Message).join(Message.contact)).all()
    return {email: m for email, m in rows}


def events(engine: Engine, kind: str | None = None) -> list[Event]:
    with Session(engine) as s:
        # The letters' events (audit events such as the campaign's creation name no letter).
        q = select(Event).where(Event.message_id.is_not(None)).order_by(Event.id)
        if kind:
            q = q.where(Event.kind == kind)
        return list(s.scalars(q))


def send(
    ws: Workspace,
    engine: Engine,
    server: SmtpTestServer,
    *,
    timeout: float = 10.0,
    **kwargs: object,
) -> SendReport:
    pool = SmtpPool(
        parse_smtp_url(server.url(), timeout=timeout), size=int(kwargs.pop("concurrency", 2))
    )  # type: ignore[call-overload]
    return send_engine.send_campaign(
        workspace=ws,
        engine=engine,
        slug=SLUG,
        transport=pool,
        concurrency=pool.size,
        **kwargs,  # type: ignore[arg-type]
    )


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


# --------------------------------------------------------------------------- happy path


def test_every_recipient_gets_one_correct_message(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    emails = seed_campaign(engine, workspace, count=25)
    result = run("send", SLUG, "--smtp", server.url(), "--concurrency", "3", "--yes")
    assert result.exit_code == 0, result.output
    assert "Sending appeal: 25 message(s)" in result.output
    assert "25 sent" in result.output

    got = server.accepted()
    assert sorted(server.recipients()) == sorted(emails)  # each exactly once
    rows = by_email(engine)
    for received in got:
        (rcpt,) = received.rcpt_tos
        msg = received.message()
        assert isinstance(msg, EmailMessage)
        number = int(rcpt[len("mayor") : rcpt.index("@")])
        assert msg["To"].addresses[0].addr_spec == rcpt
        assert msg["Subject"] == f"An appeal to Mayor {number}"
        assert msg["From"].addresses[0].addr_spec == "office@example.org"
        body = msg.get_body(("plain",))
        assert body is not None
        text = body.get_content()
        assert f"Dear Mayor {number}," in text
        assert "\n.a line that starts with a dot" in text
        row = rows[rcpt]
        assert row.status == "sent" and row.smtp_code == 250
        assert msg["Message-ID"] == row.message_id
        assert row.subject == f"An appeal to Mayor {number}" and row.attempts == 1
    sent = events(engine, "sent")
    assert len(sent) == 25
    assert all(e.smtp_code == 250 and e.via == f"127.0.0.1:{server.port}" for e in sent)
    assert len(events(engine, "queued")) == 25 and len(events(engine, "claimed")) == 25
    with Session(engine) as s:
        campaign = s.scalar(select(Campaign))
        assert campaign is not None
        assert campaign.status == "done" and campaign.template_sources

    again = run("send", SLUG, "--smtp", server.url(), "--yes")
    assert again.exit_code == 0, again.output
    assert len(server.received) == 25


# --------------------------------------------------------------------------- per-recipient failures


def test_451_is_retried_with_backoff_and_550_fails(
    ws: Workspace, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    emails = seed_campaign(engine, workspace, count=6)
    later, refused = emails[1], emails[2]
    server.on_rcpt = {later: "451 4.7.1 greylisted", refused: "550 5.1.1 no such mailbox"}.get
    clock = Clock()
    report = send(ws, engine, server, clock=clock)
    assert (report.sent, report.deferred, report.failed) == (4, 1, 1)
    assert report.incomplete
    rows = by_email(engine)
    assert rows[later].status == "retry" and rows[later].smtp_code == 451
    assert rows[later].next_attempt_at == clock.now + dt.timedelta(minutes=1)
    assert rows[refused].status == "failed"
    assert (rows[refused].smtp_code, rows[refused].smtp_reply) == (550, "5.1.1 no such mailbox")
    (deferred,) = events(engine, "deferred")
    assert deferred.smtp_code == 451 and "greylisted" in (deferred.detail or "")

    # Not due yet: nothing goes out.
    server.on_rcpt = None
    assert send(ws, engine, server, clock=clock).sent == 0
    clock.now += dt.timedelta(minutes=2)
    report = send(ws, engine, server, clock=clock)
    assert report.sent == 1
    assert by_email(engine)[later].status == "sent"
    assert by_email(engine)[later].attempts == 2
    assert sorted(server.recipients()) == sorted(e for e in emails if e != refused)


def test_a_message_deferred_too_often_fails(
    ws: Workspace, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    (email,) = seed_campaign(engine, workspace, count=1)
    server.on_rcpt = lambda a: "452 4.2.2 mailbox full"
    clock = Clock()
    policy = SendPolicy(max_attempts=3)
    for _ in range(3):
        send(ws, engine, server, clock=clock, policy=policy)
        clock.now += dt.timedelta(hours=3)
    row = by_email(engine)[email]
    assert (row.status, row.attempts) == ("failed", 3)
    assert "gave up after 3 attempts" in (events(engine, "failed")[0].detail or "")


def test_drop_after_data_is_uncertain_and_never_resent(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    emails = seed_campaign(engine, workspace, count=4)
    server.on_data = lambda env: DROP if env.rcpt_tos == [emails[1]] else None
    result = run("send", SLUG, "--smtp", server.url(), "--yes")
    assert result.exit_code == 3, result.output
    assert "1 uncertain" in result.output
    assert by_email(engine)[emails[1]].status == "uncertain"
    server.on_data = None
    assert run("send", SLUG, "--smtp", server.url(), "--yes").exit_code == 3
    assert server.recipients().count(emails[1]) == 1
    # Only an explicit retry sends it again.
    assert "1 uncertain" in run.ok("retry", SLUG, "--uncertain").output
    assert run("send", SLUG, "--smtp", server.url(), "--yes").exit_code == 0
    assert server.recipients().count(emails[1]) == 2
    assert statuses(engine) == {"sent": 4}


def test_421_then_sent_on_a_later_run(
    ws: Workspace, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    emails = seed_campaign(engine, workspace, count=5)
    server.on_rcpt = lambda a: "421 4.3.2 going down" if a == emails[0] else None
    clock = Clock()
    report = send(ws, engine, server, clock=clock, concurrency=1)
    assert (report.sent, report.deferred) == (4, 1)
    assert by_email(engine)[emails[0]].status == "retry"
    server.on_rcpt = None
    clock.now += dt.timedelta(minutes=5)
    assert send(ws, engine, server, clock=clock).sent == 1
    assert sorted(server.recipients()) == sorted(emails)


def test_a_stalled_server_makes_the_message_uncertain(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    emails = seed_campaign(engine, workspace, count=3)
    server.on_data = lambda env: Stall(5) if env.rcpt_tos == [emails[0]] else None
    result = run(
        "send", SLUG, "--smtp", server.url(), "--timeout", "0.5", "--concurrency", "1", "--yes"
    )
    assert result.exit_code == 3, result.output
    rows = by_email(engine)
    assert rows[emails[0]].status == "uncertain"
    assert "no reply after the message was sent" in (rows[emails[0]].smtp_reply or "")
    assert rows[emails[1]].status == rows[emails[2]].status == "sent"


# --------------------------------------------------------------------------- systemic failures


def test_wrong_password_stops_with_the_list_untouched(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    seed_campaign(engine, workspace, count=5)
    with SmtpTestServer(auth=("office", "right")) as srv:
        result = run(
            "send",
            SLUG,
            "--smtp",
            srv.url(user="office"),
            "--yes",
            env={"MAILER_SMTP_PASSWORD": "wrong-secret"},
        )
        assert result.exit_code == 1
        assert result.output.count("Error:") == 1
        assert f"127.0.0.1:{srv.port}" in result.output
        assert "wrong-secret" not in result.output
        assert srv.received == []
    assert statuses(engine) == {"queued": 5}
    assert events(engine, "claimed") == []


def test_same_5xx_for_a_run_of_recipients_is_systemic(
    ws: Workspace, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=40)
    server.on_rcpt = lambda a: "554 5.7.1 relay access denied"
    with pytest.raises(TransportError, match="relay access denied"):
        send(ws, engine, server, concurrency=1, policy=SendPolicy(batch_size=5))
    # Nothing is marked failed: the refusal was about the server, not the recipients.
    assert statuses(engine) == {"queued": 40}
    assert len(events(engine, "failed")) == 10
    assert server.received == []


def test_error_rate_pauses_the_run(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=60)
    server.on_rcpt = lambda a: None if int(a[5:11]) % 3 == 0 else f"550 5.1.1 <{a}> unknown"
    result = run("send", SLUG, "--smtp", server.url(), "--concurrency", "1", "--yes")
    assert result.exit_code == 3, result.output
    assert "paused" in result.output
    counts = statuses(engine)
    assert counts["queued"] > 0 and counts.get("sending", 0) == 0
    with Session(engine) as s:
        assert s.scalar(select(Campaign.status)) == "paused"


# --------------------------------------------------------------------------- throttling


def test_rate_is_honoured_at_the_server(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=11)
    started = time.monotonic()
    result = run(
        "send", SLUG, "--smtp", server.url(), "--rate", "20/s", "--concurrency", "4", "--yes"
    )
    assert result.exit_code == 0, result.output
    arrivals = sorted(r.at for r in server.received)
    assert len(arrivals) == 11
    # A lower bound only, and measured from before the run: the 11th token cannot be handed out
    # earlier than 10 gaps of 1/20 s after the first, and a slow machine only adds time. (Measured
    # from the first arrival instead, a slow first connection made the span look too short.)
    assert arrivals[-1] - started >= 0.5


def test_daily_cap_counts_across_runs(
    ws: Workspace, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=8)
    clock = Clock()
    first = send(ws, engine, server, clock=clock, daily_cap=5)
    assert (first.sent, first.stopped) == (5, "daily-cap")
    assert first.incomplete
    assert first.resume_at is not None
    assert abs(first.resume_at - (clock.now + dt.timedelta(hours=24))) < dt.timedelta(seconds=1)
    clock.now += dt.timedelta(hours=2)
    second = send(ws, engine, server, clock=clock, daily_cap=5)
    assert (second.sent, second.stopped) == (0, "daily-cap")
    clock.now += dt.timedelta(hours=23)
    third = send(ws, engine, server, clock=clock, daily_cap=5)
    assert (third.sent, third.stopped) == (3, None)
    assert len(server.received) == 8


def test_daily_cap_message_from_the_cli(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=3)
    result = run("send", SLUG, "--smtp", server.url(), "--daily-cap", "2", "--yes")
    assert result.exit_code == 3
    assert "daily cap reached" in result.output and "may continue after" in result.output
    assert len(server.received) == 2


def test_limit_sends_at_most_n(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=7)
    assert run("send", SLUG, "--smtp", server.url(), "--limit", "3", "--yes").exit_code == 0
    assert len(server.received) == 3
    assert statuses(engine) == {"sent": 3, "queued": 4}


# --------------------------------------------------------------------------- audience at send time


def test_suppression_added_after_create_is_skipped(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    emails = seed_campaign(engine, workspace, count=4)
    with Session(engine) as s, s.begin():
        audience.suppress(
            s, emails=[emails[2].upper()], reason=SuppressionReason.UNSUBSCRIBED, source="test"
        )
    result = run("send", SLUG, "--smtp", server.url(), "--yes")
    assert result.exit_code == 0, result.output
    assert emails[2] not in server.recipients() and len(server.received) == 3
    assert by_email(engine)[emails[2]].status == "skipped"
    (skipped,) = events(engine, "skipped")
    assert "unsubscribed" in (skipped.detail or "")


def test_contacts_added_later_are_queued_and_invalid_ones_skipped(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=2)
    assert run("send", SLUG, "--smtp", server.url(), "--yes").exit_code == 0
    seed_campaign(engine, workspace, count=2, start=100, create=False)
    seed_campaign(engine, workspace, count=1, start=200, domain="bad domain.example", create=False)
    result = run("send", SLUG, "--smtp", server.url(), "--yes")
    assert result.exit_code == 0, result.output
    assert len(server.received) == 4
    assert statuses(engine) == {"sent": 4, "skipped": 1}
    assert "invalid address" in (events(engine, "skipped")[0].detail or "")


# --------------------------------------------------------------------------- restart


def test_leftover_sending_rows_become_uncertain(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    emails = seed_campaign(engine, workspace, count=3)
    assert run("send", SLUG, "--smtp", server.url(), "--limit", "1", "--yes").exit_code == 0
    dead = f"{socket.gethostname()}:{_dead_pid()}:deadbeef"
    with Session(engine) as s, s.begin():
        s.execute(
            update(Message)
            .where(Message.status == "queued")
            .values(status="sending", claimed_by=dead, attempts=1)
        )
    result = run("send", SLUG, "--smtp", server.url(), "--yes")
    assert result.exit_code == 3, result.output
    assert "2 message(s) left `sending` by an earlier run are now `uncertain`" in result.output
    assert statuses(engine) == {"sent": 1, "uncertain": 2}
    assert server.recipients() == emails[:1]


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# --------------------------------------------------------------------------- other modes


def test_test_to_sends_real_renderings_and_records_nothing(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=5)
    result = run("send", SLUG, "--smtp", server.url(), "--test-to", "me@example.com", "--yes")
    assert result.exit_code == 0, result.output
    assert server.recipients() == ["me@example.com"] * 3
    subjects = [r.message()["Subject"] for r in server.received]
    assert subjects == [f"[TEST] An appeal to Mayor {i}" for i in range(3)]
    assert statuses(engine) == {}
    assert events(engine) == []


def test_dry_run_changes_nothing(run: Cli, workspace: Path, engine: Engine) -> None:
    seed_campaign(engine, workspace, count=5)
    result = run("send", SLUG, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "5 message(s) built" in result.output
    assert statuses(engine) == {} and events(engine) == []
    with Session(engine) as s:
        assert s.scalar(select(Campaign.status)) == "draft"


def test_outbox_writes_a_maildir(run: Cli, workspace: Path, engine: Engine, tmp_path: Path) -> None:
    seed_campaign(engine, workspace, count=4)
    result = run("send", SLUG, "--outbox", str(tmp_path / "out"), "--yes")
    assert result.exit_code == 0, result.output
    files = list((tmp_path / "out" / "new").glob("*.eml"))
    assert len(files) == 4
    assert statuses(engine) == {"sent": 4}
    assert {e.via for e in events(engine, "sent")} == {f"maildir:{tmp_path / 'out'}"}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "no server to send to: give --smtp URL"),
        (["--dry-run", "--outbox", "x"], "at most one of"),
        (["--smtp", "smtp+plain://127.0.0.1:1", "--dry-run"], "at most one of"),
    ],
)
def test_at_most_one_transport_and_one_there_is(
    run: Cli, workspace: Path, engine: Engine, args: list[str], says: str
) -> None:
    seed_campaign(engine, workspace, count=1)
    result = run("send", SLUG, *args, "--yes")
    assert result.exit_code == 2
    assert says in result.output


def test_retry_needs_a_flag_and_moves_only_what_was_asked(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    emails = seed_campaign(engine, workspace, count=3)
    server.on_rcpt = {emails[0]: "550 5.7.1 refused by policy"}.get
    server.on_data = lambda env: DROP if env.rcpt_tos == [emails[1]] else None
    assert run("send", SLUG, "--smtp", server.url(), "--yes").exit_code == 3
    assert run("retry", SLUG).exit_code == 2
    out = run.ok("retry", SLUG, "--failed").output
    assert "1 failed" in out
    assert statuses(engine) == {"queued": 1, "uncertain": 1, "sent": 1}
    assert len(events(engine, "requeued")) == 1


def test_unreachable_server_is_one_error_line(run: Cli, workspace: Path, engine: Engine) -> None:
    seed_campaign(engine, workspace, count=2)
    with SmtpTestServer() as srv:
        port = srv.port
    result = run("send", SLUG, "--smtp", f"smtp+plain://127.0.0.1:{port}", "--yes")
    assert result.exit_code == 1
    assert (
        result.output.startswith("Sending") and "Error: cannot reach SMTP server" in result.output
    )
    assert statuses(engine) == {"queued": 2}


def test_nothing_due_needs_no_server(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=2)
    assert run("send", SLUG, "--smtp", server.url(), "--yes").exit_code == 0
    with SmtpTestServer() as gone:
        port = gone.port
    result = run("send", SLUG, "--smtp", f"smtp+plain://127.0.0.1:{port}", "--yes")
    assert result.exit_code == 0, result.output
    assert "Error" not in result.output
    assert statuses(engine) == {"sent": 2}
    assert len(server.received) == 2


def test_authentication_error_type_is_kept(ws: Workspace, workspace: Path, engine: Engine) -> None:
    seed_campaign(engine, workspace, count=1)
    with SmtpTestServer(auth=("office", "right")) as srv:
        pool = SmtpPool(parse_smtp_url(srv.url(user="office")).with_password("nope"), size=1)
        with pytest.raises(AuthenticationRefused):
            send_engine.send_campaign(workspace=ws, engine=engine, slug=SLUG, transport=pool)


def test_interrupt_with_sends_stuck_past_the_grace(
    ws: Workspace, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    import signal
    import threading

    from mailer.errors import Interrupted

    seed_campaign(engine, workspace, count=20)
    server.on_data = lambda env: Stall(10)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(Interrupted, match="Paused: 0 sent this run, 18 waiting"):
            send(
                ws,
                engine,
                server,
                concurrency=2,
                handle_signals=True,
                policy=SendPolicy(grace=0.3),
            )
    finally:
        timer.cancel()
    # The two messages whose bytes were at the server are uncertain; nothing else was sent.
    assert statuses(engine) == {"uncertain": 2, "queued": 18}
    assert len(server.stalled) == 2


# --------------------------------------------------------------------------- hard bounces


def test_no_such_user_suppresses_the_address_and_retry_leaves_it_alone(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    """Issue 14 item 7: a 5.1.1-class refusal (at RCPT or after DATA) suppresses the address
    as `hard_bounce` with the server's answer; `retry --failed` leaves it alone and says so."""
    from mailer.models import Contact, Suppression

    emails = seed_campaign(engine, workspace, count=5)
    at_rcpt, after_data, policy_refusal = emails[:3]
    server.on_rcpt = {
        at_rcpt: f"550 5.1.1 <{at_rcpt}>: Recipient address rejected: User unknown",
        policy_refusal: "554 5.7.1 Service unavailable; client host blocked",
    }.get
    server.on_data = lambda env: (
        "550 5.1.1 mailbox does not exist" if env.rcpt_tos == [after_data] else None
    )
    result = run("send", SLUG, "--smtp", server.url(), "--yes")
    assert result.exit_code == 3, result.output
    with Session(engine) as s:
        suppressed = {x.email: x for x in s.scalars(select(Suppression))}
    assert set(suppressed) == {at_rcpt, after_data}
    assert all(x.reason == "hard_bounce" for x in suppressed.values())
    assert "550 5.1.1" in (suppressed[at_rcpt].source or "")
    assert "User unknown" in (suppressed[at_rcpt].source or "")
    assert "mailbox does not exist" in (suppressed[after_data].source or "")
    rows = by_email(engine)
    assert rows[at_rcpt].bounced_at is not None and rows[after_data].bounced_at is not None
    assert rows[policy_refusal].bounced_at is None

    server.on_rcpt = server.on_data = None
    out = run.ok("retry", SLUG, "--failed").output
    assert "Requeued 1 failed" in out
    assert "Left 2 alone: their address is suppressed" in out
    assert run("send", SLUG, "--smtp", server.url(), "--yes").exit_code == 3
    assert server.recipients().count(policy_refusal) == 1
    assert at_rcpt not in server.recipients() and server.recipients().count(after_data) == 1
    # The event list and the message agree on how often the letter was tried.
    with Session(engine) as s:
        contact = s.scalar(select(Contact.id).where(Contact.email == policy_refusal))
        kinds = s.scalars(select(Event.kind).where(Event.contact_id == contact)).all()
        claims = s.scalars(
            select(Event.detail).where(Event.contact_id == contact, Event.kind == "claimed")
        ).all()
    row = by_email(engine)[policy_refusal]
    assert (row.status, row.attempts) == ("sent", 2)
    assert sum(1 for k in kinds if k in ("sent", "failed", "deferred", "uncertain")) == 2
    assert claims == ["attempt 1", "attempt 2"]


def test_hard_bounces_of_a_running_send_pause_and_hold_the_campaign(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    """Issue 12: the SMTP answers of a running send count toward the bounce spike."""
    emails = seed_campaign(engine, workspace, count=80)
    bad = set(emails[::4])
    server.on_rcpt = lambda a: f"550 5.1.1 <{a}>: user unknown" if a in bad else None
    result = run(
        "send", SLUG, "--smtp", server.url(), "--rate", "25/s", "--concurrency", "2", "--yes"
    )
    assert result.exit_code == 3, result.output
    assert "bounce spike" in result.output and "--acknowledge-bounces" in result.output
    with Session(engine) as s:
        campaign = s.scalar(select(Campaign))
        assert campaign is not None
        assert (campaign.status, campaign.held) == ("paused", True)
        assert "hard bounces" in (campaign.pause_reason or "")
    # It stopped mid-run, and a plain send does not resume it.
    assert statuses(engine).get("queued", 0) > 0
    again = run("send", SLUG, "--smtp", server.url(), "--yes")
    assert again.exit_code == 1 and again.output.count("Error:") == 1
    assert "bounce spike" in again.output
    server.on_rcpt = None
    resumed = run("send", SLUG, "--smtp", server.url(), "--acknowledge-bounces", "--yes")
    assert resumed.exit_code == 3, resumed.output  # the hard bounces stay failed
    # The hard bounces of the first run stay failed; the rest went out once acknowledged.
    counts = statuses(engine)
    assert set(counts) == {"sent", "failed"} and counts["sent"] + counts["failed"] == 80
    assert 10 <= counts["failed"] < 20
