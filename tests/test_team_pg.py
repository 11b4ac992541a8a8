"""A team on one database (issue 16): two workspaces ("laptops") on one PostgreSQL database,
real `mailer` processes, a real SMTP server on 127.0.0.1.

The campaign's letter is frozen when it is created, whatever the other laptop's folder or
mailer.toml says; `mailer init --db URL` joins a shared database (and refuses a newer one in
one line); anyone's `campaign pause`/`cancel` stops a running sender within seconds, and
a bounce-spike hold is not lifted by a run's end.
"""

from __future__ import annotations

import email
import email.policy
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from smtp_server import PLAIN_TEMPLATE, SmtpTestServer, seed_campaign
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from mailer import db, outbox
from mailer.cli import cli
from mailer.clock import utcnow
from mailer.models import Campaign, Contact, Event, Message

FROM = "Campaign Office <office@example.org>"


@dataclass
class Laptop:
    root: Path

    def __call__(self, *args: str) -> Result:
        return CliRunner().invoke(cli, ["-w", str(self.root), *args], catch_exceptions=False)

    def ok(self, *args: str) -> Result:
        result = self(*args)
        assert result.exit_code == 0, (result.exit_code, result.output)
        return result

    def process(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", "from mailer.cli import main; main()", "-w", str(self.root),
             *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip


def init(root: Path, url: str) -> Result:
    return CliRunner().invoke(cli, ["init", str(root), "--db", url], catch_exceptions=False)


@pytest.fixture
def team(pg_url: str, tmp_path: Path) -> Iterator[tuple[Laptop, Laptop, Engine]]:
    first = init(tmp_path / "a", pg_url)
    assert first.exit_code == 0, first.output
    second = init(tmp_path / "b", pg_url)
    assert second.exit_code == 0, second.output
    engine = db.make_engine(pg_url)
    yield Laptop(tmp_path / "a"), Laptop(tmp_path / "b"), engine
    engine.dispose()


def statuses(engine: Engine) -> dict[str, int]:
    with Session(engine) as s:
        rows = s.execute(select(Message.status, func.count()).group_by(Message.status)).all()
    return {status: n for status, n in rows}


def wait_for(server: SmtpTestServer, proc: subprocess.Popen[str], count: int) -> None:
    deadline = time.monotonic() + 60
    while len(server.received) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


# --------------------------------------------------------------------------- init --db


def test_init_db_makes_a_workspace_for_a_shared_database(pg_url: str, tmp_path: Path) -> None:
    first = init(tmp_path / "a", pg_url)
    assert first.exit_code == 0, first.output
    assert "(empty: migrated to head)" in first.output
    second = init(tmp_path / "b", pg_url)
    assert second.exit_code == 0, second.output
    assert "(in use: joined (schema " in second.output
    for laptop in ("a", "b"):
        root = tmp_path / laptop
        # No stray SQLite file: every later command uses the shared database.
        assert not (root / "mailer.db").exists()
        config = root / "mailer.toml"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert f'url = "{pg_url}"' in config.read_text()
    a, b = Laptop(tmp_path / "a"), Laptop(tmp_path / "b")
    a.ok("suppress", "add", "gone@example.org", "--reason", "manual")
    assert "gone@example.org" in b.ok("suppress", "list").output
    assert not (tmp_path / "b" / "mailer.db").exists()


def test_a_database_newer_than_the_code_is_one_clean_line(pg_url: str, tmp_path: Path) -> None:
    assert init(tmp_path / "a", pg_url).exit_code == 0
    engine = db.make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    try:
        for result in (
            init(tmp_path / "c", pg_url),
            Laptop(tmp_path / "a")("status"),
            Laptop(tmp_path / "a")("db", "upgrade"),
        ):
            assert result.exit_code == 1, result.output
            lines = result.output.strip().splitlines()
            assert len(lines) == 1, result.output
            assert lines[0].startswith("Error: database ")
            assert "is at schema revision 0099_from_the_future, newer than this mailer" in lines[0]
            assert "upgrade mailer on this machine too" in lines[0]
        # Refused before anything was written.
        assert not (tmp_path / "c").exists()
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- the frozen letter


def test_the_letter_is_the_one_frozen_at_create_whichever_laptop_sends(
    team: tuple[Laptop, Laptop, Engine], tmp_path: Path
) -> None:
    a, b, engine = team
    for laptop, subject, mailto in ((a, "From A", "stop@a.example.org"),
                                    (b, "From B", "stop@b.example.org")):  # fmt: skip
        folder = laptop.root / "templates" / "note"
        folder.mkdir()
        (folder / "en.txt.j2").write_text(f"Subject: {subject}\n\nHello {{{{ contact.name }}}}\n")
        config = laptop.root / "mailer.toml"
        config.write_text(
            config.read_text().replace("[campaign]\n", f'[campaign]\nunsubscribe_mailto = "{mailto}"\n')
        )  # fmt: skip
    sheet = tmp_path / "mayors.csv"
    sheet.write_text("email,name\n" + "".join(f"m{i}@example.org,Mayor {i}\n" for i in range(4)))
    a.ok("import", "contacts", str(sheet))
    a.ok("campaign", "create", "wave", "--template", "note", "--from", FROM)
    # Laptop B's own folder and settings change nothing of it -- even broken.
    (b.root / "templates" / "note" / "en.txt.j2").write_text("Subject: From B\n\n{{ broken\n")
    checked = b.ok("check", "wave")
    assert "differs from the copy frozen in campaign wave (en.txt.j2 changed)" in checked.output
    out = tmp_path / "out"
    sent = b.ok("send", "wave", "--outbox", str(out), "--yes")
    assert "subject:   From A" in sent.output
    letters = [
        email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
        for p in sorted((out / "new").glob("*.eml"))
    ]
    assert len(letters) == 4
    assert {m["Subject"] for m in letters} == {"From A"}
    assert {m["List-Unsubscribe"] for m in letters} == {
        "<mailto:stop@a.example.org?subject=unsubscribe>"
    }
    # Changing it once letters are out is explicit, and in the log with who did it.
    refused = b("campaign", "update", "wave", "--template", "note")
    assert refused.exit_code == 1
    assert "has 4 letter(s) sent or being sent" in refused.output and "--force" in refused.output
    (b.root / "templates" / "note" / "en.txt.j2").write_text("Subject: From B\n\nHi\n")
    changed = b.ok("campaign", "update", "wave", "--template", "note", "--force")
    assert "template note frozen again (en.txt.j2 changed), with 4 letter(s) already sent" in (
        changed.output
    )
    with Session(engine) as s:
        event = s.scalars(select(Event).where(Event.kind == "campaign_updated")).one()
        campaign = s.scalars(select(Campaign)).one()
    assert event.actor and " pid " in event.actor
    assert campaign.template_sources == {"en.txt.j2": "Subject: From B\n\nHi\n"}
    assert "differs" not in b.ok("check", "wave").output
    assert "differs from the copy frozen" in a.ok("check", "wave").output


# --------------------------------------------------------------------------- stopped by anyone


def slow_campaign(laptop: Laptop, engine: Engine, count: int) -> None:
    folder = laptop.root / "templates" / "plain"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "en.txt.j2").write_text(PLAIN_TEMPLATE, encoding="utf-8")
    seed_campaign(engine, laptop.root, count=count, create=False)
    laptop.ok("campaign", "create", "wave", "--template", "plain", "--from", FROM)


