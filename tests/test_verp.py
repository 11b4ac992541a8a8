"""Issue 12 item 4: an optional VERP envelope sender names each letter, so a bounce is matched to
its letter even when the report's returned copy is stripped or its failed address is not ours.

Letters are sent to the test SMTP server (the envelope is read there); the bounces are files in
a Maildir read by `mailer inbox sync`.
"""

from __future__ import annotations

import re
from pathlib import Path

import inbox_samples as S
import pytest
from conftest import Cli
from smtp_server import SmtpTestServer, seed_campaign
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from mailer import tokens, workspace_secret
from mailer.config import find_workspace
from mailer.models import Contact, Event, Message, Suppression
from mailer.tokens import Purpose

SLUG = "appeal"
FORWARDED = "m.hartmann@forwarded.example.net"


def with_setting(workspace: Path, line: str) -> None:
    config = workspace / "mailer.toml"
    config.write_text(config.read_text().replace("[campaign]\n", f"[campaign]\n{line}\n"))


def send_with_verp(
    run: Cli, engine: Engine, workspace: Path, *, setting: str = "verp = true", count: int = 3
) -> dict[str, str]:
    """Each recipient's envelope sender, as the SMTP server received it."""
    with_setting(workspace, setting)
    seed_campaign(engine, workspace, count=count)
    with SmtpTestServer() as smtp:
        run.ok("send", SLUG, "--smtp", smtp.url(), "--yes")
        return {r.rcpt_tos[0]: r.mail_from for r in smtp.accepted()}


def stripped_dsn(*, to: str, failed: str = FORWARDED, n: int = 1) -> bytes:
    """A report from a server the letter was forwarded to: the failed address is the forward
    target (never ours) and the returned copy is gone; only the envelope says whose it was."""
    return S._crlf(
        f"Date: {S.DATE}\nMessage-ID: <dsn-fwd-{n}@mx.forwarded.example.net>\n"
        "From: MAILER-DAEMON@mx.forwarded.example.net (Mail Delivery System)\n"
        f"To: {to}\nDelivered-To: {to}\nSubject: Undelivered Mail Returned to Sender\n"
        "Auto-Submitted: auto-replied\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="rep"\n\n'
        "--rep\nContent-Type: text/plain; charset=us-ascii\n\n"
        "Your message could not be delivered.\n\n"
        "--rep\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; mx.forwarded.example.net\n\n"
        f"Final-Recipient: rfc822; {failed}\nAction: failed\nStatus: 5.1.1\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{failed}>: User unknown\n\n--rep--\n"
    )


def mangled_bounce(*, to: str, failed: str = FORWARDED, n: int = 1) -> bytes:
    """A plain-text bounce (no report parts) whose quoted original was cut off."""
    return S._crlf(
        f"Date: {S.DATE}\nMessage-ID: <qm-fwd-{n}@mx.forwarded.example.net>\n"
        "From: MAILER-DAEMON@mx.forwarded.example.net\n"
        f"To: office@example.org\nX-Original-To: {to}\n"
        "Subject: failure notice\n\n"
        "Hi. This is the qmail-send program at mx.forwarded.example.net.\n"
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        "This is a permanent error; I've given up. Sorry it didn't work out.\n\n"
        f"<{failed}>:\n550 5.1.1 mailbox unavailable\n\n"
        "--- Below this line is a copy of the message.\n\n[truncated]\n"
    )


def letter_of(engine: Engine, address: str) -> Message:
    with Session(engine) as s:
        found = s.scalar(select(Message).join(Contact).where(Contact.email == address))
        assert found is not None
        return found


def suppressed(engine: Engine) -> dict[str, str]:
    with Session(engine) as s:
        return {e: r for e, r in s.execute(select(Suppression.email, Suppression.reason))}


# --------------------------------------------------------------------------- the envelope


def test_each_letter_goes_out_with_its_own_verp_address(
    run: Cli, engine: Engine, workspace: Path
) -> None:
    envelopes = send_with_verp(run, engine, workspace)
    assert len(envelopes) == 3
    keys = workspace_secret.keyring(find_workspace(start=workspace))
    for address, mail_from in envelopes.items():
        match = re.fullmatch(r"office\+([a-z2-7]+)@example\.org", mail_from)
        assert match, mail_from
        assert len(mail_from.partition("@")[0]) <= 64
        token = match.group(1)
        assert tokens.verify(keys, token, purpose=Purpose.VERP, slug=SLUG, email=address)
        # A VERP address is no unsubscribe link.
        assert not tokens.verify(keys, token, purpose=Purpose.UNSUBSCRIBE, slug=SLUG, email=address)
    assert len(set(envelopes.values())) == 3


