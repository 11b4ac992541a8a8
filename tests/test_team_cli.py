"""The office's safety and the team's controls on the command line (issues 14, 16, 11 item 12):
no send without a yes, a remembered server and pace, quiet days, cancel/delete/suppress remove,
the audit log, owner-only secrets, a busy or read-only database.

Real parts throughout: a migrated SQLite workspace, `mailer` run in-process or as a process
with no terminal, an aiosmtpd server on 127.0.0.1.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner, Result
from conftest import Cli
from smtp_server import SmtpTestServer, seed_campaign, server_context, write_ca
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from mailer import db, outbox
from mailer.cli import cli
from mailer.clock import utcnow
from mailer.models import Campaign, Contact, Event, Message, Suppression

SLUG = "appeal"
FROM = "Campaign Office <office@example.org>"


def statuses(engine: Engine, slug: str = SLUG) -> dict[str, int]:
    with Session(engine) as s:
        rows = s.execute(
            select(Message.status, func.count())
            .join(Campaign, Campaign.id == Message.campaign_id)
            .where(Campaign.slug == slug)
            .group_by(Message.status)
        ).all()
    return {status: n for status, n in rows}


def audit(engine: Engine) -> list[Event]:
    with Session(engine) as s:
        return list(s.scalars(select(Event).where(Event.message_id.is_(None)).order_by(Event.id)))


def mailer_process(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailer` as a script runs it: no terminal, input from /dev/null."""
    return subprocess.run(
        [sys.executable, "-c", "from mailer.cli import main; main()", "-w", str(workspace), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def set_toml(workspace: Path, section: str, text: str) -> None:
    config = workspace / "mailer.toml"
    config.write_text(config.read_text().replace(f"[{section}]\n", f"[{section}]\n{text}\n"))


# --------------------------------------------------------------------------- never by accident


def test_send_without_yes_and_without_a_terminal_refuses(
    workspace: Path, engine: Engine, tmp_path: Path
) -> None:
    seed_campaign(engine, workspace, count=3)
    with SmtpTestServer() as server:
        done = mailer_process(workspace, "send", SLUG, "--smtp", server.url())
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.startswith("Error: ")
        assert "add --yes" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert server.received == []
        out = mailer_process(workspace, "send", SLUG, "--outbox", str(tmp_path / "out"))
        assert out.returncode == 1 and "add --yes" in out.stderr
        assert not (tmp_path / "out").exists()
        # Nothing was queued either: the refusal comes before the campaign is touched.
        assert statuses(engine) == {}
        assert (
            mailer_process(workspace, "send", SLUG, "--smtp", server.url(), "--yes").returncode == 0
        )
        assert len(server.received) == 3


def test_the_campaign_remembers_its_server_and_pace_and_beats_mailer_toml(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    seed_campaign(engine, workspace, count=4, create=False)
    with SmtpTestServer() as mine, SmtpTestServer() as office:
        set_toml(workspace, "smtp", f'url = "{office.url()}"\nrate = "600/min"')
        created = run.ok(
            "campaign", "create", SLUG, "--template", "plain", "--from", FROM,
            "--smtp", mine.url(), "--rate", "6000/min",
        )  # fmt: skip
        assert f"remembered for send: server {mine.url()}, rate 6000/min" in created.output
        shown = run.ok("campaign", "show", SLUG).output
        assert (
            f"Send uses: {mine.url()} (campaign {SLUG}), rate 6000/min (campaign {SLUG})" in shown
        )
        result = run("send", SLUG, "--yes")
        assert result.exit_code == 0, result.output
        assert f"transport: {mine.url()} (from campaign {SLUG})" in result.output
        assert "rate 6000/min (campaign appeal)" in result.output
        assert len(mine.received) == 4 and office.received == []
        # What the campaign does not say, mailer.toml does.
        run.ok("campaign", "create", "second", "--template", "plain", "--from", FROM)
        result = run("send", "second", "--yes")
        assert result.exit_code == 0, result.output
        assert (
            "(from mailer.toml)" in result.output and "rate 600/min (mailer.toml)" in result.output
        )
        assert len(office.received) == 4


def test_a_remembered_url_with_a_password_is_refused(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    seed_campaign(engine, workspace, count=1, create=False)
    result = run(
        "campaign", "create", SLUG, "--template", "plain", "--from", FROM,
        "--smtp", "smtp://office:hunter2@mail.example.org:587",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "must not contain a password" in result.output and "hunter2" not in result.output
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Campaign)) == 0


def test_check_warns_when_a_remote_server_has_no_rate(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    seed_campaign(engine, workspace, count=2, create=False)
    created = run.ok(
        "campaign", "create", SLUG, "--template", "plain", "--from", FROM,
        "--smtp", "smtp://office@mail.example.org:587",
    )  # fmt: skip
    assert "note: no sending rate is set for mail.example.org" in created.output
    result = run.ok("check", SLUG)
    assert "no sending rate is set for mail.example.org" in result.output
    assert f"`mailer campaign update {SLUG} --rate 300/min`" in result.output
    run.ok("campaign", "update", SLUG, "--rate", "300/min")
    assert "no sending rate" not in run.ok("check", SLUG).output
    # A relay on this machine has no provider's limit.
    run.ok("campaign", "create", "local", "--template", "plain", "--from", FROM, "--smtp",
           "smtp+plain://127.0.0.1:25")  # fmt: skip
    assert "no sending rate" not in run.ok("check", "local").output


# --------------------------------------------------------------------------- quiet days


def test_recipients_written_to_lately_are_counted_and_left_out_on_request(
    run: Cli, workspace: Path, engine: Engine, tmp_path: Path
) -> None:
    emails = seed_campaign(engine, workspace, count=6, create=False)
    # The first campaign writes to three of the six (one field given twice means either).
    run.ok("campaign", "create", "first", "--template", "plain", "--from", FROM,
           *(f"--where=email={e}" for e in emails[:3]))  # fmt: skip
    run.ok("send", "first", "--outbox", str(tmp_path / "one"), "--yes")
    created = run.ok("campaign", "create", "second", "--template", "plain", "--from", FROM)
    assert (
        "3 recipient(s) were written to in the last 14 days by another campaign" in created.output
    )
    assert "--skip-contacted-within 14d` leaves them out" in created.output
    assert "3 recipient(s) were written to in the last 14 days" in run.ok("check", "second").output
    # What the claim can ask per batch (outbox.recently_contacted): the same three.
    with Session(engine) as s:
        second = s.scalars(select(Campaign).where(Campaign.slug == "second")).one()
        ids = list(s.scalars(select(Contact.id).order_by(Contact.id)))
        recent = outbox.recently_contacted(
            s, campaign_id=second.id, contact_ids=ids, since=utcnow() - dt.timedelta(days=14)
        )
    assert sorted(recent) == ids[:3]
    assert {slug for slug, _ in recent.values()} == {"first"}
    run.ok("campaign", "update", "second", "--skip-contacted-within", "14d")
    assert "send skips them" in run.ok("check", "second").output
    result = run.ok("send", "second", "--outbox", str(tmp_path / "two"), "--yes")
    assert statuses(engine, "second") == {"sent": 3, "skipped": 3}
    assert len(list((tmp_path / "two" / "new").glob("*.eml"))) == 3
    assert "skipped 3" in result.output
    with Session(engine) as s:
        details = list(
            s.scalars(select(Event.detail).where(Event.kind == "skipped").order_by(Event.id))
        )
    assert len(details) == 3
    assert all(
        d and d.startswith("quiet days: campaign first wrote to this contact on") for d in details
    )
    # `[campaign] quiet_days` sets how far back create and check look.
    config = workspace / "mailer.toml"
    config.write_text(config.read_text().replace("quiet_days = 14", "quiet_days = 1"))
    third = run.ok("campaign", "create", "third", "--template", "plain", "--from", FROM)
    assert "6 recipient(s) were written to in the last 1 days" in third.output


def test_bad_quiet_days_are_one_error_line(run: Cli, workspace: Path, engine: Engine) -> None:
    seed_campaign(engine, workspace, count=1, create=False)
    result = run("campaign", "create", SLUG, "--template", "plain", "--from", FROM,
                 "--skip-contacted-within", "soon")  # fmt: skip
    assert result.exit_code == 1
    assert result.output == (
        "Error: --skip-contacted-within 'soon': expected a number of days, e.g. 14d or 2w\n"
    )


# --------------------------------------------------------------------------- undo


def test_cancel_skips_what_waits_and_send_refuses(
    run: Cli, workspace: Path, engine: Engine, tmp_path: Path
) -> None:
    seed_campaign(engine, workspace, count=5)
    run.ok("send", SLUG, "--outbox", str(tmp_path / "out"), "--limit", "2", "--yes")
    result = run.ok("campaign", "cancel", SLUG, "--reason", "wrong list")
    assert result.output == f"Campaign {SLUG} cancelled: 3 waiting letter(s) skipped.\n"
    assert statuses(engine) == {"sent": 2, "skipped": 3}
    with Session(engine) as s:
        skipped = list(s.scalars(select(Event.detail).where(Event.kind == "skipped")))
        campaign = s.scalar(select(Campaign))
        assert campaign is not None and campaign.status == "cancelled"
    assert len(skipped) == 3 and all(
        "cancelled by " in str(d) and "wrong list" in str(d) for d in skipped
    )
    assert "cancelled by " in run.ok("status", SLUG).output
    again = run("send", SLUG, "--outbox", str(tmp_path / "out"), "--yes")
    assert again.exit_code == 1
    assert again.output.startswith(f"Error: campaign {SLUG} is cancelled (cancelled by ")
    # The record stays: a campaign with letters sent is not deleted.
    refused = run("campaign", "delete", SLUG)
    assert refused.exit_code == 1
    assert "2 letter(s) that were sent or tried" in refused.output
    assert "cancelled already" in run("campaign", "cancel", SLUG).output


def test_delete_a_campaign_nothing_was_sent_of(run: Cli, workspace: Path, engine: Engine) -> None:
    seed_campaign(engine, workspace, count=3)
    run.ok("send", SLUG, "--dry-run")
    assert run.ok("campaign", "delete", SLUG).output == (
        f"Campaign {SLUG} deleted (0 unsent letter(s) dropped).\n"
    )
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Campaign)) == 0
    kinds = [(e.kind, e.campaign_id) for e in audit(engine)]
    # Its creation and its deletion stay in the log, no longer linked to a campaign.
    assert kinds == [("campaign_created", None), ("campaign_deleted", None)]
    assert "campaign appeal deleted by " in str(audit(engine)[-1].detail)
    # The slug is free again.
    run.ok("campaign", "create", SLUG, "--template", "plain", "--from", FROM)


def test_suppress_remove_keeps_the_reason_in_the_log(run: Cli, engine: Engine) -> None:
    run.ok("suppress", "add", "Mayor@Example.org", "--reason", "manual")
    removed = run.ok("suppress", "remove", "mayor@example.org", "--reason", "asked again by phone")
    assert "mayor@example.org is no longer suppressed (was manual)" in removed.output
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Suppression)) == 0
    last = audit(engine)[-1]
    assert last.kind == "unsuppressed"
    assert last.detail is not None and last.detail.endswith(": asked again by phone")
    assert last.actor and " pid " in last.actor
    missing = run("suppress", "remove", "nobody@example.org", "--reason", "x")
    assert missing.exit_code == 1
    assert missing.output.startswith("Error: nobody@example.org is not suppressed")
    no_reason = run("suppress", "remove", "mayor@example.org")
    assert no_reason.exit_code == 2


