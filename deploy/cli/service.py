"""`pairloop up`, `pairloop worker` and `pairloop model`: the processes of a deployment."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from deploy.cli.options import DataDir, env_data_dir, explain, fail, redis_url, setup_logging, worker_settings

model_app = typer.Typer(help="The embedded default base model.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(worker)
    app.add_typer(model_app, name="model")


def up(
    port: Annotated[int | None, typer.Option(help="Gateway port (env PAIRLOOP_PORT; default 8000).")] = None,
    host: Annotated[str | None, typer.Option(help="Gateway address (env PAIRLOOP_HOST; default 127.0.0.1).")] = None,
    data_dir: DataDir = None,
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
    from deploy.local import stack
    from deploy.local.models import ModelUnavailable
    from deploy.local.settings import LocalSettings

    setup_logging()
    overrides = {
        k: v for k, v in {"port": port, "host": host, "data_dir": data_dir, "model": model}.items() if v is not None
    }
    try:
        settings = LocalSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise typer.BadParameter(explain(exc)) from None
    try:
        stack.run(settings, workers=workers, training=training)
    except ModelUnavailable as exc:
        typer.echo(f"pairloop up: {exc.message}", err=True)
        # Everything it started is stopped; skip the interpreter's teardown, where libraries the engine check
        # imported print pages of leak warnings after this line (nanobind, in Triton).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


@model_app.command("build-tiny")
def build_tiny(
    out: Annotated[Path | None, typer.Option(help="Output directory; default: the cache in the data dir.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of corpus, weights and batches.")] = 0,
    data_dir: DataDir = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a build is cached.")] = False,
) -> None:
    """Build the embedded default chat model (tokenizer + small Llama) from a generated corpus, offline."""
    from serving.settings import default_data_dir
    from trainer.tiny.build import TinyModelConfig, build, default_model_dir, is_built

    setup_logging()
    config = TinyModelConfig(seed=seed)
    target = out or default_model_dir(data_dir or env_data_dir() or default_data_dir(), config)
    if is_built(target) and not force:
        typer.echo(f"{target} (cached)")
        return
    info = build(target, config)
    typer.echo(f"{target} ({info['build_seconds']} s, final loss {info['final_loss']:.3f})")


def worker(
    burst: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
    name: Annotated[str | None, typer.Option(help="Worker name in RQ (default: random).")] = None,
    training: Annotated[bool, typer.Option(help="Run training rounds instead of storing feedback.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Migrate the store, then run one RQ worker that stores queued feedback events (env PAIRLOOP_REDIS_URL,
    PAIRLOOP_DATABASE_URL); with --training, one that runs the learning loop's periodic checks and training rounds."""
    from sqlalchemy.exc import SQLAlchemyError

    from deploy.local.secrets import secure_data_dir
    from deploy.migrations import upgrade
    from workers.runner import run

    setup_logging()
    settings = worker_settings(data_dir)
    secure_data_dir(settings.data_dir)
    try:
        upgrade(settings.store_url())  # a worker may start before anything else made the store
        run(redis_url(settings), settings, burst=burst, name=name, training=training)
    except SQLAlchemyError as exc:
        fail(f"cannot open the preference store: {exc}")
