"""Campaigns: where the database meets the templates (the only such seam besides the engine).

Unsubscribe defaults, documented here because every message carries them:

- `List-Unsubscribe` mailto: `[campaign] unsubscribe_mailto` in mailer.toml (an address or a
  `mailto:` URL); when unset, the campaign's own From address with `?subject=unsubscribe`. That
  mailbox exists for sure (replies already go there), unlike a guessed `+unsubscribe` alias that
  many providers do not route.
- https one-click: `[campaign] unsubscribe_url` containing `{token}`, which becomes a per-contact
  token: HMAC-SHA256 of "slug NUL email" keyed with `[campaign] unsubscribe_secret` (or with the
  slug alone when no secret is set, which is then merely a hash). Must be https.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import types
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from mailer import audience as audience_mod
from mailer.addresses import address_problem, split_mailbox
from mailer.audience import Audience
from mailer.config import Workspace
from mailer.errors import (
    ConflictError,
    InvalidValueError,
    MailerError,
    NotFoundError,
    TemplateError,
)
from mailer.message import build_message, clean_text, make_message_id
from mailer.models import Campaign, CampaignStatus, City, Contact, Partnership, Signatory
from mailer.render import (
    CampaignView,
    CityView,
    ContactView,
    MissingFieldError,
    PartnershipView,
    Recipient,
    Rendered,
    RenderProblem,
    SignatoryView,
    TemplateSet,
    leftover_markup,
    normalise_sources,
    template_names,
)

SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*$")
REPLY_TO_SIGNATORY = "signatory"
# Longer subjects are cut by most mail clients' lists (and read as spam); a warning, not a block.
SUBJECT_WARN_LENGTH = 120
CHECK_BATCH = 2000
EXAMPLES = 5


# --------------------------------------------------------------------------- campaigns


def _check_address(value: str, flag: str) -> None:
    _, address = split_mailbox(value)
    problem = address_problem(address)
    if problem:
        raise InvalidValueError(f"{flag} {value!r} is not a valid address: {problem}")


def load_template_set(templates_dir: Path, name: str) -> TemplateSet:
    available = template_names(templates_dir)
    if name not in available:
        listing = ", ".join(available) if available else "none"
        raise NotFoundError(
            f"no template {name!r} in {templates_dir} (available: {listing}); "
            f"a template is a folder {templates_dir}/NAME/ with LANG.txt.j2 files"
        )
    return TemplateSet.from_directory(templates_dir / name, name=name)


def create_campaign(
    session: Session,
    *,
    slug: str,
    template: str,
    from_address: str,
    reply_to: str | None,
    audience: Audience,
    title: str | None,
    default_language: str,
    templates_dir: Path,
) -> Campaign:
    if not SLUG_RE.match(slug):
        raise InvalidValueError(
            f"campaign slug {slug!r}: use letters, digits, - and _ (up to 100), e.g. appeal-2022"
        )
    if session.scalar(select(Campaign.id).where(Campaign.slug == slug)) is not None:
        raise ConflictError(
            f"campaign {slug!r} exists already; pick another slug "
            f"(`mailer campaign show {slug}` shows the existing one)"
        )
    _check_address(from_address, "--from")
    if reply_to is not None:
        reply_to = reply_to.strip()
        if reply_to.lower() == REPLY_TO_SIGNATORY:
            reply_to = REPLY_TO_SIGNATORY
        else:
            _check_address(reply_to, "--reply-to")
    if not LANGUAGE_RE.match(default_language):
        raise InvalidValueError(
            f"--language {default_language!r} is not a language tag (use en, de, pt-BR...)"
        )
    # Loading compiles every variant, so a syntax error is reported now with file and line.
    load_template_set(templates_dir, template)
    # Resolving the audience once rejects a --where on a field no contact has.
    audience_size(session, audience)
    campaign = Campaign(
        slug=slug,
        title=clean_text(title) if title else None,
        template=template,
        from_address=from_address.strip(),
        reply_to=reply_to,
        audience=audience.to_json(),
        default_language=default_language,
        status=CampaignStatus.DRAFT.value,
    )
    session.add(campaign)
    session.flush()
    return campaign


def get_campaign(session: Session, slug: str) -> Campaign:
    campaign = session.scalar(select(Campaign).where(Campaign.slug == slug))
    if campaign is None:
        raise NotFoundError(f"no campaign {slug!r}; `mailer campaign list` shows them")
    return campaign


def list_campaigns(session: Session) -> list[Campaign]:
    return list(session.scalars(select(Campaign).order_by(Campaign.created_at, Campaign.id)))


def audience_size(session: Session, audience: Audience) -> int:
    """How many contacts the audience matches (raises InvalidValueError on an unknown field)."""
    return audience_mod.count(session, audience)


def audience_of(campaign: Campaign) -> Audience:
    return Audience.from_json(campaign.audience)


def template_set_for(campaign: Campaign, *, templates_dir: Path) -> TemplateSet:
    """Live from disk while a draft; the frozen copy once sending has started."""
    if campaign.template_sources:
        return TemplateSet.from_sources(
            name=campaign.template, sources=normalise_sources(campaign.template_sources)
        )
    return load_template_set(templates_dir, campaign.template)


def freeze_templates(session: Session, campaign: Campaign, *, templates_dir: Path) -> TemplateSet:
    """Copy the sources into the campaign, once: a resumed campaign keeps its first copy."""
    if campaign.template_sources:
        return template_set_for(campaign, templates_dir=templates_dir)
    template_set = load_template_set(templates_dir, campaign.template)
    campaign.template_sources = template_set.sources
    session.flush()
    return template_set


@dataclass(frozen=True, kw_only=True)
class CampaignSummary:
    campaign: Campaign
    audience: str
    size: int
    # (contact language or "", count, template language it gets or None when the template fails)
    languages: list[tuple[str, int, str | None]]
    template_languages: tuple[str, ...]
    template_error: str | None


def summarise(session: Session, campaign: Campaign, *, templates_dir: Path) -> CampaignSummary:
    audience = audience_of(campaign)
    query = (
        audience_mod.contacts_query(session, audience)
        .with_only_columns(Contact.language, func.count())
        .group_by(Contact.language)
        .order_by(None)
    )
    rows = [(lang or "", int(n)) for lang, n in session.execute(query)]
    template_set: TemplateSet | None = None
    error = None
    try:
        template_set = template_set_for(campaign, templates_dir=templates_dir)
    except (TemplateError, NotFoundError) as exc:
        error = str(exc)
    languages = []
    for lang, n in sorted(rows, key=lambda r: (-r[1], r[0])):
        used = None
        if template_set is not None:
            used = template_set.choose_language(
                requested=lang or None, default=campaign.default_language
            )[0]
        languages.append((lang, n, used))
    return CampaignSummary(
        campaign=campaign,
        audience=audience.describe(),
        size=sum(n for _, n in rows),
        languages=languages,
        template_languages=template_set.languages if template_set else (),
        template_error=error,
    )


# --------------------------------------------------------------------------- recipients


def _mayor_first(title: str | None) -> int:
    lowered = (title or "").strip().lower()
    return 0 if lowered.startswith("mayor") else 1 if "mayor" in lowered else 2


class RecipientLoader:
    """Builds render views for pages of contacts with a few queries each.

    The signatories are read once per loader; `load_recipients` makes a one-off loader.
    """

    def __init__(self, session: Session, *, today: dt.date | None = None) -> None:
        self.session = session
        self.today = today or dt.datetime.now(dt.UTC).date()
        self._signatories: tuple[SignatoryView, ...] | None = None
        self._by_city: dict[int, SignatoryView] = {}
        # Pages of one audience share cities: their views and ties are built once per loader.
        self._cities: dict[int, CityView] = {}
        self._ties: dict[int, tuple[PartnershipView, ...]] = {}

    def _load_signatories(self) -> tuple[SignatoryView, ...]:
        if self._signatories is None:
            rows = self.session.execute(
                select(
                    Signatory.name, Signatory.title, Signatory.city_id, Signatory.email, City.name
                )
                .outerjoin(City, City.id == Signatory.city_id)
                .order_by(Signatory.id)
            ).all()
            views = []
            best: dict[int, tuple[int, SignatoryView]] = {}
            for name, title, city_id, email, city_name in rows:
                view = SignatoryView(name=name, title=title, city=city_name, email=email or None)
                views.append(view)
                if city_id is not None:
                    rank = _mayor_first(title)
                    if city_id not in best or rank < best[city_id][0]:
                        best[city_id] = (rank, view)
            self._signatories = tuple(views)
            self._by_city = {city_id: view for city_id, (_, view) in best.items()}
        return self._signatories

    def load(self, contact_ids: Sequence[int]) -> dict[int, Recipient]:
        signatories = self._load_signatories()
        ids = list(dict.fromkeys(contact_ids))
        if not ids:
            return {}
        # Plain Core rows (no ORM bookkeeping): this runs for every recipient of a campaign.
        rows = (
            self.session.connection()
            .execute(
                select(
                    Contact.id,
                    Contact.email,
                    Contact.name,
                    Contact.title,
                    Contact.salutation,
                    Contact.language,
                    Contact.organisation,
                    Contact.attributes,
                    Contact.tags,
                    Contact.city_id,
                    City.name,
                    City.country,
                    City.region,
                )
                .outerjoin(City, City.id == Contact.city_id)
                .where(Contact.id.in_(ids))
            )
            .all()
        )
        self._load_partnerships({row[9] for row in rows if row[9] is not None})
        ties = self._ties
        cities = self._cities
        result: dict[int, Recipient] = {}
        for (
            contact_id,
            email,
            name,
            title,
            salutation,
            language,
            organisation,
            attributes,
            tags,
            city_id,
            city_name,
            country,
            region,
        ) in rows:
            city = None
            if city_id is not None:
                city = cities.get(city_id) or self._city(city_id, city_name, country, region)
            contact = ContactView(
                email=email,
                name=name or None,
                title=title or None,
                salutation=salutation or None,
                language=language or None,
                organisation=organisation or None,
                attributes=types.MappingProxyType(dict(attributes or {})),
                tags=tuple(str(t) for t in (tags or ())),
            )
            result[contact_id] = Recipient(
                contact_id=contact_id,
                contact=contact,
                city=city,
                partnerships=ties.get(city_id, ()) if city_id is not None else (),
                signatories=signatories,
            )
        return result

    def _city(self, city_id: int, name: str, country: str | None, region: str | None) -> CityView:
        view = self._cities.get(city_id)
        if view is None:
            view = self._cities[city_id] = CityView(name=name, country=country, region=region)
        return view

    def _load_partnerships(self, city_ids: Iterable[int]) -> None:
        wanted = sorted(set(city_ids) - self._ties.keys())
        if not wanted:
            return
        ua = aliased(City)
        found: dict[int, list[PartnershipView]] = {}
        for start in range(0, len(wanted), 5000):
            chunk = wanted[start : start + 5000]
            rows = (
                self.session.connection()
                .execute(
                    select(
                        Partnership.partner_city_id,
                        Partnership.kind,
                        Partnership.since,
                        Partnership.note,
                        ua.id,
                        ua.name,
                        ua.country,
                        ua.region,
                    )
                    .join(ua, ua.id == Partnership.ukrainian_city_id)
                    .where(Partnership.partner_city_id.in_(chunk))
                    # The oldest tie first: `partner` is the one that has lasted longest.
                    .order_by(
                        Partnership.partner_city_id,
                        Partnership.since.is_(None),
                        Partnership.since,
                        ua.name,
                    )
                )
                .all()
            )
            for partner_city_id, kind, since, note, ua_id, ua_name, ua_country, ua_region in rows:
                found.setdefault(partner_city_id, []).append(
                    PartnershipView(
                        ukrainian_city=self._city(ua_id, ua_name, ua_country, ua_region),
                        kind=kind,
                        since=since,
                        years=(self.today.year - since) if since else None,
                        note=note or None,
                        signatory=self._by_city.get(ua_id),
                    )
                )
        for city_id in wanted:
            self._ties[city_id] = tuple(found.get(city_id, ()))


def load_recipients(
    session: Session, contact_ids: Sequence[int], *, today: dt.date | None = None
) -> dict[int, Recipient]:
    return RecipientLoader(session, today=today).load(contact_ids)


# --------------------------------------------------------------------------- composing


@dataclass(frozen=True, kw_only=True, slots=True)
class Composed:
    data: bytes
    message_id: str
    mail_from: str
    rcpt_to: str
    smtputf8: bool
    language: str
    requested_language: str
    fell_back: bool
    subject: str
    body_hash: str


def _domain(address: str) -> str:
    return split_mailbox(address)[1].rpartition("@")[2].lower()


class Composer:
    """Renders and builds one campaign's messages; everything constant is worked out once."""

    def __init__(
        self,
        *,
        campaign: Campaign,
        template_set: TemplateSet,
        settings: Workspace,
        today: dt.date | None = None,
    ) -> None:
        self.template_set = template_set
        self.slug = campaign.slug
        self.view = CampaignView(
            slug=campaign.slug, title=campaign.title, default_language=campaign.default_language
        )
        self.sender = campaign.from_address
        _check_address(self.sender, f"campaign {campaign.slug!r}: From")
        self.domain = _domain(self.sender)
        self.list_id = f"<{campaign.slug}.{self.domain}>"
        self.reply_rule = campaign.reply_to
        self.today = today or dt.datetime.now(dt.UTC).date()
        self.unsubscribe_mailto = self._mailto(settings)
        self._url_template, self._secret = self._url(settings)

    def _mailto(self, settings: Workspace) -> str:
        configured = settings.setting("campaign", "unsubscribe_mailto")
        if configured is None or str(configured).strip() == "":
            address = split_mailbox(self.sender)[1]
            return f"mailto:{address}?subject=unsubscribe"
        value = str(configured).strip()
        if value.lower().startswith("mailto:"):
            address = value[len("mailto:") :].split("?", 1)[0]
        else:
            address, value = value, f"mailto:{value}?subject=unsubscribe"
        problem = address_problem(address)
        if problem:
            raise InvalidValueError(
                f"mailer.toml [campaign] unsubscribe_mailto {configured!r}: {problem}"
            )
        return value

    def _url(self, settings: Workspace) -> tuple[str | None, bytes]:
        configured = settings.setting("campaign", "unsubscribe_url")
        secret = settings.setting("campaign", "unsubscribe_secret")
        key = str(secret).encode() if secret else self.slug.encode()
        if configured is None or str(configured).strip() == "":
            return None, key
        value = str(configured).strip()
        if not value.lower().startswith("https://") or "{token}" not in value:
            raise InvalidValueError(
                f"mailer.toml [campaign] unsubscribe_url {value!r}: must be an https:// URL "
                "containing {token} (e.g. https://example.org/unsubscribe?t={token})"
            )
        return value, key

    def token(self, email: str) -> str:
        message = f"{self.slug}\0{email.strip().lower()}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def unsubscribe_url(self, email: str) -> str | None:
        if self._url_template is None:
            return None
        return self._url_template.replace("{token}", self.token(email))

    def render(self, recipient: Recipient) -> Rendered:
        return self._render(recipient, self.unsubscribe_url(recipient.contact.email))

    def _render(self, recipient: Recipient, unsubscribe_url: str | None) -> Rendered:
        return self.template_set.render(
            recipient=recipient,
            campaign=self.view,
            unsubscribe_url=unsubscribe_url,
            unsubscribe_mailto=self.unsubscribe_mailto,
            today=self.today,
        )

    def reply_to(self, recipient: Recipient) -> str | None:
        if self.reply_rule is None:
            return None
        if self.reply_rule == REPLY_TO_SIGNATORY:
            partner = recipient.partnerships[0] if recipient.partnerships else None
            signatory = partner.signatory if partner is not None else None
            if signatory is not None and signatory.email:
                return signatory.email
            return None
        return self.reply_rule

    def compose(
        self,
        recipient: Recipient,
        *,
        to_override: str | None = None,
        test: bool = False,
        rendered: Rendered | None = None,
        date: dt.datetime | None = None,
    ) -> Composed:
        email = recipient.contact.email
        # One HMAC per message: the letter and the List-Unsubscribe header share the URL.
        unsubscribe_url = self.unsubscribe_url(email)
        rendered = rendered or self._render(recipient, unsubscribe_url)
        to_address = to_override or email
        key = email if to_override is None else f"{email}>{to_override}"
        built = build_message(
            rendered=rendered,
            sender=self.sender,
            to_address=to_address,
            to_name=recipient.contact.name,
            reply_to=self.reply_to(recipient),
            message_id=make_message_id(
                campaign_slug=self.slug if not test else f"{self.slug}+test",
                contact_email=key,
                domain=self.domain,
            ),
            date=date or dt.datetime.now(dt.UTC),
            list_id=self.list_id,
            unsubscribe_mailto=self.unsubscribe_mailto,
            unsubscribe_url=unsubscribe_url,
            test=test,
        )
        return Composed(
            data=built.data,
            message_id=built.message_id,
            mail_from=built.mail_from,
            rcpt_to=built.rcpt_to,
            smtputf8=built.smtputf8,
            language=rendered.language,
            requested_language=rendered.requested_language,
            fell_back=rendered.fell_back,
            subject=("[TEST] " if test else "") + clean_text(rendered.subject),
            body_hash=built.body_hash,
        )


