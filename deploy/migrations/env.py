"""Alembic environment of the store: run by `deploy.migrations.upgrade` (or `alembic` by hand)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from deploy.migrations import metadata
from feedback.store import make_engine

config = context.config
target_metadata = metadata()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set"
    engine = make_engine(url)
    with engine.connect() as connection:
        # SQLite cannot alter most constraints in place: batch mode copies the table instead.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Two processes upgrading at once (gateway and worker starting together) take turns.
                connection.execute(text("SELECT pg_advisory_xact_lock(7340121)"))
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