def test_where_country_reads_country_names_as_import_does(run: Cli, tmp_path: Path) -> None:
    sheet = tmp_path / "c.csv"
    sheet.write_text(
        "email,city,country\nob@berlin.example.org,Berlin,Deutschland\n"
        "maire@lille.example.org,Lille,France\n",
        encoding="utf-8",
    )
    run.ok("import", "contacts", str(sheet))
    for value in ("Germany", "Deutschland", "DE", "de"):
        listed = run.ok("contacts", "list", "--where", f"country={value}", "--format", "csv")
        assert "ob@berlin.example.org" in listed.output, value
        assert "lille" not in listed.output, value
    created = run.ok("campaign", "create", "de", "--template", "appeal", "--from", FROM,
                     "--where", "country=Germany")  # fmt: skip
    assert "1 recipients (country=Germany)" in created.output


# --------------------------------------------------------------------------- the audit log


def test_the_audit_log_says_who_did_what_from_where(
    run: Cli, workspace: Path, engine: Engine, tmp_path: Path
) -> None:
    sheet = tmp_path / "mayors.csv"
    sheet.write_text("email,name\nmayor@example.org,Ann\n", encoding="utf-8")
    run.ok("import", "contacts", str(sheet))
    unsub = tmp_path / "unsub.csv"
    unsub.write_text("email\ngone@example.org\n", encoding="utf-8")
    run.ok("suppress", "import", str(unsub))
    run.ok("suppress", "add", "mayor@example.org", "--reason", "manual")
    run.ok("suppress", "remove", "mayor@example.org", "--reason", '=HYPERLINK("http://evil.test")')
    run.ok("campaign", "create", SLUG, "--template", "appeal", "--from", FROM)
    run.ok("campaign", "update", SLUG, "--rate", "100/min")
    run.ok("campaign", "pause", SLUG, "--reason", "wait for the mayor's office")
    run.ok("campaign", "resume", SLUG)
    run.ok("campaign", "create", "typo", "--template", "appeal", "--from", FROM)
    run.ok("campaign", "delete", "typo")
    run.ok("campaign", "cancel", SLUG)
    result = run.ok("log", "--events", "--all", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.output)))
    kinds = [r["kind"] for r in rows]
    assert kinds == [
        "imported", "imported", "suppressed", "unsuppressed", "campaign_created",
        "campaign_updated", "campaign_paused", "campaign_resumed", "campaign_created",
        "campaign_deleted", "campaign_cancelled",
    ]  # fmt: skip
    host = os.uname().nodename
    assert all(r["actor"].endswith(f"pid {r['actor'].rsplit(' ', 1)[-1]}") for r in rows)
    assert {r["host"] for r in rows} == {host}
    assert rows[0]["detail"].startswith("import contacts mayors.csv (sha256 ")
    assert rows[2]["email"] == "mayor@example.org"
    # A spreadsheet never runs what a user typed.
    assert rows[3]["detail"].endswith(': =HYPERLINK("http://evil.test")')
    assert "'=HYPERLINK" not in rows[3]["detail"]  # inside the cell, not at its start
    assert rows[6]["campaign"] == SLUG and "wait for the mayor's office" in rows[6]["detail"]
    assert rows[8]["campaign"] == "" and "campaign typo created" in rows[8]["detail"]
    as_json = json.loads(run.ok("log", "--events", "--all", "--format", "json").output)
    assert [r["kind"] for r in as_json] == kinds
    assert as_json[-1]["campaign"] == SLUG
    table = run.ok("log", "--events", "--all").output
    assert "campaign_cancelled" in table.splitlines()[-1]
    assert run("log", "--all").exit_code == 2
    assert run("log", SLUG, "--events", "--all").exit_code == 2


