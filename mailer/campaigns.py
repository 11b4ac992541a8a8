"""Campaigns: create, get, list, freeze the templates of, and summarise campaigns.

Composing a campaign's letters is compose.py's job, checking them check.py's; neither imports
this module (the Reply-To rule and the mailbox check live in addresses.py, below both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailer import audience as audience_mod
from mailer import compose
from mailer.addresses import parse_mailbox, reply_to_rule
from mailer.audience import Audience
from mailer.errors import ConflictError, InvalidValueError, NotFoundError, TemplateError
from mailer.message import clean_text
from mailer.models import Campaign, CampaignStatus, Contact
from mailer.render import TemplateSet, load_template_set

SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*$")


# --------------------------------------------------------------------------- campaigns


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
    parse_mailbox(from_address, what="--from")
    reply_to = reply_to_rule(reply_to)
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
    """The campaign named `slug`; NotFoundError naming the campaigns there are if none is."""
    campaign = session.scalar(select(Campaign).where(Campaign.slug == slug))
    if campaign is None:
        known = list(session.scalars(select(Campaign.slug).order_by(Campaign.slug).limit(20)))
        hint = f"; campaigns: {', '.join(known)}" if known else "; there are no campaigns yet"
        raise NotFoundError(f"no campaign {slug!r}{hint}")
    return campaign


def list_campaigns(session: Session) -> list[Campaign]:
    return list(session.scalars(select(Campaign).order_by(Campaign.created_at, Campaign.id)))


def audience_size(session: Session, audience: Audience) -> int:
    """How many contacts the audience matches (raises InvalidValueError on an unknown field)."""
    return audience_mod.count(session, audience)


def audience_of(campaign: Campaign) -> Audience:
    return Audience.from_json(campaign.audience)


def freeze_templates(session: Session, campaign: Campaign, *, templates_dir: Path) -> TemplateSet:
    """Copy the sources into the campaign, once: a resumed campaign keeps its first copy."""
    if campaign.template_sources:
        return compose.template_set_for(campaign, templates_dir=templates_dir)
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
        template_set = compose.template_set_for(campaign, templates_dir=templates_dir)
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
