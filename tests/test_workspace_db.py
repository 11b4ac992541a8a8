from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import text

from mailer import db
from mailer.cli import cli
from mailer.errors import DatabaseError
from mailer.models import Base


def _assert_models_match_migrations(url: str) -> None:
    engine = db.make_engine(url)
    try:
        assert db.current_revision(engine) is None
        db.upgrade(engine)
        assert db.current_revision(engine) == db.head_revision()
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_sqlite_upgrade_to_head_matches_models(tmp_path: Path) -> None:
    _assert_models_match_migrations(f"sqlite:///{tmp_path / 'm.db'}")


def test_postgresql_upgrade_to_head_matches_models(pg_url: str) -> None:
    _assert_models_match_migrations(pg_url)


def test_sqlite_connections_are_durable(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    engine.dispose()


def test_init_creates_workspace_and_prints_next_steps(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "office")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "office" / "mailer.toml").is_file()
    assert (tmp_path / "office" / "mailer.db").is_file()
    assert (tmp_path / "office" / "templates" / "appeal" / "en.txt.j2").is_file()
    assert "Next steps" in result.output
    engine = db.make_engine(f"sqlite:///{tmp_path / 'office' / 'mailer.db'}")
    assert db.current_revision(engine) == db.head_revision()
    engine.dispose()


def test_init_refuses_existing_workspace(workspace: Path) -> None:
    result = CliRunner().invoke(cli, ["init", str(workspace)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "already" in result.output


def test_command_outside_workspace_says_how_to_make_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["db", "current"])
    assert result.exit_code == 1
    assert "Error: no mailer workspace here" in result.output
    assert "mailer init" in result.output
    assert "Traceback" not in result.output


def test_workspace_found_from_subfolder_and_env(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = workspace / "templates"
    monkeypatch.chdir(sub)
    assert "head" in CliRunner().invoke(cli, ["db", "current"]).output
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["db", "current"], env={"MAILER_WORKSPACE": str(workspace)})
    assert result.exit_code == 0 and "up to date" in result.output


def test_db_flag_and_env_override_workspace_database(workspace: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    runner = CliRunner()
    result = runner.invoke(
        cli, ["-w", str(workspace), "--db", f"sqlite:///{other}", "db", "upgrade"]
    )
    assert result.exit_code == 0, result.output
    assert "upgraded from empty" in result.output
    assert other.is_file()
    result = runner.invoke(
        cli,
        ["-w", str(workspace), "db", "current"],
        env={"MAILER_DATABASE_URL": f"sqlite:///{other}"},
    )
    assert str(other) in result.output


def test_unmigrated_database_is_refused_with_hint(workspace: Path, tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(DatabaseError, match="mailer db upgrade"):
        db.ensure_current(engine)
    engine.dispose()


def test_postgresql_workspace_via_db_flag(workspace: Path, pg_url: str) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["-w", str(workspace), "--db", pg_url, "db", "upgrade"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["-w", str(workspace), "--db", pg_url, "db", "current"])
    assert "up to date" in result.output
    assert "postgresql" in result.output


def test_broken_toml_is_one_error_line(workspace: Path) -> None:
    (workspace / "mailer.toml").write_text("[database\nurl=", encoding="utf-8")
    result = CliRunner().invoke(cli, ["-w", str(workspace), "db", "current"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "mailer.toml" in result.output
    assert result.output.count("\n") == 1


def test_the_actor_names_this_user_host_and_process() -> None:
    import getpass
    import os
    import socket

    from mailer.identity import Actor

    actor = Actor.current()
    assert (actor.user, actor.host, actor.pid) == (
        getpass.getuser(),
        socket.gethostname(),
        os.getpid(),
    )
    assert actor.label == f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"
