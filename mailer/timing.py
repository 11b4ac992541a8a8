"""When each letter of a send is due: sending windows in the recipient's own time, a
follow-up's delay after the letter it follows, and a return date an out-of-office answer named.

The engine asks one question before it composes and claims a peeked batch (`Gate.admit`):
which of these letters are due now? The others are held until their time (still `queued`, the
due time in `next_attempt_at`, a `held` event saying why) or skipped when they must not go at
all (a follow-up whose first letter was answered or bounced, a suppressed address), through
the outbox's `hold_and_skip`. A letter admitted while its window is open carries the window's
closing time; the sender asks `Gate.closed` just before it hands a letter over, so a window
that closed while the letter waited (a slow server, `--spread`) holds it again instead.

Also here: a campaign's stored timing (`configure`, `describe_campaign`), `--spread`
(`SpreadLimiter`), the zones `check` reports (`zone_report`), and the words for people
(`format_*`).

Reads contacts, cities, the parent campaign's letters and suppressions; writes only through
outbox verbs. Must not import engine, compose or transport.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, Text, bindparam, cast, func, select
from sqlalchemy.orm import Session

from mailer import outbox
from mailer.audience import Audience
from mailer.clock import Clock, Sleeper
from mailer.config import Workspace
from mailer.errors import InvalidValueError
from mailer.models import (
    Campaign,
    City,
    Contact,
    Message,
    MessageStatus,
    Suppression,
)
from mailer.windows import Schedule, parse_windows
from mailer.zones import (
    RULE_WORDS,
    Place,
    ZoneResolver,
    ZoneRule,
    parse_zone,
    zone_info,
)

RECIPIENT = "recipient"
# When neither the campaign nor mailer.toml names a default zone.
FALLBACK_ZONE = "UTC"
# The letters a page of `reconsider` and `zone_report` reads at once.
_PAGE = 1000
# `check` lists at most this many recipients whose zone fell back to the default.
FALLBACKS_LISTED = 20
# --spread: each gap is the even share of the window, give or take this fraction.
SPREAD_JITTER = 0.1

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)")
_UNITS = {
    "s": 1,
    "sec": 1,
    "m": 60,
    "min": 60,
    "h": 3600,
    "hr": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 604800,
    "week": 604800,
    "weeks": 604800,
}


def parse_duration(text: str, *, flag: str = "--after") -> dt.timedelta:
    """`7d`, `36h`, `2w`, `1d12h`, `90m` as a timedelta; InvalidValueError naming `flag`."""
    compact = text.strip().lower()
    parts = _DURATION_RE.findall(compact)
    if not parts or _DURATION_RE.sub("", compact).strip() or any(u not in _UNITS for _, u in parts):
        raise InvalidValueError(
            f"{flag} {text!r} is not a duration: use a number and a unit (m, h, d, w), "
            "e.g. 7d, 36h or 2w"
        )
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise InvalidValueError(f"{flag} {text!r}: a follow-up comes some time after, not at once")
    return dt.timedelta(seconds=seconds)


def format_duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _utc(at: dt.datetime) -> str:
    return f"{at.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


def _local(at: dt.datetime, zone: str) -> str:
    return f"{at.astimezone(zone_info(zone)):%a %H:%M} in {zone}"


# --------------------------------------------------------------------------- a campaign's timing


def configure(
    session: Session,
    campaign: Campaign,
    *,
    windows: Sequence[str] = (),
    window_zone: str | None = None,
    default_zone: str | None = None,
    follow_up_of: str | None = None,
    after: str | None = None,
) -> None:
    """Store a campaign's timing (at `campaign create`): its default sending windows and their
    zone (settings `windows`, `window_zone`), the default zone for recipients whose zone is not
    known (`default_zone`), and for a follow-up its parent and delay (`parent_id`,
    `follow_up_after`; its audience is then the parent's recipients, narrowed by the other
    filters). Raises InvalidValueError for a bad window, zone or duration, and for a follow-up of
    a campaign that does not exist or sent nothing yet."""
    settings = dict(campaign.settings or {})
    schedule = parse_windows(windows)
    if window_zone is not None:
        if schedule is None:
            raise InvalidValueError("--window-zone says whose time a window is in: give --window")
        settings["window_zone"] = _window_zone(window_zone)
    if schedule is not None:
        settings["windows"] = schedule.texts
        settings.setdefault("window_zone", RECIPIENT)
    if default_zone is not None:
        settings["default_zone"] = parse_zone(default_zone, what="--default-zone")
    if after is not None and follow_up_of is None:
        raise InvalidValueError("--after is the delay of a follow-up: give --follow-up-of SLUG")
    if follow_up_of is not None:
        if after is None:
            raise InvalidValueError(
                f"--follow-up-of {follow_up_of}: say how long after the first letter, "
                "e.g. --after 7d"
            )
        delay = parse_duration(after)
        parent = session.scalar(select(Campaign).where(Campaign.slug == follow_up_of))
        if parent is None:
            known = list(session.scalars(select(Campaign.slug).order_by(Campaign.slug).limit(20)))
            hint = f"; campaigns: {', '.join(known)}" if known else "; there are no campaigns yet"
            raise InvalidValueError(
                f"--follow-up-of {follow_up_of}: no campaign {follow_up_of!r}{hint}"
            )
        sent = session.scalar(
            select(Message.id)
            .where(Message.campaign_id == parent.id, Message.sent_at.is_not(None))
            .limit(1)
        )
        if sent is None:
            raise InvalidValueError(
                f"--follow-up-of {follow_up_of}: campaign {follow_up_of} has not sent a letter "
                f"yet; a follow-up follows letters that went out (`mailer send {follow_up_of}`)"
            )
        campaign.parent_id = parent.id
        campaign.follow_up_after = int(delay.total_seconds())
        audience = Audience.from_json(campaign.audience)
        if follow_up_of not in audience.contacted_in:
            audience = Audience(
                where=audience.where,
                tags=audience.tags,
                contacted_in=(*audience.contacted_in, follow_up_of),
                not_contacted_in=audience.not_contacted_in,
                replied_to=audience.replied_to,
                not_replied_to=audience.not_replied_to,
            )
            campaign.audience = audience.to_json()
    campaign.settings = settings
    session.flush()


def _window_zone(value: str) -> str:
    if value.strip().lower() == RECIPIENT:
        return RECIPIENT
    return parse_zone(value, what="--window-zone")


def describe_campaign(session: Session, campaign: Campaign) -> list[str]:
    """`campaign show`'s lines about timing: windows and their zone, the default zone, and what
    a follow-up follows."""
    settings = campaign.settings or {}
    lines = []
    windows = settings.get("windows") or []
    if windows:
        zone = settings.get("window_zone") or RECIPIENT
        whose = "each recipient's own time" if zone == RECIPIENT else zone
        lines.append(f"Windows:   {' and '.join(windows)} ({whose})")
    if settings.get("default_zone"):
        lines.append(f"Zone:      {settings['default_zone']} where a recipient's is not known")
    if campaign.parent_id is not None:
        parent = session.scalar(select(Campaign.slug).where(Campaign.id == campaign.parent_id))
        after = format_duration(dt.timedelta(seconds=campaign.follow_up_after or 0))
        lines.append(f"Follows:   {parent}, {after} after each contact's letter (same thread)")
    return lines


# --------------------------------------------------------------------------- one run's rules


@dataclass(frozen=True, kw_only=True)
class RunTiming:
    """What `send` was told about timing; the campaign's stored settings fill in the rest."""

    windows: tuple[str, ...] = ()
    window_zone: str | None = None
    wait: bool = False
    spread: bool = False
    # --spread's jitter is random; a seed makes it repeatable.
    seed: int | None = None
    # Where `--wait` says what it waits for (a line for people).
    notify: Callable[[str], None] | None = None