def composer_for(
    *,
    campaign: Campaign,
    template_set: TemplateSet,
    settings: Workspace,
    today: dt.date | None = None,
) -> Composer:
    return Composer(campaign=campaign, template_set=template_set, settings=settings, today=today)


# --------------------------------------------------------------------------- preview


def preview(
    session: Session,
    campaign: Campaign,
    *,
    contact_email: str | None,
    templates_dir: Path,
    settings: Workspace,
) -> Composed:
    """What one recipient (by default the first of the audience) would receive, as bytes."""
    audience = audience_of(campaign)
    query = audience_mod.contacts_query(session, audience).with_only_columns(Contact.id)
    if contact_email is not None:
        email = audience_mod.normalise_email(contact_email)
        contact_id = session.scalar(select(Contact.id).where(Contact.email == email))
        if contact_id is None:
            raise NotFoundError(f"no contact {email}; `mailer contacts list` shows them")
        if session.scalar(query.where(Contact.id == contact_id)) is None:
            raise NotFoundError(
                f"{email} is not in the audience of campaign {campaign.slug!r} "
                f"({audience.describe()})"
            )
    else:
        contact_id = session.scalar(query.limit(1))
        if contact_id is None:
            raise NotFoundError(
                f"campaign {campaign.slug!r} has no recipients: no contact matches "
                f"{audience.describe()}"
            )
    template_set = template_set_for(campaign, templates_dir=templates_dir)
    composer = composer_for(campaign=campaign, template_set=template_set, settings=settings)
    recipient = load_recipients(session, [contact_id])[contact_id]
    return composer.compose(recipient)


