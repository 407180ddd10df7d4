"""`pairloop gateway`, `pairloop vllm` and `pairloop adapter-sync`: the processes of a deployment across hosts.

`pairloop up` runs every part on one machine. Across machines each host runs one of these (docs/DEPLOY.md):
gateways (`pairloop gateway`, as many as needed), vLLM hosts (`pairloop vllm` with `pairloop adapter-sync`
beside it), feedback workers (`pairloop worker`), one training worker (`pairloop worker --training`) and
one `pairloop cron`. `pairloop health` is the containers' health check (the image has no curl).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from deploy.cli.options import explain, fail, setup_logging
from deploy.local.settings import LocalSettings
from serving.settings import is_loopback


def register(app: typer.Typer) -> None:
    app.command()(gateway)
    app.command()(vllm)
    app.command("adapter-sync")(adapter_sync)
    app.command()(health)


def _serving_settings(**overrides: object) -> LocalSettings:
    try:
        return LocalSettings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        raise typer.BadParameter(explain(exc)) from None


def gateway(
    port: Annotated[int | None, typer.Option(help="Gateway port (env PAIRLOOP_PORT; default 8000).")] = None,
    host: Annotated[str | None, typer.Option(help="Gateway address (env PAIRLOOP_HOST; default 127.0.0.1).")] = None,
) -> None:
    """Run one gateway over running vLLM servers (PAIRLOOP_VLLM_URLS), a shared Redis (PAIRLOOP_REDIS_URL,
    with PAIRLOOP_SECRET) and the preference store (PAIRLOOP_DATABASE_URL); run as many as needed."""
    from deploy.local import stack

    setup_logging()
    settings = _serving_settings(port=port, host=host)
    missing = [
        name
        for name, value in (
            ("PAIRLOOP_VLLM_URLS", settings.vllm_urls),
            ("PAIRLOOP_REDIS_URL", settings.redis_url),
            ("PAIRLOOP_DATABASE_URL", settings.database_url),
        )
        if not value
    ]
    if missing:
        fail(
            f"pairloop gateway shares its state with the other gateways: set {', '.join(missing)} "
            "(or run everything on one machine with `pairloop up`)"
        )
    stack.run(settings, workers=0, training=False)


def vllm(
    host: Annotated[str, typer.Option(help="Address vLLM listens on: a private address the gateways reach.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port vLLM listens on.")] = 8001,
    adapter_dir: Annotated[
        list[Path] | None,
        typer.Option(
            help="Directory vLLM may load adapters from: the one its `pairloop adapter-sync` fills (repeat for "
            "more; default: the data dir's adapters/). A load naming any other path is refused."
        ),
    ] = None,
) -> None:
    """Run the vLLM server of one vLLM host (model: PAIRLOOP_MODEL, or the embedded tiny model built into the
    data dir), restarted if it dies. Beside it, run `pairloop adapter-sync`. Only the routes the gateways and the
    trainer use answer, all but /health with the key (PAIRLOOP_VLLM_API_KEY), which an address other than
    loopback requires."""
    from deploy.local.engine import EngineProcess, engine_config
    from deploy.local.models import ModelUnavailable
    from deploy.local.stack import ENGINE_GIVE_UP_AFTER, resolve_model

    setup_logging()
    settings = _serving_settings()
    if not is_loopback(host) and not settings.vllm_key():
        fail(
            f"pairloop vllm --host {host}: other machines could reach vLLM, so it needs a key; set "
            "PAIRLOOP_VLLM_API_KEY (the gateways and the trainer send the same one)"
        )
    try:
        model, name = resolve_model(settings)
    except ModelUnavailable as exc:
        fail(f"pairloop vllm: {exc.message}")
    stop = threading.Event()
    gave_up: list[int] = []

    def give_up(code: int) -> None:
        gave_up.append(code)
        stop.set()

    engine = EngineProcess(
        engine_config(
            settings,
            model,
            name,
            host=host,
            port=port,
            adapter_dirs=adapter_dir or None,
            echo=lambda line: typer.echo(f"[vllm] {line}", err=True),
        ),
        give_up_after=ENGINE_GIVE_UP_AFTER,
        on_give_up=give_up,
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    engine.start()
    try:
        stop.wait()
    finally:
        engine.stop(settings.shutdown_timeout_s)
    if gave_up:
        fail(f"pairloop vllm: vLLM exited with status {gave_up[0]} at each of its last {ENGINE_GIVE_UP_AFTER} starts")


def adapter_sync(
    vllm_url: Annotated[
        str, typer.Option(help="The vLLM server this sidecar sits beside, as the gateways address it.")
    ],
    directory: Annotated[
        Path, typer.Option("--dir", help="Directory on this host that the vLLM server loads adapters from.")
    ],
    interval_s: Annotated[float, typer.Option(min=0.05, help="Seconds between passes.")] = 0.5,
) -> None:
    """Keep DIR holding the adapters that are or may be served, copied from the adapter store
    (PAIRLOOP_ADAPTER_STORE_URL) with every hash checked, and report them in Redis (PAIRLOOP_REDIS_URL)."""
    from serving.adapters.sync import AdapterSync
    from serving.errors import AdapterError
    from serving.redis_client import connect
    from serving.settings import PairloopSettings

    setup_logging()
    try:
        settings = PairloopSettings()
    except ValidationError as exc:
        raise typer.BadParameter(explain(exc)) from None
    if not settings.redis_url or not settings.adapter_store_url:
        fail("pairloop adapter-sync needs PAIRLOOP_REDIS_URL and PAIRLOOP_ADAPTER_STORE_URL")
    try:
        store = settings.adapter_store()
    except AdapterError as exc:
        fail(exc.message)
    assert store is not None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with connect(str(settings.redis_url)) as redis:
            await AdapterSync(redis, store, vllm_url, directory, interval_s=interval_s).run(stop)

    asyncio.run(main())


def health(
    url: Annotated[
        str | None,
        typer.Argument(help="URL to probe; default: this host's gateway, http://127.0.0.1:$PAIRLOOP_PORT/healthz."),
    ] = None,
    timeout_s: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the answer.")] = 5.0,
) -> None:
    """Exit 0 when URL answers 200, 1 otherwise (a container's health check: docs/DEPLOY.md)."""
    import httpx

    target = url or f"http://127.0.0.1:{os.environ.get('PAIRLOOP_PORT', '8000')}/healthz"
    try:
        status = httpx.get(target, timeout=timeout_s).status_code
    except httpx.HTTPError as exc:
        fail(f"{target}: {exc!r}")
    if status != 200:
        fail(f"{target}: HTTP {status}")
