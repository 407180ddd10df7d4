"""What the `pairloop` commands share: logging, the data dir option, settings from the environment with
readable errors, the Redis to talk to, and a one-line failure."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from trainer.settings import TrainerSettings
    from workers.settings import WorkerSettings

DataDir = Annotated[Path | None, typer.Option(help="Data directory (env PAIRLOOP_DATA_DIR).")]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise


def fail(message: str) -> NoReturn:
    """Print `message` to stderr and exit with status 1 (no traceback)."""
    typer.echo(message, err=True)
    raise typer.Exit(1)


def env_data_dir() -> Path | None:
    value = os.environ.get("PAIRLOOP_DATA_DIR")
    return Path(value) if value else None


def explain(exc: ValidationError) -> str:
    """A settings error as one line: `field: what is wrong; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())


def worker_settings(data_dir: Path | None = None) -> WorkerSettings:
    from workers.settings import WorkerSettings

    try:
        return WorkerSettings(data_dir=data_dir) if data_dir else WorkerSettings()
    except ValidationError as exc:
        raise typer.BadParameter(explain(exc)) from None


def trainer_settings(data_dir: Path | None) -> TrainerSettings:
    from trainer.settings import TrainerSettings

    try:
        return TrainerSettings(data_dir=data_dir) if data_dir else TrainerSettings()
    except (ValidationError, ValueError) as exc:
        raise typer.BadParameter(explain(exc) if isinstance(exc, ValidationError) else str(exc)) from None


def redis_url(settings: WorkerSettings) -> str:
    """PAIRLOOP_REDIS_URL, or the embedded Redis of a `pairloop up` running on the same data dir."""
    from deploy.local.stack import running_redis_url

    url = settings.redis_url or running_redis_url(settings.data_dir)
    if not url:
        typer.echo(
            f"No PAIRLOOP_REDIS_URL, and no `pairloop up` is running with data dir {settings.data_dir}.", err=True
        )
        raise typer.Exit(2)
    return url


@contextlib.contextmanager
def store_engine(url: str) -> Iterator[Engine]:
    """An engine on the preference store for the block, disposed after it; a store that cannot be read ends the
    command with one line (no traceback)."""
    from sqlalchemy.exc import SQLAlchemyError

    from feedback.store import make_engine

    engine = make_engine(url)
    try:
        yield engine
    except SQLAlchemyError as exc:
        fail(f"cannot read the preference store ({type(exc).__name__}); is it migrated (`pairloop db upgrade`)?")
    finally:
        engine.dispose()