def test_a_named_verp_mailbox_and_test_letters(run: Cli, engine: Engine, workspace: Path) -> None:
    envelopes = send_with_verp(run, engine, workspace, setting='verp = "bounces@example.org"')
    assert all(re.fullmatch(r"bounces\+[a-z2-7]+@example\.org", m) for m in envelopes.values())
    # A test letter is recorded nowhere: it goes out from the plain address.
    with SmtpTestServer() as smtp:
        run.ok(
            "send",
            SLUG,
            "--smtp",
            smtp.url(),
            "--test-to",
            "me@example.com",
            "--limit",
            "1",
            "--yes",
        )
        assert [r.mail_from for r in smtp.accepted()] == ["office@example.org"]


def test_without_verp_the_envelope_is_the_from_address(
    run: Cli, engine: Engine, workspace: Path
) -> None:
    envelopes = send_with_verp(run, engine, workspace, setting="verp = false")
    assert set(envelopes.values()) == {"office@example.org"}


@pytest.mark.parametrize(
    ("setting", "why"),
    [
        ('verp = "bounces"', "give true"),
        ("verp = 3", "give true"),
        ('verp = "not an address@"', "verp 'not an address@'"),
        (f'verp = "{"b" * 40}@example.org"', "must stay within 64"),
    ],
)
def test_a_bad_verp_setting_is_one_clear_error(
    run: Cli, engine: Engine, workspace: Path, setting: str, why: str
) -> None:
    with_setting(workspace, setting)
    seed_campaign(engine, workspace, count=1)
    result = run("preview", SLUG)
    assert result.exit_code == 1
    assert result.output.startswith("Error: mailer.toml [campaign] verp")
    assert why in result.output and len(result.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- the bounce


@pytest.mark.parametrize("kind", ["stripped-dsn", "mangled-text"])
def test_a_bounce_without_its_returned_copy_is_matched_by_its_verp_address(
    run: Cli, engine: Engine, workspace: Path, kind: str
) -> None:
    envelopes = send_with_verp(run, engine, workspace)
    address = sorted(envelopes)[1]
    make = stripped_dsn if kind == "stripped-dsn" else mangled_bounce
    # First the same bounce delivered to the plain address: nothing names the letter.
    control = S.write_maildir(workspace.parent / "plain", [make(to="office@example.org")])
    result = run.ok("inbox", "sync", "--maildir", str(control))
    assert re.search(r"delivery reports for addresses we never wrote to +1", result.output)
    assert suppressed(engine) == {}
    # Delivered to the letter's VERP address: matched, failed, suppressed.
    verp = S.write_maildir(workspace.parent / "verp", [make(to=envelopes[address], n=2)])
    result = run.ok("inbox", "sync", "--maildir", str(verp))
    letter = letter_of(engine, address)
    assert letter.status == "failed" and letter.bounced_at is not None
    assert (letter.smtp_reply or "").startswith("5.")
    assert suppressed(engine) == {address: "hard_bounce"}
    with Session(engine) as s:
        kinds = s.scalars(select(Event.kind).where(Event.message_id == letter.id)).all()
    assert "bounced" in kinds
    # The other letters are untouched.
    for other in set(envelopes) - {address}:
        assert letter_of(engine, other).status == "sent"


def test_a_forged_verp_token_names_no_letter(run: Cli, engine: Engine, workspace: Path) -> None:
    envelopes = send_with_verp(run, engine, workspace)
    address = sorted(envelopes)[0]
    local, _, domain = envelopes[address].partition("@")
    forged = local[:-2] + ("aa" if local[-2:] != "aa" else "bb") + "@" + domain
    maildir = S.write_maildir(workspace.parent / "forged", [stripped_dsn(to=forged)])
    run.ok("inbox", "sync", "--maildir", str(maildir))
    assert suppressed(engine) == {}
    assert letter_of(engine, address).status == "sent"
