"""A worker (feedback, training or cron) as a child of `pairloop up`, restarted with backoff if it dies."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from deploy.local.process import Supervised, spawn


class WorkerProcess:
    def __init__(
        self,
        redis_url: str,
        data_dir: Path,
        *,
        log_path: Path | None = None,
        echo: Callable[[str], None] | None = None,
        max_backoff_s: float = 30.0,
        args: tuple[str, ...] = ("worker",),
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.env = env or {}
        self.redis_url = redis_url
        self.data_dir = data_dir
        self.log_path = log_path
        self.echo = echo
        self.child = Supervised(f"`pairloop {' '.join(args)}`", self._spawn, max_backoff_s=max_backoff_s)

    @property
    def pid(self) -> int | None:
        return self.child.pid

    @property
    def restarts(self) -> int:
        return self.child.restarts

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            **self.env,
            "PAIRLOOP_REDIS_URL": self.redis_url,
            "PAIRLOOP_DATA_DIR": str(self.data_dir),
        }
        cmd = [sys.executable, "-m", "deploy", *self.args]
        return spawn(cmd, env=env, log_path=self.log_path, echo=self.echo)

    def start(self) -> None:
        self.child.start()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM: RQ finishes the job at hand, then exits (SIGKILL after `timeout_s`; a training round cut
        short is retried by the next check)."""
        self.child.stop(timeout_s)
