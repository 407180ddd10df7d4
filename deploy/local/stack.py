"""`pairloop up`: the embedded Redis, the vLLM engine and the gateway, in the foreground, stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import SecretStr

from deploy.app.gateway import build_app
from deploy.local.engine import EngineProcess, engine_config
from deploy.local.models import ModelUnavailable, check_model
from deploy.local.redis_server import EmbeddedRedis
from deploy.local.secrets import load_or_create, secure_data_dir, write_private
from deploy.local.server import server_config
from deploy.local.settings import LocalSettings
from deploy.local.workers import WorkerProcess
from deploy.migrations import upgrade
from serving.settings import ALL_SCOPES, ApiKey, vllm_key_file

log = logging.getLogger("pairloop")

TINY_MODEL_NAME = "pairloop-tiny"
ENGINE_GIVE_UP_AFTER = 3
"""vLLM exits this many times in a row within a minute of starting: `pairloop up` stops instead of retrying."""
APP_SHUTDOWN_S = 3.0
"""Beyond the requests' grace: how long the application's own shutdown (closing clients, stopping its loops)
may take before the process goes on stopping anyway."""
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

    settings: LocalSettings
    redis: EmbeddedRedis | None = None
    engine: EngineProcess | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    dev_key: str | None = None
    notes: list[str] = field(default_factory=list)
    fatal: str | None = None
    """Why the stack stopped by itself (vLLM failing at every start): `run` exits non-zero with it."""

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop every child within a bound: the workers and vLLM together (SIGTERM; SIGKILL after `timeout_s`),
        then Redis (the workers need it to the end)."""
        timeout = self.settings.shutdown_timeout_s if timeout_s is None else timeout_s
        stoppers: list[Callable[[], object]] = [functools.partial(w.stop, timeout) for w in self.workers]
        if self.engine:
            stoppers.append(functools.partial(self.engine.stop, timeout))
        threads = [threading.Thread(target=stop, daemon=True) for stop in stoppers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        if self.redis:
            _redis_url_file(self.settings.data_dir).unlink(missing_ok=True)
            self.redis.stop(min(timeout, 5.0))

    def kill(self) -> None:
        """SIGKILL every child now (a second signal)."""
        children = [w.child for w in self.workers] + [c.child for c in (self.engine, self.redis) if c]
        for child in children:
            child.kill_now()
        if self.redis:
            _redis_url_file(self.settings.data_dir).unlink(missing_ok=True)


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after its shutdown, which would kill this process before it stops the
    children it started. Here the first signal asks the server to exit (requests in flight get
    `timeout_graceful_shutdown` seconds, the application's shutdown a few more); `run` then stops the children.
    A second signal, SIGINT or SIGTERM, stops everything at once: `on_second_signal`."""

    def __init__(self, config: uvicorn.Config, on_second_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_second_signal = on_second_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.on_second_signal()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        bound = (self.config.timeout_graceful_shutdown or 0) + APP_SHUTDOWN_S
        try:
            await asyncio.wait_for(super().shutdown(sockets), bound)
        except TimeoutError:
            log.error("the gateway did not finish shutting down within %.0f s; stopping anyway", bound)

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


def resolve_model(settings: LocalSettings) -> tuple[str, str]:
    """(model path or id, public name); builds the embedded tiny model when none is configured. ModelUnavailable
    when the model cannot be served or trained here (deploy/local/models.py)."""
    if settings.model:
        check_model(settings.model)
        return settings.model, settings.served_model_name or settings.model
    from trainer.tiny.build import default_model_dir, is_built

    out = default_model_dir(settings.data_dir)
    if not is_built(out):
        log.info("building the embedded tiny model into %s (a few minutes, once)", out)
        # In a child process: the gateway should not keep torch and the training memory for its whole life.
        cmd = [sys.executable, "-m", "deploy", "model", "build-tiny", "--out", str(out)]
        if subprocess.run(cmd, check=False).returncode != 0 or not is_built(out):
            raise ModelUnavailable(f"building the embedded tiny model into {out} failed (see the output above)")
    return str(out), settings.served_model_name or TINY_MODEL_NAME


def prepare(settings: LocalSettings, *, workers: int = 1, training: bool = True, echo_children: bool = True) -> Stack:
    """Start the children `settings` asks for and return the complete settings for the gateway."""
    data_dir = settings.data_dir
    secure_data_dir(data_dir)
    stack = Stack(settings)
    update: dict[str, object] = {}
    # The model first: one that cannot be loaded stops `up` before anything else starts.
    model, name = resolve_model(settings) if not settings.vllm_urls else ("", "")
    if settings.vllm_urls and settings.model and training:
        check_model(settings.model)  # the trainer's base model
    try:
        if not settings.redis_url:
            update["secret"] = settings.secret or SecretStr(load_or_create(data_dir / "secrets" / "token-secret"))
            stack.redis = EmbeddedRedis(
                data_dir,
                load_or_create(data_dir / "secrets" / "redis-password"),
                appendfsync=settings.redis_appendfsync,
                maxmemory_mb=settings.redis_maxmemory_mb,
                echo=_echo("redis") if echo_children else None,
            )
            stack.redis.start()
            update["redis_url"] = stack.redis.url
            write_private(_redis_url_file(data_dir), stack.redis.url)
            stack.notes.append(
                f"embedded Redis (AOF, maxmemory {settings.redis_maxmemory_mb} MiB) in {stack.redis.dir}"
            )
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
            if not settings.vllm_api_key:  # its own key: only the gateway and the trainer (same data dir) hold it
                load_or_create(vllm_key_file(data_dir), prefix="pl-vllm-")

            def give_up(code: int) -> None:
                log_path = settings.data_dir / "logs" / "vllm.log"
                stack.fatal = (
                    f"vLLM exited with status {code} at each of its last {ENGINE_GIVE_UP_AFTER} starts, serving "
                    f"{model}: see {log_path}"
                )
                os.kill(os.getpid(), signal.SIGTERM)  # stop the rest as after Ctrl-C; `run` exits with the reason

            stack.engine = EngineProcess(
                engine_config(
                    settings, model, name, port=settings.vllm_port, echo=_echo("vllm") if echo_children else None
                ),
                give_up_after=ENGINE_GIVE_UP_AFTER,
                on_give_up=give_up,
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


def run(settings: LocalSettings, *, workers: int = 1, training: bool = True) -> None:
    """Start everything, serve until SIGINT/SIGTERM, then stop every child that was started.

    Bounded whatever it is doing: a signal while the children start (the tiny model's build, vLLM's start) stops
    what was started; after one while serving, requests in flight get PAIRLOOP_SHUTDOWN_TIMEOUT_S, then the
    children as long again (about twice that, plus a few seconds, in all); a second signal kills them all at
    once."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # SIGINT already raises KeyboardInterrupt
    try:
        stack = prepare(settings, workers=workers, training=training)
    finally:
        signal.signal(signal.SIGTERM, previous)

    def stop_now() -> None:
        log.warning("second signal: stopping every child now")
        stack.kill()
        os._exit(130)

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
        _Server(server_config(app, stack.settings), on_second_signal=stop_now).run()
    finally:
        log.info("stopping")
        signal.signal(signal.SIGINT, lambda *_: stop_now())
        signal.signal(signal.SIGTERM, lambda *_: stop_now())
        stack.stop()
    if stack.fatal:
        raise ModelUnavailable(stack.fatal)


def _exit_on_sigterm(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + sig)
