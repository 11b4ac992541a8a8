"""Composing in a worker process: the same bytes as in the sender, and never a lost message.

A large run composes its messages in `python -m mailer.compose_worker` (see compose_worker);
these tests run that real process against a real workspace.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import signal
from pathlib import Path

import pytest
from conftest import SEEDS, Cli
from smtp_server import SmtpTestServer, seed_campaign
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from mailer import engine as send_engine
from mailer.compose import Composed
from mailer.compose_worker import BatchComposer, ComposeWorker, Composing
from mailer.config import Workspace, find_workspace
from mailer.models import Campaign, Contact, Message
from mailer.policy import SendPolicy
from mailer.smtp import SmtpPool, parse_smtp_url

FROM = "Campaign Office <office@example.org>"


@pytest.fixture
def ws(workspace: Path) -> Workspace:
    return find_workspace(start=workspace)


@pytest.fixture
def appeal(run: Cli, engine: Engine) -> tuple[Campaign, list[int]]:
    """The seed list and the starter appeal: ten languages, partner cities, signatories."""
    run.ok("import", "signatories", str(SEEDS / "signatories.csv"))
    run.ok("import", "partnerships", str(SEEDS / "partnerships.csv"))
    run.ok("import", "contacts", str(SEEDS / "contacts.csv"))
    run.ok("campaign", "create", "appeal", "--template", "appeal", "--from", FROM)
    with Session(engine) as session:
        campaign = session.scalars(select(Campaign)).one()
        session.expunge(campaign)
        ids = list(session.scalars(select(Contact.id).order_by(Contact.id)))
    return campaign, ids


def _without_date(data: bytes) -> bytes:
    # The Date header is the time of composing; everything else is determined by the data.
    return b"\r\n".join(line for line in data.split(b"\r\n") if not line.startswith(b"Date: "))


def test_the_worker_composes_the_same_messages_as_the_sender(
    ws: Workspace, engine: Engine, appeal: tuple[Campaign, list[int]]
) -> None:
    campaign, ids = appeal
    here = BatchComposer(engine=engine, workspace=ws, campaign=campaign).compose(ids)

    async def in_worker() -> tuple[dict[int, Composed | str], int | None]:
        worker = await ComposeWorker.start(
            database_url=ws.database_url, workspace=ws, campaign_id=campaign.id
        )
        assert worker is not None
        try:
            while not worker.ready:
                assert not worker.gone, "the worker did not start"
                await asyncio.sleep(0.05)
            # Several batches in flight at once come back in order.
            halves = [worker.compose(ids[: len(ids) // 2]), worker.compose(ids[len(ids) // 2 :])]
            first, second = await asyncio.gather(*halves)
        finally:
            await worker.close()
        # Closing its stdin ends the worker on its own.
        return {**first, **second}, worker.process.returncode

    there, returncode = asyncio.run(in_worker())
    assert returncode == 0
    assert sorted(there) == sorted(here) == sorted(ids)
    assert len(ids) >= 60
    for contact_id in ids:
        mine, theirs = here[contact_id], there[contact_id]
        assert isinstance(mine, Composed) and isinstance(theirs, Composed)
        assert _without_date(theirs.data) == _without_date(mine.data)
        # The hash is of the bytes sent, Date included.
        assert theirs.body_hash == hashlib.sha256(theirs.data).hexdigest()
        assert theirs._replace(data=b"", body_hash="") == mine._replace(data=b"", body_hash="")
    languages = collections.Counter(c.language for c in here.values() if isinstance(c, Composed))
    assert len(languages) >= 5


def test_a_missing_contact_is_reported_per_message_not_for_the_batch(
    ws: Workspace, engine: Engine, appeal: tuple[Campaign, list[int]]
) -> None:
    campaign, ids = appeal

    async def in_worker() -> dict[int, Composed | str]:
        worker = await ComposeWorker.start(
            database_url=ws.database_url, workspace=ws, campaign_id=campaign.id
        )
        assert worker is not None
        try:
            while not worker.ready:
                assert not worker.gone
                await asyncio.sleep(0.05)
            return await worker.compose([ids[0], 999_999])
        finally:
            await worker.close()

    batch = asyncio.run(in_worker())
    assert isinstance(batch[ids[0]], Composed)
    assert batch[999_999] == "contact 999999 no longer exists"


def test_a_worker_that_cannot_start_leaves_composing_to_the_sender(
    ws: Workspace, engine: Engine, appeal: tuple[Campaign, list[int]], tmp_path: Path
) -> None:
    campaign, ids = appeal

    async def go() -> tuple[bool, dict[int, Composed | str]]:
        worker = await ComposeWorker.start(
            database_url=f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}",
            workspace=ws,
            campaign_id=campaign.id,
        )
        assert worker is not None
        composing = Composing(
            BatchComposer(engine=engine, workspace=ws, campaign=campaign), worker=worker
        )
        try:
            while not worker.gone:
                await asyncio.sleep(0.05)
            future = composing.submit(ids[:5])
            return worker.ready, await composing.result(future, ids[:5])
        finally:
            await composing.close()

    ready, batch = asyncio.run(go())
    assert not ready
    assert sorted(batch) == sorted(ids[:5])
    assert all(isinstance(c, Composed) for c in batch.values())


def _worker_pids() -> list[int]:
    """This process's compose workers, found in /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"mailer.compose_worker" in cmdline and ppid == os.getpid():
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker in /proc")
def test_a_large_run_uses_the_worker_and_survives_its_death(
    ws: Workspace, workspace: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    emails = seed_campaign(engine, workspace, count=400)
    killed: list[int] = []
    environments: list[bytes] = []
    sent_so_far = 0
    monkeypatch.setenv("MAILER_SMTP_PASSWORD", "not-for-the-worker")

    def on_data(_envelope: object) -> None:
        # Halfway through, the worker dies as if the OOM killer took it.
        nonlocal sent_so_far
        sent_so_far += 1
        if sent_so_far == 250:
            for pid in _worker_pids():
                environments.append(Path(f"/proc/{pid}/environ").read_bytes())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    with SmtpTestServer(delay=0.01) as server:
        server.on_data = on_data
        pool = SmtpPool(parse_smtp_url(server.url()), size=2)
        report = send_engine.send_campaign(
            workspace=ws,
            engine=engine,
            slug="appeal",
            transport=pool,
            concurrency=2,
            policy=SendPolicy(batch_size=10, compose_worker_from=100),
        )
        received = collections.Counter(server.recipients())
    assert killed, "no compose worker was running halfway through a 400-message run"
    # It sends nothing, so it never holds the SMTP password.
    assert environments and all(b"not-for-the-worker" not in env for env in environments)
    assert report.composed_by_worker > 0
    assert report.sent == 400
    assert sorted(received) == sorted(emails)
    assert set(received.values()) == {1}
    with Session(engine) as session:
        statuses = dict(
            session.execute(select(Message.status, func.count()).group_by(Message.status)).all()
        )
    assert statuses == {"sent": 400}


def test_a_small_run_starts_no_worker(ws: Workspace, workspace: Path, engine: Engine) -> None:
    seed_campaign(engine, workspace, count=20)
    with SmtpTestServer() as server:
        pool = SmtpPool(parse_smtp_url(server.url()), size=2)
        report = send_engine.send_campaign(
            workspace=ws, engine=engine, slug="appeal", transport=pool, concurrency=2
        )
        assert len(server.received) == 20
    assert report.sent == 20
    assert report.composed_by_worker == 0
