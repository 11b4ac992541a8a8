"""senders (identity, lease, heartbeat), the campaign's shared pace, an index for the daily cap

Revision ID: 0009_reliability
Revises: 0008_mailflow
Create Date: 2026-12-02 15:00:00

- `senders`: one row per `mailer send` run on a campaign: who (OS user, host, process, SMTP
  user), its lease (renewed by a heartbeat; only an expired lease is recovered), its handover
  journal, what it holds, its rate, and when and why it stopped.
- `campaigns.pace_next_at`: the earliest time the campaign's next letter may leave under a
  `--rate`; every sender's claim advances it, so several senders keep one rate together.
- `ix_events_sent_at`: a partial index of `sent` events by time, so the rolling 24-hour
  `--daily-cap` is counted inside each claim at the cost of an index range.

Claims left `sending` by an older version have no sender row: the first send after the upgrade
recovers them as `uncertain` (an older version refuses to run on this schema, so none is live).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_reliability"
down_revision: str | None = "0008_mailflow"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    moment = sa.DateTime(timezone=True)
    op.create_table(
        "senders",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("campaign_id", sa.Integer(), nullable=False),
        sa.Column("os_user", sa.String(length=100), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("smtp_user", sa.String(length=320), nullable=True),
        sa.Column("via", sa.String(length=300), nullable=True),
        sa.Column("actor", sa.String(length=300), nullable=False),
        sa.Column("boot_id", sa.String(length=64), nullable=True),
        sa.Column("journal", sa.String(length=1000), nullable=True),
        sa.Column("started_at", moment, nullable=False),
        sa.Column("heartbeat_at", moment, nullable=False),
        sa.Column("lease_until", moment, nullable=False),
        sa.Column("holding", sa.Integer(), nullable=False),
        sa.Column("sent", sa.Integer(), nullable=False),
        sa.Column("rate", sa.Float(), nullable=True),
        sa.Column("stopped_at", moment, nullable=True),
        sa.Column("stop_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["campaign_id"],
            ["campaigns.id"],
            name=op.f("fk_senders_campaign_id_campaigns"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_senders")),
    )
    op.create_index(
        "ix_senders_campaign_stopped", "senders", ["campaign_id", "stopped_at"], unique=False
    )
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("pace_next_at", moment, nullable=True))
    op.create_index(
        "ix_events_sent_at",
        "events",
        ["at"],
        unique=False,
        sqlite_where=sa.text("kind = 'sent'"),
        postgresql_where=sa.text("kind = 'sent'"),
    )


def downgrade() -> None:
    op.drop_index("ix_events_sent_at", table_name="events")
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("pace_next_at")
    op.drop_index("ix_senders_campaign_stopped", table_name="senders")
    op.drop_table("senders")
