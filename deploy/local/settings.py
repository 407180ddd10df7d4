"""What `pairloop up`, `pairloop vllm` and `pairloop gateway` read beyond the gateway's settings: the children they
start (vLLM, the embedded Redis) and how they stop. Only deploy/ reads these; the gateway's app never does."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from serving.settings import ServingSettings


class LocalSettings(ServingSettings):
    """The gateway's settings, and those of the processes this machine starts beside it."""

    redis_appendfsync: Literal["always", "everysec"] = Field(
        "always",
        description="fsync policy of the embedded Redis' append-only file (`always`: every write, before the reply).",
    )
    redis_maxmemory_mb: int = Field(
        1024,
        ge=16,
        description="`maxmemory` of the embedded Redis, in MiB (with `noeviction`: full, it refuses writes rather "
        "than drop a queued vote).",
    )
    shutdown_timeout_s: float = Field(
        10.0,
        ge=1,
        le=600,
        description="After SIGTERM or Ctrl-C: how long requests in flight may finish, then how long the children "
        "of `pairloop up` may take to stop before they are killed; a second signal stops at once.",
    )
    # the gateway's HTTP server (deploy/local/server.py)
    max_connections: int = Field(
        1000,
        ge=1,
        description="Connections and requests in progress the gateway takes at once; beyond, it answers 503.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Longest time a client may take to send a request's line and headers."
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, le=300, description="How long an idle kept-alive connection stays open between requests."
    )
    # the vLLM child (only when PAIRLOOP_VLLM_URLS is empty)
    vllm_port: int = Field(0, ge=0, le=65535, description="Loopback port of the vLLM child; 0 picks a free one.")
    vllm_max_model_len: int | None = Field(
        None, ge=16, description="`--max-model-len` of the vLLM child; unset: the model's own context length."
    )
    vllm_max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank vLLM accepts.")
    vllm_kv_cache_gib: int = Field(1, ge=1, description="KV cache size of the CPU engine, in GiB.")
    vllm_cpu_cores: str = Field(
        "auto",
        pattern=r"^(auto|nobind|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$",
        description="Cores the CPU engine binds its compute threads to (`VLLM_CPU_OMP_THREADS_BIND`): `auto` (vLLM "
        "picks the first core(s) this process may use and leaves one to its scheduler), a list such as `0` or "
        "`2-3,6`, or `nobind`. Give each engine that shares a machine cores of its own (docs/DEPLOY.md, 'Sizing').",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.5,
        gt=0,
        le=0.95,
        description="Share of the GPU's memory the CUDA engine may take (weights and KV cache); the rest is left "
        "to the trainer on a shared GPU (docs/DEPLOY.md, 'Sizing'). Ignored by the CPU engine.",
    )
    vllm_extra_args: str = Field("", description="Extra command-line arguments for the vLLM child.")