def recipient_notes(session: Session, email: str) -> list[str]:
    """Why `send` would skip this address, if it would (for preview)."""
    notes = []
    suppression = audience_mod.suppression_for(session, email)
    if suppression is not None:
        notes.append(f"{email} is suppressed ({suppression.reason}): send will skip it")
    problem = address_problem(email.strip())
    if problem:
        notes.append(f"{email} is not a valid address ({problem}): send will skip it")
    return notes


# --------------------------------------------------------------------------- check


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
) -> _Partial:
    part = _Partial()
    found = part.found
    loader = RecipientLoader(session)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        batch = loader.load(chunk)
        for contact_id in chunk:
            recipient = batch.get(contact_id)
            if recipient is None:  # deleted since the audience was resolved
                continue
            email = recipient.contact.email
            part.emails.append(email.strip().lower())
            problem = address_problem(email.strip())
            if problem:
                found.add(
                    "invalid_address",
                    problem,
                    blocking=False,
                    message=f"invalid addresses, skipped when sending: {problem}",
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
        return _check_slice(session, composer, job.ids, job.batch_size)


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
        "slug": campaign.slug,
        "title": campaign.title,
        "template": campaign.template,
        "from_address": campaign.from_address,
        "reply_to": campaign.reply_to,
        "default_language": campaign.default_language,
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
    audience = audience_of(campaign)
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
        parts = [_check_slice(session, composer, ids, batch_size, progress=progress)]

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
    report.findings = sorted(
        found.groups.values(), key=lambda f: (not f.blocking, f.kind, -f.count, f.message)
    )
    return report


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
    if reply_to:
        problem = address_problem(split_mailbox(reply_to)[1])
        if problem:
            found.add(
                "reply_to",
                reply_to,
                blocking=True,
                message=f"Reply-To {reply_to!r} is not a valid address: {problem}",
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
    if report.ok:
        n = len(report.warnings)
        note = f" ({n} warning{'s' if n != 1 else ''})" if n else ""
        lines.append(f"OK: nothing blocks sending{note}.")
    return lines
