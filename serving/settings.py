"""Settings: `PairloopSettings`, the base every part's settings extend (environment prefix `PAIRLOOP_`, the data
dir, the store, Redis, the base model), and `ServingSettings`, the gateway's and its vLLM engine's.

Each package owns the settings it reads (`feedback/settings.py`, `workers/settings.py`, `trainer/settings.py`)
and extends this base, so no field is declared twice and every part agrees on where the data lives.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from serving.adapters.store import AdapterStore, open_store
from serving.ratelimit import RateLimit

Scope = Literal["chat", "feedback", "admin"]
ALL_SCOPES: tuple[Scope, ...] = ("chat", "feedback", "admin")


ENV_PREFIX = "PAIRLOOP_"

PLACEHOLDER = "replace-me"
"""How every example secret in deploy/ begins; a setting that still holds one is refused."""


def still_an_example(variable: str) -> str:
    """What every part says of a variable that still holds an example value of deploy/."""
    return f"{variable} still holds an example value ('{PLACEHOLDER}…'): set a real one (docs/DEPLOY.md, 'Secrets')"


def revealed(value: object) -> str:
    """`value` as text with its secrets shown: what the placeholder check reads."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return revealed(dict(value))
    if isinstance(value, dict):
        return " ".join(f"{k} {revealed(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return " ".join(revealed(v) for v in value)
    return str(value)


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/pairloop`, or `~/.local/share/pairloop`."""
    import os

    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pairloop"


def vllm_key_file(data_dir: Path) -> Path:
    """Where `pairloop up` keeps the API key of its vLLM child (only the gateway and the trainer read it)."""
    return data_dir / "secrets" / "vllm-api-key"


def default_database_url(data_dir: Path) -> str:
    """The embedded default store: a SQLite file in the data dir."""
    return f"sqlite:///{data_dir / 'pairloop.db'}"


class PairloopSettings(BaseSettings):
    """What every part reads. Each field reads `PAIRLOOP_<NAME>` from the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir, description="Models, secrets, logs, databases.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the preference store (`postgresql+psycopg://…`); unset: SQLite in the data dir.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis for records, queues and limits; unset: the embedded one of `pairloop up` in the data dir.",
    )
    model: str | None = Field(
        None, description="Hugging Face id or local path of the base model; unset: the embedded tiny model."
    )
    adapter_store_url: str | None = Field(
        None,
        description="Where finished adapters are published for every vLLM host: a shared directory or "
        "`s3://bucket/prefix` (docs/DEPLOY.md); unset: the data dir, read by the one vLLM server beside it.",
    )
    vllm_api_key: SecretStr | None = Field(
        None,
        description="Bearer key of the vLLM servers (their VLLM_API_KEY): gateways and the trainer send it; unset: "
        "the key `pairloop up` made for its vLLM child in the data dir, if any.",
    )
    adapter_store_options: dict[str, Any] = Field(
        default_factory=dict,
        description='JSON fsspec options of the adapter store, e.g. {"endpoint_url": "http://s3:9000"}.',
    )

    @model_validator(mode="after")
    def _no_placeholders(self) -> PairloopSettings:
        """Refuse the example values of deploy/pairloop.env.example and deploy/k8s (a copy applied unchanged), in
        any field of any part's settings, secrets (`SecretStr`, shown as '**********') included."""
        for name in type(self).model_fields:
            if PLACEHOLDER in revealed(getattr(self, name)):
                raise ValueError(still_an_example(f"{ENV_PREFIX}{name.upper()}"))
        return self

    def vllm_key(self) -> str | None:
        """The key the vLLM servers take: PAIRLOOP_VLLM_API_KEY, or the one `pairloop up` keeps in the data dir."""
        if self.vllm_api_key:
            return self.vllm_api_key.get_secret_value()
        path = vllm_key_file(self.data_dir)
        return path.read_text().strip() if path.is_file() else None

    def store_url(self) -> str:
        """The preference store's SQLAlchemy URL."""
        return self.database_url or default_database_url(self.data_dir)

    def adapter_store(self) -> AdapterStore | None:
        """The adapter store every vLLM host reads (None: the embedded default, the data dir)."""
        return open_store(self.adapter_store_url, self.adapter_store_options)


