"""`mailer demo`: the whole job on a fresh folder; what the server received matches the record."""

from __future__ import annotations

import csv
import io
import json
import mailbox
import os
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mailer.cli import cli


@dataclass(frozen=True)
class Demo:
    result: Result
    root: Path
    cwd: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One demo run (the default folder name, in a fresh directory), shared by the tests here."""
    cwd = tmp_path_factory.mktemp("fresh-machine")
    previous = Path.cwd()
    saved = {
        k: os.environ.pop(k) for k in ("MAILER_WORKSPACE", "MAILER_DATABASE_URL") if k in os.environ
    }
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(cli, ["demo"], catch_exceptions=False)
    finally:
        os.chdir(previous)
        os.environ.update(saved)
    yield Demo(result=result, root=cwd / "mailer-demo", cwd=cwd)


def _mailer(demo: Demo, *args: str) -> Result:
    result = CliRunner().invoke(cli, ["-w", str(demo.root), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _received(demo: Demo) -> list[EmailMessage]:
    box = mailbox.Maildir(demo.root / "received", create=False)
    out = []
    for key in box.iterkeys():
        message = message_from_bytes(box.get_bytes(key), policy=policy.default)
        assert isinstance(message, EmailMessage)
        out.append(message)
    return out


def test_demo_runs_the_whole_job_and_says_where_things_are(demo: Demo) -> None:
    assert demo.result.exit_code == 0, demo.result.output
    out = demo.result.stdout
    for step in (
        "1. Workspace",
        "2. Import",
        "3. Create the campaign",
        "4. Check",
        "5. Send",
        "6. Status",
    ):
        assert step in out
    assert "smtp+plain://127.0.0.1:" in out
    assert f"in the Maildir {demo.root / 'received'}" in out
    assert f"HTML report:      {demo.root / 'report.html'}" in out
    assert (demo.root / "mailer.toml").is_file() and (demo.root / "report.html").is_file()


def test_maildir_holds_one_message_per_non_skipped_recipient(demo: Demo) -> None:
    (status,) = json.loads(_mailer(demo, "status", "--format", "json").stdout)
    assert status["campaign"] == "appeal" and status["total"] > 0
    assert status["sent"] == status["total"] - status["skipped"]
    for state in ("queued", "sending", "retry", "failed", "uncertain"):
        assert status[state] == 0, state
    received = _received(demo)
    assert len(received) == status["sent"]
    assert f"Received letters: {len(received)} in the Maildir" in demo.result.stdout


def test_log_agrees_with_what_the_server_received(demo: Demo) -> None:
    rows = list(
        csv.DictReader(io.StringIO(_mailer(demo, "log", "appeal", "--format", "csv").stdout))
    )
    sent = {r["email"]: r for r in rows if r["status"] == "sent"}
    received = _received(demo)
    by_rcpt = {str(m["Delivered-To"]): m for m in received}
    assert set(by_rcpt) == set(sent)
    for email, message in by_rcpt.items():
        row = sent[email]
        assert message["Message-ID"] == row["message_id"]
        assert str(message["Subject"]) == row["subject"].lstrip("'")
        assert row["smtp_code"] == "250" and row["attempts"] == "1"
        assert "stored as" in row["smtp_reply"]
        assert message["Return-Path"] and "appeals@campaign.example.org" in str(message["From"])
    # Skipped recipients (suppressed or unusable) are in the log but were never delivered.
    for r in rows:
        if r["status"] == "skipped":
            assert r["email"] not in by_rcpt


def test_report_agrees_with_status_and_server(demo: Demo) -> None:
    (status,) = json.loads(_mailer(demo, "status", "--format", "json").stdout)
    page = (demo.root / "report.html").read_text(encoding="utf-8")
    assert f'id="count-total">{status["total"]:,}</div>' in page
    assert f'id="count-sent">{len(_received(demo)):,}</div>' in page
    assert f'id="count-skipped">{status["skipped"]:,}</div>' in page


def test_letters_are_personal(demo: Demo) -> None:
    received = _received(demo)
    nuernberg = next(m for m in received if str(m["Delivered-To"]) == "mayor@nuernberg.example.org")
    body = nuernberg.get_body(preferencelist=("plain",))
    assert body is not None
    text = body.get_content()
    assert "Nürnberg" in text and "Kharkiv" in text.replace("Charkiw", "Kharkiv")


def test_replies_go_to_the_signing_mayor_by_name(demo: Demo) -> None:
    received = _received(demo)
    nuernberg = next(m for m in received if str(m["Delivered-To"]) == "mayor@nuernberg.example.org")
    # Nürnberg's oldest tie is Kharkiv (1990): its mayor signs, and answers reach him.
    reply_to = nuernberg["Reply-To"].addresses[0]
    assert (reply_to.display_name, reply_to.addr_spec) == (
        "Igor Terekhov",
        "mayor@kharkiv.example.org",
    )
    assert all(m["Reply-To"].addresses[0].display_name for m in received if m["Reply-To"])


def test_second_demo_in_the_same_folder_is_refused(
    demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = sorted(p.name for p in (demo.root / "received" / "new").iterdir())
    monkeypatch.chdir(demo.cwd)
    result = CliRunner().invoke(cli, ["demo"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: {demo.root} holds an earlier demo; remove it (rm -r {demo.root}) "
        "or name another folder: mailer demo OTHER-FOLDER"
    )
    assert sorted(p.name for p in (demo.root / "received" / "new").iterdir()) == before


def test_demo_refuses_a_folder_in_use(tmp_path: Path) -> None:
    used = tmp_path / "papers"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["demo", str(used)])
    assert result.exit_code == 1
    assert "exists and is not empty; name a new folder" in result.stderr
    assert [p.name for p in used.iterdir()] == ["notes.txt"]

    office = tmp_path / "office"
    assert CliRunner().invoke(cli, ["init", str(office)]).exit_code == 0
    result = CliRunner().invoke(cli, ["demo", str(office)])
    assert result.exit_code == 1
    assert "is a workspace; the demo never writes into one" in result.stderr


def test_suppressed_sample_recipient_is_skipped_not_sent(demo: Demo) -> None:
    from mailer.demo import SUPPRESSED

    assert f"{SUPPRESSED} asked not to be contacted" in demo.result.stdout
    (row,) = csv.DictReader(
        io.StringIO(
            _mailer(demo, "log", "appeal", "--contact", SUPPRESSED, "--format", "csv").stdout
        )
    )
    assert row["status"] == "skipped"
    assert SUPPRESSED not in {str(m["Delivered-To"]) for m in _received(demo)}
    shown = _mailer(demo, "contacts", "show", SUPPRESSED).stdout
    assert "SUPPRESSED    manual" in shown and "appeal: skipped" in shown


def test_demo_in_a_named_folder_never_uses_the_configured_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "team.db"
    monkeypatch.setenv("MAILER_DATABASE_URL", f"sqlite:///{elsewhere}")
    result = CliRunner().invoke(cli, ["demo", str(tmp_path / "try")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not elsewhere.exists()
    assert (tmp_path / "try" / "mailer.db").is_file()
    received = len(list((tmp_path / "try" / "received" / "new").iterdir()))
    assert received > 0 and f"Received letters: {received} in the Maildir" in result.stdout
