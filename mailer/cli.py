"""The command line: parse, call the library, print. No business logic lives here."""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from mailer import __version__
from mailer.config import Workspace, create_workspace, find_workspace
from mailer.errors import MailerError

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from mailer import db
    from mailer.importers import ImportSummary
    from mailer.send_report import SendReport
else:

    def _lazy(name: str) -> ModuleType:
        # `mailer --version` and `--help` answer without loading SQLAlchemy (a third of a
        # second); the module loads on its first use. Every other heavy import in this file
        # sits inside the command that needs it.
        found = sys.modules.get(name)
        if found is not None:
            return found
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    db = _lazy("mailer.db")

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


def warn_about_secrets(workspace: Workspace) -> None:
    """Files holding a secret that others may read: one `Warning:` line each, on stderr."""
    from mailer.config import secret_warnings

    for line in secret_warnings(workspace):
        click.echo(f"Warning: {line}", err=True)


def actor() -> Any:
    from mailer.identity import Actor

    return Actor.current()


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
        except Exception as exc:
            # A database that is busy, full, read-only or unreachable where no library call
            # expected it: still one line that says what to do, never a traceback.
            if not type(exc).__module__.startswith("sqlalchemy"):
                raise
            from sqlalchemy.exc import OperationalError

            if isinstance(exc, OperationalError):
                message = db.explain_operational_error(exc, what="nothing was changed")
            else:
                detail = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
                message = f"database error: {detail}"
            click.echo(f"Error: {message}", err=True)
            sys.exit(1)

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
@click.option(
    "--db",
    "init_db_url",
    metavar="URL",
    help="Use this (shared) database: written to mailer.toml without its password; an empty "
    "database is migrated, one already in use is joined.",
)
def init(directory: Path, init_db_url: str | None) -> None:
    """Make a workspace: mailer.toml, the database, and the starter templates.

    With --db URL (e.g. a team's PostgreSQL database) the workspace uses that database, and
    no SQLite file is made: an empty database is migrated to the newest schema, one another
    workspace made is joined as it is. The password stays out of mailer.toml: give it in
    ~/.pgpass or PGPASSWORD.

    \b
    Example:
      mailer init campaign-office
      mailer init laptop-b --db postgresql+psycopg://mailer@db.example.org/campaigns
    """
    from mailer.config import strip_password

    st = state()
    url = init_db_url or st.db_url
    status = "migrated to head"
    current: str | None = None
    if url is not None and not db.is_new_sqlite_file(url):
        # Looked at before anything is written: a database newer than this mailer, or one
        # that cannot be reached, leaves no half-made workspace behind.
        probe = db.make_engine(url)
        try:
            current = db.current_revision(probe)
            db.check_known_revision(probe, current)
        finally:
            probe.dispose()
        if current is None:
            status = "empty: migrated to head"
        elif current == db.head_revision():
            status = f"in use: joined (schema {current})"
        else:
            status = f"at {current}, older than this mailer: run `mailer db upgrade`"
    workspace = create_workspace(root=directory, db_url=url)
    engine = db.make_engine(workspace.database_url if url is None else url)
    try:
        if current is None:
            db.upgrade(engine)
        if current is None or current == db.head_revision():
            from mailer import workspace_secret

            # The key of unsubscribe links and VERP addresses: made now, never printed (an
            # older database gets it at `mailer db upgrade`).
            workspace_secret.ensure(workspace, engine=engine)
    finally:
        engine.dispose()
    click.echo(f"Created workspace {workspace.root}")
    click.echo(f"  settings:  {workspace.root / 'mailer.toml'} (readable by you only)")
    click.echo(f"  database:  {db.redact_url(workspace.database_url)} ({status})")
    click.echo(f"  templates: {workspace.templates_dir}")
    if url is not None and strip_password(url) != url:
        click.echo(
            "  note:      the database password is not written to mailer.toml; give it in "
            "~/.pgpass or PGPASSWORD"
        )
    click.echo("Next steps:")
    click.echo(f"  cd {directory}")
    if url is not None and status.startswith("in use"):
        click.echo("  mailer status                 # the team's campaigns")
        return
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
    from mailer import workspace_secret

    engine = state().engine(check_schema=False)
    before = db.current_revision(engine)
    db.upgrade(engine)
    # A workspace older than its secret gets one now (never printed).
    workspace_secret.ensure(state().workspace(), engine=engine)
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

_READ_OPTIONS = (
    click.option(
        "--encoding",
        metavar="E",
        help="The file's encoding (default: detected; UTF-8/16 with BOM, UTF-8, cp1251, cp1252).",
    ),
    click.option(
        "--delimiter",
        metavar="D",
        help="Field separator: , ; | or tab (default: detected).",
    ),
    click.option(
        "--map",
        "mappings",
        metavar="SOURCE=FIELD",
        multiple=True,
        help="Read column SOURCE as FIELD (repeatable), e.g. --map 'E-Post=email'.",
    ),
    click.option("--strict", is_flag=True, help="Write nothing if any row is rejected."),
    click.option("--dry-run", is_flag=True, help="Validate and report; write nothing."),
    click.option(
        "--rejects",
        "rejects_path",
        metavar="FILE.csv",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write rejected rows (original cells + reject_reason) to this CSV.",
    ),
)


def _read_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_READ_OPTIONS):
        func = option(func)
    return func


def _run_import(
    run: Callable[[sessionmaker[Session]], ImportSummary], rejects_path: Path | None
) -> None:
    from mailer import importers

    factory = db.session_factory(state().engine())
    try:
        summary = run(factory)
    except importers.StrictImportFailed as exc:
        click.echo(importers.format_import(exc.summary, rejects_path=rejects_path))
        raise
    click.echo(importers.format_import(summary, rejects_path=rejects_path))


@cli.group(name="import")
def import_group() -> None:
    """Import contacts, partner-city ties or signatories from CSV or XLSX.

    \b
    Example:
      mailer import contacts mayors.xlsx --tag wave-1
      mailer import partnerships seeds/partnerships.csv
    """


@import_group.command(name="contacts")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_read_options
@click.option("--tag", "tags", metavar="T", multiple=True, help="Tag every imported contact.")
def import_contacts_cmd(
    file: Path,
    encoding: str | None,
    delimiter: str | None,
    mappings: tuple[str, ...],
    strict: bool,
    dry_run: bool,
    rejects_path: Path | None,
    tags: tuple[str, ...],
) -> None:
    """Add or update contacts from FILE (CSV in any usual encoding, or XLSX), by email.

    Columns: email plus any of name, title, salutation, organisation, city, region, country,
    language, tags (usual synonyms such as E-mail, Full name, Municipality, Lang are
    understood); every other column is kept as an attribute for templates. Empty cells never
    erase stored values; tags and attributes merge. Suppressed addresses stay suppressed.
    Rejected rows are listed as FILE:ROW: column: reason (the header is row 1).

    \b
    Example:
      mailer import contacts mayors.csv --tag germany --rejects rejected.csv
      mailer import contacts liste.csv --encoding cp1252 --delimiter ';' --map 'E-Post=email'
    """
    from mailer import fields, importers

    mapping = fields.parse_mapping(mappings)
    _run_import(
        lambda factory: importers.import_contacts(
            factory,
            path=file,
            encoding=encoding,
            delimiter=delimiter,
            mapping=mapping,
            tags=tags,
            strict=strict,
            dry_run=dry_run,
            rejects_path=rejects_path,
        ),
        rejects_path,
    )


