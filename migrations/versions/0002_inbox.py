"""inbox: what comes back (bounces, replies, auto-replies, complaints, unsubscribes)

Revision ID: 0002_inbox
Revises: 0001
Create Date: 2026-12-02 13:00:00

- `inbox_folders`: each folder inbox sync reads and where it stopped (UIDVALIDITY, last UID);
- `inbox_messages`: each mail it has seen (Message-ID, digest, what it was, our letter it answers);
- `messages`: `replied_at`, `bounced_at`, `away_until` (the return date of an out-of-office
  answer), and an index on `message_id` (what comes back names our letter by it);
- `campaigns`: `pause_reason`, `paused_at`, `held` (a bounce-spike pause that needs the user's
  acknowledgement) and `bounces_acknowledged`.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_inbox"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "inbox_folders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=500), nullable=False),
        sa.Column("folder", sa.String(length=500), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("last_uid", sa.BigInteger(), nullable=True),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox_folders")),
        sa.UniqueConstraint("source", "folder", name=op.f("uq_inbox_folders_source")),
    )
    op.create_table(
        "inbox_messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("folder_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("message_id", sa.String(length=500), nullable=True),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("outbox_message_id", sa.Integer(), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["folder_id"],
            ["inbox_folders.id"],
            name=op.f("fk_inbox_messages_folder_id_inbox_folders"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["outbox_message_id"],
            ["messages.id"],
            name=op.f("fk_inbox_messages_outbox_message_id_messages"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox_messages")),
        sa.UniqueConstraint("folder_id", "key", name=op.f("uq_inbox_messages_folder_id")),
    )
    with op.batch_alter_table("inbox_messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_inbox_messages_digest"), ["digest"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_inbox_messages_message_id"), ["message_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_inbox_messages_outbox_message_id"), ["outbox_message_id"], unique=False
        )

    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("replied_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("bounced_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("away_until", sa.Date(), nullable=True))
        batch_op.create_index("ix_messages_message_id", ["message_id"], unique=False)

    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pause_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("held", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("bounces_acknowledged", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("campaigns", schema=None) as batch_op:
        batch_op.drop_column("bounces_acknowledged")
        batch_op.drop_column("held")
        batch_op.drop_column("paused_at")
        batch_op.drop_column("pause_reason")

    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_message_id")
        batch_op.drop_column("away_until")
        batch_op.drop_column("bounced_at")
        batch_op.drop_column("replied_at")

    with op.batch_alter_table("inbox_messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_inbox_messages_outbox_message_id"))
        batch_op.drop_index(batch_op.f("ix_inbox_messages_message_id"))
        batch_op.drop_index(batch_op.f("ix_inbox_messages_digest"))

    op.drop_table("inbox_messages")
    op.drop_table("inbox_folders")