@dataclass(frozen=True, kw_only=True)
class Rules:
    """The timing rules of one campaign for one run, resolved and checked."""

    schedule: Schedule | None
    # One zone for every recipient, or None: each recipient's own.
    fixed_zone: str | None
    default_zone: str
    parent_id: int | None = None
    parent_slug: str | None = None
    after: dt.timedelta | None = None
    # The audience asks for those who answered the parent: an answer is no reason to skip.
    keep_replied: bool = False
    wait: bool = False
    spread: bool = False
    seed: int | None = None
    notify: Callable[[str], None] | None = None

    @property
    def active(self) -> bool:
        return self.schedule is not None or self.parent_id is not None

    def describe(self) -> str:
        if self.schedule is None:
            return "no sending window"
        whose = "each recipient's own time" if self.fixed_zone is None else self.fixed_zone
        return f"{self.schedule.describe()} ({whose})"


def resolve_rules(
    session: Session,
    campaign: Campaign,
    run: RunTiming | None,
    *,
    default_zone: str | None = None,
    daily_cap: int | None = None,
) -> Rules:
    """The rules for a run: `run`'s windows and zone, else the campaign's stored ones.
    `default_zone`: mailer.toml's `[campaign] default_zone`, used when the campaign names none.
    Raises InvalidValueError for a bad flag or combination."""
    run = run or RunTiming()
    settings = campaign.settings or {}
    if run.windows:
        schedule = parse_windows(run.windows)
    else:
        schedule = parse_windows(settings.get("windows") or [], flag="campaign window")
    if run.window_zone is not None:
        if schedule is None:
            raise InvalidValueError(
                "--window-zone says whose time a window is in: give --window (or store one with "
                "`campaign create --window`)"
            )
        zone = _window_zone(run.window_zone)
    else:
        zone = str(settings.get("window_zone") or RECIPIENT)
    if run.spread:
        if schedule is None:
            raise InvalidValueError("--spread spreads a day's cap over a window: give --window")
        if daily_cap is None:
            raise InvalidValueError(
                "--spread spreads a day's cap over the window: give --daily-cap N"
            )
    default = settings.get("default_zone") or default_zone or FALLBACK_ZONE
    parent_slug = None
    keep_replied = False
    if campaign.parent_id is not None:
        parent_slug = session.scalar(select(Campaign.slug).where(Campaign.id == campaign.parent_id))
        keep_replied = parent_slug in Audience.from_json(campaign.audience).replied_to
    return Rules(
        schedule=schedule,
        fixed_zone=None if zone == RECIPIENT else parse_zone(zone, what="window zone"),
        default_zone=parse_zone(str(default), what="default zone"),
        parent_id=campaign.parent_id,
        parent_slug=parent_slug,
        after=dt.timedelta(seconds=campaign.follow_up_after or 0)
        if campaign.parent_id is not None
        else None,
        keep_replied=keep_replied,
        wait=run.wait,
        spread=run.spread,
        seed=run.seed,
        notify=run.notify,
    )


