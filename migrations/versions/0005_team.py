"""campaigns: who paused it, and the unsubscribe settings frozen with the letter

Revision ID: 0005_team
Revises: 0004_event_actor
Create Date: 2026-12-05 10:00:00

A team shares one database (issue 16): a campaign's whole letter is frozen when it is created,
so `campaigns.unsubscribe_mailto` and `unsubscribe_url` keep what mailer.toml said on the laptop
that created it (NULL mailto: a campaign made before this revision, which still reads the local
settings). `campaigns.paused_by` names who paused it with `mailer campaign pause`: a pause no
`send` lifts on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_team"
down_revision: str | None = "0004_event_actor"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("paused_by", sa.String(length=300), nullable=True))
        batch.add_column(sa.Column("unsubscribe_mailto", sa.Text(), nullable=True))
        batch.add_column(sa.Column("unsubscribe_url", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("unsubscribe_url")
        batch.drop_column("unsubscribe_mailto")
        batch.drop_column("paused_by")
