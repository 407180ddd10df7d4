"""The `pairloop` command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from pydantic import ValidationError

if TYPE_CHECKING:
    from workers.settings import WorkerSettings

app = typer.Typer(
    help="pairloop: two answers per chat request, preferences in, better adapters out.",
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(help="The embedded default base model.", no_args_is_help=True)
app.add_typer(model_app, name="model")
queue_app = typer.Typer(help="The feedback queue (RQ): counts and failed jobs.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")
db_app = typer.Typer(help="The preference store's schema (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="Gateway port (env PAIRLOOP_PORT; default 8000).")] = None,
    host: Annotated[str | None, typer.Option(help="Gateway address (env PAIRLOOP_HOST; default 127.0.0.1).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (env PAIRLOOP_DATA_DIR).")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="HF model id or local path (env PAIRLOOP_MODEL); default: the embedded tiny model."),
    ] = None,
    workers: Annotated[int, typer.Option(min=0, help="Feedback workers to run as children (0: none).")] = 1,
    training: Annotated[
        bool, typer.Option(help="Run the learning loop (a training worker and the cron check).")
    ] = True,
) -> None:
    """Run the embedded Redis, vLLM, the gateway, a feedback worker and the learning loop in the foreground;
    Ctrl-C stops them all."""
    from deploy import stack
    from serving.settings import ServingSettings

    _logging()
    overrides = {
        k: v for k, v in {"port": port, "host": host, "data_dir": data_dir, "model": model}.items() if v is not None
    }
    try:
        settings = ServingSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise typer.BadParameter(_explain(exc)) from None
    stack.run(settings, workers=workers, training=training)


@model_app.command("build-tiny")
def build_tiny(
    out: Annotated[Path | None, typer.Option(help="Output directory; default: the cache in the data dir.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of corpus, weights and batches.")] = 0,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (env PAIRLOOP_DATA_DIR).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a build is cached.")] = False,
) -> None:
    """Build the embedded default chat model (tokenizer + small Llama) from a generated corpus, offline."""
    from serving.settings import default_data_dir
    from trainer.tiny.build import TinyModelConfig, build, default_model_dir, is_built

    _logging()
    config = TinyModelConfig(seed=seed)
    target = out or default_model_dir(data_dir or _env_data_dir() or default_data_dir(), config)
    if is_built(target) and not force:
        typer.echo(f"{target} (cached)")
        return
    info = build(target, config)
    typer.echo(f"{target} ({info['build_seconds']} s, final loss {info['final_loss']:.3f})")


def _worker_settings(data_dir: Path | None = None) -> WorkerSettings:
    from workers.settings import WorkerSettings

    try:
        return WorkerSettings(data_dir=data_dir) if data_dir else WorkerSettings()
    except ValidationError as exc:
        raise typer.BadParameter(_explain(exc)) from None


def _redis_url(settings: WorkerSettings) -> str:
    from deploy.stack import running_redis_url

    url = settings.redis_url or running_redis_url(settings.data_dir)
    if not url:
        typer.echo(
            f"No PAIRLOOP_REDIS_URL, and no `pairloop up` is running with data dir {settings.data_dir}.", err=True
        )
        raise typer.Exit(2)
    return url


@app.command()
def worker(
    burst: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
    name: Annotated[str | None, typer.Option(help="Worker name in RQ (default: random).")] = None,
    training: Annotated[bool, typer.Option(help="Run training rounds instead of storing feedback.")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (env PAIRLOOP_DATA_DIR).")] = None,
) -> None:
    """Run one RQ worker that stores queued feedback events (env PAIRLOOP_REDIS_URL, PAIRLOOP_DATABASE_URL);
    with --training, one that runs the learning loop's periodic checks and training rounds."""
    from sqlalchemy.exc import SQLAlchemyError

    from workers.runner import run

    _logging()
    settings = _worker_settings(data_dir)
    try:
        run(_redis_url(settings), settings, burst=burst, name=name, training=training)
    except SQLAlchemyError as exc:
        _fail(f"cannot open the preference store: {exc}")


