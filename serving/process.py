"""Child processes that die with their parent, and loopback ports for them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO


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
