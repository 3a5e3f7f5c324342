"""Alembic migrations of the state database (configured in code by fcl_server.database; no alembic.ini)."""
