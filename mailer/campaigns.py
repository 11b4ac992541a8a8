"""Campaigns: create (the whole letter frozen at once), update, get, list and summarise them;
what a send uses when given no server or pace (the campaign's, then mailer.toml's); whether
the local template folder still matches a campaign's frozen copy; quiet days.

Composing a campaign's letters is compose.py's job, checking them check.py's. The audit events
and state changes (pause, resume, cancel, delete) are outbox verbs: outbox imports this module,
so this one imports outbox inside the functions that write.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from mailer import audience as audience_mod
from mailer import compose
from mailer.addresses import parse_mailbox, reply_to_rule
from mailer.audience import Audience
from mailer.clock import utcnow
from mailer.config import Workspace
from mailer.errors import ConflictError, InvalidValueError, NotFoundError, TemplateError
from mailer.identity import Actor
from mailer.message import clean_text
from mailer.models import Campaign, CampaignStatus, Contact, EventKind, Message, MessageStatus
from mailer.render import TemplateSet, load_template_set, normalise_sources

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
    settings: Workspace | None = None,
    sending: SendingSettings | None = None,
    actor: Actor | None = None,
    now: dt.datetime | None = None,
) -> Campaign:
    """A draft campaign with its whole letter frozen now, in the database: the template's
    sources, From, the Reply-To rule, the default language and the unsubscribe mailto and URL
    (from `settings`, the local mailer.toml; none: the From address, no URL). What every
    sender of the team then sends is this, whatever its own folder or mailer.toml says.
    `sending` remembers a server, a pace and quiet days for `send`. Logged as an event."""
    from mailer import outbox

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
    template_set = load_template_set(templates_dir, template)
    mailto, url = compose.unsubscribe_settings(
        settings or Workspace(root=templates_dir.parent), from_address=from_address.strip()
    )
    # Resolving the audience once rejects a --where on a field no contact has.
    size = audience_size(session, audience)
    sending = sending or SendingSettings()
    now = now or utcnow()
    campaign = Campaign(
        slug=slug,
        title=clean_text(title) if title else None,
        template=template,
        template_sources=template_set.sources,
        from_address=from_address.strip(),
        reply_to=reply_to,
        audience=audience.to_json(),
        default_language=default_language,
        status=CampaignStatus.DRAFT.value,
        settings=sending.to_json(),
        unsubscribe_mailto=mailto,
        unsubscribe_url=url,
        created_at=now,
    )
    session.add(campaign)
    session.flush()
    remembered = sending.describe()
    outbox.log_change(
        session,
        kind=EventKind.CAMPAIGN_CREATED,
        detail=f"campaign {slug} created: template {template} "
        f"({', '.join(sorted(template_set.sources))}), from {campaign.from_address}, "
        f"reply-to {reply_to or 'none'}, language {default_language}, audience "
        f"{audience.describe()} ({size} now)" + (f"; {remembered}" if remembered else ""),
        actor=actor or Actor.current(),
        at=now,
        campaign_id=campaign.id,
    )
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
    """Copy the sources into the campaign, once: a resumed campaign keeps its first copy.
    (A campaign is frozen when created; only one made before migration 0005_team is not.)"""
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


# --------------------------------------------------------------------------- what send remembers


_DAYS_RE = re.compile(r"^\s*(\d+)\s*(d|days?|w|weeks?)?\s*$", re.IGNORECASE)


def parse_days(text: str, *, flag: str) -> int:
    """`14d`, `14`, `2w` -> days (at least one)."""
    match = _DAYS_RE.match(text)
    if not match or int(match.group(1)) < 1:
        raise InvalidValueError(f"{flag} {text!r}: expected a number of days, e.g. 14d or 2w")
    days = int(match.group(1))
    return days * 7 if (match.group(2) or "").lower().startswith("w") else days


@dataclass(frozen=True, kw_only=True)
class SendingSettings:
    """What a campaign remembers for `send` (`campaigns.settings` keys `smtp_url`, `rate`,
    `daily_cap`, `quiet_days`); None: not set. Checked when made."""

    smtp_url: str | None = None
    rate: str | None = None
    daily_cap: int | None = None
    quiet_days: int | None = None

    def __post_init__(self) -> None:
        from mailer.transport import parse_rate

        if self.smtp_url is not None:
            # A URL kept in the database must work for every sender and hold no password.
            from mailer.smtp import parse_smtp_url

            parse_smtp_url(self.smtp_url, allow_plaintext_auth=True)
        if self.rate is not None:
            parse_rate(self.rate)
        if self.daily_cap is not None and self.daily_cap < 1:
            raise InvalidValueError("--daily-cap must be at least 1")
        if self.quiet_days is not None and self.quiet_days < 1:
            raise InvalidValueError("--skip-contacted-within must be at least 1 day")

    @classmethod
    def from_json(cls, settings: dict[str, Any] | None) -> SendingSettings:
        """What a campaign's settings remember (other keys, e.g. sending windows, ignored)."""
        data = settings or {}
        cap, days = data.get("daily_cap"), data.get("quiet_days")
        return cls(
            smtp_url=data.get("smtp_url") or None,
            rate=data.get("rate") or None,
            daily_cap=int(cap) if cap else None,
            quiet_days=int(days) if days else None,
        )

    def to_json(self) -> dict[str, Any]:
        values = {
            "smtp_url": self.smtp_url,
            "rate": self.rate,
            "daily_cap": self.daily_cap,
            "quiet_days": self.quiet_days,
        }
        return {k: v for k, v in values.items() if v is not None}

    def describe(self) -> str:
        parts = []
        if self.smtp_url:
            parts.append(f"server {self.smtp_url}")
        if self.rate:
            parts.append(f"rate {self.rate}")
        if self.daily_cap:
            parts.append(f"daily cap {self.daily_cap}")
        if self.quiet_days:
            parts.append(f"skips contacts written to within {self.quiet_days} days")
        return ", ".join(parts)