def check_run(
    engine: Engine, *, slug: str, run: RunTiming, daily_cap: int | None, settings: Workspace
) -> Rules:
    """The rules a send of `slug` would use, checked before anything starts (InvalidValueError
    for a bad window, zone or combination; NotFoundError for no such campaign)."""
    from mailer.campaigns import get_campaign

    with Session(engine) as session:
        campaign = get_campaign(session, slug)
        return resolve_rules(
            session,
            campaign,
            run,
            default_zone=settings.setting("campaign", "default_zone"),
            daily_cap=daily_cap,
        )


# --------------------------------------------------------------------------- what is known of letters


@dataclass(slots=True)
class _Facts:
    email: str
    place: Place
    suppressed: str | None = None
    # The letter of the parent campaign to this contact (follow-ups only).
    parent_sent_at: dt.datetime | None = None
    parent_replied_at: dt.datetime | None = None
    parent_bounced_at: dt.datetime | None = None
    has_parent_letter: bool = False
    away_until: dt.date | None = None


@functools.cache
def _facts_statements() -> tuple[Any, Any, Any]:
    """The three reads of `_facts`, built once: building them cost more than running them."""
    ids: Any = bindparam("ids", expanding=True)
    contacts = (
        select(
            Contact.id,
            Contact.email,
            Contact.timezone,
            # As stored: decoded only when it may hold a zone or a country (see _place).
            cast(Contact.attributes, Text),
            City.name,
            City.country,
            City.region,
            Suppression.reason,
        )
        .outerjoin(City, City.id == Contact.city_id)
        .outerjoin(Suppression, Suppression.email == Contact.email)
        .where(Contact.id.in_(ids))
    )
    parents = select(
        Message.contact_id, Message.sent_at, Message.replied_at, Message.bounced_at
    ).where(Message.campaign_id == bindparam("parent"), Message.contact_id.in_(ids))
    away = (
        select(Message.contact_id, func.max(Message.away_until))
        .where(Message.contact_id.in_(ids), Message.away_until.is_not(None))
        .group_by(Message.contact_id)
    )
    return contacts, parents, away


