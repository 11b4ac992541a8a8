"""A database that goes away mid-send loses no result (issue 11 item 3): a real PostgreSQL
cluster of the test's own, restarted while two `mailer send` processes work one campaign, and a
SQLite file held locked past the busy timeout."""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from smtp_server import SmtpTestServer, seed_campaign
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer import db
from mailer import engine as send_engine
from mailer.config import Workspace, data_path
from mailer.models import Contact, Event, Message
from mailer.policy import SendPolicy
from mailer.send_report import SendReport
from mailer.smtp import SmtpPool, parse_smtp_url

SLUG = "appeal"


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


class PrivateCluster:
    """A PostgreSQL cluster of this test alone (initdb in a temp folder, a free port), so that
    restarting it leaves the shared server untouched. Run as `postgres` when the test is root
    (initdb refuses root)."""

    def __init__(self, root: Path) -> None:
        bin_dir = _pg_bin()
        assert bin_dir is not None
        self.bin = bin_dir
        self.data = root / "pgdata"
        self.log = root / "pg.log"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self.prefix, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (argv, done.stdout, done.stderr)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._ctl("stop", "-m", "immediate")

    def _ctl(self, *args: str) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.data} "
            "-c fsync=off -c max_connections=40"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-o",
            options,
            *args,
        )


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    if _pg_bin() is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as
    # `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="mailer-pg-"))
    pg = PrivateCluster(folder)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


def start_send(workspace: Path, url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from mailer.cli import main; main()",
            "-w",
            str(workspace),
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
    )


