"""Several senders on one campaign (PostgreSQL, FOR UPDATE SKIP LOCKED): each message once."""

from __future__ import annotations

import collections
import shutil
import threading
from pathlib import Path

from smtp_server import SmtpTestServer, seed_campaign
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import db
from mailer import engine as send_engine
from mailer.config import Workspace, data_path
from mailer.models import Event, Message
from mailer.policy import SendPolicy
from mailer.send_report import SendReport
from mailer.smtp import SmtpPool, parse_smtp_url


def test_two_concurrent_senders_deliver_each_message_exactly_once(
    pg_url: str, tmp_path: Path
) -> None:
    engine = db.make_engine(pg_url)
    try:
        db.upgrade(engine)
        root = tmp_path / "ws"
        shutil.copytree(data_path("templates"), root / "templates")
        workspace = Workspace(root=root, settings={}, database_url_override=pg_url)
        emails = seed_campaign(engine, root, count=300)
        reports: list[SendReport] = []
        errors: list[BaseException] = []
        policy = SendPolicy(batch_size=10)
        with SmtpTestServer(delay=0.005) as server:
            barrier = threading.Barrier(2)

            def sender() -> None:
                try:
                    pool = SmtpPool(parse_smtp_url(server.url()), size=2)
                    barrier.wait()
                    reports.append(
                        send_engine.send_campaign(
                            workspace=workspace,
                            engine=engine,
                            slug="appeal",
                            transport=pool,
                            concurrency=2,
                            policy=policy,
                        )
                    )
                except BaseException as exc:  # surfaced below
                    errors.append(exc)

            threads = [threading.Thread(target=sender) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert errors == []
            received = collections.Counter(server.recipients())
        assert sorted(received) == sorted(emails)
        assert set(received.values()) == {1}
        assert sum(r.sent for r in reports) == 300
        print("senders:", [r.sent for r in reports])
        with Session(engine) as s:
            statuses = dict(
                s.execute(select(Message.status, func.count()).group_by(Message.status)).all()
            )
            queued_events = s.scalar(
                select(func.count()).select_from(Event).where(Event.kind == "queued")
            )
        assert statuses == {"sent": 300}
        # Both senders resolved the audience; each contact was queued once.
        assert queued_events == 300
    finally:
        engine.dispose()