def test_an_audit_cell_that_starts_like_a_formula_is_neutralised(run: Cli, engine: Engine) -> None:
    run.ok("campaign", "create", SLUG, "--template", "appeal", "--from", FROM)
    run.ok("campaign", "pause", SLUG, "--reason", "x")
    with Session(engine) as s, s.begin():
        # What an attacker could get into a cell: an actor label they control (a host name).
        event = s.scalars(select(Event).order_by(Event.id.desc())).first()
        assert event is not None
        event.actor = "=cmd|' /C calc'!A0@evil pid 1"
    rows = list(
        csv.DictReader(io.StringIO(run.ok("log", "--events", "--all", "--format", "csv").output))
    )
    assert rows[-1]["actor"].startswith("'=cmd")


# --------------------------------------------------------------------------- secrets on disk


def test_mailer_toml_is_owner_only_whatever_the_umask(tmp_path: Path, run: Cli) -> None:
    old = os.umask(0)
    try:
        result = CliRunner().invoke(cli, ["init", str(tmp_path / "open")], catch_exceptions=False)
    finally:
        os.umask(old)
    assert result.exit_code == 0
    assert "(readable by you only)" in result.output
    mode = stat.S_IMODE((tmp_path / "open" / "mailer.toml").stat().st_mode)
    assert mode == 0o600


