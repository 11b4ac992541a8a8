"""`mailer demo`: the whole job, end to end, on sample data and a mail server on this machine.

A new user sees every step once (import, campaign, check, send, review) without an SMTP
account: the letters go to an embedded SMTP server on 127.0.0.1 that files them in a Maildir.

The folder must be new (or empty): a demo never writes into an existing workspace, and a
second run asks for the old demo folder to be removed or another one named, so nobody's
real workspace is ever mixed with sample data.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from mailer import addresses, campaigns, db, importers, review, smtp
from mailer import check as checking
from mailer import engine as send_engine
from mailer.audience import Audience, suppress
from mailer.config import CONFIG_NAME, DEFAULT_DB_NAME, Workspace, create_workspace, data_path
from mailer.devserver import DevServer
from mailer.errors import CheckFailed, ConflictError, SendIncomplete, WorkspaceError
from mailer.models import SuppressionReason
from mailer.report import write_report
from mailer.send_report import format_send_counts

SLUG = "appeal"
TEMPLATE = "appeal"
FROM_ADDRESS = "Campaign office <appeals@campaign.example.org>"
TITLE = "Open letter of the mayors of Ukraine (demo)"
MARKER = ".mailer-demo"
SEED_FILES = ("signatories.csv", "partnerships.csv", "contacts.csv")
# One sample recipient "asked not to be contacted", to show that suppression holds.
SUPPRESSED = "international@nuernberg.example.org"

Out = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    directory: Path
    maildir: Path
    received: int
    report: Path
    summary: review.CampaignSummary
    seconds: float


def _prepare(directory: Path) -> Path:
    root = directory.expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConflictError(f"{root} is a file; name a new folder: mailer demo OTHER-FOLDER")
    if root.is_dir() and any(root.iterdir()):
        if (root / MARKER).exists():
            raise ConflictError(
                f"{root} holds an earlier demo; remove it (rm -r {root}) "
                "or name another folder: mailer demo OTHER-FOLDER"
            )
        if (root / CONFIG_NAME).exists():
            raise ConflictError(
                f"{root} is a workspace; the demo never writes into one, "
                "name a new folder: mailer demo OTHER-FOLDER"
            )
        raise ConflictError(
            f"{root} exists and is not empty; name a new folder: mailer demo OTHER-FOLDER"
        )
    return root


def program_name() -> str:
    """How to call mailer again from any folder: `mailer` if it is on PATH, else its full path."""
    invoked = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if invoked is None or invoked.name != "mailer":
        return "mailer"
    on_path = shutil.which("mailer")
    if on_path and Path(on_path).resolve() == invoked.resolve():
        return "mailer"
    return str(invoked.resolve())


def run_demo(*, directory: Path, out: Out) -> DemoResult:
    started = time.monotonic()
    root = _prepare(directory)
    seeds = data_path("seeds")
    missing = [name for name in SEED_FILES if not (seeds / name).is_file()]
    if missing:
        raise WorkspaceError(f"the sample data is missing from {seeds}: {', '.join(missing)}")

    out(f"1. Workspace {root}")
    # Its own SQLite file, whatever MAILER_DATABASE_URL says: sample data never lands in a
    # real (perhaps shared) database.
    workspace = create_workspace(root=root, db_url=f"sqlite:///{root / DEFAULT_DB_NAME}")
    (root / MARKER).write_text(
        "Made by `mailer demo`: sample data only, safe to delete.\n", encoding="utf-8"
    )
    engine = db.make_engine(workspace.database_url)
    try:
        db.upgrade(engine)
        return _run(workspace=workspace, engine=engine, seeds=seeds, out=out, started=started)
    finally:
        engine.dispose()


def _run(
    *, workspace: Workspace, engine: Engine, seeds: Path, out: Out, started: float
) -> DemoResult:
    root = workspace.root
    factory = db.session_factory(engine)

    out("2. Import the sample lists (fictional recipients on example.org)")
    for name, importer in (
        ("signatories.csv", importers.import_signatories),
        ("partnerships.csv", importers.import_partnerships),
        ("contacts.csv", importers.import_contacts),
    ):
        imported = importer(factory, path=seeds / name)
        out(f"   {importers.format_counts(imported)}")

    with db.transaction(factory) as session:
        suppress(
            session,
            emails=[SUPPRESSED],
            reason=SuppressionReason.MANUAL,
            source="mailer demo: asked not to be contacted",
        )
    out(f"   {SUPPRESSED} asked not to be contacted: suppressed (it will be skipped)")

    out(f"3. Create the campaign {SLUG!r} from the starter template {TEMPLATE!r}")
    with db.transaction(factory) as session:
        campaigns.create_campaign(
            session,
            slug=SLUG,
            template=TEMPLATE,
            from_address=FROM_ADDRESS,
            reply_to=addresses.REPLY_TO_SIGNATORY,
            audience=Audience(),
            title=TITLE,
            default_language=str(workspace.setting("campaign", "default_language", "en")),
            templates_dir=workspace.templates_dir,
            settings=workspace,
        )

    out("4. Check: render the letter for every recipient")
    with db.transaction(factory) as session:
        campaign = campaigns.get_campaign(session, SLUG)
        check = checking.check_campaign(
            session, campaign, templates_dir=workspace.templates_dir, settings=workspace
        )
    for line in checking.format_report(check):
        out(f"   {line}")
    if not check.ok:
        raise CheckFailed(f"the demo campaign does not pass `mailer check {SLUG}`")

    maildir = root / "received"
    with DevServer(maildir=maildir) as server:
        out(f"5. Send through the embedded mail server at {server.url} (this machine only)")
        transport = smtp.SmtpPool(smtp.parse_smtp_url(server.url), size=4)
        report = send_engine.send_campaign(
            workspace=workspace, engine=engine, slug=SLUG, transport=transport, concurrency=4
        )
        out(f"   {format_send_counts(report)}")
        received = server.count()

    out("6. Status (`mailer status`)")
    with factory() as session:
        (summary,) = review.campaign_status(session, SLUG)
    for line in review.format_status_text([summary]).rstrip().splitlines():
        out(f"   {line}")

    report_path = root / "report.html"
    with factory() as session:
        write_report(session, slug=SLUG, output=report_path, workspace=workspace)

    seconds = time.monotonic() - started
    out("")
    out(f"Done in {seconds:.1f} s.")
    out(f"  Received letters: {received} in the Maildir {maildir} (one file each, in new/)")
    out(f"  HTML report:      {report_path}")
    mailer = program_name()
    out("Look around:")
    out(f"  cd {root}")
    out(f"  {mailer} log {SLUG}          # who got what, with the server's answer")
    out(f"  {mailer} log {SLUG} --format csv > log.csv")
    out(f"  {mailer} contacts show mayor@nuernberg.example.org")
    out(f"  {mailer} preview {SLUG}")
    if report.incomplete:
        raise SendIncomplete(f"the demo send left messages unsent; see `mailer status {SLUG}`")
    return DemoResult(
        directory=root,
        maildir=maildir,
        received=received,
        report=report_path,
        summary=summary,
        seconds=seconds,
    )
