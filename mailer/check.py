"""`mailer check`: render the letter for every recipient and report every problem, grouped.

Findings are grouped by kind with a count and a few example addresses; `format_report` turns a
report into lines for a terminal. A large audience is checked in slices by several processes.
Composes through compose.py (the same code the sender uses); must not import `engine`.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from mailer import audience as audience_mod
from mailer.addresses import address_problem, display, needs_smtputf8, normalise
from mailer.audience import Audience
from mailer.compose import Composer, RecipientLoader, composer_for, template_set_for
from mailer.config import Workspace
from mailer.errors import InvalidValueError, MailerError, NotFoundError, TemplateError
from mailer.greetings import generic_greeting
from mailer.message import clean_text
from mailer.models import Campaign, utcnow
from mailer.render import (
    MissingFieldError,
    Recipient,
    RenderProblem,
    TemplateSet,
    leftover_markup,
)
from mailer.timing import ZoneReport, format_zone_report, zone_report

# Longer subjects are cut by most mail clients' lists (and read as spam); a warning, not a block.
SUBJECT_WARN_LENGTH = 120
CHECK_BATCH = 2000
EXAMPLES = 5


@dataclass(kw_only=True)
class Finding:
    """One group of problems: what, how many, and a few example addresses."""

    kind: str
    blocking: bool
    message: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str | None) -> None:
        self.count += 1
        if example is not None and len(self.examples) < EXAMPLES:
            self.examples.append(example)


@dataclass(kw_only=True)
class CheckReport:
    campaign: str
    template: str
    audience: str
    recipients: int = 0
    rendered: int = 0
    # template language used -> recipients
    languages: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    # How each recipient's time zone was found (for sending windows).
    zones: ZoneReport | None = None

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.blocking]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if not f.blocking]

    @property
    def ok(self) -> bool:
        return not self.blocking

    def kinds(self) -> set[str]:
        return {f.kind for f in self.findings}


class _Findings:
    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], Finding] = {}

    def add(
        self, kind: str, key: str, *, blocking: bool, message: str, example: str | None
    ) -> None:
        finding = self.groups.get((kind, key))
        if finding is None:
            finding = self.groups[(kind, key)] = Finding(
                kind=kind, blocking=blocking, message=message
            )
        finding.add(example)

    def merge(self, other: _Findings) -> None:
        for key, theirs in other.groups.items():
            ours = self.groups.get(key)
            if ours is None:
                self.groups[key] = theirs
                continue
            ours.count += theirs.count
            ours.examples.extend(theirs.examples[: EXAMPLES - len(ours.examples)])


@dataclass(kw_only=True)
class _Partial:
    """What one slice of the audience contributed to a check."""

    found: _Findings = field(default_factory=_Findings)
    rendered: int = 0
    languages: Counter[str] = field(default_factory=Counter)
    # Normalised addresses in audience order, for duplicates and suppressions across slices.
    emails: list[str] = field(default_factory=list)
    built: set[str] = field(default_factory=set)


def _check_slice(
    session: Session,
    composer: Composer | None,
    ids: Sequence[int],
    batch_size: int,
    *,
    progress: Callable[[int, int], None] | None = None,
    campaign_id: int | None = None,
) -> _Partial:
    part = _Partial()
    found = part.found
    # A follow-up's letters are checked with the thread they answer (its subject, its dates).
    loader = RecipientLoader(session, campaign_id=campaign_id)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        batch = loader.load(chunk)
        for contact_id in chunk:
            recipient = batch.get(contact_id)
            if recipient is None:  # deleted since the audience was resolved
                continue
            email = recipient.contact.email
            part.emails.append(normalise(email))
            problem = address_problem(email.strip())
            if problem:
                found.add(
                    "invalid_address",
                    problem,
                    blocking=False,
                    message=f"invalid addresses, skipped when sending: {problem}",
                    example=email,
                )
            elif not email.isascii() and needs_smtputf8(email):
                found.add(
                    "smtputf8",
                    "",
                    blocking=False,
                    message="addresses with a non-ASCII local part need SMTPUTF8 (RFC 6531); "
                    "sent only through a server that offers it, failed otherwise",
                    example=email,
                )
            name = recipient.contact.name
            if name and clean_text(name) != name.strip():
                found.add(
                    "line_break",
                    "",
                    blocking=False,
                    message="names with line breaks or control characters "
                    "(shown as single spaces in the To header)",
                    example=email,
                )
            if composer is not None:
                _check_one(composer, recipient, part)
        if progress is not None:
            progress(len(chunk), len(ids))
    return part


# Audiences at least this big are checked by several processes (one per core, at most
# CHECK_MAX_WORKERS): rendering is CPU-bound, and starting workers costs about a second.
CHECK_PARALLEL_FROM = 20_000
CHECK_MAX_WORKERS = 8
_CHECK_SLICE = 5_000


@dataclass(frozen=True, kw_only=True)
class _SliceJob:
    url: str
    campaign: dict[str, Any]
    sources: dict[str, str]
    settings: Workspace
    ids: list[int]
    batch_size: int


_worker_state: dict[str, Any] = {}


def _run_slice_job(job: _SliceJob) -> _Partial:
    """In a worker process: its own engine, and the template compiled once per worker."""
    from mailer import db

    engine = _worker_state.get(job.url)
    if engine is None:
        engine = _worker_state[job.url] = db.make_engine(job.url)
    key = _composer_key(job.campaign, job.sources)
    composer = _worker_state.get(key)
    if composer is None:
        campaign = Campaign(**job.campaign)
        template_set = TemplateSet.from_sources(name=campaign.template, sources=job.sources)
        composer = _worker_state[key] = composer_for(
            campaign=campaign, template_set=template_set, settings=job.settings
        )
    with db.transaction(db.session_factory(engine)) as session:
        return _check_slice(
            session, composer, job.ids, job.batch_size, campaign_id=job.campaign.get("id")
        )


def _composer_key(campaign: dict[str, Any], sources: dict[str, str]) -> str:
    text = repr((sorted(campaign.items()), sorted(sources.items())))
    return "composer:" + hashlib.sha256(text.encode()).hexdigest()


def _parallel_url(session: Session) -> str | None:
    """The database URL workers can open, or None when they cannot share this database."""
    url = session.get_bind().engine.url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return None
    return url.render_as_string(hide_password=False)


def _check_parallel(
    session: Session,
    campaign: Campaign,
    template_set: TemplateSet,
    composer: Composer,
    settings: Workspace,
    ids: list[int],
    *,
    workers: int,
    batch_size: int,
    url: str,
    progress: Callable[[int, int], None] | None,
) -> list[_Partial]:
    import concurrent.futures
    import multiprocessing

    fields = {
        "id": campaign.id,
        "slug": campaign.slug,
        "title": campaign.title,
        "template": campaign.template,
        "from_address": campaign.from_address,
        "reply_to": campaign.reply_to,
        "default_language": campaign.default_language,
        "unsubscribe_mailto": campaign.unsubscribe_mailto,
        "unsubscribe_url": campaign.unsubscribe_url,
    }
    jobs = [
        _SliceJob(
            url=url,
            campaign=fields,
            sources=template_set.sources,
            settings=settings,
            ids=ids[start : start + _CHECK_SLICE],
            batch_size=batch_size,
        )
        for start in range(0, len(ids), _CHECK_SLICE)
    ]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # Forked workers inherit the compiled templates instead of compiling them again.
    key = _composer_key(fields, template_set.sources)
    _worker_state[key] = composer
    try:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=context
        ) as pool:
            # map keeps audience order, so examples and duplicates read as with one process.
            parts = []
            for job, part in zip(jobs, pool.map(_run_slice_job, jobs), strict=True):
                parts.append(part)
                if progress is not None:
                    progress(len(job.ids), len(ids))
            return parts
    finally:
        _worker_state.pop(key, None)


def check_campaign(
    session: Session,
    campaign: Campaign,
    *,
    templates_dir: Path,
    settings: Workspace,
    batch_size: int = CHECK_BATCH,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Render for every recipient of the audience (resolved now) and group what is wrong.

    Blocking: a template that fails to load or render, a field a contact lacks, unrendered
    markup in the output, an empty subject, an address twice, bad campaign settings.
    Warnings: language fallbacks, suppressed or invalid addresses (skipped when sending),
    overlong subjects, line breaks in names (shown as spaces), an empty audience.

    `workers`: processes to render with (default: one per core for big audiences).
    `progress(checked, total)` is called as the work goes, with the recipients just checked.
    """
    audience = Audience.from_json(campaign.audience)
    report = CheckReport(
        campaign=campaign.slug, template=campaign.template, audience=audience.describe()
    )
    found = _Findings()
    ids = audience_mod.contact_ids(session, audience)
    report.recipients = len(ids)
    if not ids:
        found.add(
            "empty_audience",
            "",
            blocking=False,
            message=f"no contact matches the audience ({audience.describe()})",
            example=None,
        )
    composer: Composer | None = None
    template_set: TemplateSet | None = None
    try:
        template_set = template_set_for(campaign, templates_dir=templates_dir)
        composer = composer_for(campaign=campaign, template_set=template_set, settings=settings)
    except (TemplateError, NotFoundError, InvalidValueError) as exc:
        found.add("template_error", str(exc), blocking=True, message=str(exc), example=None)
    if composer is not None:
        _check_sender(composer, settings, found)

    if workers is None:
        workers = (
            min(os.cpu_count() or 1, CHECK_MAX_WORKERS) if len(ids) >= CHECK_PARALLEL_FROM else 1
        )
    url = _parallel_url(session) if workers > 1 and composer is not None else None
    parts: list[_Partial] | None = None
    if url is not None and template_set is not None and composer is not None:
        try:
            parts = _check_parallel(
                session,
                campaign,
                template_set,
                composer,
                settings,
                ids,
                workers=workers,
                batch_size=batch_size,
                url=url,
                progress=progress,
            )
        except (BrokenProcessPool, OSError):
            # No worker processes here (a sandbox, a resource limit): one process is only slower.
            parts = None
    if parts is None:
        parts = [
            _check_slice(
                session, composer, ids, batch_size, progress=progress, campaign_id=campaign.id
            )
        ]

    emails: list[str] = []
    for part in parts:
        found.merge(part.found)
        report.rendered += part.rendered
        report.languages.update(part.languages)
        emails.extend(part.emails)
    seen: set[str] = set()
    for email in emails:
        if email in seen:
            found.add(
                "duplicate",
                "",
                blocking=True,
                message="addresses appear more than once (a contact would get two letters)",
                example=email,
            )
        seen.add(email)
    suppressed = audience_mod.suppressed_among(session, emails) if emails else set()
    for email in sorted(suppressed):
        found.add(
            "suppressed",
            "",
            blocking=False,
            message="suppressed addresses (unsubscribed, bounced or do-not-contact), "
            "skipped when sending",
            example=email,
        )
    _team_findings(found, session, campaign, settings=settings, templates_dir=templates_dir)
    report.findings = sorted(
        found.groups.values(), key=lambda f: (not f.blocking, f.kind, -f.count, f.message)
    )
    try:
        report.zones = zone_report(
            session,
            campaign,
            contact_ids=ids,
            default_zone=settings.setting("campaign", "default_zone"),
            today=utcnow().date(),
        )
    except InvalidValueError as exc:
        found.add("timing", str(exc), blocking=True, message=str(exc), example=None)
        report.findings.insert(0, found.groups[("timing", str(exc))])
    return report


