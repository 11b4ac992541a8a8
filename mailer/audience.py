"""Who is addressed: `--where`/`--tag` filters over contacts, filters from the record of earlier
campaigns (contacted in, replied to: follow-ups), and who must never be contacted."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    and_,
    bindparam,
    exists,
    func,
    not_,
    or_,
    select,
)
from sqlalchemy.orm import Session

from mailer import addresses
from mailer.errors import InvalidValueError
from mailer.models import (
    Campaign,
    City,
    Contact,
    ContactTag,
    Message,
    Suppression,
    SuppressionReason,
    city_key,
)

CORE_FIELDS = (
    "email",
    "name",
    "title",
    "salutation",
    "language",
    "organisation",
    "city",
    "region",
    "country",
    "timezone",
)


# The follow-up filters: (JSON key, flag, words for people).
RECORD_FILTERS = (
    ("contacted_in", "--contacted-in", "contacted in"),
    ("not_contacted_in", "--not-contacted-in", "not contacted in"),
    ("replied_to", "--replied-to", "replied to"),
    ("not_replied_to", "--not-replied-to", "got and did not reply to"),
)


@dataclass(frozen=True, kw_only=True)
class Audience:
    """A stored filter, resolved whenever it is needed (so later imports and suppressions count).

    The record filters name campaigns by slug: `contacted_in` (a letter of it was sent to the
    contact), `not_contacted_in`, `replied_to` (the contact answered it; an auto-reply is no
    answer), `not_replied_to` (a letter of it was sent to the contact, who has not answered).
    """

    where: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    contacted_in: tuple[str, ...] = ()
    not_contacted_in: tuple[str, ...] = ()
    replied_to: tuple[str, ...] = ()
    not_replied_to: tuple[str, ...] = ()

    def to_json(self) -> dict[str, list[object]]:
        data: dict[str, list[object]] = {
            "where": [list(pair) for pair in self.where],
            "tags": list(self.tags),
        }
        for key, _flag, _words in RECORD_FILTERS:
            slugs = getattr(self, key)
            if slugs:
                data[key] = list(slugs)
        return data

    @classmethod
    def from_json(cls, data: dict[str, object] | None) -> Audience:
        data = data or {}
        where = data.get("where") or []
        tags = data.get("tags") or []
        assert isinstance(where, list) and isinstance(tags, list)
        record: dict[str, tuple[str, ...]] = {}
        for key, _flag, _words in RECORD_FILTERS:
            slugs = data.get(key) or []
            assert isinstance(slugs, list)
            record[key] = tuple(str(s) for s in slugs)
        return cls(
            where=tuple((str(f), str(v)) for f, v in where),
            tags=tuple(str(t) for t in tags),
            **record,
        )

    def describe(self) -> str:
        parts = [f"{f}={v}" for f, v in self.where] + [f"tag={t}" for t in self.tags]
        for key, _flag, words in RECORD_FILTERS:
            parts.extend(f"{words} {slug}" for slug in getattr(self, key))
        return " and ".join(parts) if parts else "all contacts"


def parse_where(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """`FIELD=VALUE` strings from the command line, field names normalised."""
    pairs = []
    for item in items:
        field, sep, value = item.partition("=")
        field = field.strip().lower().replace(" ", "_").replace("-", "_")
        if not sep or not field:
            raise InvalidValueError(f"--where {item!r}: expected FIELD=VALUE")
        pairs.append((field, value.strip()))
    return tuple(pairs)


def normalise_email(address: str) -> str:
    """The stored form of an address (see addresses.normalise): lookups find any form of it."""
    return addresses.normalise(address)


def _condition(session: Session, field: str, value: str) -> ColumnElement[bool]:
    if field == "email":
        return Contact.email == normalise_email(value)
    if field in ("name", "title", "salutation", "organisation"):
        column = getattr(Contact, field)
        return func.lower(column) == value.lower()
    if field == "language":
        lowered = value.lower()
        # "de" also selects "de-AT": a language filter means the language, not one region of it.
        return or_(func.lower(Contact.language) == lowered, Contact.language.ilike(f"{lowered}-%"))
    if field == "city":
        return Contact.city_id.in_(select(City.id).where(City.name_key == city_key(value)))
    if field == "country":
        return Contact.city_id.in_(select(City.id).where(City.country == _country_code(value)))
    if field == "region":
        return Contact.city_id.in_(select(City.id).where(func.lower(City.region) == value.lower()))
    if field in ("timezone", "time_zone"):
        return func.lower(Contact.timezone) == value.strip().lower()
    if field in ("tag", "tags"):
        return exists().where(and_(ContactTag.contact_id == Contact.id, ContactTag.tag == value))
    attribute = Contact.attributes[field].as_string()
    if not session.scalar(select(exists().where(attribute.is_not(None)))):
        known = ", ".join((*CORE_FIELDS, "tag"))
        raise InvalidValueError(
            f"--where {field}={value}: unknown field {field!r}; it is neither one of "
            f"{known} nor a column of any imported contact"
        )
    condition: ColumnElement[bool] = attribute == value
    return condition


def _country_code(value: str) -> str:
    """`--where country=Germany` reads the value as import reads a country (fields.parse_country:
    ISO codes and names in our languages); what it cannot read is taken as a code."""
    from mailer.fields import parse_country

    try:
        return parse_country(value)
    except ValueError:
        return value.strip().upper()


def contacts_query(session: Session, audience: Audience) -> Select[Contact]:
    """Contacts matching the audience: repeated fields are alternatives, different fields all apply."""
    by_field: dict[str, list[ColumnElement[bool]]] = {}
    for field, value in audience.where:
        by_field.setdefault(field, []).append(_condition(session, field, value))
    query = select(Contact)
    for conditions in by_field.values():
        query = query.where(or_(*conditions))
    for tag in audience.tags:
        query = query.where(
            exists().where(and_(ContactTag.contact_id == Contact.id, ContactTag.tag == tag))
        )
    for condition in _record_conditions(session, audience):
        query = query.where(condition)
    return query.order_by(Contact.id)


def _campaign_id(session: Session, slug: str, flag: str) -> int:
    found = session.scalar(select(Campaign.id).where(Campaign.slug == slug))
    if found is None:
        known = list(session.scalars(select(Campaign.slug).order_by(Campaign.slug).limit(20)))
        hint = f"; campaigns: {', '.join(known)}" if known else "; there are no campaigns yet"
        raise InvalidValueError(f"{flag} {slug}: no campaign {slug!r}{hint}")
    return found


def _record_conditions(session: Session, audience: Audience) -> list[ColumnElement[bool]]:
    def letter(campaign_id: int, *more: ColumnElement[bool]) -> ColumnElement[bool]:
        return exists().where(
            Message.contact_id == Contact.id,
            Message.campaign_id == campaign_id,
            Message.sent_at.is_not(None),
            *more,
        )

    conditions: list[ColumnElement[bool]] = []
    for key, flag, _words in RECORD_FILTERS:
        for slug in getattr(audience, key):
            campaign_id = _campaign_id(session, slug, flag)
            # An auto-reply sets no `replied_at`: out of office is not an answer.
            replied = letter(campaign_id, Message.replied_at.is_not(None))
            conditions.append(
                {
                    "contacted_in": letter(campaign_id),
                    "not_contacted_in": not_(letter(campaign_id)),
                    "replied_to": replied,
                    "not_replied_to": and_(letter(campaign_id), not_(replied)),
                }[key]
            )
    return conditions


def away_until(session: Session, *, contact_ids: Sequence[int]) -> dict[int, dt.date]:
    """The latest return date an out-of-office answer named, per contact (none: not away).

    A follow-up's letter to a contact is due only after this day.
    """
    found: dict[int, dt.date] = {}
    for start in range(0, len(contact_ids), 500):
        chunk = list(contact_ids[start : start + 500])
        rows = session.execute(
            select(Message.contact_id, func.max(Message.away_until))
            .where(Message.contact_id.in_(chunk), Message.away_until.is_not(None))
            .group_by(Message.contact_id)
        )
        for contact_id, day in rows:
            if day is not None:
                found[int(contact_id)] = day
    return found


def contact_ids(session: Session, audience: Audience) -> list[int]:
    query = contacts_query(session, audience).with_only_columns(Contact.id)
    return list(session.scalars(query))


def contact_id_pages(
    session: Session, audience: Audience, *, size: int = 1000
) -> Iterator[list[int]]:
    """The audience's contact ids in id order, one keyset page (`id > last`) at a time: memory
    stays flat for an audience of any size, and each page is one index range, never a sort.

    Each page is its own query, so the caller may end the session's transaction between pages
    (a long walk then holds no read snapshot open)."""
    if size < 1:
        raise ValueError("a page holds at least one contact")
    page = (
        contacts_query(session, audience)
        .with_only_columns(Contact.id)
        .where(Contact.id > bindparam("after", type_=Integer))
        .limit(size)
    )
    after = 0
    while True:
        ids = list(session.scalars(page, {"after": after}))
        if not ids:
            return
        yield ids
        if len(ids) < size:
            return
        after = ids[-1]


def count(session: Session, audience: Audience) -> int:
    """How many contacts match (raises InvalidValueError on an unknown field)."""
    ids = contacts_query(session, audience).with_only_columns(Contact.id).order_by(None)
    return int(session.scalar(select(func.count()).select_from(ids.subquery())) or 0)


# --------------------------------------------------------------------------- suppression


def parse_reason(reason: str) -> SuppressionReason:
    try:
        return SuppressionReason(reason.strip().lower().replace("-", "_"))
    except ValueError:
        allowed = ", ".join(r.value for r in SuppressionReason)
        raise InvalidValueError(
            f"unknown suppression reason {reason!r}; use one of {allowed}"
        ) from None


def suppress(
    session: Session, *, emails: Sequence[str], reason: SuppressionReason, source: str | None
) -> int:
    """Suppress addresses; an address suppressed already keeps its first reason. Returns new count."""
    normalised = {normalise_email(e) for e in emails if e.strip()}
    existing = suppressed_among(session, normalised)
    new = sorted(normalised - existing)
    session.add_all(Suppression(email=e, reason=reason.value, source=source) for e in new)
    session.flush()
    return len(new)


def suppressed_among(session: Session, emails: Iterable[str]) -> set[str]:
    wanted = list({normalise_email(e) for e in emails})
    found: set[str] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        found.update(session.scalars(select(Suppression.email).where(Suppression.email.in_(chunk))))
    return found


def suppression_for(session: Session, email: str) -> Suppression | None:
    return session.scalar(select(Suppression).where(Suppression.email == normalise_email(email)))


def list_suppressions(session: Session) -> list[Suppression]:
    return list(
        session.scalars(select(Suppression).order_by(Suppression.created_at, Suppression.id))
    )
