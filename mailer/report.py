"""The HTML report: one self-contained file that someone who never used a terminal can read.

`build_report` reads what the page shows into one `ReportData` (it only reads: sample letters are
rendered through compose's public API, nothing is written); the page is the Jinja2 template
`report.html.j2` beside this module, with autoescaping, so every value from the database is text,
never markup. No scripts, fonts, images or style sheets from elsewhere: the file is mailed around
and opened offline. Each list of people is capped (`limit`, with the `mailer log` command that
lists them all) and the page is written as the template generates it, so memory stays flat for a
campaign of any size.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from itertools import islice
from pathlib import Path

import jinja2
from babel import Locale
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from mailer import compose
from mailer.campaigns import get_campaign
from mailer.config import Workspace
from mailer.errors import MailerError, OutputFileError
from mailer.localtime import (
    format_local,
    local_zone,
    to_local,
    zone_abbreviation,
    zone_name,
)
from mailer.message import clean_text
from mailer.models import (
    Campaign,
    City,
    Contact,
    Event,
    EventKind,
    Message,
    MessageStatus,
    utcnow,
)
from mailer.render import TemplateSet
from mailer.review import (
    STATES,
    BounceReason,
    CampaignSummary,
    FailureReason,
    LetterDetail,
    LogFilter,
    OutcomeRow,
    Row,
    bounce_reasons,
    campaign_status,
    configured_cap,
    configured_rate,
    count_log_rows,
    failure_reasons,
    follow_up_note,
    format_rate,
    letter_details,
    log_rows,
    outcome_rows,
    skip_reasons,
    why_not_sent,
)

TEMPLATE = "report.html.j2"
# Rows per list of people; the rest are named by the `mailer log` command that lists them all.
LIST_LIMIT = 500
# Sample letters: one per language, for this many languages at most (the most used first).
MAX_SAMPLES = 20
MAX_BARS = 60
# Candidate bar widths, smallest first: the chart uses the finest one that fits MAX_BARS.
BUCKET_MINUTES = (1, 5, 10, 15, 30, 60, 180, 360, 720, 1440, 10080)
HIDDEN_TOKEN = "(personal link, not shown)"

EXPLAIN = {
    "sent": "accepted by the recipient's mail server",
    "failed": "refused for good (or bounced later); the reasons are listed",
    "uncertain": "the connection broke while handing the letter over: it may or may not have "
    "arrived; never re-sent unless someone runs `mailer retry --uncertain`",
    "retry": "refused for now by the server; will be tried again later",
    "queued": "waiting to be sent",
    "sending": "being sent right now",
    "skipped": "not sent on purpose (unsubscribed, bounced before, or an unusable address)",
}
COLOURS = {
    "sent": "#2e7d32",
    "failed": "#c62828",
    "uncertain": "#ef6c00",
    "retry": "#f9a825",
    "queued": "#546e7a",
    "sending": "#1565c0",
    "skipped": "#8d6e63",
}
# The order a reader cares about: outcomes first, pending work after.
DISPLAY_ORDER = ("sent", "failed", "uncertain", "retry", "queued", "sending", "skipped")
OUTCOME_LABELS = {
    "replied": "replied",
    "auto_replied": "answered automatically",
    "bounced": "bounced",
    "unsubscribed": "unsubscribed",
}
# The letters not (yet) sent, in the groups `mailer log --status` lists them by.
NOT_SENT_GROUPS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("failed", "uncertain"), "Refused, bounced, or of unknown fate"),
    (("retry",), "Refused for now: the next `mailer send` tries them again"),
    (("skipped",), "Not sent on purpose"),
    (("queued", "sending"), "Waiting to be sent"),
)


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True, kw_only=True)
class Breakdown:
    label: str
    counts: dict[str, int]
    # Letters handed to a server (sent, including those that bounced later), and what came back.
    contacted: int = 0
    replied: int = 0
    bounced: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def reply_rate(self) -> float | None:
        """Replies per letter sent, in percent; None before any letter was sent."""
        return 100.0 * self.replied / self.contacted if self.contacted else None


@dataclass(frozen=True, kw_only=True)
class Person:
    """One recipient in a list: who, where, their Ukrainian partner cities, and their letter."""

    email: str
    name: str | None
    city: str | None
    country: str | None
    partners: tuple[str, ...]
    status: str
    # When: the letter was sent (contacted, follow up) or last changed (the others).
    at: dt.datetime | None
    # Why it was not sent, or a note (an auto-reply's return date).
    reason: str = ""
    # When a waiting or postponed letter is due again.
    due: dt.datetime | None = None

    @property
    def place(self) -> str:
        return ", ".join(p for p in (self.city, self.country) if p)


@dataclass(frozen=True, kw_only=True)
class PersonList:
    """The first rows of a list, how many it has in all, and the command that lists them all."""

    rows: tuple[Person, ...]
    total: int
    command: str

    @property
    def more(self) -> int:
        return max(0, self.total - len(self.rows))


@dataclass(frozen=True, kw_only=True)
class NotSentGroup:
    statuses: tuple[str, ...]
    title: str
    people: PersonList


@dataclass(frozen=True, kw_only=True)
class SampleLetter:
    """One language's letter as the template renders it for one real recipient."""

    language: str
    label: str
    letters: int
    email: str
    name: str | None
    city: str | None
    sent_at: dt.datetime | None
    subject: str = ""
    text: str = ""
    # The variant used when there is none in this language.
    fell_back_to: str | None = None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class Windows:
    """Sending windows (campaign settings `windows`, `window_zone`). The report's place for
    them: a campaign without any shows that letters go out whenever `send` runs."""

    windows: tuple[str, ...]
    zone: str | None = None