@dataclass(frozen=True, kw_only=True)
class SendDefaults:
    """What `send` uses for what it is not given, and where each came from."""

    smtp_url: str | None = None
    smtp_from: str | None = None
    rate: str | None = None
    rate_from: str | None = None
    daily_cap: int | None = None
    daily_cap_from: str | None = None


def send_defaults(campaign: Campaign, workspace: Workspace) -> SendDefaults:
    """The campaign's own server, rate and daily cap, else mailer.toml's `[smtp] url`, `rate`,
    `daily_cap`: so `mailer send SLUG` alone goes on after a Ctrl-C. Flags beat both."""
    mine = dict(campaign.settings or {})
    found: dict[str, Any] = {}
    for key, toml_key in (("smtp_url", "url"), ("rate", "rate"), ("daily_cap", "daily_cap")):
        value = mine.get(key)
        origin: str | None = f"campaign {campaign.slug}"
        if value in (None, ""):
            value = workspace.setting("smtp", toml_key)
            origin = "mailer.toml"
        if value in (None, ""):
            value, origin = None, None
        found[key] = value
        found[key + "_from"] = origin
    cap = found["daily_cap"]
    if cap is not None:
        try:
            cap = int(cap)
        except (TypeError, ValueError):
            raise InvalidValueError(
                f"{found['daily_cap_from']}: daily_cap {cap!r} is not a whole number"
            ) from None
    return SendDefaults(
        smtp_url=str(found["smtp_url"]) if found["smtp_url"] is not None else None,
        smtp_from=found["smtp_url_from"],
        rate=str(found["rate"]) if found["rate"] is not None else None,
        rate_from=found["rate_from"],
        daily_cap=cap,
        daily_cap_from=found["daily_cap_from"],
    )


def format_no_rate(host: str) -> str:
    """Why a send to another machine with no rate deserves a second look (`check`, `send`)."""
    return (
        f"no sending rate is set for {host}: every provider has a limit (often a few hundred "
        "an hour); set one with `send --rate`, [smtp] rate in mailer.toml or `mailer campaign "
        "update SLUG --rate 300/min`"
    )


