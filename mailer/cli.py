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
    from mailer import audience, importers
    from mailer.errors import InvalidValueError

    parsed = audience.parse_reason(reason)
    check = importers.EmailChecker()
    valid = []
    for email in emails:
        try:
            valid.append(check(email))
        except ValueError as exc:
            raise InvalidValueError(f"not an email address: {exc}") from None
    with db.transaction(db.session_factory(state().engine())) as session:
        added = audience.suppress(session, emails=valid, reason=parsed, source="cli")
    click.echo(f"{added} address(es) suppressed, {len(set(valid)) - added} already suppressed.")


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
) -> None:
    """Create a draft campaign; its audience is a filter, resolved whenever needed.

    A follow-up is a campaign whose audience comes from the record of another: bounced and
    unsubscribed addresses are suppressed anyway.

    \b
    Example:
      mailer campaign create appeal-de --template appeal --from office@example.org \\
          --reply-to signatory --where country=DE --tag mayor
      mailer campaign create appeal-again --template appeal --from office@example.org \\
          --contacted-in appeal-de --not-replied-to appeal-de
    """
    from mailer import campaigns
    from mailer.audience import Audience, parse_where

    workspace = state().workspace()
    audience = Audience(
        where=parse_where(where),
        tags=tuple(tags),
        contacted_in=tuple(contacted_in),
        not_contacted_in=tuple(not_contacted_in),
        replied_to=tuple(replied_to),
        not_replied_to=tuple(not_replied_to),
    )
    default_language = language or str(workspace.setting("campaign", "default_language", "en"))
    with _session() as session:
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
        )
        size = campaigns.audience_size(session, audience)
    click.echo(
        f"Created campaign {campaign.slug} (draft): template {template}, "
        f"{size:,} recipients ({audience.describe()})."
    )
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
    from mailer import campaigns

    workspace = state().workspace()
    with _session() as session:
        campaign = campaigns.get_campaign(session, slug)
        summary = campaigns.summarise(session, campaign, templates_dir=workspace.templates_dir)
    frozen = "frozen copy" if campaign.template_sources else f"live from {workspace.templates_dir}"
    click.echo(f"Campaign:  {campaign.slug}" + (f" ({campaign.title})" if campaign.title else ""))
    click.echo(f"Status:    {campaign.status}")
    variants = ", ".join(summary.template_languages) or "none"
    click.echo(f"Template:  {campaign.template} ({frozen}); variants: {variants}")
    if summary.template_error:
        click.echo(f"           problem: {summary.template_error}")
    click.echo(f"From:      {campaign.from_address}")
    click.echo(f"Reply-To:  {campaign.reply_to or '(none)'}")
    click.echo(f"Language:  {campaign.default_language} (default)")
    click.echo(f"Audience:  {summary.audience}: {summary.size:,} contacts")
    for lang, n, used in summary.languages:
        arrow = f" -> {used}" if used and used != lang else ""
        click.echo(f"           {lang or '(no language)':<14} {n:>8,}{arrow}")


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
    help="smtp://user@host:587 (STARTTLS), smtps://user@host:465, or smtp+plain://host:25.",
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
    "--rate", metavar="N/s|N/min|N/h", help="At most this many messages per second, minute or hour."
)
@click.option(
    "--daily-cap",
    type=click.IntRange(min=1),
    help="At most this many sent in any 24 hours (all campaigns).",
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
    help="Resume a campaign a bounce spike has paused (you have looked at the bounces).",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
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
    yes: bool,
) -> None:
    """Deliver a campaign: every recipient at most once, every outcome in the send log.

    Exit status: 0 all sent; 3 messages left failed, uncertain, retrying or held by a cap;
    130 interrupted (run send again to continue).

    \b
    Example:
      MAILER_SMTP_PASSWORD=... mailer send appeal-2022 --smtp smtp://office@mail.example.org:587 --rate 300/min
      mailer send appeal-2022 --outbox out/
      mailer send appeal-2022 --smtp smtp+plain://127.0.0.1:1025 --test-to me@example.org
    """
    from mailer import engine as send_engine
    from mailer import smtp
    from mailer import transport as tr
    from mailer.errors import SendIncomplete
    from mailer.send_report import (
        format_incomplete_reason,
        format_send_plan,
        format_send_summary,
    )

    if sum((smtp_url is not None, outbox is not None, dry_run)) != 1:
        raise click.UsageError("give exactly one of --smtp URL, --outbox DIR or --dry-run")
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
    per_second = tr.parse_rate(rate) if rate else None
    transport: tr.Transport
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
        shown = settings.display
    else:
        assert outbox is not None
        transport = tr.MaildirOutbox(outbox)
        shown = f"Maildir {outbox}"
    plan = send_engine.plan_send(workspace=workspace, engine=engine, slug=slug)
    for line in format_send_plan(
        plan, transport=shown, test_to=test_to, limit=limit, rate=rate, daily_cap=daily_cap
    ):
        click.echo(line)
    if terminal and not yes:
        click.confirm("Send now?", abort=True)
    with _send_progress(terminal=terminal) as progress:
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
            acknowledge_bounces=acknowledge_bounces,
        )
    for line in format_send_summary(report):
        click.echo(line)
    if report.incomplete:
        raise SendIncomplete(format_incomplete_reason(report))