@import_group.command(name="partnerships")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_read_options
@click.option(
    "--new-city",
    is_flag=True,
    help="Add a Ukrainian city that is not in the known list (default: such a row is rejected).",
)
def import_partnerships_cmd(
    file: Path,
    encoding: str | None,
    delimiter: str | None,
    mappings: tuple[str, ...],
    strict: bool,
    dry_run: bool,
    rejects_path: Path | None,
    new_city: bool,
) -> None:
    """Add or update partner-city ties from FILE; cities are created as needed.

    Columns: ukrainian_city, partner_city, partner_country, kind (twin, sister, partner,
    friendship, cooperation), since (a year), note; optional ukrainian_region, partner_region.
    The Ukrainian city must be a known one (seeds/ukrainian_cities.csv, or added before) in any
    usual spelling: Kharkiv, Charkiw, Kharkov and Харків are one city. An unknown one is
    rejected with the nearest known city, unless --new-city.

    \b
    Example:
      mailer import partnerships seeds/partnerships.csv
    """
    from mailer import fields, importers

    mapping = fields.parse_mapping(mappings)
    _run_import(
        lambda factory: importers.import_partnerships(
            factory,
            path=file,
            encoding=encoding,
            delimiter=delimiter,
            mapping=mapping,
            strict=strict,
            dry_run=dry_run,
            rejects_path=rejects_path,
            new_city=new_city,
        ),
        rejects_path,
    )


@import_group.command(name="signatories")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_read_options
@click.option(
    "--new-city",
    is_flag=True,
    help="Add a Ukrainian city that is not in the known list (default: such a row is rejected).",
)
def import_signatories_cmd(
    file: Path,
    encoding: str | None,
    delimiter: str | None,
    mappings: tuple[str, ...],
    strict: bool,
    dry_run: bool,
    rejects_path: Path | None,
    new_city: bool,
) -> None:
    """Add or update the Ukrainian signatories from FILE, by (name, city).

    Columns: name, title, city (a known Ukrainian city, in any usual spelling; --new-city
    adds one that is not known), email (optional reply-to address); optional region.

    \b
    Example:
      mailer import signatories seeds/signatories.csv
    """
    from mailer import fields, importers

    mapping = fields.parse_mapping(mappings)
    _run_import(
        lambda factory: importers.import_signatories(
            factory,
            path=file,
            encoding=encoding,
            delimiter=delimiter,
            mapping=mapping,
            strict=strict,
            dry_run=dry_run,
            rejects_path=rejects_path,
            new_city=new_city,
        ),
        rejects_path,
    )


@cli.group(name="contacts")
def contacts_group() -> None:
    """Look at the imported contacts.

    \b
    Example:
      mailer contacts list --where country=DE
    """


@contacts_group.command(name="list")
@click.option(
    "--where",
    "wheres",
    metavar="FIELD=VALUE",
    multiple=True,
    help="Filter (repeatable): a field (email, name, city, country, language, ...) or an "
    "imported column. The same field twice means either value.",
)
@click.option("--tag", "tags", metavar="T", multiple=True, help="Only contacts with this tag.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="table: for people; csv: a header row, formula-like cells neutralised; "
    "json: one JSON array of objects (with attributes).",
)
def contacts_list(wheres: tuple[str, ...], tags: tuple[str, ...], fmt: str) -> None:
    """List contacts, optionally filtered.

    \b
    Example:
      mailer contacts list --where country=DE --where language=de
      mailer contacts list --tag wave-1 --format csv > wave-1.csv
    """
    from mailer import review
    from mailer.audience import Audience, parse_where

    audience = Audience(where=parse_where(wheres), tags=tuple(tags))
    with db.session_factory(state().engine())() as session:
        review.write_contact_list(
            session, audience=audience, fmt=review.OutputFormat(fmt), out=sys.stdout
        )


@cli.group(name="suppress")
def suppress_group() -> None:
    """Addresses that must never be contacted, whatever campaign or import brings them back.

    \b
    Example:
      mailer suppress add mayor@example.org --reason unsubscribed
    """


@suppress_group.command(name="add")
@click.argument("emails", metavar="EMAIL...", nargs=-1, required=True)
@click.option(
    "--reason",
    required=True,
    metavar="R",
    help="unsubscribed, hard_bounce, complaint or manual.",
)
def suppress_add(emails: tuple[str, ...], reason: str) -> None:
    """Suppress addresses (an address suppressed already keeps its first reason).

    \b
    Example:
      mailer suppress add mayor@example.org office@example.org --reason manual
    """
    from mailer import audience, importers, outbox
    from mailer.clock import utcnow
    from mailer.errors import InvalidValueError

    parsed = audience.parse_reason(reason)
    check = importers.EmailChecker()
    valid = []
    for email in emails:
        try:
            valid.append(check(email))
        except ValueError as exc:
            raise InvalidValueError(f"not an email address: {exc}") from None
    who = actor()
    with db.writing(state().engine(), what="nothing was suppressed") as session:
        added = outbox.add_suppressions(
            session, emails=valid, reason=parsed, source="cli", actor=who, now=utcnow()
        )
    click.echo(f"{added} address(es) suppressed, {len(set(valid)) - added} already suppressed.")


@suppress_group.command(name="remove")
@click.argument("email")
@click.option(
    "--reason",
    "why",
    required=True,
    metavar="TEXT",
    help="Why this address may be written to again (kept in the log).",
)
def suppress_remove(email: str, why: str) -> None:
    """Let a suppressed address be written to again; the removal and its reason stay in the log.

    \b
    Example:
      mailer suppress remove mayor@example.org --reason "asked to hear from us again (phone, 3 May)"
    """
    from mailer import outbox
    from mailer.clock import utcnow

    with db.writing(state().engine(), what="nothing was changed") as session:
        gone = outbox.remove_suppression(session, email=email, why=why, actor=actor(), now=utcnow())
    click.echo(
        f"{gone.email} is no longer suppressed (was {gone.reason}); "
        "`mailer log --events --all` keeps the change and its reason."
    )


@suppress_group.command(name="list")
def suppress_list() -> None:
    """List suppressed addresses with reason, source and time.

    \b
    Example:
      mailer suppress list
    """
    from mailer import audience

    with db.session_factory(state().engine())() as session:
        rows = audience.list_suppressions(session)
    for row in rows:
        when = row.created_at.strftime("%Y-%m-%d %H:%M")
        click.echo(f"{row.email}  {row.reason}  {row.source or ''}  {when}".rstrip())
    click.echo(f"{len(rows)} suppressed address(es)")


@suppress_group.command(name="import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--reason",
    default="manual",
    show_default=True,
    metavar="R",
    help="Reason for rows without a reason column value.",
)
@click.option("--encoding", metavar="E", help="The file's encoding (default: detected).")
@click.option("--delimiter", metavar="D", help="Field separator (default: detected).")
def suppress_import(file: Path, reason: str, encoding: str | None, delimiter: str | None) -> None:
    """Suppress every address in FILE (an email column, optionally a reason column).

    \b
    Example:
      mailer suppress import unsubscribed.csv --reason unsubscribed
    """
    from mailer import audience, importers

    summary = importers.import_suppressions(
        db.session_factory(state().engine()),
        path=file,
        reason=audience.parse_reason(reason),
        encoding=encoding,
        delimiter=delimiter,
    )
    click.echo(importers.format_import(summary))


# --------------------------------------------------------------------------- campaigns, check, preview
# (audience.py, render.py)


def _session() -> Any:
    return db.transaction(db.session_factory(state().engine()))


_SENDING_OPTIONS = (
    click.option(
        "--smtp",
        "smtp_url",
        metavar="URL",
        help="The server `mailer send SLUG` uses when given none (no password in it).",
    ),
    click.option(
        "--rate",
        metavar="N/s|N/min|N/h",
        help="The pace `mailer send SLUG` keeps when given none, e.g. 300/min.",
    ),
    click.option(
        "--daily-cap",
        type=click.IntRange(min=1),
        help="At most this many sent in any 24 hours, when send is given no --daily-cap.",
    ),
    click.option(
        "--skip-contacted-within",
        "skip_within",
        metavar="DAYS",
        help="Leave out recipients another campaign wrote to in the last DAYS (e.g. 14d); "
        "re-checked whenever the campaign is sent.",
    ),
)


def _sending_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_SENDING_OPTIONS):
        func = option(func)
    return func


def _sending_settings(
    smtp_url: str | None, rate: str | None, daily_cap: int | None, skip_within: str | None
) -> Any:
    from mailer import campaigns

    return campaigns.SendingSettings(
        smtp_url=smtp_url.strip() if smtp_url else None,
        rate=rate.strip() if rate else None,
        daily_cap=daily_cap,
        quiet_days=campaigns.parse_days(skip_within, flag="--skip-contacted-within")
        if skip_within
        else None,
    )


