"""The schema of fcl 0.1.0 (tokens, clients, labels, uploads, jobs, heads, metrics, kv, reservations).

A 0.1.0 state database has these tables and no alembic_version: fcl_server.database checks its columns
and stamps it at this revision without running it. On SQLite this creates exactly 0.1.0's tables, down
to its single TEXT primary keys that SQLite lets be NULL (`TEXT PRIMARY KEY` without NOT NULL; 0002
adds it); on PostgreSQL every primary key column is NOT NULL anyway.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# the types as they were at this revision (see fcl_server/schema.py for why each)
TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")
REAL: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
INT = sa.Integer()
ZERO = sa.text("0")
EMPTY = sa.text("''")


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "tokens",
        sa.Column("token_hash", TEXT, primary_key=True, nullable=True),
        sa.Column("principal", TEXT, nullable=False),
        sa.Column("is_admin", INT, nullable=False),
        sa.Column("created", REAL, nullable=False),
        sa.Column("revoked", INT, nullable=False, server_default=ZERO),
    )
    op.create_table(
        "clients",
        sa.Column("client_id", TEXT, primary_key=True, nullable=True),
        sa.Column("created", REAL, nullable=False),
        sa.Column("last_seen", REAL, nullable=False, server_default=ZERO),
        sa.Column("fm_digest", TEXT, nullable=False, server_default=EMPTY),
        sa.Column("model_spec", TEXT, nullable=False, server_default=EMPTY),
    )
    op.create_table(
        "labels",
        sa.Column("name", TEXT, primary_key=True, nullable=True),
        sa.Column("id", INT, nullable=False, unique=True),
    )
    op.create_table(
        "uploads",
        sa.Column("upload_id", TEXT, nullable=False),
        sa.Column("client_id", TEXT, nullable=False),
        sa.Column("task_key", TEXT, nullable=False),
        sa.Column("task_index", INT, nullable=False),
        sa.Column("size", BIGINT, nullable=False),
        sa.Column("sha256", TEXT, nullable=False),
        sa.Column("received", REAL, nullable=False),
        sa.Column("job_id", BIGINT, nullable=False),
        sa.PrimaryKeyConstraint("client_id", "upload_id"),
    )
    op.create_table(
        "jobs",
        # SQLite: `INTEGER PRIMARY KEY AUTOINCREMENT` as 0.1.0 declared it (the rowid: never NULL);
        # PostgreSQL: an identity column, which must be NOT NULL
        sa.Column("job_id", BIGINT, sa.Identity(), primary_key=True, nullable=sqlite),
        sa.Column("client_id", TEXT, nullable=False),
        sa.Column("upload_id", TEXT, nullable=False),
        sa.Column("task_key", TEXT, nullable=False),
        sa.Column("task_index", INT, nullable=False),
        sa.Column("blob", TEXT, nullable=False),
        sa.Column("state", TEXT, nullable=False),
        sa.Column("message", TEXT, nullable=False, server_default=EMPTY),
        sa.Column("created", REAL, nullable=False),
        sa.Column("started", REAL, nullable=False, server_default=ZERO),
        sa.Column("finished", REAL, nullable=False, server_default=ZERO),
        sa.Column("global_version", INT, nullable=False, server_default=ZERO),
        sa.Column("personal_version", INT, nullable=False, server_default=ZERO),
        sa.Column("attempts", INT, nullable=False, server_default=ZERO),
        sqlite_autoincrement=True,
    )
    op.create_index("jobs_state", "jobs", ["state", "job_id"])
    op.create_table(
        "heads",
        sa.Column("scope", TEXT, primary_key=True),
        sa.Column("client_id", TEXT, primary_key=True),
        sa.Column("version", INT, primary_key=True),
        sa.Column("blob", TEXT, nullable=False),
        sa.Column("job_id", BIGINT, nullable=False),
        sa.Column("num_labels", INT, nullable=False),
        sa.Column("created", REAL, nullable=False),
    )
    op.create_table(
        "metrics",
        sa.Column("client_id", TEXT, primary_key=True),
        sa.Column("task_key", TEXT, nullable=False),
        sa.Column("task_index", INT, primary_key=True),
        sa.Column("name", TEXT, primary_key=True),
        sa.Column("value", REAL, nullable=False),
        sa.Column("reported", REAL, nullable=False),
    )
    op.create_table(
        "kv",
        sa.Column("key", TEXT, primary_key=True, nullable=True),
        sa.Column("value", TEXT, nullable=False),
    )
    op.create_table(
        "upload_reservations",
        sa.Column("client_id", TEXT, primary_key=True),
        sa.Column("upload_id", TEXT, primary_key=True),
        sa.Column("size", BIGINT, nullable=False),
        sa.Column("sha256", TEXT, nullable=False),
        sa.Column("reserved", REAL, nullable=False),
    )


def downgrade() -> None:
    op.drop_index("jobs_state", "jobs")
    for table in (
        "upload_reservations",
        "kv",
        "metrics",
        "heads",
        "jobs",
        "uploads",
        "labels",
        "clients",
        "tokens",
    ):
        op.drop_table(table)
