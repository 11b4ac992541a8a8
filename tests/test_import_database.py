"""An import against a database that is busy or full: it waits within the busy timeout, then
says what to do in one `Error:` line, and nothing of the file is written (issue 11, item 12).

The lock is held by a real second process; the full disk is SQLite's own SQLITE_FULL, reached
through `max_page_count` (a database that may not grow is a full disk to SQLite).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from mailer import db
from mailer.models import Contact, ImportRecord, Partnership, Suppression

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
    """Another process that holds the workspace database's write lock until told to stop."""
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


def count(factory: sessionmaker[Session], model: type) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def contacts_file(tmp_path: Path, rows: int = 50) -> Path:
    path = tmp_path / "c.csv"
    path.write_text(
        "email,name\n" + "".join(f"u{i}@example.org,U{i}\n" for i in range(rows)),
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["import", "contacts"],
        ["import", "partnerships"],
        ["import", "signatories"],
        ["suppress", "import"],
    ],
    ids=["contacts", "partnerships", "signatories", "suppressions"],
)
def test_import_while_another_process_writes_is_one_line(
    run: Cli,
    tmp_path: Path,
    session_factory: sessionmaker[Session],
    holder: subprocess.Popen[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 300)
    files = {
        "contacts": contacts_file(tmp_path),
        "partnerships": tmp_path / "p.csv",
        "signatories": tmp_path / "s.csv",
        "import": tmp_path / "unsub.csv",
    }
    files["partnerships"].write_text(
        "ukrainian_city,partner_city,partner_country\nKharkiv,Lille,FR\n", encoding="utf-8"
    )
    files["signatories"].write_text("name,city\nIhor Terekhov,Kharkiv\n", encoding="utf-8")
    files["import"].write_text("email\ngone@example.org\n", encoding="utf-8")
    result = run(*command, str(files[command[-1]]))
    assert result.exit_code == 1, result.output
    assert result.output == (
        "Error: the database is busy: another mailer process (a send, another import) kept "
        "writing to it for more than 0.3 s; nothing was imported: run the import again when it "
        "has finished\n"
    )
    assert holder.stdin is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout is not None and holder.stdout.readline() == "released\n"
    assert count(session_factory, ImportRecord) == 0
    assert count(session_factory, Suppression) == 0
    run.ok(*command, str(files[command[-1]]))


def test_import_waits_for_a_writer_that_finishes_within_the_busy_timeout(
    run: Cli,
    tmp_path: Path,
    session_factory: sessionmaker[Session],
    holder: subprocess.Popen[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 60_000)
    assert holder.stdin is not None
    stdin = holder.stdin

    def release() -> None:
        stdin.write("\n")
        stdin.flush()

    # The writer finishes while the import waits for the lock (or before it asks: either way
    # the import must succeed, never fail at once).
    timer = threading.Timer(0.5, release)
    timer.start()
    try:
        result = run.ok("import", "contacts", str(contacts_file(tmp_path)))
    finally:
        timer.join()
    assert result.output.splitlines()[-1] == "c.csv: 50 added, 0 updated, 0 unchanged, 0 rejected"
    assert count(session_factory, Contact) == 50


def test_full_disk_during_import_is_one_line_and_writes_nothing(
    run: Cli,
    tmp_path: Path,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pragmas = db._sqlite_pragmas

    def small_disk(dbapi_connection: Any, record: Any) -> None:
        pragmas(dbapi_connection, record)
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count={pages + 3}")

    monkeypatch.setattr(db, "_sqlite_pragmas", small_disk)
    result = run("import", "contacts", str(contacts_file(tmp_path, rows=5_000)))
    assert result.exit_code == 1
    assert result.output == (
        "Error: the disk is full (or the database reached its size limit): nothing was "
        "imported; free some space and run the import again\n"
    )
    monkeypatch.undo()
    assert count(session_factory, Contact) == 0
    assert count(session_factory, ImportRecord) == 0
    assert count(session_factory, Partnership) == 0