@cli.group(name="campaign")
def campaign_group() -> None:
    """Create and inspect campaigns (one letter, one audience).

    \b
    Example:
      mailer campaign create appeal-2022 --template appeal --from office@example.org
      mailer campaign show appeal-2022
    """


@campaign_group.command(name="create")
@click.argument("slug")
@click.option("--template", "template", required=True, metavar="NAME", help="templates/NAME/")
@click.option("--from", "from_address", required=True, metavar="ADDRESS", help="Sender.")
@click.option(
    "--reply-to",
    "reply_to",
    metavar="ADDRESS|signatory",
    help="Reply-To address, or `signatory`: the partner city's signatory where one has an address.",
)
@click.option("--where", "where", multiple=True, metavar="FIELD=VALUE", help="Audience filter.")
@click.option("--tag", "tags", multiple=True, metavar="T", help="Only contacts with this tag.")
@click.option("--title", default=None, help="A human-readable title (default: none).")
@click.option(
    "--language",
    default=None,
    metavar="LANG",
    help="Default language (default: [campaign] default_language in mailer.toml, else en).",
)
@click.option(
    "--contacted-in",
    "contacted_in",
    multiple=True,
    metavar="SLUG",
    help="Only contacts a letter of campaign SLUG was sent to (repeatable).",
)
@click.option(
    "--not-contacted-in",
    "not_contacted_in",
    multiple=True,
    metavar="SLUG",
    help="Only contacts no letter of campaign SLUG was sent to (repeatable).",
)
@click.option(
    "--replied-to",
    "replied_to",
    multiple=True,
    metavar="SLUG",
    help="Only contacts who answered campaign SLUG (auto-replies do not count; repeatable).",
)
@click.option(
    "--not-replied-to",
    "not_replied_to",
    multiple=True,
    metavar="SLUG",
    help="Only contacts who have not answered campaign SLUG (an out-of-office answer is no "
    "answer; repeatable).",
)
@_sending_options
@click.option(
    "--window",
    "windows",
    multiple=True,
    metavar="'DAYS HH:MM-HH:MM'",
    help="Default sending window, e.g. 'Mon-Fri 09:00-17:00' (repeatable; `send --window` "
    "overrides it).",
)
@click.option(
    "--window-zone",
    metavar="recipient|ZONE",
    help="Whose time the windows are in: each recipient's own (default) or one IANA zone.",
)
@click.option(
    "--default-zone",
    metavar="ZONE",
    help="Time zone of recipients whose own cannot be told (default: [campaign] default_zone "
    "in mailer.toml, else UTC).",
)
@click.option(
    "--follow-up-of",
    metavar="SLUG",
    help="A follow-up of campaign SLUG: to its recipients, in the same thread (Re: its subject "
    "unless the template sets one).",
)
@click.option(
    "--after",
    metavar="DURATION",
    help="With --follow-up-of: due this long after each contact's first letter, e.g. 7d, 36h.",
)
def campaign_create(
    slug: str,
    template: str,
    from_address: str,
    reply_to: str | None,
    where: tuple[str, ...],
    tags: tuple[str, ...],
    title: str | None,
    language: str | None,
    contacted_in: tuple[str, ...],
    not_contacted_in: tuple[str, ...],
    replied_to: tuple[str, ...],
    not_replied_to: tuple[str, ...],
    smtp_url: str | None,
    rate: str | None,
    daily_cap: int | None,
    skip_within: str | None,
    windows: tuple[str, ...],
    window_zone: str | None,
    default_zone: str | None,
    follow_up_of: str | None,
    after: str | None,
) -> None:
    """Create a draft campaign; its audience is a filter, resolved whenever needed.

    The letter is frozen in the database now: the template's files, From, Reply-To, the
    default language and the unsubscribe address and URL of mailer.toml. Every sender of the
    team sends exactly this; `mailer campaign update SLUG --template NAME` changes it.
    --smtp, --rate and --daily-cap are remembered for `mailer send SLUG`.

    A follow-up is a campaign whose audience comes from the record of another: bounced and
    unsubscribed addresses are suppressed anyway.

    \b
    Example:
      mailer campaign create appeal-de --template appeal --from office@example.org \\
          --reply-to signatory --where country=DE --tag mayor
      mailer campaign create appeal-again --template appeal --from office@example.org \\
          --contacted-in appeal-de --not-replied-to appeal-de
      mailer campaign create appeal-eu --template appeal --from office@example.org \\
          --window 'Mon-Thu 09:00-12:00' --window 'Mon-Thu 14:00-17:00'
      mailer campaign create follow-1 --template follow-up --from office@example.org \\
          --follow-up-of appeal-de --after 7d --not-replied-to appeal-de
    """
    from mailer import campaigns, timing
    from mailer.audience import Audience, parse_where

    workspace = state().workspace()
    sending = _sending_settings(smtp_url, rate, daily_cap, skip_within)
    audience = Audience(
        where=parse_where(where),
        tags=tuple(tags),
        contacted_in=tuple(contacted_in),
        not_contacted_in=tuple(not_contacted_in),
        replied_to=tuple(replied_to),
        not_replied_to=tuple(not_replied_to),
    )
    default_language = language or str(workspace.setting("campaign", "default_language", "en"))
    quiet_days = sending.quiet_days or campaigns.quiet_days_setting(workspace)
    with db.writing(state().engine(), what="the campaign was not created") as session:
        campaign = campaigns.create_campaign(
            session,
            slug=slug,
            template=template,
            from_address=from_address,
            reply_to=reply_to,
            audience=audience,
            title=title,
            default_language=default_language,
            templates_dir=workspace.templates_dir,
            settings=workspace,
            sending=sending,
            actor=actor(),
        )
        timing.configure(
            session,
            campaign,
            windows=windows,
            window_zone=window_zone,
            default_zone=default_zone,
            follow_up_of=follow_up_of,
            after=after,
        )
        audience = campaigns.audience_of(campaign)
        size = campaigns.audience_size(session, audience)
        recent = campaigns.recently_contacted(
            session, campaign=campaign, audience=audience, days=quiet_days
        )
        defaults = campaigns.send_defaults(campaign, workspace)
    click.echo(
        f"Created campaign {campaign.slug} (draft): template {template}, "
        f"{size:,} recipients ({audience.describe()})."
    )
    click.echo(
        f"  frozen: {len(campaign.template_sources)} template file(s), From, Reply-To, "
        f"language {default_language}, unsubscribe {campaign.unsubscribe_mailto}"
    )
    if sending.describe():
        click.echo(f"  remembered for send: {sending.describe()}")
    line = campaigns.format_recently_contacted(recent, slug=slug)
    if line:
        click.echo(f"  {line}")
    host = campaigns.unpaced_host(defaults.smtp_url, defaults.rate)
    if host:
        click.echo(f"  note: {campaigns.format_no_rate(host).replace('SLUG', slug)}")
    click.echo(f"Next: mailer check {slug}   then   mailer preview {slug}")


@campaign_group.command(name="list")
def campaign_list() -> None:
    """List campaigns.

    \b
    Example:
      mailer campaign list
    """
    from mailer import campaigns

    with _session() as session:
        rows = campaigns.list_campaigns(session)
    if not rows:
        click.echo("No campaigns yet; create one with `mailer campaign create`.")
        return
    for c in rows:
        click.echo(f"{c.slug:<24} {c.status:<10} template {c.template:<16} from {c.from_address}")


