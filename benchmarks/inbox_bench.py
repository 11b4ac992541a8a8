"""Inbox sync benchmark: `mailer inbox sync` of a generated Maildir of N mixed mails.

A workspace with N/2 fictional contacts (`@cityN.example.org`) and a campaign sent to them, then
a Maildir of N mails that come back: replies (30 %), out-of-office answers with a return date
(15 %), RFC 3464 bounces (15 %), qmail bounces (5 %), delays (5 %), junk (20 %) and replies to
mail that is not ours (10 %). The sync runs as its own process (`mailer inbox sync`), so its
peak memory is its own; then a second sync that finds nothing new.

Targets (issue 12): at least 1,000 mails/s on 2 cores, peak memory under 150 MB, a second
no-change sync under 5 s, at 100,000 mails.

    .venv/bin/python benchmarks/inbox_bench.py --mails 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert, select

from mailer import db
from mailer.config import create_workspace
from mailer.message import make_message_id
from mailer.models import Campaign, Contact, Message

SLUG = "appeal"
DOMAIN = "example.org"


def setup(root: Path, contacts: int) -> list[tuple[str, str]]:
    """The workspace, the contacts and the campaign as `send` leaves them: every letter sent."""
    workspace = create_workspace(root=root)
    engine = db.make_engine(workspace.database_url)
    db.upgrade(engine)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    letters = []
    with engine.begin() as conn:
        campaign_id = conn.execute(
            insert(Campaign)
            .values(
                slug=SLUG,
                template="appeal",
                from_address=f"office@{DOMAIN}",
                status="done",
                template_sources={},
                audience={},
                settings={},
                default_language="en",
                created_at=now,
            )
            .returning(Campaign.id)
        ).scalar_one()
        rows = [
            {
                "email": f"mayor.{i}@city{i % 500}.example.org",
                "name": f"Mayor {i}",
                "attributes": {},
                "tags": [],
                "created_at": now,
                "updated_at": now,
            }
            for i in range(contacts)
        ]
        for start in range(0, len(rows), 5000):
            conn.execute(insert(Contact), rows[start : start + 5000])
        ids = conn.execute(select(Contact.id, Contact.email).order_by(Contact.id)).all()
        messages = []
        for contact_id, address in ids:
            mid = make_message_id(campaign_slug=SLUG, contact_email=address, domain=DOMAIN)
            letters.append((mid, address))
            messages.append(
                {
                    "campaign_id": campaign_id,
                    "contact_id": contact_id,
                    "status": "sent",
                    "attempts": 1,
                    "message_id": mid,
                    "queued_at": now,
                    "sent_at": now,
                    "updated_at": now,
                }
            )
        for start in range(0, len(messages), 5000):
            conn.execute(insert(Message), messages[start : start + 5000])
    engine.dispose()
    return letters


def mail(i: int, letters: list[tuple[str, str]]) -> bytes:
    mid, address = letters[i % len(letters)]
    date = email.utils.format_datetime(dt.datetime.now(dt.UTC))
    own = f"<in.{i}@city{i % 500}.example.org>"
    kind = i % 20
    head = f"Date: {date}\r\nMessage-ID: {own}\r\nTo: office@{DOMAIN}\r\n"
    if kind < 6:
        return (
            f"{head}From: {address}\r\nSubject: Re: An appeal\r\nIn-Reply-To: {mid}\r\n"
            f"References: {mid}\r\n\r\nDear colleagues,\r\nwe stand with you ({i}).\r\n"
            "\r\nOn Sunday the office wrote:\r\n> the mayors of Ukraine\r\n"
        ).encode()
    if kind < 9:
        back = (dt.date.today() + dt.timedelta(days=10 + i % 30)).strftime("%d %B %Y")
        return (
            f"{head}From: {address}\r\nSubject: Out of Office: An appeal\r\n"
            f"Auto-Submitted: auto-replied\r\nIn-Reply-To: {mid}\r\n\r\n"
            f"I am out of the office and back on {back}.\r\n"
        ).encode()
    if kind < 12:
        return (
            f"{head}From: MAILER-DAEMON@mx{i % 50}.example.net\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
            "--b\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
            "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
            f"Reporting-MTA: dns; mx{i % 50}.example.net\r\n\r\n"
            f"Final-Recipient: rfc822; {address}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            f"Diagnostic-Code: smtp; 550 5.1.1 <{address}>: User unknown\r\n\r\n"
            f"--b\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: {mid}\r\n"
            f"To: {address}\r\n\r\n--b--\r\n"
        ).encode()
    if kind < 13:
        return (
            f"{head}From: MAILER-DAEMON@mx.example.net\r\nSubject: failure notice\r\n\r\n"
            "Hi. This is the qmail-send program at mx.example.net.\r\n"
            "I'm afraid I wasn't able to deliver your message to the following addresses.\r\n"
            "This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n"
            f"<{address}>:\r\nSorry, no mailbox here by that name. (#5.1.1)\r\n\r\n"
            f"--- Below this line is a copy of the message.\r\n\r\nMessage-ID: {mid}\r\n"
        ).encode()
    if kind < 14:
        return (
            f"{head}From: MAILER-DAEMON@mx.example.net\r\nSubject: Delayed Mail\r\n"
            'MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
            "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n\r\n"
            f"Final-Recipient: rfc822; {address}\r\nAction: delayed\r\nStatus: 4.4.7\r\n\r\n"
            f"--b\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: {mid}\r\n\r\n--b--\r\n"
        ).encode()
    if kind < 18:
        return (
            f"{head}From: Deals <deals{i % 97}@shop.example.net>\r\nSubject: Offer {i}\r\n"
            "Content-Type: text/html\r\n\r\n<html><body><p>Buy now</p></body></html>\r\n"
        ).encode()
    return (
        f"{head}From: someone{i}@elsewhere.example.com\r\nSubject: Re: Something else\r\n"
        f"In-Reply-To: <other.{i}@elsewhere.example.com>\r\n\r\nNot about your letter.\r\n"
    ).encode()


def write_maildir(path: Path, count: int, letters: list[tuple[str, str]]) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    for i in range(count):
        (path / "new" / f"{stamp}.M{i}P1.bench").write_bytes(mail(i, letters))


def timed_sync(root: Path, maildir: Path) -> tuple[float, float, str]:
    """Seconds, peak RSS (MB) of the sync process, and its summary."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "mailer"),
            "-w",
            str(root),
            "inbox",
            "sync",
            "--maildir",
            str(maildir),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest of them so far (KiB on Linux).
    return elapsed, max(peak, before) / 1024, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mails", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it.")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="inbox-bench-"))
    root, maildir = base / "ws", base / "Maildir"
    print(f"python {platform.python_version()}, {os.cpu_count()} cpu(s), {args.mails:,} mails")
    t = time.perf_counter()
    letters = setup(root, max(1, args.mails // 2))
    write_maildir(maildir, args.mails, letters)
    print(f"setup: {time.perf_counter() - t:.1f} s")
    elapsed, peak, summary = timed_sync(root, maildir)
    print(summary.rstrip())
    print(
        f"first sync:  {elapsed:.1f} s, {args.mails / elapsed:,.0f} mails/s, peak RSS {peak:.0f} MB"
    )
    elapsed, peak, summary = timed_sync(root, maildir)
    print(f"second sync: {elapsed:.2f} s (nothing new), peak RSS {peak:.0f} MB")
    if args.keep is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
