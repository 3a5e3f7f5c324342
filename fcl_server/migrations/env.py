"""Alembic environment: runs on the connection fcl_server.database hands over, inside its transaction."""

from __future__ import annotations

from alembic import context

from fcl_server.schema import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("fcl's migrations run through `fcl-server db upgrade`, on a live database connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():  # joins the caller's transaction: the upgrade commits whole or not at all
    context.run_migrations()
