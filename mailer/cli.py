"""The command line: parse, call the library, print. No business logic lives here."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
from sqlalchemy import Engine

from mailer import __version__, db
from mailer.config import Workspace, create_workspace, find_workspace
from mailer.errors import MailerError

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class CliState:
    workspace_dir: Path | None
    db_url: str | None
    _workspace: Workspace | None = None
    _engine: Engine | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def workspace(self) -> Workspace:
        if self._workspace is None:
            self._workspace = find_workspace(start=self.workspace_dir, db_url=self.db_url)
        return self._workspace

    def engine(self, *, check_schema: bool = True) -> Engine:
        if self._engine is None:
            self._engine = db.make_engine(self.workspace().database_url)
            self.cleanups.append(self._engine.dispose)
            if check_schema:
                db.ensure_current(self._engine)
        return self._engine


def state() -> CliState:
    return click.get_current_context().find_object(CliState)  # type: ignore[return-value]


def fail(message: str, *, code: int = 1) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Library errors become one `Error:` line and their exit code; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except MailerError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


class MailerGroup(click.Group):
    """Every subcommand gets the error handling, so none can leak a traceback."""

    def command(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> Callable[[Callable[..., Any]], click.Command]:
        decorator = super().command(*args, **kwargs)

        def wrap(func: Callable[..., Any]) -> click.Command:
            command: click.Command = decorator(handle_errors(func))
            return command

        return wrap

    def group(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> Callable[[Callable[..., Any]], click.Group]:
        kwargs.setdefault("cls", MailerGroup)
        decorator: Callable[[Callable[..., Any]], click.Group] = super().group(*args, **kwargs)
        return decorator


@click.group(cls=MailerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--workspace",
    "-w",
    "workspace_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="MAILER_WORKSPACE",
    help="Workspace folder (default: the one containing the current directory).",
)
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    envvar="MAILER_DATABASE_URL",
    help="Database URL, overriding mailer.toml (e.g. postgresql+psycopg://host/db).",
)
@click.version_option(__version__, prog_name="mailer")
@click.pass_context
def cli(ctx: click.Context, workspace_dir: Path | None, db_url: str | None) -> None:
    """Turn one open letter into personal appeals, send them, and keep an exact record.

    \b
    Example:
      mailer demo            # the whole job on an embedded SMTP server
      mailer init campaign-office && cd campaign-office
    """
    st = CliState(workspace_dir=workspace_dir, db_url=db_url)
    ctx.obj = st
    ctx.call_on_close(lambda: [cleanup() for cleanup in reversed(st.cleanups)])


def main() -> None:
    cli(prog_name="mailer")


# --------------------------------------------------------------------------- workspace & db


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=".")
def init(directory: Path) -> None:
    """Make a workspace: mailer.toml, the database, and the starter templates.

    \b
    Example:
      mailer init campaign-office
    """
    st = state()
    workspace = create_workspace(root=directory, db_url=st.db_url)
    engine = db.make_engine(workspace.database_url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()
    click.echo(f"Created workspace {workspace.root}")
    click.echo(f"  settings:  {workspace.root / 'mailer.toml'}")
    click.echo(f"  database:  {db.redact_url(workspace.database_url)} (migrated to head)")
    click.echo(f"  templates: {workspace.templates_dir}")
    click.echo("Next steps:")
    click.echo(f"  cd {directory}")
    click.echo("  mailer import contacts your-list.csv")
    click.echo("  mailer campaign create appeal-2022 --template appeal --from you@example.org")
    click.echo("  mailer check appeal-2022")


@cli.group(name="db")
def db_group() -> None:
    """Inspect and migrate the workspace database.

    \b
    Example:
      mailer db upgrade
    """


@db_group.command(name="upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema.

    \b
    Example:
      mailer db upgrade
    """
    engine = state().engine(check_schema=False)
    before = db.current_revision(engine)
    db.upgrade(engine)
    after = db.current_revision(engine)
    if before == after:
        click.echo(f"Database already at {after}.")
    else:
        click.echo(f"Database upgraded from {before or 'empty'} to {after}.")


@db_group.command(name="current")
def db_current() -> None:
    """Show the database's schema revision and the code's.

    \b
    Example:
      mailer db current
    """
    engine = state().engine(check_schema=False)
    current = db.current_revision(engine)
    head = db.head_revision()
    note = "up to date" if current == head else "run `mailer db upgrade`"
    click.echo(f"{db.redact_url(str(engine.url))}: {current or 'empty'} (head {head}, {note})")


# --------------------------------------------------------------------------- import & contacts
# (importers.py, audience.py)


# --------------------------------------------------------------------------- campaigns, check, preview
# (audience.py, render.py)


# --------------------------------------------------------------------------- send & retry
# (engine.py, transport.py)


# --------------------------------------------------------------------------- review & demo
# (review.py, demo.py)
