"""`mailer inbox sync --imap` against a real Dovecot on 127.0.0.1: plain, STARTTLS and TLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import inbox_samples as S
import pytest
import trustme
from conftest import Cli
from imap_server import DovecotServer
from smtp_server import write_ca
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from test_inbox_sync import mixed, sent_campaign, snapshot

from mailer.models import InboxFolder, InboxMessage, Message

PASSWORD = {"MAILER_IMAP_PASSWORD": "s3cret"}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def imap(ca: trustme.CA) -> Iterator[DovecotServer]:
    if not DovecotServer.available():
        pytest.fail("dovecot is not installed: apt-get install dovecot-imapd (.ci/run does)")
    with DovecotServer(ca=ca) as server:
        yield server


def seen(engine: Engine) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(InboxMessage)) or 0)


def test_imap_sync_reads_only_new_mail_and_never_changes_the_mailbox(
    run: Cli, engine: Engine, workspace: Path, imap: DovecotServer, tmp_path: Path
) -> None:
    letters = sent_campaign(run, engine, workspace, 12)
    mails = mixed(letters)
    imap.append(mails[:9])
    imap.append(mails[9:], folder="Bounces")
    url = imap.url("imap+plain")
    first = run(
        "inbox", "sync", "--imap", url, "--folder", "INBOX", "--folder", "Bounces", env=PASSWORD
    )
    assert first.exit_code == 0, first.output
    assert "13 new mail(s), 8 recorded" in first.stdout
    assert "(INBOX, Bounces)" in first.stdout
    with Session(engine) as s:
        positions = dict(s.execute(select(InboxFolder.folder, InboxFolder.last_uid)).all())
    assert positions == {"INBOX": 9, "Bounces": 4}

    before = snapshot(engine)
    again = run(
        "inbox", "sync", "--imap", url, "--folder", "INBOX", "--folder", "Bounces", env=PASSWORD
    )
    assert "0 new mail(s), 0 recorded" in again.stdout
    assert snapshot(engine) == before

    # A new reply arrives: only it is fetched.
    m8, a8 = letters[8]
    imap.append([S.reply(to_id=m8, sender=a8, own_id="<new@city.example.com>")])
    third = run("inbox", "sync", "--imap", url, env=PASSWORD)
    assert "1 new mail(s), 1 recorded" in third.stdout

    # Read-only: every mail is still there, none marked \Seen or deleted.
    for folder, count in (("INBOX", 10), ("Bounces", 4)):
        flags = imap.flags(folder=folder)
        assert len(flags) == count
        assert not any(b"\\Seen" in f or b"\\Deleted" in f for f in flags.values())

    # The same mails read from a Maildir export are seen already.
    box = S.write_maildir(tmp_path / "export", mails)
    export = run.ok("inbox", "sync", "--maildir", str(box))
    assert "0 recorded" in export.stdout and "seen before" in export.stdout


def test_new_uidvalidity_reads_again_but_counts_nothing_twice(
    run: Cli, engine: Engine, workspace: Path, imap: DovecotServer
) -> None:
    from imapclient import IMAPClient

    letters = sent_campaign(run, engine, workspace, 2)
    mails = [
        S.reply(to_id=m, sender=a, own_id=f"<r{i}@city.example.com>")
        for i, (m, a) in enumerate(letters)
    ]
    imap.append(mails, folder="Bounces")
    url = imap.url("imap+plain")
    assert (
        "2 recorded"
        in run("inbox", "sync", "--imap", url, "--folder", "Bounces", env=PASSWORD).stdout
    )
    with IMAPClient("127.0.0.1", port=imap.port, ssl=False) as client:
        client.login(imap.user, imap.password)
        client.delete_folder("Bounces")
        client.create_folder("Bounces")
    imap.append(mails, folder="Bounces")
    result = run("inbox", "sync", "--imap", url, "--folder", "Bounces", env=PASSWORD)
    assert "2 new mail(s), 0 recorded" in result.stdout and "seen before" in result.stdout
    with Session(engine) as s:
        assert s.scalar(select(func.count(Message.replied_at))) == 2


@pytest.mark.parametrize("scheme", ["imaps", "imap+starttls"])
def test_tls_needs_a_trusted_certificate(
    run: Cli,
    engine: Engine,
    workspace: Path,
    imap: DovecotServer,
    ca: trustme.CA,
    tmp_path: Path,
    scheme: str,
) -> None:
    letters = sent_campaign(run, engine, workspace, 1)
    imap.append([S.reply(to_id=letters[0][0], sender=letters[0][1])])
    refused = run("inbox", "sync", "--imap", imap.url(scheme), env=PASSWORD)
    assert refused.exit_code == 1
    (line,) = refused.output.strip().splitlines()
    assert line.startswith("Error: TLS with IMAP server 127.0.0.1:")
    assert "certificate refused" in line and "--ca-file" in line
    assert seen(engine) == 0
    ca_file = write_ca(ca, tmp_path)
    ok = run("inbox", "sync", "--imap", imap.url(scheme), "--ca-file", str(ca_file), env=PASSWORD)
    assert ok.exit_code == 0, ok.output
    assert "1 recorded" in ok.stdout


def test_wrong_password_missing_folder_and_no_password(
    run: Cli, engine: Engine, workspace: Path, imap: DovecotServer
) -> None:
    url = imap.url("imap+plain")
    imap.append([S.junk()])
    wrong = run("inbox", "sync", "--imap", url, env={"MAILER_IMAP_PASSWORD": "wrong"})
    assert wrong.exit_code == 1
    assert wrong.output.startswith(
        f"Error: IMAP server 127.0.0.1:{imap.port} refused the login of 'office'"
    )
    assert "wrong" not in wrong.output.replace("refused", "")

    missing = run(
        "inbox", "sync", "--imap", url, "--folder", "INBOX", "--folder", "Archiv", env=PASSWORD
    )
    assert missing.exit_code == 1
    (line,) = missing.output.strip().splitlines()
    assert "no folder 'Archiv' for office" in line and "INBOX" in line and "Bounces" in line
    # INBOX exists, but nothing is read when one folder named is wrong.
    assert seen(engine) == 0

    nopass = run("inbox", "sync", "--imap", url)
    assert nopass.exit_code == 1
    assert (
        "no password for office@127.0.0.1" in nopass.output
        and "MAILER_IMAP_PASSWORD" in nopass.output
    )


def test_password_command_from_mailer_toml(
    run: Cli, engine: Engine, workspace: Path, imap: DovecotServer
) -> None:
    config = workspace / "mailer.toml"
    config.write_text(config.read_text() + '\n[imap]\npassword_command = "echo s3cret"\n')
    imap.append([S.junk()])
    result = run("inbox", "sync", "--imap", imap.url("imap+plain"))
    assert result.exit_code == 0, result.output
    assert "1 new mail(s)" in result.stdout


def test_server_not_listening_is_one_error_line(run: Cli) -> None:
    from imap_server import _free_port

    result = run(
        "inbox", "sync", "--imap", f"imap+plain://office@127.0.0.1:{_free_port()}", env=PASSWORD
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot reach IMAP server 127.0.0.1:")