# Words in a contact's stored attributes that may make them matter for its zone.
_PLACE_WORDS = re.compile(r'"(?:timezone|time_zone|tz|zone|country|region)"')
_PlaceKey = tuple[str | None, str | None, str | None, str | None, str | None]


def _place(key: _PlaceKey, places: dict[_PlaceKey, Place]) -> Place:
    """A contact's Place from its stored columns, once per distinct set of them (a list has
    many contacts per city)."""
    tz, attributes_text, city, country, region = key
    if attributes_text and not _PLACE_WORDS.search(attributes_text):
        # Attributes that name no zone or place (a population, a note) do not make a place of
        # their own: contacts of one city share one Place, whatever else they carry.
        key = (tz, None, city, country, region)
        attributes_text = None
    found = places.get(key)
    if found is None:
        attributes = None
        if attributes_text:
            decoded = json.loads(attributes_text)
            attributes = decoded if isinstance(decoded, dict) else None
        found = places[key] = Place.of(
            timezone=tz, attributes=attributes, city=city, country=country, region=region
        )
        if len(places) > 100_000:
            places.clear()
    return found


def _facts(
    conn: Connection | Session,
    contact_ids: Sequence[int],
    rules: Rules | None,
    places: dict[_PlaceKey, Place] | None = None,
) -> dict[int, _Facts]:
    """What decides when each contact's letter is due, a few queries for the whole batch."""
    ids = list(dict.fromkeys(contact_ids))
    found: dict[int, _Facts] = {}
    places = {} if places is None else places
    contacts, parents, away = _facts_statements()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for cid, email, tz, attributes, city, country, region, suppressed in conn.execute(
            contacts, {"ids": chunk}
        ):
            found[int(cid)] = _Facts(
                email=str(email),
                place=_place((tz, attributes, city, country, region), places),
                suppressed=str(suppressed) if suppressed and rules is not None else None,
            )
        if rules is None or rules.parent_id is None:
            continue
        for cid, sent, replied, bounced in conn.execute(
            parents, {"ids": chunk, "parent": rules.parent_id}
        ):
            facts = found.get(int(cid))
            if facts is not None:
                facts.has_parent_letter = True
                facts.parent_sent_at = _aware(sent)
                facts.parent_replied_at = _aware(replied)
                facts.parent_bounced_at = _aware(bounced)
        for cid, day in conn.execute(away, {"ids": chunk}):
            facts = found.get(int(cid))
            if facts is not None and day is not None:
                facts.away_until = day
    return found


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


# --------------------------------------------------------------------------- the verdicts


@dataclass(frozen=True, slots=True)
class _Due:
    # When the window it goes in closes (None: no window), and the zone that window is in.
    closes_at: dt.datetime | None
    zone: str | None


@dataclass(frozen=True, slots=True)
class _Hold:
    until: dt.datetime
    reason: str


@dataclass(frozen=True, slots=True)
class _Skip:
    reason: str


_Verdict = _Due | _Hold | _Skip


