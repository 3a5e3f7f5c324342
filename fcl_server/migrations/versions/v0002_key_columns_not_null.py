"""Single-column TEXT primary keys are NOT NULL on SQLite too (as on PostgreSQL).

0.1.0 declared tokens.token_hash, clients.client_id, labels.name and kv.key as `TEXT PRIMARY KEY`,
which SQLite lets be NULL. SQLite cannot alter a column: each of the four tables is copied into a new
one with the same rows (batch mode), in the upgrade's one transaction. fcl never wrote a NULL key; if
a database has one, the copy fails and the upgrade rolls back whole, leaving the database as it was.
On PostgreSQL these columns are NOT NULL already (primary keys), and nothing changes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

KEYS = {"tokens": "token_hash", "clients": "client_id", "labels": "name", "kv": "key"}


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, column in KEYS.items():
        with op.batch_alter_table(table, recreate="always") as batch:
            batch.alter_column(column, existing_type=sa.Text(), nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, column in KEYS.items():
        with op.batch_alter_table(table, recreate="always") as batch:
            batch.alter_column(column, existing_type=sa.Text(), nullable=True)