def test_a_postgresql_restart_mid_send_loses_no_result(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    engine = db.make_engine(cluster.url)
    try:
        db.upgrade(engine)
        workspaces = []
        for name in ("a", "b"):
            root = tmp_path / name
            shutil.copytree(data_path("templates"), root / "templates")
            (root / "mailer.toml").write_text(
                f'[database]\nurl = "{cluster.url}"\n', encoding="utf-8"
            )
            workspaces.append(root)
        emails = seed_campaign(engine, workspaces[0], count=1500)
        shutil.copytree(
            workspaces[0] / "templates" / "plain", workspaces[1] / "templates" / "plain"
        )
        engine.dispose()
        with SmtpTestServer(pipelining=True, delay=0.01) as server:
            procs = [start_send(root, server.url(), "--concurrency", "2") for root in workspaces]
            deadline = time.monotonic() + 60
            while len(server.received) < 250 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert all(p.poll() is None for p in procs), "both senders still at work"
            at_restart = len(server.received)
            cluster.restart()
            outputs = [p.communicate(timeout=180)[0] for p in procs]
            received = collections.Counter(server.arrived_recipients())
        assert at_restart < 1200, "the restart came mid-send"
        for proc, output in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, output
            # No noise from the driver, no traceback: the outage was waited out.
            assert "Pipeline" not in output and "Traceback" not in output, output
        # Promise 1: nobody twice. Nothing lost: every letter recorded, each as it went.
        assert [a for a, n in received.items() if n > 1] == []
        with Session(engine) as s:
            rows: dict[str, str] = dict(
                s.execute(select(Contact.email, Message.status).join(Message.contact)).all()
            )
            sent_events = len(s.scalars(select(Event.id).where(Event.kind == "sent")).all())
        # Each result written once, even those whose first write was cut off by the restart.
        assert sent_events == sum(1 for v in rows.values() if v == "sent")
        counts = collections.Counter(rows.values())
        print("after a restart mid-send:", dict(counts), "at restart:", at_restart)
        assert set(rows.values()) <= {"sent", "uncertain"} and len(rows) == len(emails)
        # Only what a sender truly could not know: at most its connections times two each.
        assert counts["uncertain"] <= 2 * 2 * 2
        for email, status in rows.items():
            assert received[email] == 1, (email, status)
    finally:
        engine.dispose()


def test_sqlite_locked_past_the_busy_timeout_is_waited_out(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds SQLite's write lock for longer than the busy timeout: the sender
    hands nothing over meanwhile, keeps its answers, and goes on once the lock is free."""
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 300)
    engine = db.make_engine(f"sqlite:///{workspace / 'mailer.db'}")
    emails = seed_campaign(engine, workspace, count=120)
    progress: list[tuple[float, float] | None] = []
    with SmtpTestServer(pipelining=True) as server:
        locked = threading.Event()
        holding = 2.0

        def hold_the_lock() -> None:
            while len(server.received) < 30:
                time.sleep(0.005)
            conn = sqlite3.connect(workspace / "mailer.db", isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            locked.set()
            # The sender notices within a second or so (its next write waits, then fails).
            time.sleep(1.5)
            noticed = len(server.arrived)
            time.sleep(holding)
            still_locked = len(server.arrived)
            conn.execute("COMMIT")
            conn.close()
            arrivals.extend([noticed, still_locked])

        arrivals: list[int] = []
        locker = threading.Thread(target=hold_the_lock)
        locker.start()
        pool = SmtpPool(parse_smtp_url(server.url()), size=2)

        def seen(report: SendReport) -> None:
            progress.append(report.database_down)

        report = send_engine.send_campaign(
            workspace=Workspace(root=workspace),
            engine=engine,
            slug=SLUG,
            transport=pool,
            concurrency=2,
            rate=40,
            progress=seen,
            policy=SendPolicy(db_outage=30.0),
        )
        locker.join()
        received = collections.Counter(server.arrived_recipients())
    assert locked.is_set()
    noticed, still_locked = arrivals
    # Once the sender knew it could not record, nothing more went out (at 40/s, 80 would have).
    assert still_locked - noticed == 0, arrivals
    assert [p for p in progress if p is not None], "the wait was shown on the progress line"
    assert (report.sent, report.uncertain) == (120, 0)
    assert sorted(received) == sorted(emails) and set(received.values()) == {1}
    with Session(engine) as s:
        assert set(s.scalars(select(Message.status))) == {"sent"}
    engine.dispose()


def test_answers_kept_past_the_outage_window_are_recorded_by_the_next_run(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database stays locked longer than the sender waits: it stops with one error line,
    hands nothing more over, and the answers it had are in its journal -- the next run on this
    machine records them (sent stays sent, never uncertain), and sends the rest."""
    from mailer import journal
    from mailer.errors import DatabaseError

    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    engine = db.make_engine(f"sqlite:///{workspace / 'mailer.db'}")
    emails = seed_campaign(engine, workspace, count=60)
    release = threading.Event()
    with SmtpTestServer(pipelining=True) as server:

        def hold_the_lock() -> None:
            while len(server.received) < 10:
                time.sleep(0.002)
            conn = sqlite3.connect(workspace / "mailer.db", isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            release.wait(30)
            conn.execute("COMMIT")
            conn.close()

        locker = threading.Thread(target=hold_the_lock)
        locker.start()
        try:
            with pytest.raises(DatabaseError, match="could not be reached") as stopped:
                send_engine.send_campaign(
                    workspace=Workspace(root=workspace),
                    engine=engine,
                    slug=SLUG,
                    transport=SmtpPool(parse_smtp_url(server.url()), size=2),
                    concurrency=2,
                    rate=30,
                    policy=SendPolicy(db_outage=1.5),
                )
        finally:
            release.set()
            locker.join()
        assert "kept in" in str(stopped.value) and "run `mailer send appeal` again" in str(
            stopped.value
        )
        kept = list(journal.journal_dir(workspace).glob("*.journal"))
        assert len(kept) == 1
        first = collections.Counter(server.arrived_recipients())
        with Session(engine) as s:
            recorded_sent = set(
                s.scalars(
                    select(Contact.email).join(Message.contact).where(Message.status == "sent")
                )
            )
            held = len(s.scalars(select(Message.id).where(Message.status == "sending")).all())
        # Some answers came while the database was locked: known to the journal only.
        unrecorded = set(first) - recorded_sent
        assert unrecorded
        second_run = dt.datetime.now(dt.UTC)
        report = send_engine.send_campaign(
            workspace=Workspace(root=workspace),
            engine=engine,
            slug=SLUG,
            transport=SmtpPool(parse_smtp_url(server.url()), size=2),
            concurrency=2,
        )
        received = collections.Counter(server.arrived_recipients())
    # Each answer the journal kept is recorded as it was; what was never handed over goes
    # back to the queue; nothing is left uncertain.
    assert report.recovered_known == len(unrecorded) and report.recovered == 0
    assert report.recovered_known + report.recovered_requeued == held
    assert sorted(received) == sorted(emails) and set(received.values()) == {1}
    with Session(engine) as s:
        assert set(s.scalars(select(Message.status))) == {"sent"}
        kept_sent_at = s.scalars(
            select(Message.sent_at).join(Message.contact).where(Contact.email.in_(unrecorded))
        ).all()
    # A letter's `sent_at` is its handover, which the journal kept: not the time it was
    # recorded by the next run.
    assert all(at is not None and at < second_run for at in kept_sent_at)
    assert not list(journal.journal_dir(workspace).glob("*.journal"))
    engine.dispose()
