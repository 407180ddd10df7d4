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

from deploy.cli.options import (
    DataDir,
    fail,
    redis_url,
    setup_logging,
    store_engine,
    trainer_settings,
    worker_settings,
)

if TYPE_CHECKING:
    from trainer.promotion import Promotions

T = TypeVar("T")

adapters_app = typer.Typer(help="Versioned LoRA adapters: list, promote, roll back.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(cron)
    app.add_typer(adapters_app, name="adapters")


def _with_promotions(data_dir: Path | None, action: Callable[[Promotions], Awaitable[T]]) -> T:
    from redis.exceptions import RedisError

    from serving.errors import AdapterError
    from trainer.promotion import remote_promotions

    url = redis_url(worker_settings(data_dir))
    settings = trainer_settings(data_dir)

    with store_engine(settings.store_url()) as engine:

        async def run() -> T:
            async with remote_promotions(url, engine, settings.vllm_key()) as promotions:
                return await action(promotions)

        try:
            return asyncio.run(run())
        except AdapterError as exc:
            fail(exc.message)
        except RedisError as exc:
            fail(f"cannot reach Redis: {exc}")


def train(
    now: Annotated[bool, typer.Option("--now", help="Run the round in this process and wait for it.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Start a training round by hand: queued for the training worker, or with --now run here."""
    import redis

    from serving import redis_client
    from trainer import loop
    from trainer.errors import RoundBusy
    from trainer.queue import enqueue_round

    settings = trainer_settings(data_dir)
    url = redis_url(worker_settings(data_dir))
    loop.configure(url)
    try:
        if now:
            setup_logging()
            typer.echo(json.dumps(loop.train_round("manual"), default=str))
        else:
            job = enqueue_round(redis_client.connect_sync(url), settings, "manual")
            typer.echo(json.dumps({"job": job.id, "queue": settings.training_queue}))
    except RoundBusy as exc:
        fail(exc.message)
    except redis.RedisError as exc:
        fail(f"cannot reach Redis: {exc}")


def cron(data_dir: DataDir = None) -> None:
    """Run RQ's cron scheduler: every `check_interval_s`, judge the challenger and start a round if due."""
    from workers.cron import run_cron

    setup_logging()
    run_cron(redis_url(worker_settings(data_dir)), trainer_settings(data_dir))


def _age(seconds: int) -> str:
    return str(dt.timedelta(seconds=seconds))


@adapters_app.command("list")
def adapters_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False, data_dir: DataDir = None
) -> None:
    """Every adapter version: status (champion, challenger, candidate, rejected, retired), figures, age; the
    challenger's live A/B record with the statistic that decides; and the backlog of examples waiting for a round."""
    from sqlalchemy.orm import Session

    from trainer import registry
    from trainer.ab import live_record
    from trainer.data import backlog

    settings = trainer_settings(data_dir)

    async def collect(promotions: Promotions) -> dict[str, Any]:
        routing = await promotions.routing()
        with Session(promotions.store) as session:
            items = [a.as_dict() for a in registry.listing(session)]
            waiting = backlog(session, settings)
            ab = None
            if routing.challenger:
                ab = live_record(
                    session,
                    routing.challenger,
                    min_votes=settings.ab_min_votes,
                    alpha=settings.ab_alpha,
                    max_votes=settings.ab_max_votes,
                    confidence=settings.ab_confidence,
                )
        return {
            "champion": routing.champion,
            "challenger": routing.challenger,
            "ab": ab,
            "backlog": waiting,
            "adapters": items,
        }

    out = _with_promotions(data_dir, collect)
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"champion: {out['champion'] or '(base model)'}   challenger: {out['challenger'] or '-'}")
    b = out["backlog"]
    typer.echo(
        f"backlog: {b['examples']} {b['method']} examples wait for a round (one starts at {b['round_starts_at']} "
        f"and takes at most {b['round_takes_at_most']} rows)"
    )
    if (ab := out["ab"]) is not None:
        typer.echo(
            f"live A/B: {ab['wins']} wins, {ab['losses']} losses; {ab['statistic']}: {ab['evidence']:.3g} for, "
            f"{ab['evidence_worse']:.3g} against; promotes at >= {ab['threshold']:.3g} (1/alpha) after "
            f"{ab['min_votes']} votes, now: {ab['decision']}"
        )
    for a in out["adapters"]:
        gate = (a["metrics"] or {}).get("gate", {}).get("candidate", {})
        figures = f"acc {gate.get('accuracy', 0):.2f} margin {gate.get('margin', 0):+.3f}" if gate else ""
        typer.echo(f"{a['name']:<22} {a['status']:<10} {figures:<26} age {_age(a['age_s'])}  {a['reason'] or ''}")


@adapters_app.command("promote")
def adapters_promote(
    name: Annotated[str, typer.Argument(help="Adapter name, e.g. pl-v0003-1a2b3c4d.")], data_dir: DataDir = None
) -> None:
    """Load NAME into every vLLM backend, probe it, then make it the champion."""
    result = _with_promotions(data_dir, lambda p: p.promote(name))
    typer.echo(
        json.dumps(
            {"champion": result.after.champion, "previous": result.before.champion, "load_s": round(result.load_s, 3)}
        )
    )


@adapters_app.command("rollback")
def adapters_rollback(data_dir: DataDir = None) -> None:
    """Put the previous champion back (it is usually still loaded: well under a second)."""
    result = _with_promotions(data_dir, lambda p: p.rollback())
    typer.echo(
        json.dumps(
            {
                "champion": result.after.champion,
                "rolled_back": result.before.champion,
                "load_s": round(result.load_s, 3),
            }
        )
    )


@adapters_app.command("leaderboard")
def adapters_leaderboard(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    bootstrap: Annotated[int, typer.Option(min=0, max=2000, help="Bootstrap refits for the intervals.")] = 200,
    data_dir: DataDir = None,
) -> None:
    """Every variant that ever served (the base and each adapter), ranked by a Bradley-Terry fit on all pairwise
    votes between two of them, with 95% bootstrap intervals (Elo scale, the base at 1000)."""
    from sqlalchemy.orm import Session

    from trainer import leaderboard

    with store_engine(trainer_settings(data_dir).store_url()) as engine, Session(engine) as session:
        board = leaderboard.from_store(session, bootstrap=bootstrap)
    if as_json:
        typer.echo(json.dumps(board))
        return
    if not board["variants"]:
        typer.echo("no pairwise votes between two different variants yet")
        return
    typer.echo(f"{board['model']}; {board['scale']}; {board['votes']} votes")
    typer.echo(f"first-position effect: the answer shown first wins {board['position_effect']:.1%} of even matches")
    typer.echo(f"{'rank':>4}  {'variant':<24} {'rating':>7}  {'95% interval':<16} {'votes':>6}  wins-losses-ties")
    for v in board["variants"]:
        interval = f"[{v['lower']:.0f}, {v['upper']:.0f}]"
        record = f"{v['wins']:g}-{v['losses']:g}-{v['ties']}"
        typer.echo(f"{v['rank']:>4}  {v['name']:<24} {v['rating']:>7.0f}  {interval:<16} {v['votes']:>6}  {record}")