@campaign_group.command(name="show")
@click.argument("slug")
def campaign_show(slug: str) -> None:
    """Show a campaign: audience size and languages, template, status, sender.

    \b
    Example:
      mailer campaign show appeal-2022
    """
    from mailer import campaigns, timing

    workspace = state().workspace()
    with _session() as session:
        campaign = campaigns.get_campaign(session, slug)
        summary = campaigns.summarise(session, campaign, templates_dir=workspace.templates_dir)
        timing_lines = timing.describe_campaign(session, campaign)
    frozen = "frozen copy" if campaign.template_sources else f"live from {workspace.templates_dir}"
    drift = campaigns.template_drift(campaign, templates_dir=workspace.templates_dir)
    click.echo(f"Campaign:  {campaign.slug}" + (f" ({campaign.title})" if campaign.title else ""))
    click.echo(f"Status:    {campaign.status}")
    variants = ", ".join(summary.template_languages) or "none"
    click.echo(f"Template:  {campaign.template} ({frozen}); variants: {variants}")
    if summary.template_error:
        click.echo(f"           problem: {summary.template_error}")
    if drift:
        click.echo(f"           note: {drift}")
    click.echo(f"From:      {campaign.from_address}")
    click.echo(f"Reply-To:  {campaign.reply_to or '(none)'}")
    click.echo(f"Language:  {campaign.default_language} (default)")
    if campaign.pause_reason:
        click.echo(f"Stopped:   {campaign.pause_reason}")
    if campaign.unsubscribe_mailto is not None:
        url = campaign.unsubscribe_url or "no one-click URL"
        click.echo(f"Unsubscribe: {campaign.unsubscribe_mailto}; {url} (frozen)")
    remembered = campaigns.SendingSettings.from_json(campaign.settings).describe()
    defaults = campaigns.send_defaults(campaign, workspace)
    click.echo(
        f"Send uses: {defaults.smtp_url or '(no server: give --smtp)'}"
        + (f" ({defaults.smtp_from})" if defaults.smtp_from else "")
        + (f", rate {defaults.rate} ({defaults.rate_from})" if defaults.rate else ", no rate")
        + (
            f", daily cap {defaults.daily_cap} ({defaults.daily_cap_from})"
            if defaults.daily_cap
            else ""
        )
    )
    if remembered:
        click.echo(f"Remembers: {remembered}")
    for line in timing_lines:
        click.echo(line)
    click.echo(f"Audience:  {summary.audience}: {summary.size:,} contacts")
    for lang, n, used in summary.languages:
        arrow = f" -> {used}" if used and used != lang else ""
        click.echo(f"           {lang or '(no language)':<14} {n:>8,}{arrow}")


@campaign_group.command(name="update")
@click.argument("slug")
@click.option(
    "--template",
    "template",
    metavar="NAME",
    help="Freeze the letter again from templates/NAME/ (the same name takes your edits).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Change the template even though letters were sent (the rest read differently).",
)
@_sending_options
def campaign_update(
    slug: str,
    template: str | None,
    force: bool,
    smtp_url: str | None,
    rate: str | None,
    daily_cap: int | None,
    skip_within: str | None,
) -> None:
    """Change a campaign: its frozen letter, or what send remembers. Logged as an event.

    The template can be changed while nothing is sent; after that only with --force. The
    server, pace and quiet days can be changed any time.

    \b
    Example:
      mailer campaign update appeal-2022 --template appeal
      mailer campaign update appeal-2022 --rate 200/min --skip-contacted-within 14d
    """
    from mailer import campaigns

    sending = _sending_settings(smtp_url, rate, daily_cap, skip_within)
    if template is None and not sending.to_json():
        raise click.UsageError(
            "say what to change: --template, --smtp, --rate, --daily-cap or --skip-contacted-within"
        )
    workspace = state().workspace()
    with db.writing(state().engine(), what="the campaign was not changed") as session:
        update = campaigns.update_campaign(
            session,
            slug=slug,
            templates_dir=workspace.templates_dir,
            template=template,
            sending=sending if sending.to_json() else None,
            force=force,
            actor=actor(),
        )
    if not update.changes:
        click.echo(f"Campaign {slug}: nothing changed.")
        return
    click.echo(f"Campaign {slug} updated:")
    for change in update.changes:
        click.echo(f"  {change}")


@campaign_group.command(name="pause")
@click.argument("slug")
@click.option("--reason", metavar="TEXT", help="Why (shown to whoever tries to send it).")
def campaign_pause(slug: str, reason: str | None) -> None:
    """Pause a campaign for the whole team: every running sender stops within seconds.

    Letters on the wire finish; the rest go back to the queue. No `send` starts until
    `mailer campaign resume SLUG`.

    \b
    Example:
      mailer campaign pause appeal-2022 --reason "wrong partner city in the Polish letter"
    """
    from mailer import outbox
    from mailer.clock import utcnow

    done = outbox.pause_campaign(
        state().engine(), slug=slug, actor=actor(), reason=reason, now=utcnow()
    )
    click.echo(f"Campaign {slug} {done.pause_reason}.")
    click.echo(
        f"Running senders stop within seconds; `mailer campaign resume {slug}` lets it go on."
    )


@campaign_group.command(name="resume")
@click.argument("slug")
@click.option(
    "--acknowledge-bounces",
    is_flag=True,
    help="Resume a campaign a bounce spike paused (you looked at the bounces).",
)
def campaign_resume(slug: str, acknowledge_bounces: bool) -> None:
    """Let a paused campaign be sent again (by the next `mailer send SLUG`).

    \b
    Example:
      mailer campaign resume appeal-2022
    """
    from mailer import outbox
    from mailer.clock import utcnow

    outbox.resume_campaign(
        state().engine(),
        slug=slug,
        actor=actor(),
        acknowledge_bounces=acknowledge_bounces,
        now=utcnow(),
    )
    click.echo(f"Campaign {slug} resumed; `mailer send {slug}` goes on.")


@campaign_group.command(name="cancel")
@click.argument("slug")
@click.option("--reason", metavar="TEXT", help="Why (kept in the log).")
def campaign_cancel(slug: str, reason: str | None) -> None:
    """Cancel a campaign (and its follow-ups): every letter still waiting is skipped.

    Running senders stop within seconds. What was sent stays in the record.

    \b
    Example:
      mailer campaign cancel appeal-2022 --reason "sent from the wrong list"
    """
    from mailer import outbox
    from mailer.clock import utcnow

    skipped = outbox.cancel_campaign(
        state().engine(), slug=slug, actor=actor(), reason=reason, now=utcnow()
    )
    for name, count in skipped.items():
        click.echo(f"Campaign {name} cancelled: {count:,} waiting letter(s) skipped.")


@campaign_group.command(name="delete")
@click.argument("slug")
def campaign_delete(slug: str) -> None:
    """Delete a campaign none of whose letters was ever sent or tried (a mistake, a test).

    A campaign with letters sent stays: it is the record (`campaign cancel` stops the rest).

    \b
    Example:
      mailer campaign delete appeal-typo
    """
    from mailer import outbox
    from mailer.clock import utcnow

    dropped = outbox.delete_campaign(state().engine(), slug=slug, actor=actor(), now=utcnow())
    click.echo(f"Campaign {slug} deleted ({dropped:,} unsent letter(s) dropped).")


class _CheckProgress:
    """A bar on a terminal, a line per 10 % elsewhere; silent for small audiences."""

    def __init__(self) -> None:
        self.done = 0
        self.total: int | None = None
        self.bar: Any = None
        self.reported = 0

    def __enter__(self) -> _CheckProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def __call__(self, count: int, total: int) -> None:
        if self.total is None:
            self.total = total
            if total >= 5000 and sys.stderr.isatty():
                self.bar = click.progressbar(length=total, label="Checking", file=sys.stderr)
                self.bar.__enter__()
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.total and self.total >= 5000 and self.done * 10 // self.total > self.reported:
            self.reported = self.done * 10 // self.total
            click.echo(f"checked {self.done:,} of {self.total:,}", err=True)


@cli.command(name="check")
@click.argument("slug")
def check(slug: str) -> None:
    """Render for every recipient and report every problem; exit 1 if any blocks sending.

    \b
    Example:
      mailer check appeal-2022
    """
    from mailer import campaigns
    from mailer import check as checking
    from mailer.errors import CheckFailed

    workspace = state().workspace()
    warn_about_secrets(workspace)
    with _session() as session, _CheckProgress() as progress:
        campaign = campaigns.get_campaign(session, slug)
        report = checking.check_campaign(
            session,
            campaign,
            templates_dir=workspace.templates_dir,
            settings=workspace,
            progress=progress,
        )
    for line in checking.format_report(report):
        click.echo(line)
    if not report.ok:
        raise CheckFailed(
            f"campaign {slug}: {len(report.blocking)} kinds of problem block sending; "
            f"fix them and run `mailer check {slug}` again"
        )


