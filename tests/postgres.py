"""Throwaway databases on the machine's PostgreSQL, for the tests and the benches that need one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

from tests.parts import missing


def _admin_engine(base: URL) -> Engine:
    """An engine on the URL's database, or on the server's `postgres` database where that one does not exist:
    the tests only create and drop databases of their own."""
    error: OperationalError | None = None
    for url in (base, base.set(database="postgres")):
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            admin.connect().close()
            return admin
        except OperationalError as exc:
            admin.dispose()
            error = error or exc
    missing("postgres", f"no PostgreSQL at {base.render_as_string()}: {error}")


@contextlib.contextmanager
def postgres_database(name: str) -> Iterator[str]:
    """A new, empty database `name` on the machine's PostgreSQL for the block.

    Without PostgreSQL the test fails, or skips where the run opted out of `postgres` (tests/parts.py).
    """
    base = make_url(os.environ.get("PAIRLOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    admin = _admin_engine(base)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