@dataclass(frozen=True, kw_only=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    count: int


@dataclass(frozen=True, kw_only=True)
class Tick:
    x: float
    text: str


@dataclass(frozen=True, kw_only=True)
class GridLine:
    y: float
    label: str


@dataclass(frozen=True, kw_only=True)
class Chart:
    """The sends-over-time bar chart, laid out; the template draws it as inline SVG."""

    bars: tuple[Bar, ...]
    ticks: tuple[Tick, ...]
    grid: tuple[GridLine, ...]
    axis_title: str
    width: int = 960
    height: int = 300
    left: int = 56
    right: int = 16
    top: int = 16
    bottom: int = 64

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom

    @property
    def baseline(self) -> int:
        return self.top + self.plot_height


@dataclass(frozen=True, kw_only=True)
class ReportData:
    summary: CampaignSummary
    generated_at: dt.datetime
    zone: dt.tzinfo
    from_address: str
    template: str
    template_frozen: bool
    bucket: dt.timedelta
    sends: list[tuple[dt.datetime, int]]
    by_country: list[Breakdown]
    by_language: list[Breakdown]
    failures: list[FailureReason]
    skipped: list[FailureReason] = field(default_factory=list)
    bounces: list[BounceReason] = field(default_factory=list)
    replies: list[OutcomeRow] = field(default_factory=list)
    replies_total: int = 0
    unsubscribed: list[OutcomeRow] = field(default_factory=list)
    unsubscribed_total: int = 0
    contacted: PersonList = field(default_factory=lambda: PersonList(rows=(), total=0, command=""))
    follow_up: PersonList = field(default_factory=lambda: PersonList(rows=(), total=0, command=""))
    not_sent: tuple[NotSentGroup, ...] = ()
    samples: tuple[SampleLetter, ...] = ()
    samples_note: str | None = None
    # Sending windows: None when the campaign has none (another part of mailer sets them).
    windows: Windows | None = None
    # Follow-up and how the recipients' time zones were found, as lines (see timing.py).
    timing: list[str] = field(default_factory=list)

    @property
    def sent_events(self) -> int:
        return sum(n for _, n in self.sends)

    @property
    def letters_sent(self) -> int:
        return sum(b.contacted for b in self.by_country)

    @property
    def reply_rate(self) -> float | None:
        sent = self.letters_sent
        return 100.0 * self.summary.outcomes["replied"] / sent if sent else None


def build_report(
    session: Session,
    *,
    slug: str,
    now: dt.datetime | None = None,
    zone: dt.tzinfo | None = None,
    workspace: Workspace | None = None,
    limit: int = LIST_LIMIT,
) -> ReportData:
    """Everything the report shows, read (only read) from the record. `workspace` gives the
    configured limits and the settings sample letters are rendered with (none without it)."""
    now = now or utcnow()
    zone = zone or local_zone()
    limit = max(1, limit)
    campaign = get_campaign(session, slug)
    summary = campaign_status(
        session,
        slug,
        now=now,
        default_rate=configured_rate(workspace.setting("smtp", "rate")) if workspace else None,
        default_daily_cap=(
            configured_cap(workspace.setting("smtp", "daily_cap")) if workspace else None
        ),
    )[0]
    bucket, sends = _sends_over_time(session, campaign_id=campaign.id, zone=zone)
    country: ColumnElement[str] = func.coalesce(City.country, "")
    language: ColumnElement[str] = func.coalesce(Message.language, Contact.language, "")
    replies, replies_total = outcome_rows(
        session, campaign_id=campaign.id, kinds=(EventKind.REPLIED,), limit=limit
    )
    unsubscribed, unsubscribed_total = outcome_rows(
        session,
        campaign_id=campaign.id,
        kinds=(EventKind.UNSUBSCRIBED, EventKind.COMPLAINT),
        limit=limit,
    )
    samples, samples_note = _samples(session, campaign=campaign, workspace=workspace, now=now)
    return ReportData(
        summary=summary,
        generated_at=now,
        zone=zone,
        from_address=campaign.from_address,
        template=campaign.template,
        template_frozen=bool(campaign.template_sources),
        bucket=bucket,
        sends=sends,
        by_country=_breakdown(
            session, campaign_id=campaign.id, key=country, unknown="unknown", names=_country
        ),
        by_language=_breakdown(
            session, campaign_id=campaign.id, key=language, unknown="unknown", names=_language
        ),
        failures=failure_reasons(session, campaign_id=campaign.id, limit=50),
        skipped=skip_reasons(session, campaign_id=campaign.id, limit=50)
        if summary.counts[MessageStatus.SKIPPED.value]
        else [],
        bounces=bounce_reasons(session, campaign_id=campaign.id),
        replies=replies,
        replies_total=replies_total,
        unsubscribed=unsubscribed,
        unsubscribed_total=unsubscribed_total,
        contacted=_people(
            session,
            campaign=campaign,
            flt=LogFilter(statuses=(MessageStatus.SENT.value,)),
            total=summary.counts[MessageStatus.SENT.value],
            command=f"mailer log {slug} --status sent",
            limit=limit,
            note=lambda row, detail: "",
        ),
        follow_up=_people(
            session,
            campaign=campaign,
            flt=LogFilter(awaiting_reply=True),
            total=None,
            command=f"mailer log {slug} --status sent --format csv",
            limit=limit,
            note=lambda row, detail: follow_up_note(detail),
        ),
        not_sent=tuple(
            NotSentGroup(
                statuses=statuses,
                title=title,
                people=_people(
                    session,
                    campaign=campaign,
                    flt=LogFilter(statuses=statuses),
                    total=sum(summary.counts[s] for s in statuses),
                    command=f"mailer log {slug} " + " ".join(f"--status {s}" for s in statuses),
                    limit=limit,
                    note=why_not_sent,
                ),
            )
            for statuses, title in NOT_SENT_GROUPS
            if any(summary.counts[s] for s in statuses)
        ),
        samples=samples,
        samples_note=samples_note,
        windows=_windows(campaign),
        timing=_timing_lines(session, campaign, now=now),
    )


def _people(
    session: Session,
    *,
    campaign: Campaign,
    flt: LogFilter,
    total: int | None,
    command: str,
    limit: int,
    note: Callable[[Row, LetterDetail], str],
) -> PersonList:
    # The log's own rows (keyset pages along the unique index), cut at `limit`: what `mailer
    # log` would list first is what the report shows.
    rows = list(
        islice(log_rows(session, slug=campaign.slug, flt=flt, page_size=min(limit, 1000)), limit)
    )
    details = letter_details(
        session, campaign_id=campaign.id, contact_ids=[r["contact_id"] for r in rows]
    )
    people = []
    for row in rows:
        detail = details.get(row["contact_id"], LetterDetail())
        sent = row["status"] == MessageStatus.SENT.value
        people.append(
            Person(
                email=row["email"],
                name=row["name"],
                city=row["city"],
                country=row["country"],
                partners=detail.partners,
                status=row["status"],
                at=row["sent_at"] if sent else row["last_event_at"],
                reason=note(row, detail),
                due=detail.next_attempt_at
                if row["status"] in (MessageStatus.RETRY.value, MessageStatus.QUEUED.value)
                else None,
            )
        )
    if total is None:
        total = count_log_rows(session, campaign_id=campaign.id, flt=flt)
    return PersonList(rows=tuple(people), total=total, command=command)


def _timing_lines(session: Session, campaign: Campaign, *, now: dt.datetime) -> list[str]:
    """The campaign's windows and follow-up, and how its recipients' time zones were found."""
    from mailer import timing

    windows = [str(w) for w in campaign.settings.get("windows") or ()]
    # The windows themselves are the section's first sentence (see _windows): not said twice.
    lines = [
        line.split(":", 1)[1].strip()
        for line in timing.describe_campaign(session, campaign)
        if not any(window in line for window in windows)
    ]
    ids = list(session.scalars(select(Message.contact_id).where(Message.campaign_id == campaign.id)))
    if windows and ids:
        zones = timing.zone_report(session, campaign, contact_ids=ids, today=now.date())
        lines.extend(
            line.strip()
            for line in timing.format_zone_report(zones)[:2]
            if not any(window in line for window in windows)
        )
    return lines


def _windows(campaign: Campaign) -> Windows | None:
    settings = campaign.settings if isinstance(campaign.settings, dict) else {}
    windows = settings.get("windows")
    if not isinstance(windows, list) or not windows:
        return None
    zone = settings.get("window_zone")
    return Windows(
        windows=tuple(str(w) for w in windows), zone=str(zone) if zone is not None else None
    )


def _country(code: str) -> str:
    name = Locale("en").territories.get(code.upper())
    return f"{name} ({code})" if name else code


def _language(tag: str) -> str:
    locale = Locale("en")
    name = locale.languages.get(tag.replace("-", "_")) or locale.languages.get(
        tag.split("-")[0].lower()
    )
    return f"{name} ({tag})" if name else tag


def _breakdown(
    session: Session,
    *,
    campaign_id: int,
    key: ColumnElement[str],
    unknown: str,
    names: Callable[[str], str],
) -> list[Breakdown]:
    rows = session.execute(
        select(
            key,
            Message.status,
            func.count(),
            func.count(Message.sent_at),
            func.count(Message.replied_at),
            func.count(Message.bounced_at),
        )
        .select_from(Message)
        .join(Contact, Contact.id == Message.contact_id)
        .outerjoin(City, City.id == Contact.city_id)
        .where(Message.campaign_id == campaign_id)
        .group_by(key, Message.status)
    )
    table: dict[str, dict[str, int]] = {}
    outcomes: dict[str, list[int]] = {}
    for label, status, n, sent, replied, bounced in rows:
        # Readers know "Germany (DE)" better than "DE".
        name = names(label) if label else unknown
        counts = table.setdefault(name, dict.fromkeys(STATES, 0))
        counts[status] = counts.get(status, 0) + int(n)
        totals = outcomes.setdefault(name, [0, 0, 0])
        totals[0] += int(sent)
        totals[1] += int(replied)
        totals[2] += int(bounced)
    items = [
        Breakdown(
            label=k,
            counts=v,
            contacted=outcomes[k][0],
            replied=outcomes[k][1],
            bounced=outcomes[k][2],
        )
        for k, v in table.items()
    ]
    return sorted(items, key=lambda b: (-b.total, b.label))


# --------------------------------------------------------------------------- sample letters


def _samples(
    session: Session, *, campaign: Campaign, workspace: Workspace | None, now: dt.datetime
) -> tuple[tuple[SampleLetter, ...], str | None]:
    """One letter per language the campaign writes in, rendered for its first recipient in that
    language (one whose letter was sent, if any) from the campaign's frozen template."""
    if workspace is None:
        return (), "Sample letters are shown when the report is made in the campaign's workspace."
    language: ColumnElement[str | None] = func.coalesce(Message.language, Contact.language)
    first_sent = func.min(case((Message.sent_at.is_not(None), Message.contact_id)))
    rows = session.execute(
        select(language, func.count(), first_sent, func.min(Message.contact_id))
        .select_from(Message)
        .join(Contact, Contact.id == Message.contact_id)
        .where(Message.campaign_id == campaign.id)
        .group_by(language)
    ).all()
    # language -> [letters, first contact whose letter was sent, first contact at all]
    groups: dict[str, list[int | None]] = {}
    for tag, n, sent_id, any_id in rows:
        # A contact without a language gets the campaign's default: count them together.
        group = groups.setdefault(tag or campaign.default_language, [0, None, None])
        group[0] = int(group[0] or 0) + int(n)
        group[1] = min((i for i in (group[1], sent_id) if i is not None), default=None)
        group[2] = min((i for i in (group[2], any_id) if i is not None), default=None)
    ordered = [
        (tag, int(n or 0), int(sent_id or any_id or 0))
        for tag, (n, sent_id, any_id) in sorted(
            groups.items(), key=lambda kv: (-int(kv[1][0] or 0), kv[0])
        )
    ][:MAX_SAMPLES]
    if not ordered:
        return (), None
    try:
        template_set = compose.template_set_for(campaign, templates_dir=workspace.templates_dir)
    except (MailerError, jinja2.TemplateError, OSError) as exc:
        return (), f"The letter's template cannot be read: {exc}"
    return tuple(
        _sample(
            session,
            campaign=campaign,
            template_set=template_set,
            workspace=workspace,
            language=tag,
            letters=n,
            contact_id=contact_id,
            now=now,
        )
        for tag, n, contact_id in ordered
    ), None


def _sample(
    session: Session,
    *,
    campaign: Campaign,
    template_set: TemplateSet,
    workspace: Workspace,
    language: str,
    letters: int,
    contact_id: int,
    now: dt.datetime,
) -> SampleLetter:
    email, name, city, sent_at = session.execute(
        select(Contact.email, Contact.name, City.name, Message.sent_at)
        .join(Message, Message.contact_id == Contact.id)
        .outerjoin(City, City.id == Contact.city_id)
        .where(Message.campaign_id == campaign.id, Contact.id == contact_id)
    ).one()
    sample = functools.partial(
        SampleLetter,
        language=language,
        label=_language(language),
        letters=letters,
        email=email,
        name=name,
        city=city,
        sent_at=sent_at,
    )
    # The date the letter was written for: the day it went out, or today.
    today = (sent_at or now).astimezone(dt.UTC).date()
    try:
        composer = compose.composer_for(
            campaign=campaign, template_set=template_set, settings=workspace, today=today
        )
        recipient = compose.load_recipients(session, [contact_id], today=today)[contact_id]
        rendered = composer.render(recipient)
    except (MailerError, jinja2.TemplateError, ValueError) as exc:
        return sample(error=str(exc))
    subject, text = clean_text(rendered.subject), rendered.text
    # A working unsubscribe link for a real mayor must not travel with a report mailed around.
    if composer.unsubscribe_url(email) is not None:
        token = composer.token(email)
        subject, text = subject.replace(token, HIDDEN_TOKEN), text.replace(token, HIDDEN_TOKEN)
    return sample(
        subject=subject,
        text=text,
        fell_back_to=rendered.language if rendered.fell_back else None,
    )


# --------------------------------------------------------------------------- the chart


def _sends_over_time(
    session: Session, *, campaign_id: int, zone: dt.tzinfo
) -> tuple[dt.timedelta, list[tuple[dt.datetime, int]]]:
    sent = (Event.campaign_id == campaign_id, Event.kind == EventKind.SENT.value)
    first, last = session.execute(select(func.min(Event.at), func.max(Event.at)).where(*sent)).one()
    if first is None or last is None:
        return dt.timedelta(minutes=1), []
    first, last = _aware(first), _aware(last)
    span_minutes = (last - first).total_seconds() / 60
    minutes = next(
        (m for m in BUCKET_MINUTES if span_minutes / m < MAX_BARS - 1), BUCKET_MINUTES[-1]
    )
    size = dt.timedelta(minutes=minutes)
    # Bars start on the reader's clock: a day bar is a local day, an hour bar a local hour.
    origin = _origin(first, zone)
    start = _floor(first, size, origin)
    count = int((_floor(last, size, origin) - start) / size) + 1
    bars = [0] * count
    # Streamed: a campaign of a million sends costs one counter per bar, not a list of times.
    result = session.execute(
        select(Event.at).where(*sent).execution_options(yield_per=5000)
    ).scalars()
    for at in result:
        index = int((_floor(_aware(at), size, origin) - start) / size)
        if 0 <= index < count:
            bars[index] += 1
    return size, [(start + i * size, n) for i, n in enumerate(bars)]


def _origin(moment: dt.datetime, zone: dt.tzinfo) -> dt.datetime:
    offset = moment.astimezone(zone).utcoffset() or dt.timedelta(0)
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) - offset