def test_loose_secrets_get_a_warning(run: Cli, workspace: Path, engine: Engine) -> None:
    seed_campaign(engine, workspace, count=1)
    secret = workspace / "smtp-password.txt"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    set_toml(workspace, "smtp", f'password_command = "cat {secret}"')
    key = workspace / "unsubscribe.secret"
    key.write_text("k\n")
    key.chmod(0o640)
    result = run.ok("check", SLUG)
    assert (
        f"Warning: {secret} ([smtp] password_command reads it) is readable by every user of "
        f"this machine; make it yours only: chmod 600 {secret}"
    ) in result.output
    assert f"Warning: {key} (workspace secret) is readable or writable by others" in result.output
    assert "mailer.toml" not in result.output.split("Warning:")[-1].split("\n")[0]
    secret.chmod(0o600)
    key.chmod(0o600)
    assert "Warning:" not in run.ok("check", SLUG).output


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_a_certificate_for_another_name_does_not_suggest_ca_file_when_given(
    run: Cli, workspace: Path, engine: Engine, ca: trustme.CA, tmp_path: Path
) -> None:
    seed_campaign(engine, workspace, count=1)
    context = server_context(ca, names=("mail.example.org",))
    with SmtpTestServer(tls="implicit", server_context=context) as server:
        result = run(
            "send", SLUG, "--smtp", server.url("smtps"), "--ca-file", str(write_ca(ca, tmp_path)),
            "--yes", "--timeout", "5",
        )  # fmt: skip
    assert result.exit_code == 1
    assert "certificate refused" in result.output and "mismatch" in result.output
    assert "--ca-file" not in result.output


