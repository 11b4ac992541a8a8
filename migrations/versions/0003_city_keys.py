"""cities keyed across letters without a decomposition (Wrocław = Wroclaw); duplicates merged

Revision ID: 0003_city_keys
Revises: 0002_inbox
Create Date: 2026-12-02 13:20:00

The old key folded case and combining accents only, so "Wrocław" (ł has no decomposition) and
"Wroclaw" from a Windows-1252 save were two cities, and a contact in one never met the partner
city tie of the other. Keys are recomputed with `anyascii`; cities that now share a key and a
country are merged into the oldest, their contacts, signatories and ties moved over (a tie that
would then be there twice is kept once).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op
from anyascii import anyascii

revision: str = "0003_city_keys"
down_revision: str | None = "0002_inbox"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

cities = sa.table(
    "cities", sa.column("id"), sa.column("name"), sa.column("name_key"), sa.column("country")
)
contacts = sa.table("contacts", sa.column("id"), sa.column("city_id"))
signatories = sa.table("signatories", sa.column("id"), sa.column("city_id"))
partnerships = sa.table(
    "partnerships",
    sa.column("id"),
    sa.column("ukrainian_city_id"),
    sa.column("partner_city_id"),
)


def new_key(name: str) -> str:
    # A copy of models.city_key as of this revision: a migration must not change with the code.
    text = re.sub(r"[^\w\s-]", "", anyascii(name).casefold())
    return " ".join(text.replace("-", " ").replace("_", " ").split())[:200]


def old_key(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.casefold().replace("-", " ").split())


def _merge(bind: sa.Connection, duplicate: int, survivor: int) -> None:
    bind.execute(contacts.update().where(contacts.c.city_id == duplicate).values(city_id=survivor))
    bind.execute(
        signatories.update().where(signatories.c.city_id == duplicate).values(city_id=survivor)
    )
    for mine, other in (
        (partnerships.c.ukrainian_city_id, partnerships.c.partner_city_id),
        (partnerships.c.partner_city_id, partnerships.c.ukrainian_city_id),
    ):
        for tie_id, other_id in bind.execute(
            sa.select(partnerships.c.id, other).where(mine == duplicate)
        ).all():
            exists = bind.execute(
                sa.select(partnerships.c.id).where(mine == survivor, other == other_id)
            ).first()
            if exists is not None:
                bind.execute(partnerships.delete().where(partnerships.c.id == tie_id))
            else:
                bind.execute(
                    partnerships.update()
                    .where(partnerships.c.id == tie_id)
                    .values({mine.name: survivor})
                )
    bind.execute(cities.delete().where(cities.c.id == duplicate))


def _rekey(key: Callable[[str], str]) -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(cities.c.id, cities.c.name, cities.c.country).order_by(cities.c.id)
    ).all()
    survivors: dict[tuple[str, str | None], int] = {}
    keys: dict[int, str] = {}
    for city_id, name, country in rows:
        folded = key(name)
        survivor = survivors.setdefault((folded, country), city_id)
        if survivor == city_id:
            keys[city_id] = folded
        else:
            _merge(bind, city_id, survivor)
    # Through a key no city has, so no two rows share one on the way (it is unique per country).
    for city_id in keys:
        bind.execute(cities.update().where(cities.c.id == city_id).values(name_key=f"#{city_id}"))
    for city_id, folded in keys.items():
        bind.execute(cities.update().where(cities.c.id == city_id).values(name_key=folded))


def upgrade() -> None:
    _rekey(new_key)


def downgrade() -> None:
    _rekey(old_key)