class _Judge:
    """The verdict on each letter under one run's rules (one resolver: each place once)."""

    def __init__(self, rules: Rules, *, today: dt.date) -> None:
        self.rules = rules
        self.resolver = ZoneResolver(default=rules.default_zone, today=today)
        # (zone, instant) -> (next opening, closing of the window open then): a batch's letters
        # are judged at one instant, and share a few zones.
        self._windows: dict[tuple[str, dt.datetime], tuple[dt.datetime, dt.datetime | None]] = {}

    def _window(self, zone: str, at: dt.datetime) -> tuple[dt.datetime, dt.datetime | None]:
        found = self._windows.get((zone, at))
        if found is None:
            schedule = self.rules.schedule
            assert schedule is not None
            info = zone_info(zone)
            opens = schedule.next_open(at, info)
            opening = schedule.opening(opens, info) if opens <= at else None
            if len(self._windows) > 10_000:
                self._windows.clear()
            found = self._windows[(zone, at)] = (opens, opening.closes_at if opening else None)
        return found

    def zone_of(self, facts: _Facts) -> str:
        if self.rules.fixed_zone is not None:
            return self.rules.fixed_zone
        return self.resolver.resolve(facts.place).zone

    def verdict(self, facts: _Facts | None, now: dt.datetime) -> _Verdict:
        rules = self.rules
        if facts is None:
            return _Skip("the contact no longer exists")
        if facts.suppressed:
            return _Skip(f"suppressed: {facts.suppressed}")
        due = now
        reasons: list[str] = []
        zone: str | None = None
        if rules.parent_id is not None:
            parent = rules.parent_slug
            if not facts.has_parent_letter or facts.parent_sent_at is None:
                return _Skip(f"follow-up of {parent}: no letter of {parent} was sent to them")
            if facts.parent_bounced_at is not None:
                return _Skip(
                    f"follow-up of {parent}: their letter of {parent} bounced "
                    f"({_utc(facts.parent_bounced_at)})"
                )
            if facts.parent_replied_at is not None and not rules.keep_replied:
                return _Skip(
                    f"follow-up of {parent}: they replied to {parent} "
                    f"({_utc(facts.parent_replied_at)})"
                )
            after = rules.after or dt.timedelta(0)
            at = facts.parent_sent_at + after
            if at > due:
                due = at
                reasons.append(
                    f"follow-up {format_duration(after)} after their letter of {parent} "
                    f"({_utc(facts.parent_sent_at)})"
                )
            if facts.away_until is not None:
                zone = self.zone_of(facts)
                back = dt.datetime.combine(facts.away_until, dt.time(), tzinfo=zone_info(zone))
                back_utc = back.astimezone(dt.UTC)
                if back_utc > due:
                    due = back_utc
                    reasons.append(
                        f"away until {facts.away_until.isoformat()} (an out-of-office answer)"
                    )
        schedule = rules.schedule
        if schedule is not None:
            zone = zone or self.zone_of(facts)
            opens, closes = self._window(zone, due)
            if opens > due:
                due = opens
                reasons.append(
                    f"outside its window {schedule.describe()} in {zone}; opens "
                    f"{_local(opens, zone)}"
                )
            if due <= now:
                return _Due(closes, zone)
        if due <= now:
            return _Due(None, None)
        return _Hold(due, "; then ".join(reasons))


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True, kw_only=True)
class Waiting:
    """What a run waits for: the next due time, how many letters are due then, one of them."""

    at: dt.datetime
    count: int
    later: int
    example: str
    zone: str | None


