"""A worker (feedback, training or cron) as a child of `pairloop up`, restarted with backoff if it dies."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from serving.process import spawn, terminate

log = logging.getLogger(__name__)


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
        self.max_backoff_s = max_backoff_s
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _spawn(self) -> None:
        env = {
            **os.environ,
            **self.env,
            "PAIRLOOP_REDIS_URL": self.redis_url,
            "PAIRLOOP_DATA_DIR": str(self.data_dir),
        }
        cmd = [sys.executable, "-m", "deploy", *self.args]
        self._proc = spawn(cmd, env=env, log_path=self.log_path, echo=self.echo)

    def start(self) -> None:
        self._spawn()
        threading.Thread(target=self._watch, daemon=True, name="worker-watch").start()

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            proc = self._proc
            assert proc is not None
            code = proc.wait()
            with self._lock:
                if self._stopping.is_set():
                    return
                log.warning(
                    "`pairloop %s` exited (status %s); restarting in %.0f s", " ".join(self.args), code, backoff
                )
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff_s)
            with self._lock:
                if self._stopping.is_set():
                    return
                self.restarts += 1
                self._spawn()

    def stop(self) -> None:
        """SIGTERM: RQ finishes the job at hand, then exits (SIGKILL after 20 s)."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None:
            terminate(proc, 20.0)
