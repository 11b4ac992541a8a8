"""Shared fixtures: real workspaces on disk, a real migrated SQLite file, real PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from mailer import db
from mailer.cli import cli
from mailer.config import data_path

PG_ENV = "MAILER_TEST_DATABASE_URL"
SEEDS = data_path("seeds")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own settings must never leak into a test.
    for name in (
        "MAILER_WORKSPACE",
        "MAILER_DATABASE_URL",
        "MAILER_SMTP_PASSWORD",
        "MAILER_IMAP_PASSWORD",
    ):
        monkeypatch.delenv(name, raising=False)
    # Times are shown in the local zone: tests read them in UTC unless they set TZ themselves.
    monkeypatch.setenv("TZ", "UTC")


class Cli:
    """`mailer` run in-process against one workspace, the way simonw/sqlite-utils tests its CLI."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.runner = CliRunner()

    def __call__(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> Result:
        return self.runner.invoke(
            cli, ["-w", str(self.workspace), *args], input=input, env=env, catch_exceptions=False
        )

    def ok(self, *args: str, input: str | None = None) -> Result:
        result = self(*args, input=input)
        assert result.exit_code == 0, (result.exit_code, result.output)
        return result


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    result = CliRunner().invoke(cli, ["init", str(root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def run(workspace: Path) -> Cli:
    return Cli(workspace)


@pytest.fixture
def engine(workspace: Path) -> Iterator[Engine]:
    eng = db.make_engine(f"sqlite:///{workspace / 'mailer.db'}")
    yield eng
    eng.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return db.session_factory(engine)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL schema for one test, dropped afterwards."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set: PostgreSQL tests need a server (.ci/run sets it)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = db.make_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in base else "?"
    yield f"{base}{separator}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()