@dataclass
class Gate:
    """Which letters of one campaign are due now, for one run (see the module docstring)."""

    engine: Engine
    campaign_id: int
    slug: str
    rules: Rules
    today: dt.date
    held: int = 0
    skipped: int = 0
    released: int = 0
    _judge: _Judge = field(init=False)
    # Admitted letters whose window closes: (closing time, zone), until handed over.
    _deadlines: dict[int, tuple[dt.datetime, str]] = field(default_factory=dict)
    _places: dict[_PlaceKey, Place] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._judge = _Judge(self.rules, today=self.today)

    @property
    def active(self) -> bool:
        return self.rules.active

    def admit(self, rows: Sequence[tuple[int, int]], *, now: dt.datetime) -> list[tuple[int, int]]:
        """THE ENGINE'S HOOK, called with a peeked batch of (message id, contact id) before it
        is composed and claimed: returns those due now (in the order given); holds the others
        until their time and skips those that must not go, through `outbox.hold_and_skip`."""
        with self.engine.connect() as conn:
            facts = _facts(conn, [cid for _, cid in rows], self.rules, self._places)
        due: list[tuple[int, int]] = []
        holds: list[outbox.Hold] = []
        skips: list[outbox.Drop] = []
        for mid, cid in rows:
            verdict = self._judge.verdict(facts.get(cid), now)
            if isinstance(verdict, _Due):
                due.append((mid, cid))
                if verdict.closes_at is not None and verdict.zone is not None:
                    self._deadlines[mid] = (verdict.closes_at, verdict.zone)
            elif isinstance(verdict, _Hold):
                holds.append(
                    outbox.Hold(
                        message=mid, contact_id=cid, until=verdict.until, reason=verdict.reason
                    )
                )
            else:
                skips.append(outbox.Drop(message=mid, contact_id=cid, reason=verdict.reason))
        if holds or skips:
            done = outbox.hold_and_skip(
                self.engine, campaign_id=self.campaign_id, holds=holds, skips=skips, now=now
            )
            self.held += done.held
            self.skipped += done.skipped
        return due

    def closed(self, message: int, *, now: dt.datetime) -> dt.datetime | None:
        """Asked just before a letter is handed over (and again at the very last moment, when
        the transport has a connection for it: it may be asked several times): None when it
        may go; else its window has closed since it was admitted, and this is when the next
        one opens (it is held till then)."""
        deadline = self._deadlines.get(message)
        if deadline is None or now < deadline[0]:
            return None
        assert self.rules.schedule is not None
        return self.rules.schedule.next_open(now, zone_info(deadline[1]))

    def forget(self, message: int) -> None:
        """The letter is settled (handed over, or given back): its deadline is no longer asked."""
        self._deadlines.pop(message, None)

    def reconsider(self, *, now: dt.datetime) -> None:
        """At a run's start: letters held by an earlier run are judged again under this run's
        rules (other windows, none at all, a reply since), so a due time always follows the
        rules that send it. Letters whose verdict is unchanged are not touched."""
        after = 0
        while True:
            with Session(self.engine) as session:
                rows = session.execute(
                    select(Message.id, Message.contact_id, Message.next_attempt_at)
                    .where(
                        Message.campaign_id == self.campaign_id,
                        Message.status == MessageStatus.QUEUED.value,
                        Message.next_attempt_at > now,
                        Message.id > after,
                    )
                    .order_by(Message.id)
                    .limit(_PAGE)
                ).all()
                if not rows:
                    return
                facts = _facts(session, [int(cid) for _, cid, _ in rows], self.rules, self._places)
            holds: list[outbox.Hold] = []
            skips: list[outbox.Drop] = []
            releases: list[outbox.DueNow] = []
            for mid, cid, held_until in rows:
                verdict = self._judge.verdict(facts.get(int(cid)), now)
                if isinstance(verdict, _Due):
                    releases.append(
                        outbox.DueNow(
                            message=mid,
                            contact_id=cid,
                            reason=f"due now under this run's rules ({self.rules.describe()})",
                        )
                    )
                elif isinstance(verdict, _Hold):
                    if verdict.until != _aware(held_until):
                        holds.append(
                            outbox.Hold(
                                message=mid,
                                contact_id=cid,
                                until=verdict.until,
                                reason=verdict.reason,
                            )
                        )
                else:
                    skips.append(outbox.Drop(message=mid, contact_id=cid, reason=verdict.reason))
            done = outbox.hold_and_skip(
                self.engine,
                campaign_id=self.campaign_id,
                holds=holds,
                skips=skips,
                releases=releases,
                now=now,
            )
            self.skipped += done.skipped
            self.released += done.released
            after = int(rows[-1][0])

    def next_due(self, *, now: dt.datetime) -> Waiting | None:
        """The next time held letters of the campaign fall due, how many then and later, and
        one of them (for `--wait`'s line and send's last words); None when none is held."""
        return next_due(self.engine, campaign_id=self.campaign_id, now=now, judge=self._judge)

    def notify(self, waiting: Waiting) -> None:
        if self.rules.notify is not None:
            self.rules.notify(format_waiting(waiting, slug=self.slug, waiting_now=True))

    def limiter(
        self, *, daily_cap: int, rate: float | None, clock: Clock, sleep: Sleeper
    ) -> SpreadLimiter:
        assert self.rules.schedule is not None
        return SpreadLimiter(
            per_day=daily_cap,
            window=self.rules.schedule.open_per_day(),
            rate=rate,
            clock=clock,
            sleep=sleep,
            seed=self.rules.seed,
        )


