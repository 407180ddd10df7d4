"""The store's schema: Alembic migrations of every table (feedback's and the trainer's registry), and the
calls that apply them (`pairloop db upgrade`, `pairloop up`, `pairloop worker` at start).

They live in deploy because the store holds tables of two packages (feedback/store.py, trainer/registry.py)
and only deploy may import both; `metadata()` is every table, what autogenerate compares against.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData

from feedback.store import Base, make_engine

MIGRATIONS = Path(__file__).parent


def metadata() -> MetaData:
    """Every table of the store: feedback's and the adapter registry's (importing it adds its tables)."""
    import trainer.registry  # noqa: F401

    return Base.metadata


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextlib.contextmanager
def _sqlite_lock(url: str) -> Iterator[None]:
    """Processes on this host that upgrade the same SQLite file take turns (PostgreSQL locks in env.py)."""
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        yield
        return
    db = Path(url.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".migrate.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade(url: str) -> None:
    """Apply every migration not yet applied to the database at `url` (creating a SQLite file if needed)."""
    with _sqlite_lock(url):
        command.upgrade(alembic_config(url), "head")


def current(url: str) -> str | None:
    """The revision the database is at (None: never migrated)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