def _floor(value: dt.datetime, size: dt.timedelta, origin: dt.datetime) -> dt.datetime:
    return origin + ((value - origin) // size) * size


def _aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def build_chart(data: ReportData) -> Chart | None:
    """The bar chart's geometry in the reader's zone (None before any letter was sent)."""
    sends, bucket, zone = data.sends, data.bucket, data.zone
    if not sends:
        return None
    width, left, right, top, bottom, height = 960, 56, 16, 16, 64, 300
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(n for _, n in sends) or 1
    step = plot_w / len(sends)
    # A few bars stay bars, not blocks filling the chart.
    bar_w = min(48.0, max(1.0, step * 0.8))
    grid = []
    for fraction in (0.0, 0.5, 1.0):
        value = peak * fraction
        grid.append(
            GridLine(
                y=top + plot_h * (1 - fraction),
                label=f"{value:,.0f}" if value == int(value) else f"{value:,.1f}",
            )
        )
    bars = []
    for i, (at, n) in enumerate(sends):
        h = plot_h * n / peak
        bars.append(
            Bar(
                x=left + i * step + (step - bar_w) / 2,
                y=top + plot_h - h,
                width=bar_w,
                height=h,
                label=_bar_label(at, bucket, zone),
                count=n,
            )
        )
    ticks = []
    every = max(1, -(-len(sends) // 8))
    previous_day = None
    for i in range(0, len(sends), every):
        local = to_local(sends[i][0], zone=zone)
        day = local.date()
        ticks.append(
            Tick(
                x=left + i * step + step / 2,
                text=_tick(local, bucket, show_date=day != previous_day),
            )
        )
        previous_day = day
    return Chart(
        bars=tuple(bars),
        ticks=tuple(ticks),
        grid=tuple(grid),
        axis_title=f"time ({zone_name(zone)})",
    )


def _tick(local: dt.datetime, bucket: dt.timedelta, *, show_date: bool) -> str:
    if bucket >= dt.timedelta(days=1):
        return local.strftime("%Y-%m-%d")
    return local.strftime("%d %b %H:%M") if show_date else local.strftime("%H:%M")


def _bar_label(at: dt.datetime, bucket: dt.timedelta, zone: dt.tzinfo) -> str:
    start, end = to_local(at, zone=zone), to_local(at + bucket, zone=zone)
    if bucket >= dt.timedelta(days=1):
        return f"{start:%Y-%m-%d} – {end:%Y-%m-%d}"
    return f"{start:%Y-%m-%d %H:%M} – {end:%H:%M} {zone_abbreviation(end)}"


def span_words(bucket: dt.timedelta) -> str:
    minutes = int(bucket.total_seconds() // 60)
    if minutes % 1440 == 0:
        days = minutes // 1440
        return "day" if days == 1 else f"{days} days"
    if minutes % 60 == 0:
        hours = minutes // 60
        return "hour" if hours == 1 else f"{hours} hours"
    return "minute" if minutes == 1 else f"{minutes} minutes"


# --------------------------------------------------------------------------- writing


def write_report(
    session: Session,
    *,
    slug: str,
    output: Path,
    now: dt.datetime | None = None,
    zone: dt.tzinfo | None = None,
    workspace: Workspace | None = None,
    limit: int = LIST_LIMIT,
) -> ReportData:
    """Build the report and write it to `output` (replacing it whole, never half-written)."""
    target = Path(output).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputFileError(f"cannot write report to {target}: it is a folder; name a file")
    if not parent.exists():
        raise OutputFileError(f"cannot write report to {target}: folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputFileError(f"cannot write report to {target}: {parent} is not a folder")
    data = build_report(session, slug=slug, now=now, zone=zone, workspace=workspace, limit=limit)
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputFileError(f"cannot write report to {target}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for chunk in render_chunks(data):
                fh.write(chunk)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputFileError(f"cannot write report to {target}: {exc.strerror}") from exc
    return data


def render_html(data: ReportData) -> str:
    return "".join(render_chunks(data))


def render_chunks(data: ReportData) -> Iterator[str]:
    """The page, piece by piece as the template produces it."""
    return _template().generate(_context(data))


@functools.cache
def _template() -> jinja2.Template:
    source = resources.files("mailer").joinpath(TEMPLATE).read_text(encoding="utf-8")
    environment = jinja2.Environment(
        # Every value is data: a contact's name, a server's answer, a reply's first lines.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return environment.from_string(source)


def _context(data: ReportData) -> dict[str, object]:
    zone = data.zone

    def when(value: dt.datetime | None) -> str:
        return format_local(value, zone=zone)

    def letters(n: int) -> str:
        return f"{n:,} letter" + ("" if n == 1 else "s")

    def was(n: int) -> str:
        return "was" if n == 1 else "were"

    def percent(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}%"

    s = data.summary
    return {
        "data": data,
        "s": s,
        "title": f"Campaign report: {s.title or s.campaign}",
        "zone_name": zone_name(zone),
        "rate": format_rate(s.rate, zone=zone),
        "next_steps": s.next_steps(zone=zone),
        "chart": build_chart(data),
        "span_words": span_words(data.bucket),
        "order": DISPLAY_ORDER,
        "colours": COLOURS,
        "explain": EXPLAIN,
        "outcome_labels": OUTCOME_LABELS,
        "when": when,
        "letters": letters,
        "was": was,
        "percent": percent,
        "share": _share(s),
    }


def _share(s: CampaignSummary) -> Sequence[tuple[str, float]]:
    """(state, percent of recipients) for the share bar, states with none left out."""
    if not s.total:
        return ()
    return tuple(
        (state, 100 * s.counts[state] / s.total) for state in DISPLAY_ORDER if s.counts[state]
    )
