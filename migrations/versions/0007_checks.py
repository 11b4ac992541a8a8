"""cities.name_uk (a city's name in Ukrainian) and signatories.role (who signs for a city)

Revision ID: 0007_checks
Revises: 0006_windows
Create Date: 2026-12-02 15:00:00

Ukrainian letters name the partner city in Ukrainian when its Ukrainian name is known, and a
letter is signed by the head of its Ukrainian partner city or community, never by an official
listed under a city (`role`; empty means: decided by the title). The Ukrainian cities of the
known list get their Ukrainian names here; a city abroad gets one from a partnerships import.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_checks"
down_revision: str | None = "0006_windows"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A copy of seeds/ukrainian_cities.csv (name key -> name_uk) as of this revision: a migration
# must not change with the seed list.
KNOWN = {
    "kharkiv": "Харків",
    "lviv": "Львів",
    "dnipro": "Дніпро",
    "chernihiv": "Чернігів",
    "zaporizhzhia": "Запоріжжя",
    "ternopil": "Тернопіль",
    "ivano frankivsk": "Івано-Франківськ",
    "mariupol": "Маріуполь",
    "mykolaiv": "Миколаїв",
    "rivne": "Рівне",
    "chernivtsi": "Чернівці",
    "zhytomyr": "Житомир",
    "khmelnytskyi": "Хмельницький",
    "vinnytsia": "Вінниця",
    "lutsk": "Луцьк",
    "uzhhorod": "Ужгород",
    "cherkasy": "Черкаси",
    "odesa": "Одеса",
    "trostianets": "Тростянець",
    "kramatorsk": "Краматорськ",
    "kyiv": "Київ",
    "pokrovsk": "Покровськ",
    "irpin": "Ірпінь",
    "volnovakha": "Волноваха",
    "enerhodar": "Енергодар",
    "hostomel": "Гостомель",
    "kherson": "Херсон",
}

cities = sa.table(
    "cities", sa.column("name_key"), sa.column("country"), sa.column("name_uk", sa.String)
)


def upgrade() -> None:
    with op.batch_alter_table("cities") as batch:
        batch.add_column(sa.Column("name_uk", sa.String(length=200), nullable=True))
    with op.batch_alter_table("signatories") as batch:
        batch.add_column(sa.Column("role", sa.String(length=20), nullable=True))
    bind = op.get_bind()
    for key, name_uk in KNOWN.items():
        bind.execute(
            cities.update()
            .where(cities.c.name_key == key, cities.c.country == "UA")
            .values(name_uk=name_uk)
        )


def downgrade() -> None:
    with op.batch_alter_table("signatories") as batch:
        batch.drop_column("role")
    with op.batch_alter_table("cities") as batch:
        batch.drop_column("name_uk")