def unpaced_host(smtp_url: str | None, rate: str | None) -> str | None:
    """The host a send would go to as fast as it accepts, when that is another machine (a
    provider has a limit; a relay on this machine does not matter): None when all is well."""
    if smtp_url is None or rate:
        return None
    from urllib.parse import urlsplit

    from mailer.secrets_source import is_loopback

    try:
        host = urlsplit(smtp_url.strip()).hostname
    except ValueError:
        return None
    if not host or is_loopback(host):
        return None
    return host


# --------------------------------------------------------------------------- changing a campaign


def anything_sent(session: Session, campaign_id: int) -> int:
    """Letters of the campaign that were handed to a server or are being sent."""
    return int(
        session.scalar(
            select(func.count()).where(
                Message.campaign_id == campaign_id,
                (Message.attempts > 0)
                | Message.sent_at.is_not(None)
                | Message.status.in_(
                    [
                        MessageStatus.SENDING.value,
                        MessageStatus.SENT.value,
                        MessageStatus.UNCERTAIN.value,
                    ]
                ),
            )
        )
        or 0
    )


@dataclass(frozen=True, kw_only=True)
class CampaignUpdate:
    """What `campaign update` changed, in words (empty: nothing)."""

    slug: str
    changes: tuple[str, ...]


def update_campaign(
    session: Session,
    *,
    slug: str,
    templates_dir: Path,
    template: str | None = None,
    sending: SendingSettings | None = None,
    force: bool = False,
    actor: Actor | None = None,
    now: dt.datetime | None = None,
) -> CampaignUpdate:
    """`mailer campaign update`: a new frozen copy of the letter's templates (from the local
    folder `template`, which may be the same name), refused once any letter was handed to a
    server unless `force` (the rest would read differently); and what `send` remembers
    (server, pace, quiet days), which may change any time. Logged as an event."""
    from mailer import outbox

    campaign = get_campaign(session, slug)
    if campaign.status == CampaignStatus.CANCELLED.value:
        raise InvalidValueError(f"campaign {slug} is cancelled; there is nothing to change")
    changes: list[str] = []
    if template is not None:
        sent = anything_sent(session, campaign.id)
        if sent and not force:
            raise InvalidValueError(
                f"campaign {slug} has {sent} letter(s) sent or being sent: changing its "
                "template now would send the rest a different letter; add --force if that is "
                "what you want"
            )
        fresh = load_template_set(templates_dir, template)
        before = normalise_sources(campaign.template_sources or {})
        diff = _source_diff(before, fresh.sources)
        if template != campaign.template or diff:
            what = ", ".join(diff) if diff else "same files"
            changes.append(
                f"template {campaign.template} -> {template} ({what})"
                if template != campaign.template
                else f"template {template} frozen again ({what})"
            )
            if sent:
                changes[-1] += f", with {sent} letter(s) already sent (--force)"
        campaign.template = template
        campaign.template_sources = fresh.sources
    if sending is not None:
        merged = dict(campaign.settings or {})
        for key, value in sending.to_json().items():
            if merged.get(key) != value:
                changes.append(f"{key} {merged.get(key)!r} -> {value!r}")
                merged[key] = value
        campaign.settings = merged
    if changes:
        session.flush()
        now = now or utcnow()
        outbox.log_change(
            session,
            kind=EventKind.CAMPAIGN_UPDATED,
            detail=f"campaign {slug} updated: " + "; ".join(changes),
            actor=actor or Actor.current(),
            at=now,
            campaign_id=campaign.id,
        )
    return CampaignUpdate(slug=slug, changes=tuple(changes))


def _source_diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """`de.txt.j2 changed`, `fr.txt.j2 added`, ...: what differs between two copies."""
    out = []
    for name in sorted(before.keys() | after.keys()):
        if name not in before:
            out.append(f"{name} added")
        elif name not in after:
            out.append(f"{name} removed")
        elif before[name] != after[name]:
            out.append(f"{name} changed")
    return out