@cli.command(name="preview")
@click.argument("slug")
@click.option("--contact", "contact", metavar="EMAIL", help="Default: the first recipient.")
@click.option("--raw", is_flag=True, help="Write the exact bytes that would be sent.")
def preview(slug: str, contact: str | None, raw: bool) -> None:
    """Show exactly what one recipient would receive.

    \b
    Example:
      mailer preview appeal-2022 --contact mayor@nuernberg.example.org
      mailer preview appeal-2022 --raw > letter.eml
    """
    from mailer import campaigns, compose, message

    workspace = state().workspace()
    with _session() as session:
        campaign = campaigns.get_campaign(session, slug)
        composed = compose.preview(
            session,
            campaign,
            contact_email=contact,
            templates_dir=workspace.templates_dir,
            settings=workspace,
        )
        notes = compose.recipient_notes(session, composed.rcpt_to)
        drift = campaigns.template_drift(campaign, templates_dir=workspace.templates_dir)
    if drift:
        click.echo(f"Note: {drift}", err=True)
    if raw:
        # click.echo writes bytes to the binary stream untouched: the exact message.
        click.echo(composed.data, nl=False)
        return
    note = f" (fallback from {composed.requested_language})" if composed.fell_back else ""
    click.echo(f"[language {composed.language}{note}; {len(composed.data):,} bytes]")
    for line in notes:
        click.echo(f"[note: {line}]")
    click.echo(message.readable(composed.data), nl=False)


# --------------------------------------------------------------------------- send & retry
# (engine.py, outbox.py, send_report.py, transport.py)


def _on_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


@cli.command()
@click.argument("slug")
@click.option(
    "--smtp",
    "smtp_url",
    metavar="URL",
    help="smtp://user@host:587 (STARTTLS), smtps://user@host:465, or smtp+plain://host:25. "
    "Default: the campaign's (campaign create --smtp), else [smtp] url in mailer.toml.",
)
@click.option(
    "--outbox",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write a Maildir of .eml files instead of sending.",
)
@click.option(
    "--dry-run", is_flag=True, help="Render and build every message; send nothing, change nothing."
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="SMTP connections.",
)
@click.option(
    "--rate",
    metavar="N/s|N/min|N/h",
    help="At most this many messages per second, minute or hour. Default: the campaign's, "
    "else [smtp] rate in mailer.toml.",
)
@click.option(
    "--daily-cap",
    type=click.IntRange(min=1),
    help="At most this many sent in any 24 hours (all campaigns). Default: the campaign's, "
    "else [smtp] daily_cap in mailer.toml.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Send at most this many in this run.")
@click.option(
    "--test-to",
    metavar="ADDRESS",
    help="Send real renderings of the first recipients (3, or --limit) to this address only; record nothing.",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Trust this CA for the server's certificate (a private CA).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for each SMTP reply.",
)
@click.option(
    "--allow-plaintext-auth",
    is_flag=True,
    help="Allow a login over smtp+plain:// to another machine (the password goes in clear).",
)
@click.option(
    "--acknowledge-bounces",
    is_flag=True,
    help="Send a campaign a bounce spike paused (you looked at the bounces).",
)
@click.option(
    "--window",
    "windows",
    multiple=True,
    metavar="'DAYS HH:MM-HH:MM'",
    help="Send only inside this window, e.g. 'Mon-Fri 09:00-17:00' (repeatable; default: the "
    "campaign's). Others wait, queued, for their window.",
)
@click.option(
    "--window-zone",
    metavar="recipient|ZONE",
    help="Whose time the windows are in: each recipient's own (default) or one IANA zone.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for the next window (or follow-up delay) instead of ending with exit 3.",
)
@click.option(
    "--spread",
    is_flag=True,
    help="Spread the --daily-cap evenly over the window (with a little jitter) instead of "
    "sending in a burst when it opens.",
)
@click.option(
    "--yes",
    "-y",
    is_flag=True,
    help="Do not ask for confirmation (needed where there is no terminal to ask on).",
)
def send(
    slug: str,
    smtp_url: str | None,
    outbox: Path | None,
    dry_run: bool,
    concurrency: int,
    rate: str | None,
    daily_cap: int | None,
    limit: int | None,
    test_to: str | None,
    ca_file: Path | None,
    timeout: float,
    allow_plaintext_auth: bool,
    acknowledge_bounces: bool,
    windows: tuple[str, ...],
    window_zone: str | None,
    wait: bool,
    spread: bool,
    yes: bool,
) -> None:
    """Deliver a campaign: every recipient at most once, every outcome in the send log.

    Asks before it sends, on a terminal; in a script it sends only with --yes. With no
    --smtp/--outbox, the campaign's remembered server is used, else [smtp] url in mailer.toml
    (likewise --rate and --daily-cap), so after a Ctrl-C `mailer send SLUG` goes on.

    With a sending window, each letter goes when the window is open in its recipient's time
    zone (their timezone column, else their city and country, else the campaign's default
    zone); the others stay queued until theirs opens. Public holidays are not known.

    Exit status: 0 all sent; 3 messages left failed, uncertain, retrying, held by a cap or
    waiting for their window, or the campaign was paused or cancelled by someone; 130
    interrupted (send again to go on).

    \b
    Example:
      MAILER_SMTP_PASSWORD=... mailer send appeal-2022 --smtp smtp://office@mail.example.org:587 --rate 300/min
      mailer send appeal-2022            # the server and rate remembered in mailer.toml
      mailer send appeal-2022 --outbox out/
      mailer send appeal-2022 --smtp smtp+plain://127.0.0.1:1025 --test-to me@example.org
      mailer send appeal-2022 --smtp URL --window 'Mon-Fri 09:00-17:00' --daily-cap 500 --spread --wait
    """
    import shlex

    from mailer import campaigns, smtp, timing
    from mailer import engine as send_engine
    from mailer import outbox as outbox_verbs
    from mailer import transport as tr
    from mailer.clock import utcnow
    from mailer.errors import MailerError, SendIncomplete
    from mailer.send_report import (
        SendPaused,
        format_incomplete_reason,
        format_paused,
        format_send_plan,
        format_send_summary,
    )

    if sum((smtp_url is not None, outbox is not None, dry_run)) > 1:
        raise click.UsageError("give at most one of --smtp URL, --outbox DIR or --dry-run")
    st = state()
    workspace = st.workspace()
    engine = st.engine()
    terminal = _on_terminal()
    if dry_run:
        report = send_engine.dry_run(workspace=workspace, engine=engine, slug=slug, limit=limit)
        for line in format_send_summary(report):
            click.echo(line)
        if report.incomplete:
            raise SendIncomplete(format_incomplete_reason(report))
        return
    if not yes and not terminal:
        raise MailerError(
            f"`mailer send` asks before it sends, and there is no terminal here to ask on "
            f"(a script, or input from a file or pipe): add --yes to send {slug} without asking"
        )
    warn_about_secrets(workspace)
    with db.session_factory(engine)() as session:
        defaults = campaigns.send_defaults(campaigns.get_campaign(session, slug), workspace)
    again = ["mailer", "send", slug]
    transport_from = None
    if smtp_url is None and outbox is None:
        if defaults.smtp_url is None:
            raise click.UsageError(
                "no server to send to: give --smtp URL (or --outbox DIR, --dry-run), or "
                f"remember one: [smtp] url in mailer.toml, or `mailer campaign update {slug} "
                "--smtp URL`"
            )
        smtp_url, transport_from = defaults.smtp_url, defaults.smtp_from
    elif smtp_url is not None and smtp_url != defaults.smtp_url:
        again += ["--smtp", smtp_url]
    elif outbox is not None:
        again += ["--outbox", str(outbox)]
    rate_from = None
    if rate is None:
        rate, rate_from = defaults.rate, defaults.rate_from
    elif rate != defaults.rate:
        again += ["--rate", rate]
    cap_from = None
    if daily_cap is None:
        daily_cap, cap_from = defaults.daily_cap, defaults.daily_cap_from
    elif daily_cap != defaults.daily_cap:
        again += ["--daily-cap", str(daily_cap)]
    for flag, on in (("--yes", yes), ("--allow-plaintext-auth", allow_plaintext_auth)):
        if on and (flag != "--yes" or not terminal):
            again.append(flag)
    if ca_file is not None:
        again += ["--ca-file", str(ca_file)]
    if concurrency != 4:
        again += ["--concurrency", str(concurrency)]
    if timeout != 60.0:
        again += ["--timeout", f"{timeout:g}"]
    for window in windows:
        again += ["--window", window]
    if window_zone is not None:
        again += ["--window-zone", window_zone]
    again += [flag for flag, on in (("--wait", wait), ("--spread", spread)) if on]
    per_second = tr.parse_rate(rate) if rate else None
    if test_to is None:
        # Paused by someone, cancelled, or held by a bounce spike: said before anything else.
        outbox_verbs.ensure_sendable(
            engine,
            slug=slug,
            acknowledge_bounces=acknowledge_bounces,
            actor=actor(),
            now=utcnow(),
        )
    run_timing = timing.RunTiming(
        windows=windows, window_zone=window_zone, wait=wait, spread=spread, notify=click.echo
    )
    # Bad windows, zones or combinations are refused before a password is asked for.
    timing.check_run(engine, slug=slug, run=run_timing, daily_cap=daily_cap, settings=workspace)
    transport: tr.Transport
    notes: list[str] = []
    if smtp_url is not None:
        settings = smtp.parse_smtp_url(
            smtp_url,
            ca_file=ca_file,
            timeout=timeout,
            allow_plaintext_auth=allow_plaintext_auth,
        )
        password = smtp.resolve_password(
            settings=settings,
            password_command=workspace.setting("smtp", "password_command"),
            prompt=(lambda text: str(click.prompt(text, hide_input=True))) if terminal else None,
        )
        transport = smtp.SmtpPool(settings.with_password(password), size=concurrency)
        shown = settings.display + (f" (from {transport_from})" if transport_from else "")
        host = campaigns.unpaced_host(smtp_url, rate)
        if host is not None:
            notes.append(campaigns.format_no_rate(host).replace("SLUG", slug))
    else:
        assert outbox is not None
        transport = tr.MaildirOutbox(outbox)
        shown = f"Maildir {outbox}"
    plan = send_engine.plan_send(workspace=workspace, engine=engine, slug=slug)
    shown_rate = f"{rate} ({rate_from})" if rate and rate_from else rate
    shown_cap = daily_cap
    for line in format_send_plan(
        plan,
        transport=shown,
        test_to=test_to,
        limit=limit,
        rate=shown_rate,
        daily_cap=shown_cap,
        notes=tuple(notes),
    ):
        click.echo(line)
    if cap_from and daily_cap:
        click.echo(f"  (daily cap from {cap_from})")
    if terminal and not yes:
        if notes and per_second is None and smtp_url is not None:
            rate, per_second = _ask_rate()
            if rate is not None:
                again += ["--rate", rate]
        click.confirm("Send now?", abort=True)
    with _send_progress(terminal=terminal) as progress:
        try:
            report = send_engine.send_campaign(
                workspace=workspace,
                engine=engine,
                slug=slug,
                transport=transport,
                concurrency=concurrency,
                rate=per_second,
                daily_cap=daily_cap,
                limit=limit,
                test_to=test_to,
                progress=progress,
                handle_signals=True,
                timing_options=run_timing,
            )
        except SendPaused as paused:
            paused.report.again = shlex.join(again)
            progress.finish()
            if paused.report.totals:
                for line in format_send_summary(paused.report):
                    click.echo(line)
            click.echo(format_paused(paused.report))
            sys.exit(paused.exit_code)
    report.again = shlex.join(again)
    for line in format_send_summary(report):
        click.echo(line)
    if report.incomplete:
        raise SendIncomplete(format_incomplete_reason(report))