def test_a_pause_by_another_laptop_stops_a_running_sender(
    team: tuple[Laptop, Laptop, Engine],
) -> None:
    a, b, engine = team
    slow_campaign(a, engine, 300)
    with SmtpTestServer(delay=0.03) as server:
        proc = a.process("send", "wave", "--smtp", server.url(), "--concurrency", "1", "--yes")
        wait_for(server, proc, 5)
        paused = b.ok("campaign", "pause", "wave", "--reason", "wrong city in the letter")
        assert "Campaign wave paused by " in paused.output
        output, _ = proc.communicate(timeout=60)
        # Exit 3: the campaign is not complete, and the sender says who stopped it and why.
        assert proc.returncode == 3, output
        assert "Stopped: paused by " in output and ": wrong city in the letter." in output
        assert "`mailer campaign resume wave`, then" in output
        counts = statuses(engine)
        received = Counter(server.recipients())
        assert max(received.values()) == 1
        # What was on the wire finished; the rest went back to the queue.
        assert counts.get("sending", 0) == 0 and counts.get("uncertain", 0) == 0
        assert counts["sent"] == len(received) and counts["queued"] > 0
        with Session(engine) as s:
            campaign = s.scalars(select(Campaign)).one()
            assert campaign.status == "paused" and campaign.paused_by
        # Nobody sends it until it is resumed -- not even the laptop that was sending.
        refused = a("send", "wave", "--smtp", server.url(), "--yes")
        assert refused.exit_code == 1
        assert refused.output.startswith("Error: campaign wave is paused by ")
        assert "`mailer campaign resume wave` lets it go on" in refused.output
        b.ok("campaign", "resume", "wave")
        done = a("send", "wave", "--smtp", server.url(), "--yes", "--concurrency", "4")
        assert done.exit_code == 0, done.output
    assert statuses(engine) == {"sent": 300}
    assert Counter(server.recipients()) == Counter({e: 1 for e in server.recipients()})
    with Session(engine) as s:
        kinds = list(s.scalars(select(Event.kind).where(Event.message_id.is_(None))))
    assert kinds == ["campaign_created", "campaign_paused", "campaign_resumed"]


