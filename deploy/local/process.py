"""Child processes that die with their parent, and loopback ports for them."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the child when the thread that spawned it dies, so a
    # SIGKILLed parent leaves no orphan holding ports and memory. Its own process group lets us signal
    # the child together with whatever it forks (vLLM starts an engine-core process).
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    os.setpgrp()


def spawn(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `cmd` in a process group of its own; its output goes to `log_path` and, line by line, to `echo`."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )
    threading.Thread(target=_pump, args=(proc.stdout, log_path, echo), daemon=True).start()
    return proc


def _pump(stream: IO[bytes] | None, log_path: Path | None, echo: Callable[[str], None] | None) -> None:
    if stream is None:
        return
    sink = None
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        sink = log_path.open("ab")
    with stream, sink or contextlib.nullcontext():
        for raw in stream:
            if sink:
                sink.write(raw)
                sink.flush()
            if echo:
                echo(raw.decode(errors="replace").rstrip())


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the process group of `proc`, if it still runs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """SIGTERM to the group, SIGKILL after `timeout_s`; returns the exit status."""
    signal_group(proc, signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        return proc.wait()


class Supervised:
    """A child process restarted with backoff whenever it exits, until `stop`.

    The child is spawned from the watching thread, which lives as long as the child: PR_SET_PDEATHSIG is tied
    to that thread. The backoff doubles on a crash loop (1 s up to `max_backoff_s`) and starts over after a run
    that stayed up for a minute. Each exit is logged as an error with its status and the wait before the restart.
    """

    def __init__(
        self,
        name: str,
        spawn_child: Callable[[], subprocess.Popen[bytes]],
        *,
        restart: bool = True,
        max_backoff_s: float = 30.0,
        stable_s: float = 60.0,
        give_up_after: int = 0,
        on_give_up: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.give_up_after = give_up_after
        """Stop restarting after this many exits in a row, each within `stable_s` of its start (0: never)."""
        self.on_give_up = on_give_up
        """Called with the last exit status when it gives up."""
        self.spawn_child = spawn_child
        self.restart = restart
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.restarts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._spawn_error: OSError | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Spawn the child (and its watcher); `RuntimeError` if it cannot be spawned at all."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        self._stopping.clear()
        self._started.clear()
        self._thread = threading.Thread(target=self._watch, name=f"{self.name}-watch", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._spawn_error is not None:
            self._thread = None
            raise RuntimeError(f"could not start {self.name}: {self._spawn_error}") from self._spawn_error

    def exited(self) -> bool:
        """The child exited and will not be restarted (or was never started)."""
        return self.proc is None or (self.proc.poll() is not None and (not self.restart or self._stopping.is_set()))

    def _watch(self) -> None:
        backoff = 1.0
        quick_exits = 0
        while not self._stopping.is_set():
            try:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self.proc = self.spawn_child()
            except OSError as exc:
                self._spawn_error = exc
                self._started.set()
                return
            self._started.set()
            began = time.monotonic()
            code = self.proc.wait()
            if self._stopping.is_set() or not self.restart:
                return
            if time.monotonic() - began > self.stable_s:
                backoff = 1.0
                quick_exits = 0
            quick_exits += 1
            if self.give_up_after and quick_exits >= self.give_up_after:
                log.error(
                    "%s exited with status %s, %d times in a row at start: not restarting it",
                    self.name,
                    code,
                    quick_exits,
                )
                self._stopping.set()
                if self.on_give_up:
                    self.on_give_up(code)
                return
            log.error("%s exited with status %s; restarting it in %.0f s", self.name, code, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, self.max_backoff_s)
            self.restarts += 1

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the child's process group (a crash, for tests); the watcher restarts it."""
        if self.proc:
            signal_group(self.proc, sig)

    def kill_now(self) -> None:
        """Stop for good at once: SIGKILL to the child's group, no restart (a second Ctrl-C)."""
        self._stopping.set()
        if self.proc:
            signal_group(self.proc, signal.SIGKILL)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """Stop for good: SIGTERM to the child's group, SIGKILL after `timeout_s`; its exit status."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        code = terminate(proc, timeout_s) if proc else None
        if self._thread:
            self._thread.join(timeout_s)
            self._thread = None
        return code