def _ask_rate() -> tuple[str | None, float | None]:
    """On the confirmation screen: the pace for a send to a provider that has none set."""
    from mailer import transport as tr
    from mailer.errors import InvalidValueError

    while True:
        answer = str(
            click.prompt(
                "Rate for this send (e.g. 300/min; `none` to send as fast as the server takes)",
                default="",
                show_default=False,
            )
        ).strip()
        if answer.lower() == "none":
            return None, None
        if not answer:
            continue
        try:
            return answer, tr.parse_rate(answer)
        except InvalidValueError as exc:
            click.echo(f"  {exc}")


class _send_progress:
    """A rich progress bar on a terminal (`sent 12 of 300`); elsewhere a plain line every 5 s
    or 10 %. A letter handed back to the queue is never counted as done."""

    def __init__(self, *, terminal: bool) -> None:
        self.terminal = terminal
        self.bar: Any = None
        self.task: Any = None
        self.last_time = 0.0
        self.last_tenth = -1
        self.started = 0.0
        self.finished = False

    def __enter__(self) -> _send_progress:
        import time

        self.started = time.monotonic()
        if self.terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("sent {task.fields[sent]:,} of {task.total:,.0f}"),
                BarColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(),
            )
            self.bar.start()
        return self

    def __call__(self, report: SendReport) -> None:
        import time

        from mailer.send_report import format_progress, format_progress_detail, progress_done

        if self.finished:
            # After the interrupt: what is put back in the queue must not move the count.
            return
        done = progress_done(report)
        total = max(report.due, done)
        now = time.monotonic()
        rate = done / (now - self.started) if now > self.started else 0.0
        if self.bar is not None:
            detail = format_progress_detail(report, rate=rate)
            if self.task is None:
                self.task = self.bar.add_task("send", total=total, sent=0, detail=detail)
            self.bar.update(self.task, completed=done, total=total, sent=report.sent, detail=detail)
            return
        tenth = (done * 10 // total) if total else 10
        down = report.database_down is not None
        if (done or down) and (now - self.last_time >= 5 or tenth > self.last_tenth):
            self.last_time, self.last_tenth = now, tenth
            click.echo(format_progress(report, total=total, rate=rate))

    def finish(self) -> None:
        self.finished = True
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __exit__(self, *exc: object) -> None:
        self.finish()


@cli.command()
@click.argument("slug")
@click.option("--failed", is_flag=True, help="Requeue messages refused for good or given up.")
@click.option(
    "--uncertain",
    is_flag=True,
    help="Requeue messages whose delivery is unknown (the recipient may have them).",
)
def retry(slug: str, failed: bool, uncertain: bool) -> None:
    """Put failed and/or uncertain messages back in the queue for the next send.

    \b
    Example:
      mailer retry appeal-2022 --failed
      mailer retry appeal-2022 --uncertain    # may reach someone a second time
    """
    from mailer import outbox
    from mailer.clock import utcnow

    if not (failed or uncertain):
        raise click.UsageError("say what to retry: --failed, --uncertain, or both")
    from mailer.identity import Actor

    requeued = outbox.requeue(
        state().engine(),
        slug=slug,
        failed=failed,
        uncertain=uncertain,
        now=utcnow(),
        actor=Actor.current().label,
    )
    parts = [f"{n} {status}" for status, n in requeued.moved.items()]
    click.echo(
        f"Requeued {' and '.join(parts)} message(s) of {slug}; `mailer send {slug} ...` sends them."
    )
    if requeued.suppressed:
        click.echo(
            f"Left {requeued.suppressed} alone: their address is suppressed (a hard bounce, an "
            "unsubscribe...), so a retry cannot help; `mailer suppress list` shows why."
        )


# --------------------------------------------------------------------------- inbox
# (inbox.py, inbox_sources.py)


@cli.group(name="inbox")
def inbox_group() -> None:
    """Read what came back: bounces, replies, out-of-office answers, complaints, unsubscribes.

    \b
    Example:
      mailer inbox sync --imap imaps://office@mail.example.org
    """


@inbox_group.command(name="sync")
@click.option(
    "--maildir",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="A Maildir folder (with cur/, new/, tmp/).",
)
@click.option("--mbox", type=click.Path(path_type=Path), metavar="PATH", help="An mbox file.")
@click.option(
    "--imap",
    "imap_url",
    metavar="URL",
    help="imaps://user@host[:993], imap+starttls://user@host[:143], or imap+plain://user@127.0.0.1 "
    "(no TLS: a server on this machine only).",
)
@click.option(
    "--folder",
    "folders",
    multiple=True,
    metavar="F",
    help="IMAP folder to read (repeatable; default INBOX).",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Trust this CA for the IMAP server's certificate (a private CA).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the IMAP server.",
)
def inbox_sync(
    maildir: Path | None,
    mbox: Path | None,
    imap_url: str | None,
    folders: tuple[str, ...],
    ca_file: Path | None,
    timeout: float,
) -> None:
    """Record what came back to the office's mailbox, exactly once.

    Bounces (the letter failed, the address suppressed), delays, replies (with their first
    lines), auto-replies (not counted as replies; a return date they name is kept),
    complaints and unsubscribe requests (both suppressed). Everything else is counted and
    skipped. A second sync of the same mail changes nothing; IMAP is only read (never
    deleted, moved or flagged), and each folder is read from where the last sync stopped.
    A campaign whose hard bounces spike is paused. IMAP password: $MAILER_IMAP_PASSWORD,
    [imap] password_command in mailer.toml, or a prompt on a terminal.

    \b
    Example:
      mailer inbox sync --maildir ~/Maildir
      mailer inbox sync --mbox replies.mbox
      MAILER_IMAP_PASSWORD=... mailer inbox sync --imap imaps://office@mail.example.org --folder INBOX --folder Bounces
    """
    from mailer import inbox, inbox_sources

    if sum(x is not None for x in (maildir, mbox, imap_url)) != 1:
        raise click.UsageError("give exactly one of --maildir PATH, --mbox PATH or --imap URL")
    if folders and imap_url is None:
        raise click.UsageError("--folder is for --imap only")
    st = state()
    workspace = st.workspace()
    engine = st.engine()
    source: inbox_sources.MailSource
    if maildir is not None:
        source = inbox_sources.MaildirSource(maildir)
    elif mbox is not None:
        source = inbox_sources.MboxSource(mbox)
    else:
        assert imap_url is not None
        settings = inbox_sources.parse_imap_url(imap_url, ca_file=ca_file, timeout=timeout)
        password = inbox_sources.resolve_imap_password(
            settings=settings,
            password_command=workspace.setting("imap", "password_command"),
            prompt=(lambda text: str(click.prompt(text, hide_input=True)))
            if _on_terminal()
            else None,
        )
        source = inbox_sources.ImapSource(
            settings.with_password(password),
            folders=folders or ("INBOX",),
        )
    from mailer import workspace_secret

    try:
        report = inbox.sync(
            engine=engine,
            source=source,
            keys=workspace_secret.keyring(workspace, engine=engine),
        )
    finally:
        source.close()
    for line in inbox.format_sync_report(report):
        click.echo(line)


# --------------------------------------------------------------------------- unsubscribe
# (unsubscribe.py, unsubscribe_server.py, workspace_secret.py)


class _UnsubscribeGroup(MailerGroup):
    """`mailer unsubscribe TOKEN|EMAIL` beside its subcommands: a first word that names no
    subcommand is the token or address to record."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "record", _unsubscribe_record, args
        return super().resolve_command(ctx, args)


@cli.group(name="unsubscribe", cls=_UnsubscribeGroup)
def unsubscribe_group() -> None:
    """Unsubscribe an address: by hand (TOKEN or EMAIL), or by the one-click endpoint.

    `mailer unsubscribe TOKEN` records the request of the letter a token names (the token of
    its unsubscribe link); `mailer unsubscribe EMAIL` suppresses an address. Either way the
    address is never written to again, and the event is in the send log.

    \b
    Example:
      mailer unsubscribe mayor@city.example.org
      mailer unsubscribe 6aaqgaj3q2gxvq7w3xkhm5vyzdjq2nz4
      mailer unsubscribe serve --listen 127.0.0.1:8025
    """


@click.command(name="record")
@click.argument("token_or_email", metavar="TOKEN|EMAIL")
@handle_errors
def _unsubscribe_record(token_or_email: str) -> None:
    """Record one unsubscribe request by hand.

    \b
    Example:
      mailer unsubscribe mayor@city.example.org
    """
    from mailer import unsubscribe, workspace_secret
    from mailer.clock import utcnow

    st = state()
    engine = st.engine()
    with _session() as session:
        if "@" in token_or_email:
            target = unsubscribe.target_for_email(session, token_or_email)
            source = "by hand: mailer unsubscribe EMAIL"
        else:
            keys = workspace_secret.keyring(st.workspace(), engine=engine)
            target = unsubscribe.resolve_token(session, keys, token_or_email)
            source = "by hand: mailer unsubscribe TOKEN"
        new = unsubscribe.unsubscribe(session, target, at=utcnow(), source=source, via="cli")
    click.echo(unsubscribe.format_unsubscribed(target, new=new))


@unsubscribe_group.command(name="serve")
@click.option(
    "--listen",
    default="127.0.0.1:8025",
    show_default=True,
    metavar="HOST:PORT",
    help="Address to listen on (plain HTTP: put an https reverse proxy in front of it).",
)
def unsubscribe_serve(listen: str) -> None:
    """Serve one-click unsubscribe (RFC 8058) for [campaign] unsubscribe_url.

    A POST with the letter's token unsubscribes at once (what mail programs send); a GET shows
    a confirmation page in the letter's language. Stop it with Ctrl-C.

    \b
    Example:
      mailer unsubscribe serve --listen 127.0.0.1:8025
    """
    from mailer import unsubscribe_server

    st = state()
    workspace = st.workspace()

    def ready(url: str) -> None:
        click.echo(f"Serving unsubscribe requests on {url} (Ctrl-C stops)", err=False)
        if workspace.setting("campaign", "unsubscribe_url") is None:
            click.echo(
                "Note: [campaign] unsubscribe_url is not set in mailer.toml: letters carry no "
                "link to this endpoint yet."
            )
        sys.stdout.flush()

    unsubscribe_server.serve(workspace=workspace, engine=st.engine(), listen=listen, on_ready=ready)


@unsubscribe_group.command(name="rotate-secret")
def unsubscribe_rotate_secret() -> None:
    """Sign new unsubscribe links and VERP addresses with a new workspace secret.

    Letters already sent keep working: their tokens name the key they were made with, and the
    older keys are kept. The secret itself is never shown.

    \b
    Example:
      mailer unsubscribe rotate-secret
    """
    from mailer import workspace_secret

    st = state()
    version = workspace_secret.rotate(st.workspace(), engine=st.engine())
    click.echo(
        f"New workspace secret, version {version}: new letters are signed with it; "
        "links in letters already sent keep working."
    )
    if st.workspace().setting("campaign", "unsubscribe_secret"):
        click.echo(
            "Note: [campaign] unsubscribe_secret in mailer.toml still signs new letters; "
            "remove it to use the generated secret."
        )


# --------------------------------------------------------------------------- review & demo
# (review.py, demo.py)


@contacts_group.command(name="show")
@click.argument("email")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table: for people; json: the same as one object.",
)
def contacts_show(email: str, fmt: str) -> None:
    """One contact's data, suppression and full history.

    Their data, whether they are suppressed, and every campaign message and event.

    The answer to "have we contacted this mayor, and what happened?", oldest event first.
    An address that was suppressed but never imported is shown as such.

    \b
    Example:
      mailer contacts show mayor@city.example.org
      mailer contacts show mayor@city.example.org --format json
    """
    import json

    from mailer import review

    with db.session_factory(state().engine())() as session:
        history = review.contact_history(session, email)
    if fmt == "json":
        click.echo(json.dumps(history.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(review.format_contact_history(history), nl=False)


@cli.command()
@click.argument("slug", required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table: for people; json: one object per campaign in an array.",
)
def status(slug: str | None, fmt: str) -> None:
    """Progress of each campaign, per message state.

    Messages per state, progress, start and end (in your local time), the recent send rate
    over the span actually sent with the configured limit, and the top failure reasons (SMTP
    code and reply, counted). Without SLUG, every campaign. The JSON keys are campaign, status, total and one per
    state (queued, sending, sent, retry, failed, skipped, uncertain).

    \b
    Example:
      mailer status appeal-2022
      mailer status --format json
    """
    import json

    from mailer import review

    workspace = state().workspace()
    with db.session_factory(state().engine())() as session:
        summaries = review.campaign_status(
            session,
            slug,
            default_rate=review.configured_rate(workspace.setting("smtp", "rate")),
            default_daily_cap=review.configured_cap(workspace.setting("smtp", "daily_cap")),
        )
    if fmt == "json":
        click.echo(json.dumps([s.to_json() for s in summaries], indent=2, ensure_ascii=False))
    elif sys.stdout.isatty():
        from rich.console import Console

        console = Console()
        for renderable in review.status_renderables(summaries):
            console.print(renderable)
    else:
        click.echo(review.format_status_text(summaries), nl=False)


@cli.command(name="senders")
@click.argument("slug", required=False)
@click.option(
    "--all",
    "include_stopped",
    is_flag=True,
    help="Also the senders that ended, were declared gone, or lost their lease.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)
def senders_cmd(slug: str | None, include_stopped: bool, fmt: str) -> None:
    """Who is sending: the live senders of each campaign (or of SLUG).

    For each: who (OS user, host, process, SMTP login), what it holds (letters claimed and not
    yet settled), what it has sent, its rate, and its last heartbeat. A sender whose lease has
    run out is no longer live: the next `send` of the campaign settles what it held.

    \b
    Example:
      mailer senders
      mailer senders appeal-2022 --all
    """
    import json

    from mailer import senders
    from mailer.clock import utcnow

    engine = state().engine()
    if slug is not None:
        with db.session_factory(engine)() as session:
            from mailer import campaigns

            campaigns.get_campaign(session, slug)
    now = utcnow()
    views = senders.list_senders(engine, slug=slug, now=now, include_stopped=include_stopped)
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {
                        "id": v.id,
                        "campaign": v.campaign,
                        "actor": v.actor,
                        "via": v.via,
                        "live": v.live,
                        "holding": v.holding,
                        "sent": v.sent,
                        "rate": v.rate,
                        "started_at": v.started_at.isoformat(),
                        "heartbeat_at": v.heartbeat_at.isoformat(),
                        "lease_until": v.lease_until.isoformat(),
                        "stopped_at": v.stopped_at.isoformat() if v.stopped_at else None,
                        "stop_reason": v.stop_reason,
                    }
                    for v in views
                ],
                indent=2,
                ensure_ascii=False,
            )
        )
        return
    for line in senders.format_senders(views, now=now, slug=slug):
        click.echo(line)


@cli.command(name="log")
@click.argument("slug", required=False)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    metavar="STATE",
    help="Only messages in this state (repeatable): queued, sending, sent, retry, failed, "
    "skipped, uncertain.",
)
@click.option("--contact", metavar="EMAIL", help="Only this recipient.")
@click.option("--city", metavar="CITY", help="Only recipients in this city.")
@click.option(
    "--country", metavar="CC", help="Only recipients in this country (ISO code, e.g. DE)."
)
@click.option(
    "--since",
    metavar="WHEN",
    help="Only activity since then: 2026-03-14, 2026-03-14T09:30 (your local time, or with an "
    "offset: +01:00), or an age: 30m, 2h, 3d, 1w.",
)
@click.option(
    "--events", is_flag=True, help="One line per send-log event instead of per recipient."
)
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="With --events, no SLUG: the whole log of every campaign, import, suppression change "
    "and campaign change, with who did it and from which machine (the audit export).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="csv and json stream any size; json is an array, one object per line.",
)
def log_command(
    slug: str,
    statuses: tuple[str, ...],
    contact: str | None,
    city: str | None,
    country: str | None,
    since: str | None,
    events: bool,
    everything: bool,
    fmt: str,
) -> None:
    """Who was sent what, when, and the server's answer; with --events --all, the audit log.

    One line per recipient with its state, attempts, sent time, SMTP code and reply, and
    Message-ID. With --events, one line per send-log event (queued, claimed, sent, deferred, ...),
    oldest first. CSV cells that a spreadsheet would run as a formula get a leading '.

    \b
    Example:
      mailer log appeal-2022 --status failed
      mailer log appeal-2022 --country DE --since 2d --format csv > sent.csv
      mailer log appeal-2022 --contact mayor@city.example.org --events
      mailer log --events --all --format csv > audit.csv
    """
    from mailer import review

    if everything and slug is not None:
        raise click.UsageError("--all is every campaign: give it without SLUG")
    if everything and not events:
        raise click.UsageError("--all lists the events of everything: add --events")
    if not everything and slug is None:
        raise click.UsageError("name a campaign (SLUG), or give --events --all for everything")

    flt = review.LogFilter(
        statuses=review.parse_statuses(statuses),
        contact=contact,
        city=city,
        country=country,
        since=review.parse_since(since) if since is not None else None,
    )
    with db.session_factory(state().engine())() as session:
        if everything:
            rows = review.audit_rows(session, flt=flt)
            columns, table_columns = review.AUDIT_COLUMNS, review.AUDIT_TABLE_COLUMNS
        elif events:
            assert slug is not None
            rows = review.event_rows(session, slug=slug, flt=flt)
            columns, table_columns = review.EVENT_COLUMNS, review.EVENT_TABLE_COLUMNS
        else:
            assert slug is not None
            rows = review.log_rows(session, slug=slug, flt=flt)
            columns, table_columns = review.LOG_COLUMNS, review.LOG_TABLE_COLUMNS
        writer = {"csv": review.write_csv, "json": review.write_json}.get(fmt)
        try:
            if writer is not None:
                writer(rows, columns=columns, out=sys.stdout)
            else:
                review.write_table(rows, columns=table_columns, out=sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            # `mailer log ... | head` closed the pipe: what was wanted is written; no traceback.
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@cli.command()
@click.argument("slug")
@click.option(
    "--output",
    "-o",
    # Not dir_okay=False: the library names a folder given here in its one `Error:` line.
    type=click.Path(path_type=Path),
    metavar="FILE.html",
    help="Where to write the report (one self-contained HTML file). Default: SLUG-report.html "
    "in the current folder.",
)
def report(slug: str, output: Path | None) -> None:
    """Write a one-file HTML report anyone can open.

    Totals and the recent rate; what came back (replies with their first lines, bounces by
    reason, unsubscribes, reply rate by country and language); who to follow up; who is
    waiting, refused or skipped and why; who was contacted (city, partner city, when); a chart
    of sends over time; and one sample letter per language. Times are in your local time zone.
    The file needs nothing else (no internet, no scripts): mail it, open it in any browser.

    \b
    Example:
      mailer report appeal-2022
      mailer report appeal-2022 --output ~/reports/appeal-2022.html
    """
    from mailer.report import write_report

    target = output if output is not None else Path(f"{slug}-report.html")
    workspace = state().workspace()
    with db.session_factory(state().engine())() as session:
        data = write_report(session, slug=slug, output=target, workspace=workspace)
    s = data.summary
    click.echo(
        f"Wrote {target}: {s.total:,} recipients, {s.counts['sent']:,} sent, "
        f"{s.counts['failed']:,} failed, {s.counts['uncertain']:,} uncertain."
    )


@cli.command()
@click.argument(
    "directory", type=click.Path(file_okay=False, path_type=Path), default="mailer-demo"
)
def demo(directory: Path) -> None:
    """The whole job on sample data, on this machine only.

    Makes a workspace in DIRECTORY (default: mailer-demo), imports the sample recipients,
    creates the `appeal` campaign, checks it, sends it to a mail server running on this
    machine only (127.0.0.1, nothing leaves it), then shows the status, the received
    letters and an HTML report. DIRECTORY must not exist yet, or be empty.

    \b
    Example:
      mailer demo
      mailer demo /tmp/try-mailer
    """
    from mailer.demo import run_demo

    run_demo(directory=directory, out=click.echo)
