"""A sender killed with SIGKILL leaves in doubt only what was on the wire (issue 11 item 1), and a
live sender is never declared dead by another -- not even by one on a "host" of the same name
(issue 16 items 3 and 4). Real `mailer send` processes, a real aiosmtpd server, real kills."""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cli
from smtp_server import SmtpTestServer, seed_campaign
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from mailer import db, journal, senders
from mailer import engine as send_engine
from mailer.config import Workspace, data_path
from mailer.identity import Actor
from mailer.models import Contact, Event, Message, Sender
from mailer.policy import SendPolicy
from mailer.send_report import SendReport
from mailer.smtp import SmtpPool, parse_smtp_url

SLUG = "appeal"
CONNECTIONS = 2
# The server offers PIPELINING: two letters under way on each connection.
DEPTH = 2


def start_send(
    workspace: Path, url: str, *extra: str, env: dict[str, str] | None = None, db_url: str = ""
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from mailer.cli import main; main()",
            "-w",
            str(workspace),
            *(["--db", db_url] if db_url else []),
            "send",
            SLUG,
            "--smtp",
            url,
            "--yes",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_until(condition: object, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)


def states(engine: Engine) -> dict[str, str]:
    with Session(engine) as s:
        return dict(s.execute(select(Contact.email, Message.status).join(Message.contact)).all())


def uncertain_by_dead_pid(engine: Engine) -> collections.Counter[int]:
    """Uncertain events written when a dead sender's claims were settled, per its process id."""
    found: collections.Counter[int] = collections.Counter()
    with Session(engine) as s:
        details = s.scalars(select(Event.detail).where(Event.kind == "uncertain")).all()
    for detail in details:
        match = re.search(r" pid (\d+)", detail or "")
        if match:
            found[int(match.group(1))] += 1
    return found


@pytest.fixture
def server() -> Iterator[SmtpTestServer]:
    with SmtpTestServer(pipelining=True) as srv:
        yield srv


def test_kill_9_leaves_in_doubt_only_what_was_on_the_wire(
    workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    emails = seed_campaign(engine, workspace, count=300)
    # Each letter waits 50 ms for its verdict: at any moment a few are on the wire.
    server.delay = 0.05
    rng = random.Random(20220314)
    killed: list[int] = []
    # Several kills at random moments, each in a new sender that first settles what the killed
    # one held: a letter it never handed over goes back to the queue, one on the wire becomes
    # uncertain.
    for _kill in range(6):
        proc = start_send(
            workspace, server.url(), "--rate", "60/s", "--concurrency", str(CONNECTIONS)
        )
        target = len(server.received) + rng.randint(5, 40)
        wait_until(lambda t=target: len(server.received) >= t, proc)  # type: ignore[misc]
        # A moment later, so that the kill may also hit a letter mid-transaction.
        time.sleep(rng.random() * 0.03)
        proc.kill()
        proc.communicate(timeout=30)
        if proc.returncode == -9:
            killed.append(proc.pid)
        received = collections.Counter(server.arrived_recipients())
        assert [a for a, n in received.items() if n > 1] == []
    assert len(killed) >= 4
    for _resume in range(3):
        proc = start_send(workspace, server.url(), "--concurrency", str(CONNECTIONS))
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode in (0, 3), output
        if "queued" not in set(states(engine).values()):
            break
    received = collections.Counter(server.arrived_recipients())
    # Promise 1: nobody got two letters, across every kill.
    assert [a for a, n in received.items() if n > 1] == []
    final = states(engine)
    # Nothing lost: every letter is sent or, if its fate is unknown, uncertain.
    assert len(final) == 300 and set(final.values()) <= {"sent", "uncertain"}
    for email, status in final.items():
        # Sent, or uncertain and one the server may have received (its payload came in whole;
        # the kill cut the answer off).
        assert received[email] == 1, (email, status)
    # After each kill, at most the connections times the letters in flight on each.
    per_kill = uncertain_by_dead_pid(engine)
    assert set(per_kill) <= set(killed)
    assert all(n <= CONNECTIONS * DEPTH for n in per_kill.values()), per_kill
    # The claims a killed sender held beyond the wire went back to the queue (the old
    # code made every one of them uncertain).
    with Session(engine) as s:
        requeued = s.scalar(
            select(func.count())
            .select_from(Event)
            .where(Event.kind == "requeued", Event.detail.like("%stopped before handing it over%"))
        )
    assert requeued and requeued > sum(per_kill.values())
    print("kills:", len(killed), "uncertain per kill:", dict(per_kill), "requeued:", requeued)
    assert sorted(received) == sorted(emails)


def _pg_workspace(tmp_path: Path, name: str, pg_url: str) -> Path:
    root = tmp_path / name
    shutil.copytree(data_path("templates"), root / "templates")
    (root / "mailer.toml").write_text(f'[database]\nurl = "{pg_url}"\n', encoding="utf-8")
    return root


def test_another_machine_recovers_a_dead_sender_only_after_its_lease_and_conservatively(
    pg_url: str, tmp_path: Path, server: SmtpTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db.make_engine(pg_url)
    try:
        db.upgrade(engine)
        laptop_a = _pg_workspace(tmp_path, "a", pg_url)
        laptop_b = _pg_workspace(tmp_path, "b", pg_url)
        seed_campaign(engine, laptop_a, count=200)
        shutil.copytree(laptop_a / "templates" / "plain", laptop_b / "templates" / "plain")
        # Laptop A (its own "machine": another boot id) sends and is killed mid-run.
        proc = start_send(
            laptop_a,
            server.url(),
            "--rate",
            "50/s",
            "--concurrency",
            str(CONNECTIONS),
            env={journal.BOOT_ID_ENV: "laptop-a"},
        )
        wait_until(lambda: len(server.received) >= 30, proc)
        proc.kill()
        proc.communicate(timeout=30)
        with Session(engine) as s:
            held = set(s.scalars(select(Message.id).where(Message.status == "sending")).all())
        assert held, "the killed sender held claims"
        # Laptop B: same host name, another machine. While A's lease runs, A's claims are left
        # alone (B cannot prove A dead: it cannot read A's journal).
        monkeypatch.setenv(journal.BOOT_ID_ENV, "laptop-b")
        workspace_b = Workspace(root=laptop_b, settings={}, database_url_override=pg_url)

        def send_b(now: dt.datetime) -> SendReport:
            pool = SmtpPool(parse_smtp_url(server.url()), size=CONNECTIONS)
            return send_engine.send_campaign(
                workspace=workspace_b,
                engine=engine,
                slug=SLUG,
                transport=pool,
                concurrency=CONNECTIONS,
                clock=lambda: now,
                policy=SendPolicy(batch_size=20),
            )

        first = send_b(dt.datetime.now(dt.UTC))
        assert first.recovered == first.recovered_requeued == first.recovered_known == 0
        with Session(engine) as s:
            still = set(s.scalars(select(Message.id).where(Message.status == "sending")).all())
        assert still == held
        # Once A's lease has run out B settles its claims: it cannot know which left, so every
        # one of them is uncertain (never re-sent on its own), none back in the queue.
        later = send_b(dt.datetime.now(dt.UTC) + SendPolicy().lease + dt.timedelta(minutes=1))
        assert later.recovered == len(held)
        assert later.recovered_requeued == later.recovered_known == 0
        received = collections.Counter(server.recipients())
        assert [a for a, n in received.items() if n > 1] == []
        final = states(engine)
        assert set(final.values()) <= {"sent", "uncertain"}
        assert sum(1 for v in final.values() if v == "uncertain") == len(held)
        with Session(engine) as s:
            a_row = s.scalar(select(Sender).where(Sender.boot_id == "laptop-a"))
            assert a_row is not None and a_row.stopped_at is not None
            assert "lease ran out" in (a_row.stop_reason or "")
    finally:
        engine.dispose()


def test_two_hosts_with_one_hostname_never_declare_each_other_dead(
    pg_url: str, tmp_path: Path, server: SmtpTestServer
) -> None:
    engine = db.make_engine(pg_url)
    try:
        db.upgrade(engine)
        laptop_a = _pg_workspace(tmp_path, "a", pg_url)
        laptop_b = _pg_workspace(tmp_path, "b", pg_url)
        emails = seed_campaign(engine, laptop_a, count=240)
        shutil.copytree(laptop_a / "templates" / "plain", laptop_b / "templates" / "plain")
        server.delay = 0.01
        a = start_send(
            laptop_a,
            server.url(),
            "--rate",
            "40/s",
            "--concurrency",
            "2",
            env={journal.BOOT_ID_ENV: "cloned-image-a"},
        )
        wait_until(lambda: len(server.received) >= 20, a)
        b = start_send(
            laptop_b,
            server.url(),
            "--rate",
            "40/s",
            "--concurrency",
            "2",
            env={journal.BOOT_ID_ENV: "cloned-image-b"},
        )

        # While both run, `mailer senders` lists both, what they hold, their rate, heartbeat.
        def both_started() -> bool:
            with Session(engine) as s:
                return s.scalar(select(func.count()).select_from(Sender)) == 2

        wait_until(both_started, b)
        wait_until(lambda: len(server.received) >= 60, b)
        listing = Cli(laptop_b)("senders", SLUG, "--format", "json")
        assert listing.exit_code == 0, listing.output
        live = json.loads(listing.output)
        assert len(live) == 2 and all(v["live"] for v in live)
        assert {v["rate"] for v in live} == {40.0}
        assert all(v["actor"].split(" pid ")[0] == live[0]["actor"].split(" pid ")[0] for v in live)
        text = Cli(laptop_a)("senders").output
        assert "Campaign appeal: 2 live sender(s)" in text and "holds" in text
        outputs = [p.communicate(timeout=120)[0] for p in (a, b)]
        assert [p.returncode for p in (a, b)] == [0, 0], outputs
        # Neither touched the other's letters: nothing uncertain, every letter once.
        for output in outputs:
            assert "now `uncertain`" not in output and "mailer retry" not in output
        received = collections.Counter(server.recipients())
        assert sorted(received) == sorted(emails) and set(received.values()) == {1}
        assert set(states(engine).values()) == {"sent"}
        with Session(engine) as s:
            # Each claim and each result names its sender: OS user, host and process.
            actors = set(s.scalars(select(Event.actor).where(Event.kind.in_(["claimed", "sent"]))))
            stopped = s.scalars(select(Sender.stop_reason)).all()
        assert len(actors) == 2 and all(" pid " in (x or "") for x in actors)
        assert stopped == ["finished", "finished"]
        assert Cli(laptop_a)("senders").output.startswith("No sender is working")
    finally:
        engine.dispose()


def test_a_live_sender_keeps_its_claims_and_the_advice_waits_for_it(
    pg_url: str, tmp_path: Path, server: SmtpTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: a second laptop with the same hostname ran while another one sent, and
    marked the other's in-flight letters uncertain and advised `retry --uncertain`."""
    engine = db.make_engine(pg_url)
    try:
        db.upgrade(engine)
        laptop_a = _pg_workspace(tmp_path, "a", pg_url)
        laptop_b = _pg_workspace(tmp_path, "b", pg_url)
        seed_campaign(engine, laptop_a, count=60)
        shutil.copytree(laptop_a / "templates" / "plain", laptop_b / "templates" / "plain")
        server.delay = 0.2  # A's letters spend a while on the wire
        a = start_send(
            laptop_a,
            server.url(),
            "--rate",
            "20/s",
            "--concurrency",
            "2",
            env={journal.BOOT_ID_ENV: "cloned-image-a"},
        )
        wait_until(lambda: len(server.received) >= 5, a)
        monkeypatch.setenv(journal.BOOT_ID_ENV, "cloned-image-b")
        result = Cli(laptop_b)("send", SLUG, "--smtp", server.url(), "--limit", "3", "--yes")
        assert "now `uncertain`" not in result.output
        assert "mailer retry" not in result.output
        assert "Still sending this campaign:" in result.output
        output = a.communicate(timeout=120)[0]
        assert a.returncode == 0, output
        assert set(states(engine).values()) == {"sent"}
        received = collections.Counter(server.recipients())
        assert set(received.values()) == {1} and len(received) == 60
    finally:
        engine.dispose()


def test_senders_lists_nothing_for_an_unknown_campaign(run: Cli, engine: Engine) -> None:
    result = run("senders", "nope")
    assert result.exit_code == 1
    assert result.output.count("Error:") == 1 and "nope" in result.output
    assert run.ok("senders").output == "No sender is working now.\n"


def test_a_sender_is_recorded_with_who_it_is(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=5)
    assert run("send", SLUG, "--smtp", server.url(), "--rate", "300/min", "--yes").exit_code == 0
    with Session(engine) as s:
        (row,) = s.scalars(select(Sender)).all()
        claims = s.scalars(select(Event.actor).where(Event.kind == "claimed")).all()
    assert (row.pid, row.rate, row.sent, row.holding) == (os.getpid(), 5.0, 5, 0)
    assert row.via == f"127.0.0.1:{server.port}" and row.stop_reason == "finished"
    assert (
        row.boot_id == journal.boot_id()
        and row.actor == senders.SenderIdentity(id=row.id, actor=Actor.current()).label
    )
    assert set(claims) == {row.actor}
    # Its journal is gone with it: everything it knew is in the database.
    assert not list(journal.journal_dir(workspace).glob("*.journal"))
    listing = run.ok("senders", "--all").output
    assert f"[{row.id}] stopped" in listing and "(finished)" in listing and "5/s" in listing


def test_a_suppression_during_the_send_stops_the_letter_at_once(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    """Issue 11 item 4: `suppress add X` while a send runs stops X's letter if it has not been
    handed over yet -- even one already claimed -- and so does an unsubscribe the inbox (or the
    unsubscribe endpoint) records."""
    from mailer import outbox

    emails = seed_campaign(engine, workspace, count=30)
    proc = start_send(workspace, server.url(), "--rate", "5/s", "--concurrency", "1")
    wait_until(lambda: len(server.received) >= 3, proc)
    with Session(engine) as s:
        claimed = (
            s.execute(
                select(Contact.email)
                .join(Message.contact)
                .where(Message.status == "sending")
                .order_by(Message.id.desc())
            )
            .scalars()
            .all()
        )
    arrived = set(server.arrived_recipients())
    waiting = [e for e in claimed if e not in arrived]
    assert waiting, "a claimed letter waits to be handed over"
    claimed_one, queued_one = waiting[0], emails[-1]
    assert run("suppress", "add", claimed_one, "--reason", "manual").exit_code == 0
    with Session(engine) as s, s.begin():
        # What inbox sync (and the unsubscribe endpoint) write for an unsubscribe request.
        outbox.record_unsubscribe(
            s, email=queued_one, message=None, at=dt.datetime.now(dt.UTC), source="inbox: mailto"
        )
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    arrived = set(server.arrived_recipients())
    assert claimed_one not in arrived and queued_one not in arrived
    assert arrived == set(emails) - {claimed_one, queued_one}
    assert "Skipped 2 message(s) whose address was suppressed during the send" in output
    with Session(engine) as s:
        skipped = dict(
            s.execute(
                select(Contact.email, Event.detail)
                .join(Event, Event.contact_id == Contact.id)
                .where(Event.kind == "skipped")
            ).all()
        )
        rows = dict(s.execute(select(Contact.email, Message.status).join(Message.contact)).all())
    assert rows[claimed_one] == rows[queued_one] == "skipped"
    assert skipped[claimed_one] == "suppressed: manual (cli); found before it was handed over"
    assert skipped[queued_one] == "suppressed: unsubscribed (inbox: mailto)"


# --------------------------------------------------------------------------- cap and rate


def test_two_sends_with_one_daily_cap_deliver_no_more_than_the_cap(
    workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    """Issue 11 item 5: two `send --daily-cap 50` at once (two campaigns) delivered 100."""
    from mailer import campaigns
    from mailer.audience import Audience

    seed_campaign(engine, workspace, count=80)
    with Session(engine) as s, s.begin():
        campaigns.create_campaign(
            s,
            slug="second",
            template="plain",
            from_address="Campaign Office <office@example.org>",
            reply_to=None,
            audience=Audience(),
            title="Second",
            default_language="en",
            templates_dir=workspace / "templates",
        )
    procs = [
        start_send(workspace, server.url(), "--daily-cap", "50", "--concurrency", "2"),
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from mailer.cli import main; main()",
                "-w",
                str(workspace),
                "send",
                "second",
                "--smtp",
                server.url(),
                "--yes",
                "--daily-cap",
                "50",
                "--concurrency",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        ),
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outputs
    assert all("daily cap reached" in o for o in outputs), outputs
    assert len(server.arrived) == 50
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Event).where(Event.kind == "sent")) == 50


def test_three_senders_on_one_postgresql_campaign_share_the_cap_and_the_rate(
    pg_url: str, tmp_path: Path, server: SmtpTestServer
) -> None:
    engine = db.make_engine(pg_url)
    try:
        db.upgrade(engine)
        laptops = [_pg_workspace(tmp_path, name, pg_url) for name in ("a", "b", "c")]
        seed_campaign(engine, laptops[0], count=400)
        for other in laptops[1:]:
            shutil.copytree(laptops[0] / "templates" / "plain", other / "templates" / "plain")
        # One --daily-cap 50 for three senders at once: 50 in all.
        procs = [
            start_send(root, server.url(), "--daily-cap", "50", "--concurrency", "2")
            for root in laptops
        ]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 3 for p in procs), outputs
        assert len(server.arrived) == 50
        # One --rate 30/s for three senders: the server sees 30 a second, not 90.
        first = len(server.arrived)
        procs = [
            start_send(root, server.url(), "--rate", "30/s", "--concurrency", "2")
            for root in laptops
        ]
        outputs = [p.communicate(timeout=180)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        times = sorted(r.at for r in server.arrived[first:])
        assert len(times) == 350
        # Every sender took its part...
        with Session(engine) as s:
            per_sender = collections.Counter(
                s.scalars(select(Event.actor).where(Event.kind == "sent")).all()
            )
        assert len(per_sender) >= 3 and min(per_sender.values()) > 10, per_sender
        # ...and in any two seconds the server saw about 60 (90 each second if each sender
        # kept its own 30/s): counted generously.
        busiest = max(sum(1 for t in times[i:] if t < start + 2.0) for i, start in enumerate(times))
        print("busiest 2 s:", busiest, "per sender:", dict(per_sender))
        assert busiest <= 2 * 30 + 12
    finally:
        engine.dispose()


def test_a_dead_senders_journal_that_holds_nothing_is_swept(
    run: Cli, workspace: Path, engine: Engine, server: SmtpTestServer
) -> None:
    seed_campaign(engine, workspace, count=3)
    folder = journal.journal_dir(workspace)
    # A sender that died before it claimed anything: its journal is unlocked and holds nothing.
    orphan = journal.Journal.create(folder, sender_id="deadbeef00000000", boot=journal.boot_id())
    orphan.close(remove=False)
    # A live one's journal (locked) is left alone.
    live = journal.Journal.create(folder, sender_id="feedface00000000", boot=journal.boot_id())
    try:
        assert run("send", SLUG, "--smtp", server.url(), "--yes").exit_code == 0
        assert [p.name for p in folder.glob("*.journal")] == ["feedface00000000.journal"]
    finally:
        live.close(remove=True)