def _read_folder(folder: Path) -> dict[str, str] | None:
    """A template folder's files as text, as TemplateSet.from_directory reads them (without
    compiling them: a broken local edit must not hide the difference). None: no folder."""
    if not folder.is_dir():
        return None
    sources: dict[str, str] = {}
    for file in sorted(folder.rglob("*")):
        if file.is_file() and not file.name.startswith("."):
            try:
                sources[file.relative_to(folder).as_posix()] = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                sources[file.relative_to(folder).as_posix()] = "\0unreadable"
    return sources


def template_drift(campaign: Campaign, *, templates_dir: Path) -> str | None:
    """Words for `check` and `preview` when the local folder `templates/NAME/` differs from the
    copy frozen in the campaign (which is what every sender sends); None when they agree."""
    if not campaign.template_sources:
        return None
    local = _read_folder(templates_dir / campaign.template)
    if local is None:
        return None
    diff = _source_diff(normalise_sources(campaign.template_sources), local)
    if not diff:
        return None
    return (
        f"the local template folder {templates_dir / campaign.template} differs from the copy "
        f"frozen in campaign {campaign.slug} ({', '.join(diff)}); the campaign sends its frozen "
        f"copy: `mailer campaign update {campaign.slug} --template {campaign.template}` takes "
        "the local one"
    )


# --------------------------------------------------------------------------- quiet days


def quiet_days_setting(workspace: Workspace) -> int:
    """`[campaign] quiet_days` in mailer.toml (default 14): how far back `campaign create`
    and `check` look for letters of other campaigns."""
    value = workspace.setting("campaign", "quiet_days", 14)
    try:
        days = int(value)
    except (TypeError, ValueError):
        raise InvalidValueError(
            f"mailer.toml [campaign] quiet_days {value!r}: a whole number of days"
        ) from None
    if days < 1:
        raise InvalidValueError(f"mailer.toml [campaign] quiet_days {days}: at least 1")
    return days


@dataclass(frozen=True, kw_only=True)
class RecentlyContacted:
    """Recipients of a campaign another campaign wrote to within `days`."""

    days: int
    count: int
    examples: tuple[str, ...]
    # The campaign skips them when sending (its quiet_days setting).
    skipped: bool


def recently_contacted(
    session: Session,
    *,
    campaign: Campaign | None,
    audience: Audience,
    days: int,
    now: dt.datetime | None = None,
) -> RecentlyContacted:
    """How many of the audience another campaign (not `campaign`, nor its parent) sent a
    letter to in the last `days`, with a few addresses. For a campaign with quiet days, pass
    those (send skips exactly these)."""
    since = (now or utcnow()) - dt.timedelta(days=days)
    conditions = [Message.contact_id == Contact.id, Message.sent_at >= since]
    if campaign is not None:
        excluded = [campaign.id]
        parent = getattr(campaign, "parent_id", None)
        if parent is not None:
            excluded.append(int(parent))
        conditions.append(Message.campaign_id.notin_(excluded))
    ids = (
        audience_mod.contacts_query(session, audience)
        .with_only_columns(Contact.id)
        .where(exists().where(*conditions))
    )
    count = int(
        session.scalar(select(func.count()).select_from(ids.order_by(None).subquery())) or 0
    )
    examples = tuple(session.scalars(ids.with_only_columns(Contact.email).limit(3)))
    quiet = (campaign.settings or {}).get("quiet_days") if campaign is not None else None
    return RecentlyContacted(days=days, count=count, examples=examples, skipped=bool(quiet))


def format_recently_contacted(found: RecentlyContacted, *, slug: str) -> str | None:
    """The line `campaign create` and `check` print about it (None: nobody)."""
    if not found.count:
        return None
    head = (
        f"{found.count:,} recipient(s) were written to in the last {found.days} days by another "
        f"campaign (e.g. {', '.join(found.examples)})"
    )
    if found.skipped:
        return head + "; send skips them (--skip-contacted-within)"
    return (
        head + f"; `mailer campaign update {slug} --skip-contacted-within {found.days}d` "
        "leaves them out"
    )
