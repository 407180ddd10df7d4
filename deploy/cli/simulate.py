"""`pairloop simulate`: proof that the loop learns what its users prefer (see deploy/simulate/run.py)."""

from __future__ import annotations

import enum
import importlib.util
import time
from pathlib import Path
from typing import Annotated

import typer

from deploy.cli.options import DataDir, env_data_dir, fail


class Prefer(enum.StrEnum):
    polite = "polite"
    shorter = "shorter"
    longer = "longer"
    word = "word"
    all = "all"


def register(app: typer.Typer) -> None:
    app.command()(simulate)


def simulate(
    prefer: Annotated[
        list[Prefer],
        typer.Option(help="What the simulated users prefer; repeat it, or `all` for each in turn."),
    ] = [Prefer.polite],  # noqa: B006  (typer reads the default)
    word: Annotated[str, typer.Option(help="The word that `--prefer word` users look for.")] = "indeed",
    rounds: Annotated[int, typer.Option(min=1, max=50, help="Training rounds per preference.")] = 5,
    examples_per_round: Annotated[
        int, typer.Option(min=8, help="Usable new votes that start a round (the cron check's threshold).")
    ] = 64,
    eval_prompts: Annotated[int, typer.Option(min=4, max=80, help="Held-out prompts for each measurement.")] = 80,
    users: Annotated[int, typer.Option(min=10, help="Simulated users (no user may give over 10% of a round).")] = 16,
    max_tokens: Annotated[int, typer.Option(min=8, max=256, help="max_tokens of every request.")] = 96,
    learning_rate: Annotated[
        float, typer.Option(min=1e-6, max=1e-1, help="The rounds' learning rate (PAIRLOOP_TRAIN__LEARNING_RATE).")
    ] = 2e-3,
    epochs: Annotated[float, typer.Option(min=0.5, max=20, help="Epochs per round (PAIRLOOP_TRAIN__EPOCHS).")] = 3.0,
    sft_weight: Annotated[
        float, typer.Option(min=0, help="NLL weight on chosen answers in the DPO loss (PAIRLOOP_TRAIN__SFT_WEIGHT).")
    ] = 1.0,
    target: Annotated[
        float,
        typer.Option(min=0, max=1, help="Stop once the win rate against the base reaches it; 1: run every round."),
    ] = 0.75,
    ab_fraction: Annotated[
        float, typer.Option(min=0, max=1, help="Share of pairs in the live A/B test; 0: the gate alone promotes.")
    ] = 0.5,
    time_limit: Annotated[float, typer.Option(min=10, help="Seconds per preference before it stops.")] = 900,
    out: Annotated[
        Path | None, typer.Option(help="Results folder; default: simulations/<time> in the data dir.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Drive a running service instead of starting one (it sees other votes too).")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="With --url: a key with scopes chat, feedback, admin.")] = None,
    data_dir: DataDir = None,
    seed: Annotated[int, typer.Option(help="Seed of prompts, users and training.")] = 0,
) -> None:
    """Simulated users vote by a declared preference through the public API; the loop trains, gates, A/B tests
    and swaps as in production. Prints per round the champion's rate of the preferred property and its win rate
    against the base model on held-out prompts; writes results.json/.csv per preference and plot.png."""
    missing = [name for name in ("tqdm", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        fail(
            f"`pairloop simulate` needs {' and '.join(missing)}, which a gateway install leaves out: "
            "pip install 'pairloop[simulate]' (in a checkout: make setup)"
        )
    from deploy.simulate.preferences import KINDS, Preference
    from deploy.simulate.run import SimConfig, SimulationError, load_results, plot, run_one
    from serving.settings import default_data_dir

    if not word.isalpha() or len(word) > 32:
        raise typer.BadParameter("--word takes one word of letters (at most 32)")
    kinds = list(KINDS) if Prefer.all in prefer else list(dict.fromkeys(p.value for p in prefer))
    base = data_dir or env_data_dir() or default_data_dir()
    out = out or base / "simulations" / time.strftime("%Y%m%d-%H%M%S")
    model_dir = None
    if not url:
        from deploy.local.settings import LocalSettings
        from deploy.local.stack import resolve_model

        model_dir, _ = resolve_model(LocalSettings(data_dir=base))
    try:
        for kind in kinds:
            config = SimConfig(
                Preference(kind, word.lower()),  # type: ignore[arg-type]
                rounds=rounds,
                examples_per_round=examples_per_round,
                eval_prompts=eval_prompts,
                users=users,
                max_tokens=max_tokens,
                learning_rate=learning_rate,
                epochs=epochs,
                ab_fraction=ab_fraction,
                sft_weight=sft_weight,
                target=target if target < 1 else None,
                time_limit_s=time_limit,
                seed=seed,
            )
            run_one(config, out / kind, model_dir=model_dir, url=url, key=api_key)
    except SimulationError as exc:
        fail(str(exc))
    results = list(load_results(out))
    plot(results, out / "plot.png")
    typer.echo(f"results: {out}/<preference>/results.json and .csv; plot: {out / 'plot.png'}")
