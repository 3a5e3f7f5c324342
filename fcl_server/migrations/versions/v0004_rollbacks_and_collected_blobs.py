"""Operator lifecycle: a head version may republish an older one; blobs deleted by `gc` are recorded.

Existing rows keep their data: every head gets rollback_of 0 (a job made it), and the new table
collected_blobs starts empty (nothing was ever collected before this revision).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")
REAL: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # ADD COLUMN, not a batch copy: SQLite keeps the table and its rows as they are
    op.add_column(
        "heads", sa.Column("rollback_of", sa.Integer(), nullable=False, server_default=sa.text("0"))
    )
    op.create_table(
        "collected_blobs",
        sa.Column("digest", TEXT, primary_key=True),
        sa.Column("size", BIGINT, nullable=False),
        sa.Column("kind", TEXT, nullable=False),
        sa.Column("collected", REAL, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("collected_blobs")
    with op.batch_alter_table("heads") as batch:
        batch.drop_column("rollback_of")
