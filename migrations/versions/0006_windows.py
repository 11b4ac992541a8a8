"""sending windows and follow-ups: contacts.timezone, campaigns.parent_id and follow_up_after

Revision ID: 0006_windows
Revises: 0005_team
Create Date: 2026-12-03 10:00:00

- `contacts.timezone`: the contact's IANA time zone (a `timezone` column of an import);
- `campaigns.parent_id`: the campaign a follow-up follows; `campaigns.follow_up_after`: how long
  (seconds) after each contact's letter of the parent the follow-up's letter is due.

A letter held for its window or its follow-up delay stays `queued` with its due time in
`messages.next_attempt_at` (no new column), with a `held` event saying why.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_windows"
down_revision: str | None = "0005_team"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("contacts") as batch:
        batch.add_column(sa.Column("timezone", sa.String(length=64), nullable=True))
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("parent_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("follow_up_after", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_campaigns_parent_id_campaigns"), "campaigns", ["parent_id"], ["id"]
        )
        batch.create_index(op.f("ix_campaigns_parent_id"), ["parent_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_index(op.f("ix_campaigns_parent_id"))
        batch.drop_constraint(op.f("fk_campaigns_parent_id_campaigns"), type_="foreignkey")
        batch.drop_column("follow_up_after")
        batch.drop_column("parent_id")
    with op.batch_alter_table("contacts") as batch:
        batch.drop_column("timezone")