def next_due(
    engine: Engine, *, campaign_id: int, now: dt.datetime, judge: _Judge | None = None
) -> Waiting | None:
    """See Gate.next_due (also what `status` shows, without a run's rules)."""
    with Session(engine) as session:
        held = (
            Message.campaign_id == campaign_id,
            Message.status == MessageStatus.QUEUED.value,
            Message.next_attempt_at > now,
        )
        total, first = session.execute(
            select(func.count(), func.min(Message.next_attempt_at)).where(*held)
        ).one()
        if not total or first is None:
            return None
        count, example = session.execute(
            select(func.count(), func.min(Message.contact_id)).where(
                *held, Message.next_attempt_at == first
            )
        ).one()
        zone = None
        email = ""
        facts = _facts(session, [int(example)], None).get(int(example))
        if facts is not None:
            email = facts.email
            if judge is not None and judge.rules.schedule is not None:
                zone = judge.zone_of(facts)
    return Waiting(
        at=_aware(first) or now,
        count=int(count),
        later=int(total) - int(count),
        example=email,
        zone=zone,
    )


def open_gate(
    engine: Engine,
    *,
    campaign: Campaign,
    run: RunTiming | None,
    now: dt.datetime,
    default_zone: str | None = None,
    daily_cap: int | None = None,
) -> Gate | None:
    """The gate for a run of `campaign`, after letters held by an earlier run were judged again
    under this run's rules; None when nothing of this run depends on time (no window, not a
    follow-up), so the engine asks nothing."""
    with Session(engine) as session:
        fresh = session.get(Campaign, campaign.id)
        assert fresh is not None
        rules = resolve_rules(session, fresh, run, default_zone=default_zone, daily_cap=daily_cap)
        any_held = (
            session.scalar(
                select(Message.id)
                .where(
                    Message.campaign_id == campaign.id,
                    Message.status == MessageStatus.QUEUED.value,
                    Message.next_attempt_at.is_not(None),
                )
                .limit(1)
            )
            is not None
        )
    if not rules.active and not any_held:
        return None
    gate = Gate(
        engine=engine, campaign_id=campaign.id, slug=campaign.slug, rules=rules, today=now.date()
    )
    if any_held:
        gate.reconsider(now=now)
    return gate if rules.active else None


# --------------------------------------------------------------------------- --spread


