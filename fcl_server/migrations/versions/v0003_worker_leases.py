"""Several processes: a job records its worker and lease; workers and rate-limit buckets in tables.

Existing rows keep their data: a job gets worker '' and lease_until 0 (a running job of 0.1.0 has an
expired lease, so any worker may take it up again, as a restart did before).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")
REAL: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # ADD COLUMN, not a batch copy: SQLite keeps the table as it is (its AUTOINCREMENT sequence too)
    op.add_column("jobs", sa.Column("worker", TEXT, nullable=False, server_default=sa.text("''")))
    op.add_column("jobs", sa.Column("lease_until", REAL, nullable=False, server_default=sa.text("0")))
    op.add_column("jobs", sa.Column("bank_blob", TEXT, nullable=False, server_default=sa.text("''")))
    op.create_table(
        "workers",
        sa.Column("worker_id", TEXT, primary_key=True),
        sa.Column("host", TEXT, nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started", REAL, nullable=False),
        sa.Column("heartbeat", REAL, nullable=False),
        sa.Column("job_id", BIGINT, nullable=False, server_default=sa.text("0")),
    )
    op.create_table(
        "rate_buckets",
        sa.Column("name", TEXT, primary_key=True),
        sa.Column("key", TEXT, primary_key=True),
        sa.Column("tokens", REAL, nullable=False),
        sa.Column("updated", REAL, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_buckets")
    op.drop_table("workers")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("bank_blob")
        batch.drop_column("lease_until")
        batch.drop_column("worker")
