"""Follow-ups from the record: send -> sync -> follow up reaches exactly who has not answered.

Run on SQLite and on PostgreSQL (the filters are SQL on both).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import inbox_samples as S
import pytest
from click.testing import CliRunner
from conftest import Cli
from smtp_server import seed_campaign
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from test_inbox_sync import mixed, sent_campaign

from mailer import db
from mailer.cli import cli
from mailer.models import Campaign, Contact, Message


@dataclass
class Office:
    run: Cli
    engine: Engine
    workspace: Path


@pytest.fixture(params=["sqlite", "postgresql"])
def office(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Office]:
    root = tmp_path / "ws"
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'mailer.db'}"
    else:
        url = request.getfixturevalue("pg_url")
        monkeypatch.setenv("MAILER_DATABASE_URL", url)
    result = CliRunner().invoke(cli, ["--db", url, "init", str(root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    engine = db.make_engine(url)
    yield Office(run=Cli(root), engine=engine, workspace=root)
    engine.dispose()


def recipients(engine: Engine, slug: str, status: str = "sent") -> set[str]:
    with Session(engine) as s:
        return set(
            s.scalars(
                select(Contact.email)
                .join(Message, Message.contact_id == Contact.id)
                .join(Campaign, Campaign.id == Message.campaign_id)
                .where(Campaign.slug == slug, Message.status == status)
            )
        )


def test_follow_up_reaches_exactly_who_neither_replied_bounced_nor_unsubscribed(
    office: Office, tmp_path: Path
) -> None:
    run, engine = office.run, office.engine
    letters = sent_campaign(run, engine, office.workspace, 12)
    # Contacts imported later, never written to in `appeal`.
    newcomers = seed_campaign(engine, office.workspace, count=2, start=100, create=False)
    run.ok("inbox", "sync", "--maildir", str(S.write_maildir(tmp_path / "M", mixed(letters))))
    a = [address for _mid, address in letters]
    replied, out_of_office, bounced = a[0], a[1], {a[2], a[3], a[7]}
    complained, unsubscribed, delayed = a[5], a[6], a[4]

    created = run.ok(
        "campaign",
        "create",
        "again",
        "--template",
        "plain",
        "--from",
        "office@example.org",
        "--contacted-in",
        "appeal",
        "--not-replied-to",
        "appeal",
    ).stdout
    assert "contacted in appeal and got and did not reply to appeal" in created
    run.ok("send", "again", "--outbox", str(tmp_path / "again"), "--yes")
    expected = set(a) - {replied, complained, unsubscribed} - bounced
    assert out_of_office in expected and delayed in expected
    assert recipients(engine, "again") == expected
    # The bounced, the complaint and the unsubscribed are suppressed: never sent to.
    assert recipients(engine, "again", "skipped") == bounced | {complained, unsubscribed}

    with Session(engine) as s:
        stored = s.scalar(select(Campaign.audience).where(Campaign.slug == "again"))
    assert stored == {
        "where": [],
        "tags": [],
        "contacted_in": ["appeal"],
        "not_replied_to": ["appeal"],
    }

    run.ok(
        "campaign",
        "create",
        "thanks",
        "--template",
        "plain",
        "--from",
        "office@example.org",
        "--replied-to",
        "appeal",
    )
    run.ok(
        "campaign",
        "create",
        "first",
        "--template",
        "plain",
        "--from",
        "office@example.org",
        "--not-contacted-in",
        "appeal",
    )
    (thanks, first) = (
        json.loads(run.ok("status", slug, "--format", "json").stdout)[0]
        for slug in ("thanks", "first")
    )
    assert thanks["total"] == first["total"] == 0  # drafts; their audiences are resolved below
    from mailer import audience

    with Session(engine) as s:
        for slug, want in (("thanks", {replied}), ("first", set(newcomers))):
            aud = audience.Audience.from_json(
                s.scalar(select(Campaign.audience).where(Campaign.slug == slug))
            )
            got = {c.email for c in s.scalars(audience.contacts_query(s, aud))}
            assert got == want, slug


def test_unknown_campaign_in_a_filter_is_one_error_line(office: Office) -> None:
    seed_campaign(office.engine, office.workspace, count=1)
    for flag in ("--contacted-in", "--not-contacted-in", "--replied-to", "--not-replied-to"):
        result = office.run(
            "campaign",
            "create",
            "again",
            "--template",
            "plain",
            "--from",
            "office@example.org",
            flag,
            "no-such",
        )
        assert result.exit_code == 1
        (line,) = result.output.strip().splitlines()
        assert line == f"Error: {flag} no-such: no campaign 'no-such'; campaigns: appeal"
    with Session(office.engine) as s:
        assert s.scalar(select(Campaign.id).where(Campaign.slug == "again")) is None
