"""`pairloop up`: the embedded Redis, the vLLM engine and the gateway, in the foreground, stopped together."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from deploy.app.gateway import build_app
from deploy.local.engine import EngineProcess, engine_config
from deploy.local.redis_server import EmbeddedRedis
from deploy.local.secrets import load_or_create, write_private
from deploy.local.workers import WorkerProcess
from deploy.migrations import upgrade
from serving.settings import ALL_SCOPES, ApiKey, ServingSettings

log = logging.getLogger("pairloop")

TINY_MODEL_NAME = "pairloop-tiny"
DEV_KEY_ID = "dev"


def _redis_url_file(data_dir: Path) -> Path:
    return data_dir / "run" / "redis-url"


def running_redis_url(data_dir: Path) -> str | None:
    """The URL of the embedded Redis of a `pairloop up` running on `data_dir`, for `pairloop worker`/`queue`."""
    path = _redis_url_file(data_dir)
    return path.read_text().strip() if path.is_file() else None


def _echo(prefix: str) -> Callable[[str], None]:
    def echo(line: str) -> None:
        print(f"[{prefix}] {line}", file=sys.stderr, flush=True)

    return echo


@dataclass
class Stack:
    """What `up` started, so that it can stop exactly that."""

    settings: ServingSettings
    redis: EmbeddedRedis | None = None
    engine: EngineProcess | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    dev_key: str | None = None
    notes: list[str] = field(default_factory=list)

    def stop(self) -> None:
        # The worker first (it finishes its job), Redis last (the worker and gateway need it to the end).
        for worker in self.workers:
            worker.stop()
        if self.engine:
            self.engine.stop()
        if self.redis:
            _redis_url_file(self.settings.data_dir).unlink(missing_ok=True)
            self.redis.stop()


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after its shutdown, which would kill this process before it stops the
    children it started. Here the signals only ask the server to exit; `run` then stops the children."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def resolve_model(settings: ServingSettings) -> tuple[str, str]:
    """(model path or id, public name); builds the embedded tiny model when none is configured."""
    if settings.model:
        return settings.model, settings.served_model_name or settings.model
    from trainer.tiny.build import default_model_dir, is_built

    out = default_model_dir(settings.data_dir)
    if not is_built(out):
        log.info("building the embedded tiny model into %s (a few minutes, once)", out)
        # In a child process: the gateway should not keep torch and the training memory for its whole life.
        cmd = [sys.executable, "-m", "deploy", "model", "build-tiny", "--out", str(out)]
        if subprocess.run(cmd, check=False).returncode != 0 or not is_built(out):
            raise RuntimeError("building the tiny model failed (see the output above)")
    return str(out), settings.served_model_name or TINY_MODEL_NAME


def prepare(settings: ServingSettings, *, workers: int = 1, training: bool = True, echo_children: bool = True) -> Stack:
    """Start the children `settings` asks for and return the complete settings for the gateway."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(settings)
    update: dict[str, object] = {}
    try:
        if not settings.redis_url:
            update["secret"] = settings.secret or load_or_create(data_dir / "secrets" / "token-secret")
            stack.redis = EmbeddedRedis(
                data_dir,
                load_or_create(data_dir / "secrets" / "redis-password"),
                appendfsync=settings.redis_appendfsync,
                echo=_echo("redis") if echo_children else None,
            )
            stack.redis.start()
            update["redis_url"] = stack.redis.url
            write_private(_redis_url_file(data_dir), stack.redis.url)
            stack.notes.append(f"embedded Redis (AOF) in {stack.redis.dir}")
        store_url = settings.store_url()
        upgrade(store_url)
        stack.notes.append(f"preference store: {_safe_url(store_url)}")
        for i in range(workers):
            worker = WorkerProcess(
                str(update.get("redis_url") or settings.redis_url),
                data_dir,
                log_path=data_dir / "logs" / f"worker-{i}.log",
                echo=_echo(f"worker-{i}") if echo_children else None,
            )
            stack.workers.append(worker)
            worker.start()
        stack.notes.append(f"{workers} feedback worker(s) storing into it (more: `pairloop worker`)")
        if training:
            url = str(update.get("redis_url") or settings.redis_url)
            env = {"PAIRLOOP_MODEL": settings.model} if settings.model else {}
            for args, label in ((("worker", "--training"), "trainer"), (("cron",), "cron")):
                child = WorkerProcess(
                    url,
                    data_dir,
                    args=args,
                    env=env,
                    log_path=data_dir / "logs" / f"{label}.log",
                    echo=_echo(label) if echo_children else None,
                )
                stack.workers.append(child)
                child.start()
            stack.notes.append("learning loop: a training worker and the cron check (`pairloop adapters list`)")
        if not settings.api_keys:
            stack.dev_key = load_or_create(data_dir / "secrets" / "dev-api-key", prefix="pl-dev-")
            update["api_keys"] = [ApiKey(id=DEV_KEY_ID, key=stack.dev_key, scopes=list(ALL_SCOPES))]
            stack.notes.append("no PAIRLOOP_API_KEYS: made a development key; listening on loopback only")
        if not settings.vllm_urls:
            model, name = resolve_model(settings)
            stack.engine = EngineProcess(
                engine_config(
                    settings, model, name, port=settings.vllm_port, echo=_echo("vllm") if echo_children else None
                )
            )
            stack.engine.start()
            update["vllm_urls"] = [stack.engine.url]
            update["served_model_name"] = name
            stack.notes.append(f"vLLM serving {name} from {model} on {stack.engine.url} (private)")
    except BaseException:
        stack.stop()
        raise
    stack.settings = settings.model_copy(update=update)
    return stack


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def banner(stack: Stack) -> str:
    s = stack.settings
    root = f"http://{s.host}:{s.port}"
    lines = ["", f"pairloop is ready: {root}/v1  (model: {s.served_model_name or '?'})"]
    # The key rides in the fragment, which browsers never send: the page moves it into its settings.
    fragment = f"#key={stack.dev_key}" if stack.dev_key else ""
    lines.append(f"  arena (vote):  {root}/{fragment}")
    lines.append(f"  dashboard:     {root}/dashboard{fragment}")
    if stack.dev_key:
        lines.append(f"  development API key: {stack.dev_key}")
    lines += [f"  {note}" for note in stack.notes]
    lines.append(f"  data dir: {s.data_dir}    stop: Ctrl-C")
    return "\n".join(lines) + "\n"


def run(settings: ServingSettings, *, workers: int = 1, training: bool = True) -> None:
    """Start everything, serve until SIGINT/SIGTERM, then stop every child that was started."""
    stack = prepare(settings, workers=workers, training=training)
    try:
        app = build_app(stack.settings)
        if stack.engine:
            engine = stack.engine

            def announce() -> None:
                if engine.wait_ready(timeout_s=600):
                    print(banner(stack), file=sys.stderr, flush=True)
                else:
                    log.error("vLLM did not become ready; see %s", engine.config.log_path)

            log.info("waiting for vLLM to load the model (usually 15-60 s); the gateway answers 503 until then")
            threading.Thread(target=announce, daemon=True).start()
        else:
            print(banner(stack), file=sys.stderr, flush=True)
        config = uvicorn.Config(
            app, host=stack.settings.host, port=stack.settings.port, log_level="info", access_log=False
        )
        _Server(config).run()
    finally:
        log.info("stopping")
        stack.stop()