# --------------------------------------------------------------------------- a busy or read-only database

HOLD_LOCK = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
connection.execute("INSERT INTO suppressions (email, reason, source, created_at) "
                   "VALUES ('holder@example.org', 'manual', 'holder', '2026-01-01 00:00:00')")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
print("released", flush=True)
"""


@pytest.fixture
def holder(workspace: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(workspace / "mailer.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "locked\n"
    yield process
    if process.poll() is None:
        assert process.stdin is not None
        process.stdin.write("\n")
        process.stdin.flush()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("command", "what"),
    [
        (["campaign", "create", SLUG, "--template", "appeal", "--from", FROM],
         "the campaign was not created"),
        (["suppress", "add", "a@example.org", "--reason", "manual"], "nothing was suppressed"),
    ],
    ids=["campaign-create", "suppress-add"],
)  # fmt: skip
def test_a_locked_database_is_one_line_and_nothing_half_written(
    run: Cli,
    engine: Engine,
    holder: subprocess.Popen[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    what: str,
) -> None:
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 300)
    result = run(*command)
    assert result.exit_code == 1, result.output
    assert result.output == (
        "Error: the database is busy: another mailer process (a send, an import) kept writing "
        f"to it for more than 0.3 s; {what}: run the command again when it has finished\n"
    )
    assert holder.stdin is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout is not None and holder.stdout.readline() == "released\n"
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Campaign)) == 0
        assert s.scalar(select(func.count()).select_from(Suppression)) == 0
        assert s.scalar(select(func.count()).select_from(Event)) == 0
    run.ok(*command)


def test_a_read_only_database_still_shows_status_log_and_report(
    run: Cli, workspace: Path, engine: Engine, tmp_path: Path
) -> None:
    seed_campaign(engine, workspace, count=3)
    run.ok("send", SLUG, "--outbox", str(tmp_path / "out"), "--yes")
    engine.dispose()
    # Root ignores file permissions, so the database is opened read-only the way SQLite
    # allows for anyone: a read-only URI. A write through it fails as on a read-only file.
    url = f"sqlite:///file:{workspace / 'mailer.db'}?mode=ro&uri=true"

    def call(*args: str) -> Result:
        return CliRunner().invoke(
            cli, ["-w", str(workspace), "--db", url, *args], catch_exceptions=False
        )

    status = call("status", "--format", "json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)[0]["sent"] == 3
    log = call("log", SLUG, "--format", "csv")
    assert log.exit_code == 0 and log.output.count("\n") == 4
    report = call("report", SLUG, "--output", str(tmp_path / "r.html"))
    assert report.exit_code == 0, report.output
    assert (tmp_path / "r.html").stat().st_size > 0
    assert call("log", "--events", "--all", "--format", "json").exit_code == 0
    refused = call("campaign", "create", "more", "--template", "appeal", "--from", FROM)
    assert refused.exit_code == 1
    assert refused.output.startswith(
        "Error: the database cannot be written (it is read-only here); the campaign was not created"
    )
    assert "Traceback" not in refused.output
    paused = call("campaign", "pause", SLUG)
    assert paused.exit_code == 1 and paused.output.startswith("Error: ")
    assert len(paused.output.strip().splitlines()) == 1


def test_campaign_create_waits_for_a_writer_that_finishes_within_the_busy_timeout(
    run: Cli, engine: Engine, holder: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 60_000)
    assert holder.stdin is not None
    stdin = holder.stdin

    def release() -> None:
        stdin.write("\n")
        stdin.flush()

    timer = threading.Timer(0.5, release)
    timer.start()
    try:
        run.ok("campaign", "create", SLUG, "--template", "appeal", "--from", FROM)
        run.ok("suppress", "add", "a@example.org", "--reason", "manual")
    finally:
        timer.join()
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Campaign)) == 1


def test_a_pause_by_a_person_is_in_status_and_stops_send(
    run: Cli, workspace: Path, engine: Engine, tmp_path: Path
) -> None:
    seed_campaign(engine, workspace, count=2)
    run.ok("campaign", "pause", SLUG, "--reason", "waiting for the translation")
    shown = run.ok("status", SLUG).output
    assert "waiting for the translation; `mailer campaign resume appeal` lets it go on" in shown
    refused = run("send", SLUG, "--outbox", str(tmp_path / "out"), "--yes")
    assert refused.exit_code == 1
    assert "`mailer campaign resume appeal` lets it go on" in refused.output
    assert statuses(engine) == {}
    run.ok("campaign", "resume", SLUG)
    with Session(engine) as s:
        assert s.scalars(select(Campaign.status)).one() == "draft"
    run.ok("send", SLUG, "--outbox", str(tmp_path / "out"), "--yes")
    assert statuses(engine) == {"sent": 2}
    not_paused = run("campaign", "resume", SLUG)
    assert not_paused.exit_code == 1
    assert "campaign appeal is not paused (it is done)" in not_paused.output


def on_a_terminal(workspace: Path, args: list[str], answers: list[tuple[str, str]]) -> str:
    """`mailer` on a real terminal (a pty): waits for each prompt, types its answer; returns
    all it printed."""
    import pty
    import select as selecting
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from mailer.cli import main; main()", "-w", str(workspace), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "MAILER_SMTP_PASSWORD": "pw", "COLUMNS": "200", "TERM": "dumb"},
    )
    os.close(slave)
    seen = b""
    pending = list(answers)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = selecting.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        if pending and pending[0][0].encode() in seen.split(b"\n")[-1]:
            os.write(master, pending.pop(0)[1].encode() + b"\r")
        if proc.poll() is not None and not ready:
            break
    proc.wait(timeout=30)
    os.close(master)
    return seen.decode(errors="replace").replace("\r\n", "\n")


def test_the_confirmation_asks_for_a_rate_when_a_provider_has_none(
    run: Cli, workspace: Path, engine: Engine
) -> None:
    seed_campaign(engine, workspace, count=2)
    # A provider's address: nothing is sent to it (the answer to "Send now?" is no, and the
    # server is contacted only after it), so no traffic leaves this machine.
    shown = on_a_terminal(
        workspace,
        ["send", SLUG, "--smtp", "smtp://office@mail.example.org:587"],
        [("Rate for this send", "fast"), ("Rate for this send", "120/min"), ("Send now?", "n")],
    )
    assert "note:      no sending rate is set for mail.example.org" in shown
    assert "--rate 'fast': expected N/s, N/min or N/h" in shown
    assert "Send now? [y/N]" in shown
    assert "Aborted" in shown
    assert statuses(engine) == {}


def test_quiet_days_are_checked_again_when_a_letter_is_claimed(
    run: Cli, workspace: Path, engine: Engine, tmp_path: Path
) -> None:
    """A letter whose contact another campaign wrote to after it was queued is skipped by the
    claim, with an event: here three letters refused once and requeued by `retry` (no longer
    a first attempt, so the queue's own check leaves them alone) while another campaign wrote
    to their contacts."""
    emails = seed_campaign(engine, workspace, count=6, create=False)
    run.ok("campaign", "create", "second", "--template", "plain", "--from", FROM,
           "--skip-contacted-within", "14d")  # fmt: skip
    refused = set(emails[:3])
    with SmtpTestServer() as server:
        server.on_rcpt = lambda a: "550 5.7.1 refused by policy" if a in refused else None
        assert run("send", "second", "--smtp", server.url(), "--yes").exit_code == 3
        assert statuses(engine, "second") == {"sent": 3, "failed": 3}
        # Meanwhile the first campaign writes to those three.
        run.ok("campaign", "create", "first", "--template", "plain", "--from", FROM,
               *(f"--where=email={e}" for e in emails[:3]))  # fmt: skip
        run.ok("send", "first", "--outbox", str(tmp_path / "first"), "--yes")
        assert "Requeued 3 failed" in run.ok("retry", "second", "--failed").output
        server.on_rcpt = None
        before = len(server.recipients())
        again = run.ok("send", "second", "--smtp", server.url(), "--yes")
        assert len(server.recipients()) == before  # nothing more went out
    assert statuses(engine, "second") == {"sent": 3, "skipped": 3}
    assert "skipped 3 (suppressed, invalid address, or written to lately" in again.output
    with Session(engine) as s:
        skipped = s.execute(
            select(Contact.email, Event.detail)
            .join(Event, Event.contact_id == Contact.id)
            .join(Campaign, Campaign.id == Event.campaign_id)
            .where(Campaign.slug == "second", Event.kind == "skipped")
        ).all()
    assert {email for email, _ in skipped} == refused
    assert all(
        detail.startswith("quiet days: campaign first wrote to this contact on")
        and detail.endswith("within the 14 quiet day(s); found at its claim")
        for _, detail in skipped
    )