class SpreadLimiter:
    """`--spread`: a day's cap spread evenly over the open time of a day's windows, each gap
    give or take `SPREAD_JITTER` (a seeded random source makes it repeatable), so a provider
    sees a steady, human pace instead of a burst when a window opens. Also keeps to `rate`, if
    that is slower. Waits on the run's clock (a test's clock moves instead)."""

    def __init__(
        self,
        *,
        per_day: int,
        window: dt.timedelta,
        clock: Clock,
        sleep: Sleeper,
        rate: float | None = None,
        seed: int | None = None,
        jitter: float = SPREAD_JITTER,
    ) -> None:
        self.interval = window.total_seconds() / max(1, per_day)
        if rate:
            self.interval = max(self.interval, 1.0 / rate)
        self.jitter = jitter
        self._random = random.Random(seed)
        self._clock = clock
        self._sleep = sleep
        self._next: dt.datetime | None = None
        self._lock: asyncio.Lock | None = None

    @property
    def rate(self) -> float:
        return 1.0 / self.interval if self.interval > 0 else 0.0

    async def acquire(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = self._clock()
            # After a pause (a closed window, a slow server) the next letter goes at once.
            slot = now if self._next is None or self._next < now else self._next
            if slot > now:
                await self._sleep(slot)
            gap = self.interval * (1 + self._random.uniform(-self.jitter, self.jitter))
            self._next = slot + dt.timedelta(seconds=gap)


# --------------------------------------------------------------------------- zones for check


@dataclass(kw_only=True)
class ZoneReport:
    """How the recipients' zones were found (for `check`)."""

    default_zone: str
    window: str | None
    counts: dict[ZoneRule, int]
    # Recipients whose zone is the default, and why: (email, why), the first few.
    fallbacks: list[tuple[str, str]]
    # Found by city, but a guess: (email, why).
    guesses: list[tuple[str, str]]
    guess_count: int = 0

    @property
    def fallback_count(self) -> int:
        return self.counts[ZoneRule.DEFAULT]


def zone_report(
    session: Session,
    campaign: Campaign,
    *,
    contact_ids: Sequence[int],
    default_zone: str | None = None,
    today: dt.date,
) -> ZoneReport:
    """Each recipient's zone by the rules of zones.py, counted per rule, with those that fell
    back to the default zone (and why) and those found by an ambiguous city name."""
    rules = resolve_rules(session, campaign, None, default_zone=default_zone)
    resolver = ZoneResolver(default=rules.default_zone, today=today)
    counts = dict.fromkeys(ZoneRule, 0)
    fallbacks: list[tuple[str, str]] = []
    guesses: list[tuple[str, str]] = []
    guess_count = 0
    places: dict[_PlaceKey, Place] = {}
    for start in range(0, len(contact_ids), _PAGE):
        facts = _facts(session, contact_ids[start : start + _PAGE], None, places)
        for cid in contact_ids[start : start + _PAGE]:
            f = facts.get(cid)
            if f is None:
                continue
            found = resolver.resolve(f.place)
            counts[found.rule] += 1
            if found.rule is ZoneRule.DEFAULT:
                if len(fallbacks) < FALLBACKS_LISTED:
                    fallbacks.append((f.email, found.note or ""))
            elif found.note:
                guess_count += 1
                if len(guesses) < FALLBACKS_LISTED:
                    guesses.append((f.email, found.note))
    return ZoneReport(
        default_zone=rules.default_zone,
        window=rules.describe() if rules.schedule is not None else None,
        counts=counts,
        fallbacks=fallbacks,
        guesses=guesses,
        guess_count=guess_count,
    )


def format_zone_report(report: ZoneReport) -> list[str]:
    """`check`'s lines about time zones."""
    total = sum(report.counts.values())
    if not total:
        return []
    parts = [
        f"{report.counts[rule]:,} from {RULE_WORDS[rule]}"
        + (f" ({report.default_zone})" if rule is ZoneRule.DEFAULT else "")
        for rule in ZoneRule
        if report.counts[rule]
    ]
    lines = ["Time zones: " + ", ".join(parts)]
    if report.window:
        lines.append(f"  sending window: {report.window}")
    if report.fallback_count:
        lines.append(
            f"  fell back to {report.default_zone} ({report.fallback_count:,}; a timezone column "
            "or a city with its country says it):"
        )
        lines.extend(f"    {email}: {why}" for email, why in report.fallbacks)
        more = report.fallback_count - len(report.fallbacks)
        if more > 0:
            lines.append(f"    and {more:,} more")
    if report.guess_count:
        lines.append(f"  found by an ambiguous city name ({report.guess_count:,}):")
        lines.extend(f"    {email}: {why}" for email, why in report.guesses)
    return lines


# --------------------------------------------------------------------------- words


def format_waiting(waiting: Waiting, *, slug: str, waiting_now: bool = False) -> str:
    """One line: when the next held letters of `slug` fall due, and for whom."""
    local = f" ({_local(waiting.at, waiting.zone)})" if waiting.zone else ""
    who = (
        f"{waiting.count:,} letter(s), e.g. {waiting.example}"
        if waiting.example
        else (f"{waiting.count:,} letter(s)")
    )
    later = f"; {waiting.later:,} more later" if waiting.later else ""
    if waiting_now:
        return f"waiting until {_utc(waiting.at)}{local}: then {who} of {slug} fall due{later}"
    return f"the next of {slug} fall due {_utc(waiting.at)}{local}: {who}{later}"


def held_counts(engine: Engine, *, campaign_id: int, now: dt.datetime) -> int:
    """Letters of the campaign held until later (queued with a due time still to come)."""
    with Session(engine) as session:
        return int(
            session.scalar(
                select(func.count()).where(
                    Message.campaign_id == campaign_id,
                    Message.status == MessageStatus.QUEUED.value,
                    Message.next_attempt_at > now,
                )
            )
            or 0
        )


__all__ = [
    "FALLBACK_ZONE",
    "RECIPIENT",
    "Gate",
    "Rules",
    "RunTiming",
    "SpreadLimiter",
    "Waiting",
    "ZoneReport",
    "check_run",
    "configure",
    "describe_campaign",
    "format_duration",
    "format_waiting",
    "format_zone_report",
    "held_counts",
    "next_due",
    "open_gate",
    "parse_duration",
    "resolve_rules",
    "zone_report",
]
