"""The state database's tables: one SQLAlchemy Core schema for SQLite and PostgreSQL.

The types are chosen so that each backend gets what it needs from one definition:
* SQLite keeps the declared types of 0.1.0 (TEXT, INTEGER, REAL; `INTEGER PRIMARY KEY AUTOINCREMENT` job
  ids): 0.1.0's tables are revision 0001, and 0002 only makes its four single TEXT keys NOT NULL;
* PostgreSQL gets DOUBLE PRECISION for times and values (its REAL is 4 bytes: seconds since 1970 would
  lose minutes), BIGINT for ids and sizes, an identity column for job ids, and TEXT compared bytewise
  (COLLATE "C", as SQLite compares), so ORDER BY gives the same order on both.

A change here needs a new revision under fcl_server/migrations/versions (the revisions never import
this module: each revision keeps the tables as they were when it was written).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

TEXT = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")
REAL: sa.types.TypeEngine[float] = sa.Double().with_variant(sa.REAL(), "sqlite")
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
INT = sa.Integer()
ZERO = sa.text("0")
EMPTY = sa.text("''")

metadata = sa.MetaData()

# the column order is 0.1.0's: rows read back are indexed by position as well as by name
tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("token_hash", TEXT, primary_key=True),
    sa.Column("principal", TEXT, nullable=False),
    sa.Column("is_admin", INT, nullable=False),
    sa.Column("created", REAL, nullable=False),
    sa.Column("revoked", INT, nullable=False, server_default=ZERO),
)
clients = sa.Table(
    "clients",
    metadata,
    sa.Column("client_id", TEXT, primary_key=True),
    sa.Column("created", REAL, nullable=False),
    sa.Column("last_seen", REAL, nullable=False, server_default=ZERO),
    sa.Column("fm_digest", TEXT, nullable=False, server_default=EMPTY),
    sa.Column("model_spec", TEXT, nullable=False, server_default=EMPTY),
)
labels = sa.Table(
    "labels",
    metadata,
    sa.Column("name", TEXT, primary_key=True),
    sa.Column("id", INT, nullable=False, unique=True),
)
uploads = sa.Table(
    "uploads",
    metadata,
    sa.Column("upload_id", TEXT, nullable=False),
    sa.Column("client_id", TEXT, nullable=False),
    sa.Column("task_key", TEXT, nullable=False),
    sa.Column("task_index", INT, nullable=False),
    sa.Column("size", BIGINT, nullable=False),
    sa.Column("sha256", TEXT, nullable=False),
    sa.Column("received", REAL, nullable=False),
    sa.Column("job_id", BIGINT, nullable=False),
    sa.PrimaryKeyConstraint("client_id", "upload_id"),  # not the column order
)
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("job_id", BIGINT, sa.Identity(), primary_key=True),
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
    # revision 0003: the worker running the job, and until when its claim holds without a heartbeat
    sa.Column("worker", TEXT, nullable=False, server_default=EMPTY),
    sa.Column("lease_until", REAL, nullable=False, server_default=ZERO),
    sa.Column("bank_blob", TEXT, nullable=False, server_default=EMPTY),  # 0003: the bank G was fitted on
    sa.Index("jobs_state", "state", "job_id"),
    sqlite_autoincrement=True,  # job ids never repeat, even after the newest job's row is gone
)
heads = sa.Table(
    "heads",
    metadata,
    sa.Column("scope", TEXT, primary_key=True),
    sa.Column("client_id", TEXT, primary_key=True),
    sa.Column("version", INT, primary_key=True),
    sa.Column("blob", TEXT, nullable=False),
    sa.Column("job_id", BIGINT, nullable=False),
    sa.Column("num_labels", INT, nullable=False),
    sa.Column("created", REAL, nullable=False),
    # revision 0004: the version this one publishes again (`fcl-server rollback`); 0: a job made it
    sa.Column("rollback_of", INT, nullable=False, server_default=ZERO),
)
metrics = sa.Table(
    "metrics",
    metadata,
    sa.Column("client_id", TEXT, primary_key=True),
    sa.Column("task_key", TEXT, nullable=False),
    sa.Column("task_index", INT, primary_key=True),
    sa.Column("name", TEXT, primary_key=True),
    sa.Column("value", REAL, nullable=False),
    sa.Column("reported", REAL, nullable=False),
)
kv = sa.Table(
    "kv",
    metadata,
    sa.Column("key", TEXT, primary_key=True),
    sa.Column("value", TEXT, nullable=False),
)
upload_reservations = sa.Table(
    "upload_reservations",
    metadata,
    sa.Column("client_id", TEXT, primary_key=True),
    sa.Column("upload_id", TEXT, primary_key=True),
    sa.Column("size", BIGINT, nullable=False),
    sa.Column("sha256", TEXT, nullable=False),
    sa.Column("reserved", REAL, nullable=False),
)
# revision 0003: the token buckets of the per-client upload limits, shared by every front-end
rate_buckets = sa.Table(
    "rate_buckets",
    metadata,
    sa.Column("name", TEXT, primary_key=True),
    sa.Column("key", TEXT, primary_key=True),
    sa.Column("tokens", REAL, nullable=False),
    sa.Column("updated", REAL, nullable=False),
)
# revision 0003: every distillation worker process, its heartbeat and the job it runs
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("worker_id", TEXT, primary_key=True),
    sa.Column("host", TEXT, nullable=False),
    sa.Column("pid", INT, nullable=False),
    sa.Column("started", REAL, nullable=False),
    sa.Column("heartbeat", REAL, nullable=False),
    sa.Column("job_id", BIGINT, nullable=False, server_default=ZERO),
)
# revision 0004: blobs `fcl-server gc` deleted, so a reference to one reads as collected, not as lost
collected_blobs = sa.Table(
    "collected_blobs",
    metadata,
    sa.Column("digest", TEXT, primary_key=True),
    sa.Column("size", BIGINT, nullable=False),
    sa.Column("kind", TEXT, nullable=False),
    sa.Column("collected", REAL, nullable=False),
)