def _check_sender(composer: Composer, settings: Workspace, found: _Findings) -> None:
    """A From or fixed Reply-To with a non-ASCII local part puts every letter on SMTPUTF8."""
    known = settings.setting("smtp", "smtputf8") is True
    for header, mailbox in (("From", composer.sender), ("Reply-To", composer.fixed_reply_to)):
        if mailbox is None or not needs_smtputf8(mailbox.address):
            continue
        address = display(mailbox.address)
        if known:
            message = (
                f"the {header} address {address} has a non-ASCII local part: every letter "
                "needs SMTPUTF8 (RFC 6531); [smtp] smtputf8 = true in mailer.toml says the "
                "server offers it"
            )
        else:
            message = (
                f"the {header} address {address} has a non-ASCII local part: every letter "
                "would need SMTPUTF8 (RFC 6531), which many servers do not offer; use an "
                "ASCII address, or set [smtp] smtputf8 = true in mailer.toml if yours does"
            )
        found.add(f"smtputf8_{header}", "", blocking=not known, message=message, example=None)


def _team_findings(
    found: _Findings,
    session: Session,
    campaign: Campaign,
    *,
    settings: Workspace,
    templates_dir: Path,
) -> None:
    """Warnings about the campaign rather than one letter (issues 14 and 16): the local
    template folder differs from the frozen copy, the remembered server has no rate, and
    recipients another campaign wrote to lately."""
    from mailer import campaigns

    drift = campaigns.template_drift(campaign, templates_dir=templates_dir)
    if drift:
        found.add("template_drift", "", blocking=False, message=drift, example=None)
    defaults = campaigns.send_defaults(campaign, settings)
    host = campaigns.unpaced_host(defaults.smtp_url, defaults.rate)
    if host:
        message = campaigns.format_no_rate(host).replace("SLUG", campaign.slug)
        found.add("no_rate", "", blocking=False, message=message, example=None)
    quiet = (campaign.settings or {}).get("quiet_days")
    recent = campaigns.recently_contacted(
        session,
        campaign=campaign,
        audience=Audience.from_json(campaign.audience),
        days=int(quiet) if quiet else campaigns.quiet_days_setting(settings),
    )
    line = campaigns.format_recently_contacted(recent, slug=campaign.slug)
    if line:
        found.add("recently_contacted", "", blocking=False, message=line, example=None)


