"""`pairloop train`, `pairloop cron` and `pairloop adapters`: the learning loop from the command line.

They reach Redis (PAIRLOOP_REDIS_URL, or the embedded one of a running `pairloop up`), the preference
store, and for swaps the vLLM servers that the running gateways registered in Redis.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from deploy.cli import _explain, _fail, _logging, _redis_url, _worker_settings, app

if TYPE_CHECKING:
    from trainer.settings import TrainerSettings
    from workers.promotion import Loop

T = TypeVar("T")

adapters_app = typer.Typer(help="Versioned LoRA adapters: list, promote, roll back.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

DataDir = Annotated[Path | None, typer.Option(help="Data directory (env PAIRLOOP_DATA_DIR).")]


def _trainer_settings(data_dir: Path | None) -> TrainerSettings:
    from trainer.settings import TrainerSettings

    try:
        return TrainerSettings(data_dir=data_dir) if data_dir else TrainerSettings()
    except (ValidationError, ValueError) as exc:
        raise typer.BadParameter(_explain(exc) if isinstance(exc, ValidationError) else str(exc)) from None


def _with_loop(data_dir: Path | None, action: Callable[[Loop], Awaitable[T]]) -> T:
    from redis.exceptions import RedisError
    from sqlalchemy.exc import SQLAlchemyError

    from feedback.store import make_engine
    from serving.adapters import AdapterError
    from workers.promotion import remote_loop

    url = _redis_url(_worker_settings(data_dir))
    engine = make_engine(_trainer_settings(data_dir).store_url())

    async def run() -> T:
        async with remote_loop(url, engine) as loop:
            return await action(loop)

    try:
        return asyncio.run(run())
    except AdapterError as exc:
        _fail(exc.message)
    except RedisError as exc:
        _fail(f"cannot reach Redis: {exc}")
    except SQLAlchemyError as exc:
        _fail(f"cannot read the preference store ({type(exc).__name__}); is it migrated (`pairloop db upgrade`)?")
    finally:
        engine.dispose()


@app.command()
def train(
    now: Annotated[bool, typer.Option("--now", help="Run the round in this process and wait for it.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Start a training round by hand: queued for the training worker, or with --now run here."""
    import redis

    from trainer.errors import RoundBusy
    from workers import training

    settings = _trainer_settings(data_dir)
    url = _redis_url(_worker_settings(data_dir))
    training.configure(url)
    try:
        if now:
            _logging()
            typer.echo(json.dumps(training.train_round("manual"), default=str))
        else:
            job = training.enqueue_round(redis.Redis.from_url(url, socket_connect_timeout=5), settings, "manual")
            typer.echo(json.dumps({"job": job.id, "queue": settings.training_queue}))
    except RoundBusy as exc:
        _fail(exc.message)
    except redis.RedisError as exc:
        _fail(f"cannot reach Redis: {exc}")


@app.command()
def cron(data_dir: DataDir = None) -> None:
    """Run RQ's cron scheduler: every `check_interval_s`, judge the challenger and start a round if due."""
    from workers.training import run_cron

    _logging()
    run_cron(_redis_url(_worker_settings(data_dir)), _trainer_settings(data_dir))


def _age(seconds: int) -> str:
    return str(dt.timedelta(seconds=seconds))


@adapters_app.command("list")
def adapters_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False, data_dir: DataDir = None
) -> None:
    """Every adapter version: status (champion, challenger, candidate, rejected, retired), figures, age."""
    from sqlalchemy.orm import Session

    from trainer import registry

    async def collect(loop: Loop) -> dict[str, Any]:
        routing = await loop.routing()
        with Session(loop.store) as session:
            items = [a.as_dict() for a in registry.listing(session)]
        return {"champion": routing.champion, "challenger": routing.challenger, "adapters": items}

    out = _with_loop(data_dir, collect)
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"champion: {out['champion'] or '(base model)'}   challenger: {out['challenger'] or '-'}")
    for a in out["adapters"]:
        gate = (a["metrics"] or {}).get("gate", {}).get("candidate", {})
        figures = f"acc {gate.get('accuracy', 0):.2f} margin {gate.get('margin', 0):+.3f}" if gate else ""
        typer.echo(f"{a['name']:<22} {a['status']:<10} {figures:<26} age {_age(a['age_s'])}  {a['reason'] or ''}")


@adapters_app.command("promote")
def adapters_promote(
    name: Annotated[str, typer.Argument(help="Adapter name, e.g. pl-v0003-1a2b3c4d.")], data_dir: DataDir = None
) -> None:
    """Load NAME into every vLLM backend, probe it, then make it the champion."""
    result = _with_loop(data_dir, lambda loop: loop.promote(name))
    typer.echo(
        json.dumps(
            {"champion": result.after.champion, "previous": result.before.champion, "load_s": round(result.load_s, 3)}
        )
    )


@adapters_app.command("rollback")
def adapters_rollback(data_dir: DataDir = None) -> None:
    """Put the previous champion back (it is usually still loaded: well under a second)."""
    result = _with_loop(data_dir, lambda loop: loop.rollback())
    typer.echo(
        json.dumps(
            {
                "champion": result.after.champion,
                "rolled_back": result.before.champion,
                "load_s": round(result.load_s, 3),
            }
        )
    )
