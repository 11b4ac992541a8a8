"""events.actor: who did it (OS user, host, process), for a team on one database

Revision ID: 0004_event_actor
Revises: 0003_city_keys
Create Date: 2026-12-02 14:30:00

Every event may now name its actor (`user@host pid N`, see mailer/identity.py): claims and
results of each sender, and the changes the audit export lists (imports, suppressions,
campaign changes), whose events have no message.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_event_actor"
down_revision: str | None = "0003_city_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("actor", sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_column("actor")