def _check_one(composer: Composer, recipient: Recipient, part: _Partial) -> None:
    found = part.found
    email = recipient.contact.email
    try:
        rendered = composer.render(recipient)
    except MissingFieldError as exc:
        where = f"{exc.file}:{exc.line}" if exc.line else exc.file
        found.add(
            "missing_field",
            f"{exc.field}\0{where}",
            blocking=True,
            message=f"contacts lack {exc.field}, which the template uses ({where})",
            example=email,
        )
        return
    except RenderProblem as exc:
        found.add("template_error", str(exc), blocking=True, message=str(exc), example=email)
        return
    part.rendered += 1
    part.languages[rendered.language] += 1
    reply_to = composer.reply_to(recipient)
    if reply_to is not None and reply_to is not composer.fixed_reply_to:
        problem = address_problem(reply_to.address)
        if problem:
            found.add(
                "reply_to",
                reply_to.address,
                blocking=True,
                message=f"Reply-To {reply_to.address!r} is not a valid address: {problem}",
                example=email,
            )
        elif needs_smtputf8(reply_to.address):
            found.add(
                "smtputf8_reply_to",
                "",
                blocking=False,
                message="letters whose Reply-To (the signatory) has a non-ASCII local part "
                "need SMTPUTF8 (RFC 6531); sent only through a server that offers it",
                example=email,
            )
    if rendered.language not in part.built and not address_problem(email.strip()):
        # One full message per language proves the builder takes these headers; building
        # every message would double the time check takes.
        part.built.add(rendered.language)
        try:
            composer.compose(recipient, rendered=rendered)
        except MailerError as exc:
            found.add("build_error", str(exc), blocking=True, message=str(exc), example=email)
    if rendered.fell_back:
        found.add(
            "fallback",
            f"{rendered.requested_language}\0{rendered.language}",
            blocking=False,
            message=f"contacts asking for {rendered.requested_language!r} get the "
            f"{rendered.language!r} variant (the template has no {rendered.requested_language})",
            example=email,
        )
    if rendered.generic_greeting:
        generic = generic_greeting(rendered.language) or ""
        found.add(
            "generic_greeting",
            rendered.language,
            blocking=False,
            message=f"letters with the generic greeting {generic!r} (no name, office or form "
            f"of address known; {rendered.language} variant)",
            example=email,
        )
    if not rendered.subject:
        found.add(
            "empty_subject",
            rendered.language,
            blocking=True,
            message=f"empty subject ({rendered.language} variant)",
            example=email,
        )
    elif len(rendered.subject) > SUBJECT_WARN_LENGTH:
        found.add(
            "long_subject",
            rendered.language,
            blocking=False,
            message=f"subjects longer than {SUBJECT_WARN_LENGTH} characters "
            f"({rendered.language} variant); mail clients cut them",
            example=email,
        )
    for where, text in (
        ("subject", rendered.subject),
        ("text", rendered.text),
        ("HTML", rendered.html),
    ):
        snippet = leftover_markup(text) if text else None
        if snippet is not None:
            found.add(
                "leftover_markup",
                f"{rendered.language}\0{where}",
                blocking=True,
                message=f"unrendered template markup in the {where} ({rendered.language} "
                f"variant), e.g. {snippet!r}",
                example=email,
            )


