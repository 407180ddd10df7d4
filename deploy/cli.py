"""The `pairloop` command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

app = typer.Typer(
    help="pairloop: two answers per chat request, preferences in, better adapters out.",
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(help="The embedded default base model.", no_args_is_help=True)
app.add_typer(model_app, name="model")


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
) -> None:
    """Run the embedded Redis, vLLM and the gateway in the foreground; Ctrl-C stops them all."""
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
    stack.run(settings)


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


def _env_data_dir() -> Path | None:
    import os

    value = os.environ.get("PAIRLOOP_DATA_DIR")
    return Path(value) if value else None


def _explain(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