class _send_progress:
    """A rich progress bar on a terminal; elsewhere a plain line every 5 s or 10 %."""

    def __init__(self, *, terminal: bool) -> None:
        self.terminal = terminal
        self.bar: Any = None
        self.task: Any = None
        self.last_time = 0.0
        self.last_tenth = -1
        self.started = 0.0

    def __enter__(self) -> Callable[[SendReport], None]:
        import time

        self.started = time.monotonic()
        if self.terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("sending"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(),
            )
            self.bar.start()
        return self.update

    def update(self, report: SendReport) -> None:
        import time

        from mailer.send_report import format_progress

        done = report.done + report.released
        total = max(report.due, done)
        now = time.monotonic()
        rate = done / (now - self.started) if now > self.started else 0.0
        problems = report.failed + report.uncertain + report.build_errors
        if self.bar is not None:
            from mailer.send_report import format_database_wait

            waiting = format_database_wait(report)
            detail = waiting or f"{problems} failed · {report.deferred} retry · {rate:,.0f} msg/s"
            if self.task is None:
                self.task = self.bar.add_task("send", total=total, detail=detail)
            self.bar.update(self.task, completed=done, total=total, detail=detail)
            return
        tenth = (done * 10 // total) if total else 10
        down = report.database_down is not None
        if (done or down) and (now - self.last_time >= 5 or tenth > self.last_tenth):
            self.last_time, self.last_tenth = now, tenth
            click.echo(format_progress(report, total=total, rate=rate))

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


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
    try:
        report = inbox.sync(engine=engine, source=source)
    finally:
        source.close()
    for line in inbox.format_sync_report(report):
        click.echo(line)


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

    Messages per state, progress, start and end, the recent send rate, and the top failure
    reasons (SMTP code and reply, counted). Without SLUG, every campaign. The JSON keys are campaign, status, total and one per
    state (queued, sending, sent, retry, failed, skipped, uncertain).

    \b
    Example:
      mailer status appeal-2022
      mailer status --format json
    """
    import json

    from mailer import review

    with db.session_factory(state().engine())() as session:
        summaries = review.campaign_status(session, slug)
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
@click.argument("slug")
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
    help="Only activity since then: 2026-03-14, 2026-03-14T09:30, or an age: 30m, 2h, 3d, 1w.",
)
@click.option(
    "--events", is_flag=True, help="One line per send-log event instead of per recipient."
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
    fmt: str,
) -> None:
    """Who was sent what, when, and the server's answer.

    One line per recipient with its state, attempts, sent time, SMTP code and reply, and
    Message-ID. With --events, one line per send-log event (queued, claimed, sent, deferred, ...),
    oldest first. CSV cells that a spreadsheet would run as a formula get a leading '.

    \b
    Example:
      mailer log appeal-2022 --status failed
      mailer log appeal-2022 --country DE --since 2d --format csv > sent.csv
      mailer log appeal-2022 --contact mayor@city.example.org --events
    """
    from mailer import review

    flt = review.LogFilter(
        statuses=review.parse_statuses(statuses),
        contact=contact,
        city=city,
        country=country,
        since=review.parse_since(since) if since is not None else None,
    )
    with db.session_factory(state().engine())() as session:
        if events:
            rows = review.event_rows(session, slug=slug, flt=flt)
            columns, table_columns = review.EVENT_COLUMNS, review.EVENT_TABLE_COLUMNS
        else:
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
    required=True,
    # Not dir_okay=False: the library names a folder given here in its one `Error:` line.
    type=click.Path(path_type=Path),
    metavar="FILE.html",
    help="Where to write the report (one self-contained HTML file).",
)
def report(slug: str, output: Path) -> None:
    """Write a one-file HTML report anyone can open.

    Totals, a chart of sends over time, results by country and language, failures grouped
    by reason, and the failed and uncertain recipients with the server's answers. The file
    needs nothing else (no internet, no scripts): mail it, open it in any browser.

    \b
    Example:
      mailer report appeal-2022 --output appeal-2022.html
    """
    from mailer.report import write_report

    with db.session_factory(state().engine())() as session:
        data = write_report(session, slug=slug, output=output)
    s = data.summary
    click.echo(
        f"Wrote {output}: {s.total:,} recipients, {s.counts['sent']:,} sent, "
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
