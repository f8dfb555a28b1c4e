"""Alembic environment: runs on the connection handed in by ``swarmgate.store.db.migrate``."""

from __future__ import annotations

from alembic import context

from swarmgate.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through swarmgate.store.db.migrate()")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