class ApiKey(BaseModel):
    """One client credential. `id` is what records and logs carry; `key` is the secret the client sends."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    key: SecretStr = Field(min_length=16, max_length=256)
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["chat", "feedback"]))


def is_loopback(host: str) -> bool:
    """Whether `host` names a loopback address (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServingSettings(PairloopSettings):
    """The gateway's settings."""

    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    served_model_name: str | None = Field(
        None, description="Public name of the base model; default: the model id, or `pairloop-tiny`."
    )
    redis_chat_limit: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Share of Redis's maxmemory above which the gateway refuses new chats (503 with Retry-After); "
        "1: only when Redis itself refuses the record.",
    )
    redis_feedback_limit: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Share of Redis's maxmemory above which the gateway refuses feedback (503 with Retry-After); "
        "the rest is the workers' and the training loop's.",
    )
    vllm_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated vLLM servers: base URLs, or `dns+http://name:port` for every address of a DNS "
        "name, re-resolved (a headless Service); unset: start one as a child process.",
    )
    vllm_discovery_s: float = Field(
        5.0, gt=0, le=300, description="How often the `dns+` entries of PAIRLOOP_VLLM_URLS are resolved again."
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description='JSON list of {"id", "key", "scopes"}; unset: loopback only (`pairloop up` makes a dev key).',
    )
    secret: SecretStr | None = Field(
        None, min_length=32, description="HMAC secret for feedback tokens; required with an external Redis."
    )
    secret_previous: SecretStr | None = Field(
        None,
        min_length=32,
        description="The PAIRLOOP_SECRET before a rotation: tokens it signed are still accepted (new ones are signed "
        "with PAIRLOOP_SECRET); remove it once PAIRLOOP_RECORD_TTL_S has passed.",
    )

    def token_secrets(self) -> tuple[bytes, ...]:
        """The secrets a feedback token may be signed with: the current one first, then the previous one."""
        return tuple(s.get_secret_value().encode() for s in (self.secret, self.secret_previous) if s)

    responses_per_request: int = Field(2, ge=1, le=2, description="Choices per request when `n` is absent.")
    record_ttl_s: int = Field(
        24 * 3600,
        ge=60,
        description="How long a served completion's record stays in Redis and its feedback token is valid: "
        "feedback can arrive this long.",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest accepted request body.")
    body_timeout_s: float = Field(
        30.0, gt=0, le=600, description="Longest time a request body may take to arrive (then 408)."
    )
    max_tokens_limit: int = Field(1024, ge=1, description="Largest `max_tokens` a client may ask for.")
    max_tokens_default: int = Field(
        256,
        ge=1,
        description="`max_tokens` of a request that sends none (PAIRLOOP_MAX_TOKENS_LIMIT if that is lower), so "
        "that no request generates up to the model's whole context.",
    )
    upstream_timeout_s: float = Field(300.0, gt=0, description="Longest wait for one vLLM response.")
    health_interval_s: float = Field(1.0, gt=0, description="How often each vLLM backend is probed.")
    retry_after_s: int = Field(5, ge=1, description="`Retry-After` sent with 503 answers.")
    adapter_poll_s: float = Field(
        0.1, gt=0, le=10, description="How often the gateway reads the adapter routing record from Redis."
    )
    adapter_unload_grace_s: float = Field(
        10.0, ge=0, description="How long an adapter no longer served stays loaded before it may be unloaded."
    )

    # Token buckets in Redis, as JSON {"per_s": rate, "burst": size}; per_s 0 turns one off.
    chat_limit_per_key: RateLimit = Field(
        RateLimit(per_s=20, burst=40), description="Chat requests per API key (token bucket)."
    )
    chat_limit_per_user: RateLimit = Field(
        RateLimit(per_s=1, burst=10), description="Chat requests per `user` (token bucket)."
    )
    feedback_limit_per_key: RateLimit = Field(
        RateLimit(per_s=200, burst=400), description="Feedback events per API key (token bucket)."
    )
    feedback_limit_per_user: RateLimit = Field(
        RateLimit(per_s=1, burst=20), description="Feedback events per judging `user` (token bucket)."
    )

    vllm_max_loras: int = Field(
        4, ge=1, description="Adapters vLLM keeps loaded (champion, challenger, previous champion, one draining)."
    )

    def rate_limits(self) -> dict[str, RateLimit]:
        return {
            "chat:key": self.chat_limit_per_key,
            "chat:user": self.chat_limit_per_user,
            "feedback:key": self.feedback_limit_per_key,
            "feedback:user": self.feedback_limit_per_user,
        }

    @field_validator("vllm_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            value = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
        if isinstance(value, list):
            for url in value:
                parts = urlsplit(str(url).removeprefix("dns+"))
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    raise ValueError(
                        f"PAIRLOOP_VLLM_URLS: {url!r} is not an http(s):// URL or a dns+http(s)://name:port entry"
                    )
        return value

    @model_validator(mode="after")
    def _check(self) -> ServingSettings:
        if not self.api_keys and not is_loopback(self.host):
            raise ValueError(
                f"PAIRLOOP_HOST={self.host} is not a loopback address, but no PAIRLOOP_API_KEYS are set: "
                "configure API keys before exposing the gateway"
            )
        if self.redis_url and not self.secret:
            raise ValueError(
                "PAIRLOOP_SECRET (at least 32 characters) is required with an external PAIRLOOP_REDIS_URL: "
                "every gateway replica must sign feedback tokens with the same secret"
            )
        ids = [k.id for k in self.api_keys]
        if len(set(ids)) != len(ids):
            raise ValueError("PAIRLOOP_API_KEYS: key ids must be unique")
        if self.redis_chat_limit > self.redis_feedback_limit:
            raise ValueError(
                "PAIRLOOP_REDIS_CHAT_LIMIT must not exceed PAIRLOOP_REDIS_FEEDBACK_LIMIT: a vote on a pair already "
                "served goes before a new chat"
            )
        return self
