"""`pairloop queue`, `pairloop db` and `pairloop export`: the feedback queue and the preference store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deploy.cli.options import DataDir, fail, redis_url, store_engine, worker_settings

queue_app = typer.Typer(help="The feedback queue (RQ): counts and failed jobs.", no_args_is_help=True)
db_app = typer.Typer(help="The preference store's schema (Alembic).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(queue_app, name="queue")
    app.add_typer(db_app, name="db")
    app.command()(export)


@queue_app.command("status")
def queue_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Queued, started, scheduled (waiting to retry) and failed jobs, and live workers."""
    import json

    import redis

    from feedback.queue import status
    from serving import redis_client

    settings = worker_settings(data_dir)
    url = redis_url(settings)
    try:
        counts = status(redis_client.connect_sync(url), settings).as_dict()
    except redis.RedisError as exc:
        fail(f"cannot read the queue: {exc}")
    if as_json:
        typer.echo(json.dumps(counts))
    else:
        typer.echo("  ".join(f"{k}: {v}" for k, v in counts.items()))


@queue_app.command("retry-failed")
def queue_retry_failed(
    data_dir: DataDir = None,
) -> None:
    """Requeue every failed job (safe: storing an event twice stores it once)."""
    import redis

    from feedback.queue import retry_failed
    from serving import redis_client

    settings = worker_settings(data_dir)
    url = redis_url(settings)
    try:
        count = retry_failed(redis_client.connect_sync(url), settings)
    except redis.RedisError as exc:
        fail(f"cannot reach the queue: {exc}")
    typer.echo(f"requeued {count} failed jobs")


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDir = None,
) -> None:
    """Create or migrate the preference store (env PAIRLOOP_DATABASE_URL; default SQLite in the data dir)."""
    from sqlalchemy.exc import SQLAlchemyError

    from deploy.migrations import current, upgrade

    url = worker_settings(data_dir).store_url()
    try:
        upgrade(url)
        typer.echo(f"store at revision {current(url)}")
    except SQLAlchemyError as exc:
        fail(f"cannot migrate the preference store: {exc}")


def export(
    kind: Annotated[str, typer.Option(help="dpo: prompt/chosen/rejected; kto: prompt/completion/label.")],
    out: Annotated[Path, typer.Option(help="File to write (replaced atomically).")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or parquet.")] = "jsonl",
    since: Annotated[
        str | None, typer.Option(help="Only feedback received at or after this ISO 8601 time (UTC if no zone).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Write TRL-ready training data from the preference store, and say what was skipped."""
    import datetime as dt
    import json

    from sqlalchemy.orm import Session

    from feedback.export import export as run_export

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
    with store_engine(worker_settings(data_dir).store_url()) as engine, Session(engine) as session:
        report = run_export(session, kind, out, fmt, start)  # type: ignore[arg-type]
    typer.echo(json.dumps({"out": str(out), **report.as_dict()}))
