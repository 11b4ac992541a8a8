"""Connections and migrations. SQLite is tuned here for durability: a claim must survive power loss."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from mailer.config import data_path
from mailer.errors import DatabaseError

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported where migrations are handled, not with this module: the compose worker
# (see compose_worker) needs only engines, and Alembic is 11 MB of its memory.

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, **kwargs: Any) -> Engine:
    try:
        engine = create_engine(url, **kwargs)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise DatabaseError(f"cannot use database URL {redact_url(url)}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling would defer BEGIN; we want BEGIN when we say so.
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.info.get("immediate") else "BEGIN")


def is_new_sqlite_file(url: str) -> bool:
    """An SQLite URL whose file does not exist yet (nothing to look at before making it)."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return False
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return False
    name = parsed.database
    if name == ":memory:" or name.startswith("file:"):
        return False
    return not Path(name).exists()


def redact_url(url: str) -> str:
    """A URL fit for an error message: never the password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(data_path("migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head()


def check_known_revision(engine: Engine, current: str | None) -> None:
    """DatabaseError when the database's schema is newer than this code (see below)."""
    _refuse_unknown_revision(engine, current)


def _refuse_unknown_revision(engine: Engine, current: str | None) -> None:
    """A database migrated by a newer mailer (another laptop upgraded first) is one clean line,
    never Alembic's "Can't locate revision" traceback."""
    if current is None:
        return
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    try:
        known = script.get_revision(current) is not None
    except CommandError:
        known = False
    if not known:
        raise DatabaseError(
            f"database {redact_url(str(engine.url))} is at schema revision {current}, newer "
            f"than this mailer knows (its newest is {script.get_current_head()}): someone "
            "upgraded mailer and the database; upgrade mailer on this machine too "
            "(pip install -U mailer), then try again"
        )


def upgrade(engine: Engine, *, revision: str = "head") -> None:
    _refuse_unknown_revision(engine, current_revision(engine))
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            from alembic import command

            command.upgrade(config, revision)
    except OperationalError as exc:
        raise DatabaseError(f"cannot migrate {redact_url(str(engine.url))}: {exc.orig}") from exc


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as connection:
            from alembic.runtime.migration import MigrationContext

            return MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        raise DatabaseError(f"cannot open {redact_url(str(engine.url))}: {exc.orig}") from exc


def ensure_current(engine: Engine) -> None:
    """Refuse to work on a database whose schema the code does not know."""
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        _refuse_unknown_revision(engine, current)
        raise DatabaseError(
            f"database {redact_url(str(engine.url))} is at revision {current or 'none'}, "
            f"the code expects {head}; run `mailer db upgrade`"
        )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as session, session.begin():
        yield session


@contextmanager
def writing(engine: Engine, *, what: str) -> Iterator[Session]:
    """A session whose transaction holds the database's write lock from its start, committed
    at the end of the block.

    On SQLite it begins with BEGIN IMMEDIATE and so waits within the busy timeout for another
    writer (a send, an import): a deferred transaction that reads first fails at once when it
    comes to write, busy timeout or not. A database that stays busy, is full or is read-only is
    one DatabaseError that says what to do; the transaction is rolled back, so nothing of
    `what` (e.g. "the campaign was not created") is half-written."""
    sqlite_db = engine.dialect.name == "sqlite"
    try:
        with engine.connect() as connection:
            if sqlite_db:
                connection.info["immediate"] = True
            try:
                with connection.begin(), Session(bind=connection, expire_on_commit=False) as s:
                    yield s
                    s.flush()
            finally:
                connection.info.pop("immediate", None)
    except OperationalError as exc:
        raise DatabaseError(explain_operational_error(exc, what=what)) from None


def explain_operational_error(exc: OperationalError, *, what: str) -> str:
    """What a busy, full or read-only database means for the user, in one line."""
    detail = " ".join(str(getattr(exc, "orig", None) or exc).split())
    folded = detail.casefold()
    if "locked" in folded or "busy" in folded:
        seconds = SQLITE_BUSY_TIMEOUT_MS / 1000
        return (
            "the database is busy: another mailer process (a send, an import) kept writing to "
            f"it for more than {seconds:g} s; {what}: run the command again when it has finished"
        )
    if "readonly" in folded or "read-only" in folded or "read only" in folded:
        return (
            f"the database cannot be written (it is read-only here); {what}: check the file's "
            "and its folder's permissions, or run this where the database may be written"
        )
    if "full" in folded or "no space" in folded or "could not extend" in folded:
        return (
            "the disk is full (or the database reached its size limit); "
            f"{what}: free some space and run the command again"
        )
    return f"database error; {what}: {detail[:300]}"
