"""Who is addressed: `--where`/`--tag` filters over contacts, and who must never be contacted."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from mailer import addresses
from mailer.errors import InvalidValueError
from mailer.models import City, Contact, ContactTag, Suppression, SuppressionReason, city_key

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
)


@dataclass(frozen=True, kw_only=True)
class Audience:
    """A stored filter, resolved whenever it is needed (so later imports and suppressions count)."""

    where: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()

    def to_json(self) -> dict[str, list[object]]:
        return {"where": [list(pair) for pair in self.where], "tags": list(self.tags)}

    @classmethod
    def from_json(cls, data: dict[str, object] | None) -> Audience:
        data = data or {}
        where = data.get("where") or []
        tags = data.get("tags") or []
        assert isinstance(where, list) and isinstance(tags, list)
        return cls(
            where=tuple((str(f), str(v)) for f, v in where), tags=tuple(str(t) for t in tags)
        )

    def describe(self) -> str:
        parts = [f"{f}={v}" for f, v in self.where] + [f"tag={t}" for t in self.tags]
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
        return Contact.city_id.in_(select(City.id).where(City.country == value.upper()))
    if field == "region":
        return Contact.city_id.in_(select(City.id).where(func.lower(City.region) == value.lower()))
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
    return query.order_by(Contact.id)


def contact_ids(session: Session, audience: Audience) -> list[int]:
    query = contacts_query(session, audience).with_only_columns(Contact.id)
    return list(session.scalars(query))


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