def test_a_cancel_by_another_laptop_stops_the_sender_and_skips_the_rest(
    team: tuple[Laptop, Laptop, Engine],
) -> None:
    a, b, engine = team
    slow_campaign(a, engine, 200)
    with SmtpTestServer(delay=0.03) as server:
        proc = a.process("send", "wave", "--smtp", server.url(), "--concurrency", "1", "--yes")
        wait_for(server, proc, 5)
        b.ok("campaign", "cancel", "wave", "--reason", "sent from the wrong list")
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, output
    assert "Stopped: cancelled by " in output and "sent from the wrong list" in output
    counts = statuses(engine)
    # Letters the sender handed back after the cancel were skipped too: nothing waits.
    assert set(counts) == {"sent", "skipped"}, counts
    assert counts["sent"] == len(server.received)
    with Session(engine) as s:
        assert s.scalars(select(Campaign.status)).one() == "cancelled"


# --------------------------------------------------------------------------- a bounce spike


def test_a_bounce_spike_hold_stops_a_sender_and_outlives_its_end(
    workspace: Path, engine: Engine
) -> None:
    laptop = Laptop(workspace)
    seed_campaign(engine, workspace, count=200)
    with SmtpTestServer(delay=0.03) as server:
        proc = laptop.process(
            "send", "appeal", "--smtp", server.url(), "--concurrency", "1", "--yes"
        )
        wait_for(server, proc, 5)
        with Session(engine) as s, s.begin():
            campaign_id = s.scalars(select(Campaign.id)).one()
            # What inbox sync does when hard bounces spike.
            assert outbox.pause_for_bounce_spike(
                s, campaign_id=campaign_id, reason="bounce spike: 12 of 40", now=utcnow()
            )
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 3, output
        assert "Stopped: bounce spike: 12 of 40" in output
        with Session(engine) as s:
            campaign = s.scalars(select(Campaign)).one()
        # The run's end did not lift the hold.
        assert campaign.status == "paused" and campaign.held
        refused = laptop("send", "appeal", "--smtp", server.url(), "--yes")
        assert refused.exit_code == 1
        assert "bounce spike: 12 of 40" in refused.output
        assert "--acknowledge-bounces" in refused.output
        done = laptop("send", "appeal", "--smtp", server.url(), "--yes", "--acknowledge-bounces")
        assert done.exit_code == 0, done.output
    assert statuses(engine) == {"sent": 200}
    with Session(engine) as s:
        acknowledged = s.scalars(select(Event.detail).where(Event.kind == "campaign_resumed")).one()
        emails = s.scalar(select(func.count()).select_from(Contact))
    assert "bounce spike acknowledged" in str(acknowledged)
    assert emails == 200
