"""secrets: a shared workspace's generated secrets (unsubscribe and VERP tokens)

Revision ID: 0008_mailflow
Revises: 0007_checks
Create Date: 2026-12-02 15:00:00

On PostgreSQL (a team's shared database) the workspace secret that keys unsubscribe and VERP
tokens lives here, so every sender signs alike; a SQLite workspace keeps it in an owner-only
file beside mailer.toml (mailer/workspace_secret.py) and leaves this table empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_mailflow"
down_revision: str | None = "0007_checks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "secrets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("value", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secrets")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_secrets_name")),
    )


def downgrade() -> None:
    op.drop_table("secrets")