def format_report(report: CheckReport) -> list[str]:
    """The report as lines for a terminal."""
    languages = ", ".join(f"{lang} {n:,}" for lang, n in report.languages.most_common())
    lines = [
        f"Campaign {report.campaign}: {report.recipients:,} recipients ({report.audience}); "
        f"template {report.template}",
    ]
    if languages:
        lines.append(f"  rendered {report.rendered:,}: {languages}")
    for title, findings in (
        ("Blocking problems:", report.blocking),
        ("Warnings:", report.warnings),
    ):
        if not findings:
            continue
        lines.append(title)
        for finding in findings:
            # The count goes last so one line reads right for 1 and for 1,000 recipients.
            count = f": {finding.count:,}" if finding.count and finding.examples else ""
            lines.append(f"  - {finding.message}{count}")
            if finding.examples:
                more = finding.count - len(finding.examples)
                tail = f" and {more:,} more" if more > 0 else ""
                lines.append(f"      e.g. {', '.join(finding.examples)}{tail}")
    if report.zones is not None:
        lines.extend(format_zone_report(report.zones))
    if report.ok:
        n = len(report.warnings)
        note = f" ({n} warning{'s' if n != 1 else ''})" if n else ""
        lines.append(f"OK: nothing blocks sending{note}.")
    return lines
