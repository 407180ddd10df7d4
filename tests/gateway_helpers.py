"""What the gateway tests share: the test API keys and secret, a real uvicorn server in a thread, and the
settings a test gateway runs with (rate limits off, the test keys, the session's Redis)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from feedback.settings import FeedbackSettings
from serving.ratelimit import RateLimit
from serving.settings import ALL_SCOPES, ApiKey, ServingSettings

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "pairloop-tiny"
SECRET = "test-secret-" + "x" * 32

KEYS = {
    "full": ApiKey(id="full", key="sk-full-0123456789abcdef", scopes=list(ALL_SCOPES)),
    "chat": ApiKey(id="chatonly", key="sk-chat-0123456789abcdef", scopes=["chat"]),
    "feedback": ApiKey(id="fbonly", key="sk-feedback-0123456789ab", scopes=["feedback"]),
}

LEARNING_ENV = {
    "PAIRLOOP_AB_FRACTION": "0",
    "PAIRLOOP_MIN_NEW_EXAMPLES": "8",
    "PAIRLOOP_GATE_MIN_ACCURACY": "0.5",
    "PAIRLOOP_GATE_MAX_LENGTH_RATIO": "100",
    "PAIRLOOP_GATE_LENGTH_PROMPTS": "4",
    "PAIRLOOP_HOLDOUT_FRACTION": "0.25",
    "PAIRLOOP_MAX_USER_SHARE": "0.2",
    # A rate that learns decisively (5e-4 barely moved the tiny model: the gate's verdict was chance).
    "PAIRLOOP_TRAIN__LEARNING_RATE": "2e-3",
    "PAIRLOOP_TRAIN__EPOCHS": "3",
    "PAIRLOOP_TRAIN__MIN_PAIRS": "4",
    "PAIRLOOP_TRAIN__SEED": "0",
}
"""The trainer's settings in the learning-loop tests (test_loop, test_cluster): a round on a few dozen votes of
the tiny model that learns, and a gate those votes can pass."""


class ServerThread:
    """A real uvicorn server in a thread of the test process, on a port it holds from the start (bound here and
    handed to uvicorn: no other process can take it between choosing and listening)."""

    def __init__(self, app: object, config: uvicorn.Config | None = None) -> None:
        """`config`: how to serve `app` (default: uvicorn's defaults); its address is replaced by the held port."""
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port: int = self.socket.getsockname()[1]
        config = config or uvicorn.Config(app, log_level="warning")  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.socket.close()


def keys_json() -> str:
    """KEYS as a PAIRLOOP_API_KEYS value, their secrets written out."""
    return json.dumps([k.model_dump() | {"key": k.key.get_secret_value()} for k in KEYS.values()])


GatewayFactory = Callable[..., ServerThread]


NO_LIMIT = RateLimit(per_s=0, burst=1)


def settings_for(redis_url: str, vllm_urls: list[str], tmp: Path, **overrides: object) -> ServingSettings:
    values: dict[str, object] = {
        "chat_limit_per_key": NO_LIMIT,
        "chat_limit_per_user": NO_LIMIT,
        "feedback_limit_per_key": NO_LIMIT,
        "feedback_limit_per_user": NO_LIMIT,
        "redis_url": redis_url,
        "secret": SECRET,
        "vllm_urls": vllm_urls,
        "data_dir": tmp,
        "api_keys": list(KEYS.values()),
        "served_model_name": MODEL_NAME,
        "health_interval_s": 0.5,
        "retry_after_s": 3,
        **overrides,
    }
    return ServingSettings(**values)  # type: ignore[arg-type]


def feedback_settings(tmp: Path, store_url: str | None = None, **overrides: object) -> FeedbackSettings:
    values: dict[str, object] = {"data_dir": tmp, "database_url": store_url, "feedback_durability": "none"}
    return FeedbackSettings(**{**values, **overrides})  # type: ignore[arg-type]
