"""Composing: where the database meets the templates. Contacts → render views → a letter's bytes.

`RecipientLoader` turns contact rows into render views, `Composer` renders and builds one
campaign's messages, `preview` composes one. The sender (engine, compose_worker), `check` and
`preview` all compose through here, so what is checked and previewed is what is sent. Must not
import `campaigns`, `check` or `engine` (they import this).

Unsubscribe defaults (every message carries them), read from mailer.toml on the laptop that
creates the campaign and frozen in it (`campaigns.unsubscribe_mailto`/`unsubscribe_url`), like
its templates:

- `List-Unsubscribe` mailto: `[campaign] unsubscribe_mailto` in mailer.toml (an address or a
  `mailto:` URL); when unset, the campaign's own From address with `?subject=unsubscribe`. That
  mailbox exists for sure (replies already go there), unlike a guessed `+unsubscribe` alias that
  many providers do not route.
- https one-click: `[campaign] unsubscribe_url` containing `{token}`, which becomes a per-contact
  token (see unsubscribe.py). Must be https.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from mailer import audience as audience_mod
from mailer import unsubscribe
from mailer.addresses import (
    REPLY_TO_SIGNATORY,
    Mailbox,
    address_problem,
    ascii_url,
    encode_domain,
    mailto_url,
    parse_mailbox,
)
from mailer.audience import Audience
from mailer.config import Workspace
from mailer.errors import InvalidValueError, NotFoundError
from mailer.message import build_message, clean_text, make_message_id
from mailer.models import Campaign, City, Contact, Message, Partnership, Signatory
from mailer.render import (
    CampaignView,
    CityView,
    ContactView,
    LetterView,
    PartnershipView,
    Recipient,
    Rendered,
    SignatoryView,
    TemplateSet,
    load_template_set,
    normalise_sources,
)
from mailer.zones import Place, ZoneResolver, zone_info

# A follow-up's thread is read at most this many campaigns up (a follow-up of a follow-up ...).
_THREAD_DEPTH = 20

_URL_UNSAFE = re.compile(r"[\s<>\"]")


def template_set_for(campaign: Campaign, *, templates_dir: Path) -> TemplateSet:
    """Live from disk while a draft; the frozen copy once sending has started."""
    if campaign.template_sources:
        return TemplateSet.from_sources(
            name=campaign.template, sources=normalise_sources(campaign.template_sources)
        )
    return load_template_set(templates_dir, campaign.template)


# --------------------------------------------------------------------------- recipients


def _mayor_first(title: str | None) -> int:
    lowered = (title or "").strip().lower()
    return 0 if lowered.startswith("mayor") else 1 if "mayor" in lowered else 2


class RecipientLoader:
    """Builds render views for pages of contacts with a few queries each.

    The signatories are read once per loader; `load_recipients` makes a one-off loader. For a
    follow-up (`campaign_id` of a campaign with a parent) each recipient also gets the thread:
    the earlier letters to them (`first_letter`, `previous_letter`, `references`), their dates
    in the recipient's own time zone (`default_zone` where it cannot be told).
    """

    def __init__(
        self,
        session: Session,
        *,
        today: dt.date | None = None,
        campaign_id: int | None = None,
        default_zone: str | None = None,
    ) -> None:
        self.session = session
        self.today = today or dt.datetime.now(dt.UTC).date()
        self.campaign_id = campaign_id
        self.default_zone = default_zone
        # The campaigns this one follows, oldest first (None: not looked up yet).
        self._thread: tuple[int, ...] | None = None
        self._zones: ZoneResolver | None = None
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
                    Contact.timezone,
                )
                .outerjoin(City, City.id == Contact.city_id)
                .where(Contact.id.in_(ids))
            )
            .all()
        )
        self._load_partnerships({row[9] for row in rows if row[9] is not None})
        threads = self._load_threads(rows)
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
            _timezone,
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
                **threads.get(contact_id, {}),
            )
        return result

    def _thread_campaigns(self) -> tuple[int, ...]:
        if self._thread is None:
            chain: list[int] = []
            settings: dict[str, object] = {}
            current = self.campaign_id
            if current is not None:
                row = self.session.execute(
                    select(Campaign.parent_id, Campaign.settings).where(Campaign.id == current)
                ).first()
                if row is not None:
                    current, settings = row[0], dict(row[1] or {})
                else:
                    current = None
            while current is not None and current not in chain and len(chain) < _THREAD_DEPTH:
                chain.append(current)
                current = self.session.scalar(
                    select(Campaign.parent_id).where(Campaign.id == current)
                )
            self._thread = tuple(reversed(chain))
            zone = str(settings.get("default_zone") or self.default_zone or "UTC")
            self._zones = ZoneResolver(default=zone, today=self.today) if chain else None
        return self._thread

    def _load_threads(self, rows: Sequence[Any]) -> dict[int, dict[str, Any]]:
        """Per contact, the thread a follow-up answers: the letters of the campaigns it follows
        that went out to them (see the class docstring)."""
        thread = self._thread_campaigns()
        if not thread or not rows:
            return {}
        assert self._zones is not None
        order = {campaign_id: i for i, campaign_id in enumerate(thread)}
        letters: dict[int, list[tuple[int, str, str, dt.datetime]]] = {}
        found = self.session.connection().execute(
            select(
                Message.contact_id,
                Message.campaign_id,
                Message.message_id,
                Message.subject,
                Message.sent_at,
            ).where(
                Message.campaign_id.in_(thread),
                Message.contact_id.in_([row[0] for row in rows]),
                Message.sent_at.is_not(None),
                Message.message_id.is_not(None),
            )
        )
        for contact_id, campaign_id, message_id, subject, sent_at in found:
            if message_id and sent_at is not None:
                letters.setdefault(contact_id, []).append(
                    (order[campaign_id], message_id, subject or "", sent_at)
                )
        threads: dict[int, dict[str, Any]] = {}
        for row in rows:
            sent = sorted(letters.get(row[0], ()))
            if not sent:
                continue
            place = Place.of(
                timezone=row[13],
                attributes=row[7] if isinstance(row[7], dict) else None,
                city=row[10],
                country=row[11],
                region=row[12],
            )
            zone = zone_info(self._zones.resolve(place).zone)
            views = [
                LetterView(
                    sent_at=sent_at.astimezone(zone),
                    date=sent_at.astimezone(zone).date(),
                    subject=subject,
                    message_id=message_id,
                )
                for _, message_id, subject, sent_at in sent
            ]
            threads[row[0]] = {
                "first_letter": views[0],
                "previous_letter": views[-1],
                "references": tuple(v.message_id for v in views),
            }
        return threads

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
    session: Session,
    contact_ids: Sequence[int],
    *,
    today: dt.date | None = None,
    campaign_id: int | None = None,
    default_zone: str | None = None,
) -> dict[int, Recipient]:
    return RecipientLoader(
        session, today=today, campaign_id=campaign_id, default_zone=default_zone
    ).load(contact_ids)


# --------------------------------------------------------------------------- composing


class Composed(NamedTuple):
    """One recipient's message: the bytes for the transport and what the send log records.

    A tuple, because thousands a second cross the pipe from the compose worker, and tuples
    pickle and unpickle cheapest.
    """

    data: bytes
    mail_from: str
    rcpt_to: str
    smtputf8: bool
    message_id: str
    language: str
    requested_language: str
    subject: str
    body_hash: str
    fell_back: bool


def unsubscribe_settings(settings: Workspace, *, from_address: str) -> tuple[str, str | None]:
    """The List-Unsubscribe mailto and the one-click URL template (None: no URL) that
    `[campaign] unsubscribe_mailto` / `unsubscribe_url` in mailer.toml give, checked and in
    their header form (A-labels, percent-encoding). A campaign freezes both when it is
    created."""
    sender = parse_mailbox(from_address, what="From")
    return _mailto(settings, sender.address), _url(settings)


def _mailto(settings: Workspace, sender_address: str) -> str:
    configured = settings.setting("campaign", "unsubscribe_mailto")
    if configured is None or str(configured).strip() == "":
        return mailto_url(sender_address, query="subject=unsubscribe")
    value = str(configured).strip()
    if value.lower().startswith("mailto:"):
        address, _, query = value[len("mailto:") :].partition("?")
        address = unquote(address)
    else:
        address, query = value, "subject=unsubscribe"
    problem = address_problem(address)
    if problem is None and _URL_UNSAFE.search(query):
        problem = "the part after ? has spaces or brackets"
    if problem is None:
        try:
            return mailto_url(address, query=query)
        except InvalidValueError as exc:
            problem = str(exc)
    raise InvalidValueError(f"mailer.toml [campaign] unsubscribe_mailto {configured!r}: {problem}")


def _url(settings: Workspace) -> str | None:
    configured = settings.setting("campaign", "unsubscribe_url")
    if configured is None or str(configured).strip() == "":
        return None
    value = str(configured).strip()
    if not value.lower().startswith("https://") or "{token}" not in value:
        raise InvalidValueError(
            f"mailer.toml [campaign] unsubscribe_url {value!r}: must be an https:// URL "
            "containing {token} (e.g. https://example.org/unsubscribe?t={token})"
        )
    try:
        # Headers are ASCII: an international host goes as A-labels (IDNA 2008).
        return ascii_url(value)
    except InvalidValueError as exc:
        raise InvalidValueError(f"mailer.toml [campaign] unsubscribe_url {value!r}: {exc}") from None


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
        self.sender = parse_mailbox(campaign.from_address, what=f"campaign {campaign.slug!r}: From")
        # The Message-ID's and List-Id's domain: the sender's, as A-labels (headers are ASCII).
        self.domain = encode_domain(self.sender.address.rpartition("@")[2])
        self.list_id = f"<{campaign.slug}.{self.domain}>"
        self.reply_rule = campaign.reply_to
        # A fixed Reply-To (the rule is None, `signatory` or one mailbox).
        self.fixed_reply_to = (
            parse_mailbox(campaign.reply_to, what=f"campaign {campaign.slug!r}: Reply-To")
            if campaign.reply_to not in (None, REPLY_TO_SIGNATORY)
            else None
        )
        self.today = today or dt.datetime.now(dt.UTC).date()
        if campaign.unsubscribe_mailto is not None:
            # Frozen at create (see campaigns.create_campaign): every sender's letters alike.
            self.unsubscribe_mailto = campaign.unsubscribe_mailto
            self._url_template = campaign.unsubscribe_url
        else:
            # A campaign made before migration 0005_team: the local mailer.toml, as it was.
            self.unsubscribe_mailto = _mailto(settings, self.sender.address)
            self._url_template = _url(settings)
        secret = settings.setting("campaign", "unsubscribe_secret")
        self._secret = unsubscribe.key_for(slug=self.slug, secret=str(secret) if secret else None)

    def token(self, email: str) -> str:
        return unsubscribe.make_token(key=self._secret, slug=self.slug, email=email)

    def unsubscribe_url(self, email: str) -> str | None:
        if self._url_template is None:
            return None
        return self._url_template.replace("{token}", self.token(email))

    def render(self, recipient: Recipient) -> Rendered:
        return self._render(recipient, self.unsubscribe_url(recipient.contact.email))

    def _render(self, recipient: Recipient, unsubscribe_url: str | None) -> Rendered:
        rendered = self.template_set.render(
            recipient=recipient,
            campaign=self.view,
            unsubscribe_url=unsubscribe_url,
            unsubscribe_mailto=self.unsubscribe_mailto,
            today=self.today,
        )
        if not rendered.subject and recipient.first_letter is not None:
            # A follow-up whose template leaves Subject empty answers in the same thread.
            rendered = dataclasses.replace(
                rendered, subject=reply_subject(recipient.first_letter.subject)
            )
        return rendered

    def reply_to(self, recipient: Recipient) -> Mailbox | None:
        """The letter's Reply-To: the fixed one, or the signing mayor by name and address."""
        if self.reply_rule != REPLY_TO_SIGNATORY:
            return self.fixed_reply_to
        partner = recipient.partnerships[0] if recipient.partnerships else None
        signatory = partner.signatory if partner is not None else None
        if signatory is not None and signatory.email:
            return Mailbox(name=signatory.name, address=signatory.email)
        return None

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
            in_reply_to=recipient.previous_letter.message_id if recipient.previous_letter else None,
            references=recipient.references,
        )
        return Composed(
            data=built.data,
            mail_from=built.mail_from,
            rcpt_to=built.rcpt_to,
            smtputf8=built.smtputf8,
            message_id=built.message_id,
            language=rendered.language,
            requested_language=rendered.requested_language,
            subject=("[TEST] " if test else "") + clean_text(rendered.subject),
            body_hash=built.body_hash,
            fell_back=rendered.fell_back,
        )


def reply_subject(subject: str) -> str:
    """`Re: <subject>`, without piling up `Re: Re:`."""
    text = clean_text(subject)
    while text[:3].lower() == "re:":
        text = text[3:].lstrip()
    return f"Re: {text}"


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
    audience = Audience.from_json(campaign.audience)
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
    recipient = load_recipients(
        session,
        [contact_id],
        campaign_id=campaign.id,
        default_zone=settings.setting("campaign", "default_zone"),
    )[contact_id]
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