@queue_app.command("status")
def queue_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (env PAIRLOOP_DATA_DIR).")] = None,
) -> None:
    """Queued, started, scheduled (waiting to retry) and failed jobs, and live workers."""
    import json

    import redis

    from workers.queue import status

    settings = _worker_settings(data_dir)
    url = _redis_url(settings)
    try:
        counts = status(redis.Redis.from_url(url, socket_connect_timeout=5), settings).as_dict()
    except redis.RedisError as exc:
        _fail(f"cannot read the queue: {exc}")
    if as_json:
        typer.echo(json.dumps(counts))
    else:
        typer.echo("  ".join(f"{k}: {v}" for k, v in counts.items()))


@queue_app.command("retry-failed")
def queue_retry_failed(
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (env PAIRLOOP_DATA_DIR).")] = None,
) -> None:
    """Requeue every failed job (safe: storing an event twice stores it once)."""
    import redis

    from workers.queue import retry_failed

    settings = _worker_settings(data_dir)
    url = _redis_url(settings)
    try:
        count = retry_failed(redis.Redis.from_url(url, socket_connect_timeout=5), settings)
    except redis.RedisError as exc:
        _fail(f"cannot reach the queue: {exc}")
    typer.echo(f"requeued {count} failed jobs")


@db_app.command("upgrade")
def db_upgrade(
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (env PAIRLOOP_DATA_DIR).")] = None,
) -> None:
    """Create or migrate the preference store (env PAIRLOOP_DATABASE_URL; default SQLite in the data dir)."""
    from sqlalchemy.exc import SQLAlchemyError

    from feedback.migrate import current, upgrade

    url = _worker_settings(data_dir).store_url()
    try:
        upgrade(url)
        typer.echo(f"store at revision {current(url)}")
    except SQLAlchemyError as exc:
        _fail(f"cannot migrate the preference store: {exc}")


@app.command()
def export(
    kind: Annotated[str, typer.Option(help="dpo: prompt/chosen/rejected; kto: prompt/completion/label.")],
    out: Annotated[Path, typer.Option(help="File to write (replaced atomically).")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or parquet.")] = "jsonl",
    since: Annotated[
        str | None, typer.Option(help="Only feedback received at or after this ISO 8601 time (UTC if no zone).")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory (env PAIRLOOP_DATA_DIR).")] = None,
) -> None:
    """Write TRL-ready training data from the preference store, and say what was skipped."""
    import datetime as dt
    import json

    from sqlalchemy.orm import Session

    from feedback.export import export as run_export
    from feedback.store import make_engine

    if kind not in ("dpo", "kto"):
        raise typer.BadParameter("--kind must be dpo or kto")
    if fmt not in ("jsonl", "parquet"):
        raise typer.BadParameter("--format must be jsonl or parquet")
    start = None
    if since:
        try:
            start = dt.datetime.fromisoformat(since)
        except ValueError:
            raise typer.BadParameter(f"--since: not an ISO 8601 time: {since!r}") from None
        if start.tzinfo is None:
            start = start.replace(tzinfo=dt.UTC)
    from sqlalchemy.exc import SQLAlchemyError

    engine = make_engine(_worker_settings(data_dir).store_url())
    try:
        with Session(engine) as session:
            report = run_export(session, kind, out, fmt, start)  # type: ignore[arg-type]
    except SQLAlchemyError as exc:
        _fail(f"cannot read the preference store ({type(exc).__name__}); is it migrated (`pairloop db upgrade`)?")
    finally:
        engine.dispose()
    typer.echo(json.dumps({"out": str(out), **report.as_dict()}))


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(1)


def _env_data_dir() -> Path | None:
    import os

    value = os.environ.get("PAIRLOOP_DATA_DIR")
    return Path(value) if value else None


def _explain(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())


# registers `train`, `cron`, `adapters` and `simulate`
from deploy import loop_cli, simulate_cli  # noqa: E402,F401
