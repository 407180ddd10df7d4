"""Every part killed under load, one at a time, and the network to PostgreSQL and to Redis cut for a while: what
a client sees, what is lost, how long until the part serves again.

    .venv/bin/python bench/chaos.py [--window 20] [--cut 10]        the faults (docs/RELIABILITY.md)
    .venv/bin/python bench/chaos.py --soak 36000                     a soak run: memory and open files, every tenth
    .venv/bin/python bench/chaos.py --loop-soak 35                   the loop under steady traffic for 35 minutes

The topology is deploy/compose.yaml's on this machine (tests/cluster_helpers.py: 2 vLLM hosts with sidecars,
2 gateways, 2 feedback workers, the trainer, cron, Valkey, PostgreSQL, SeaweedFS S3), except that every part
reaches PostgreSQL and Valkey through a fault-injecting TCP proxy (`FaultProxy` below: an asyncio relay that can
drop every connection and refuse new ones for a while; written here rather than run as Toxiproxy, which has no
PyPI wheel). Under steady load (plain and streaming chats across both gateways, every answer voted on through the
other gateway with a fixed feedback id), each fault is, in turn: SIGKILL of a feedback worker, of the trainer in
the middle of a round, of cron, of a vLLM host, of a gateway, of Valkey (each restarted as a supervisor would),
then a cut of the network to PostgreSQL and to Valkey. After the last, the queue is drained and every
acknowledged vote (a 202) is looked for in PostgreSQL.

The loop soak (`--loop-soak MINUTES`) injects no fault: the voter prefers the shorter answer, cron checks every 30 s
and a round is due every `--round-every` usable votes (the service's other defaults: cap, budget, A/B test, CPU
priority; but the gate's length bound is 4, since this preference is about length),
and every minute it samples the backlog, the rounds and the memory of every part. At the end: each round's status,
examples, duration and freshness (from the newest vote it used to its adapter serving), chat throughput while a
round trains against outside rounds, and the memory samples.

Per fault: chat requests failed (by status) and the span from the first failure to the last, requests that hung
past the client's timeout, the time until the part served again (for a worker and a cut: a vote acknowledged after
the restart or the cut's end is in PostgreSQL), and for the trainer whether the round ran again. At the
end: acknowledged votes lost, and votes stored twice. Needs root (the gateways' mount namespaces), the machine's
PostgreSQL and the dev extra.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster_helpers import Cluster, Host, backends, vllm_address  # noqa: E402
from tests.gateway_helpers import KEYS, LEARNING_ENV, MODEL_NAME  # noqa: E402
from tests.postgres import postgres_database  # noqa: E402
from trainer.tiny.build import default_model_dir, ensure_built  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEYS['full'].key.get_secret_value()}"}
CLIENT_TIMEOUT_S = 30.0


# -- the fault-injecting proxy -----------------------------------------------------------------------------


class FaultProxy:
    """127.0.0.1:<port> relayed to `target`; `cut(s)` drops every connection and refuses new ones for `s` seconds."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._cut_until = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._cut_until:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self, seconds: float) -> None:
        def drop() -> None:
            self._cut_until = time.monotonic() + seconds
            for w in list(self._writers):
                w.transport.abort()  # as a network that goes away: no FIN handshake, just gone
            self._writers.clear()

        self._loop.call_soon_threadsafe(drop)


class ChaosCluster(Cluster):
    """The cluster, its parts reaching PostgreSQL and Valkey through proxies."""

    pg_proxy: FaultProxy | None = None
    redis_proxy: FaultProxy | None = None

    def wiring(self) -> dict[str, str]:
        wiring = super().wiring()
        if self.redis_proxy and self.valkey:
            wiring["PAIRLOOP_REDIS_URL"] = self.valkey.url.replace(
                f":{self.valkey.port}/", f":{self.redis_proxy.port}/"
            )
        if self.pg_proxy:
            url = make_url(self.pg_url)
            wiring["PAIRLOOP_DATABASE_URL"] = url.set(port=self.pg_proxy.port).render_as_string(hide_password=False)
        return wiring


# -- load ----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    started: float
    ended: float
    kind: str
    status: int  # 0: no answer (connection failed, or the client's timeout)
    hung: bool = False


@dataclass
class Load:
    gateways: list[str]
    prefer_shorter: bool = False
    """Vote for the shorter answer (a preference the loop can learn); else by the completion id (no preference)."""
    max_tokens: int = 12
    outcomes: list[Outcome] = field(default_factory=list)
    acked: dict[str, float] = field(default_factory=dict)
    """feedback_id -> when its 202 came."""
    votes_sent: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: list[tuple[dict[str, Any], int]] = field(default_factory=list)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def chat_client(self, i: int, stream: bool) -> None:
        n = 0
        with httpx.Client(timeout=CLIENT_TIMEOUT_S, headers=AUTH) as client:
            while not self.stop.is_set():
                n += 1
                g = (i + n) % len(self.gateways)
                body: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": self.max_tokens, "stream": stream}
                body |= {"messages": [{"role": "user", "content": f"Tea {i}-{n}?"}], "user": f"chaos-{i}-{n % 50}"}
                started = time.monotonic()
                status, data, hung = 0, None, False
                try:
                    if stream:
                        with client.stream("POST", f"{self.gateways[g]}/v1/chat/completions", json=body) as r:
                            chunks = [line for line in r.iter_lines() if line.startswith("data:")]
                            status = r.status_code
                            if status == 200 and any('"error"' in c for c in chunks):
                                status = 599  # an error chunk inside the stream: the client got an error
                    else:
                        r = client.post(f"{self.gateways[g]}/v1/chat/completions", json=body)
                        status = r.status_code
                        data = r.json() if status == 200 else None
                except httpx.TimeoutException:
                    hung = True
                except (httpx.HTTPError, ValueError):
                    pass
                self.record(Outcome(started, time.monotonic(), "stream" if stream else "chat", status, hung))
                if data is not None:
                    with self.lock:
                        self.pending.append((data, (g + 1) % len(self.gateways)))
                if status != 200:
                    time.sleep(0.2)

    def voter(self) -> None:
        with httpx.Client(timeout=CLIENT_TIMEOUT_S, headers=AUTH) as client:
            while not self.stop.is_set() or self.pending:
                with self.lock:
                    item = self.pending.pop(0) if self.pending else None
                if item is None:
                    time.sleep(0.05)
                    continue
                data, g = item
                preference: int | str = len(data["id"]) % 2
                if self.prefer_shorter:
                    a, b = (len(c["message"]["content"].split()) for c in data["choices"])
                    preference = "tie" if a == b else int(b < a)
                vote = {
                    "completion_id": data["id"],
                    "feedback_token": data["pairloop"]["feedback_token"],
                    "feedback_id": str(uuid.uuid4()),
                    "kind": "pairwise",
                    "preference": preference,
                }
                self.votes_sent += 1
                for attempt in range(20):  # a client retries with the same id until it is acknowledged
                    try:
                        r = client.post(f"{self.gateways[(g + attempt) % len(self.gateways)]}/v1/feedback", json=vote)
                        if r.status_code == 202:
                            with self.lock:
                                self.acked[vote["feedback_id"]] = time.monotonic()
                            break
                        if r.status_code < 500 and r.status_code != 429:
                            break  # refused for a reason of its own (e.g. the record expired): not acknowledged
                    except httpx.HTTPError:
                        pass
                    if self.stop.is_set():
                        break
                    time.sleep(0.5)

    def acked_since(self, t: float) -> list[str]:
        """Feedback ids acknowledged after `t`."""
        with self.lock:
            return [i for i, at in self.acked.items() if at > t]

    def since(self, t: float, until: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if t <= o.started < until]


# -- faults --------------------------------------------------------------------------------------------------


def wait_until(predicate: Any, timeout_s: float, step: float = 0.25) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - start
        time.sleep(step)
    return None


def ready(gateway: Host, n: int = 2) -> bool:
    return sum(b["ready"] for b in backends(gateway)) >= n


def rounds(pg_url: str) -> list[tuple[int, str, str | None]]:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, status, error FROM training_rounds ORDER BY id"))
            return [(int(r[0]), str(r[1]), r[2]) for r in rows]
    finally:
        engine.dispose()


def summarize(name: str, load: Load, t0: float, t1: float, back_s: float | None, extra: str = "") -> dict[str, Any]:
    window = load.since(t0, t1)
    failed = [o for o in window if o.status != 200]
    span = (max(o.ended for o in failed) - min(o.started for o in failed)) if failed else 0.0
    row = {
        "fault": name,
        "requests": len(window),
        "failed": len(failed),
        # by status: 0 no answer, 599 an error chunk inside a 200 stream
        "failed_by_status": {str(k): v for k, v in sorted(Counter(o.status for o in failed).items())},
        "failed_span_s": round(span, 2),
        # when the last request that failed was sent, from the fault (for a cut: compare with its length)
        "last_failed_sent_s": round(max(o.started for o in failed) - t0, 2) if failed else None,
        "hung": sum(o.hung for o in window),
        "serving_again_s": None if back_s is None else round(back_s, 1),
        "note": extra,
    }
    print(json.dumps(row), flush=True)
    return row


def run_faults(
    c: ChaosCluster, load: Load, hosts: dict[str, Host], window: float, cut_s: float
) -> list[dict[str, Any]]:
    g1, g2 = hosts["gateway-1"], hosts["gateway-2"]
    out = []

    def kill_restart(host: Host, back: Any, name: str, extra: str = "") -> None:
        t0 = time.monotonic()
        host.kill()
        time.sleep(1.0)
        host.start()
        back_s = wait_until(back, 480)
        if back_s is None:
            keep_log(host)
        time.sleep(max(0.0, window - (time.monotonic() - t0)))
        out.append(summarize(name, load, t0, time.monotonic(), back_s, extra))

    restarted = time.monotonic() + 1.0
    votes_stored = lambda: stored_since(c.pg_url, load, restarted)[1] > 0  # noqa: E731
    kill_restart(hosts["worker-1"], votes_stored, "feedback worker (SIGKILL, restarted)")

    # the trainer in the middle of a round
    before = len(rounds(c.pg_url))
    httpx.post(f"{g1.url}/admin/train", headers=AUTH, timeout=30)
    wait_until(lambda: any(s == "running" for _, s, _ in rounds(c.pg_url)[before:]), 120, 0.2)
    t0 = time.monotonic()
    hosts["trainer"].kill()
    time.sleep(1.0)
    hosts["trainer"].start()
    rerun = wait_until(lambda: len(rounds(c.pg_url)) >= before + 2, 300, 0.5)  # the interrupted round again
    time.sleep(max(0.0, window - (time.monotonic() - t0)))
    log = rounds(c.pg_url)[before:]
    note = (
        f"round again {rerun:.1f} s after the kill; rounds since: {[s for _, s, _ in log]}"
        if rerun is not None
        else "no rerun"
    )
    out.append(summarize("training worker mid-round (SIGKILL, restarted)", load, t0, time.monotonic(), rerun, note))

    kill_restart(hosts["cron"], lambda: hosts["cron"].alive(), "cron (SIGKILL, restarted)")
    kill_restart(
        hosts["vllm-1"],
        lambda: all(any(b["url"] == hosts["vllm-1"].url and b["ready"] for b in backends(g)) for g in (g1, g2)),
        "vLLM host 1 (SIGKILL of vLLM and its sidecar, restarted)",
    )
    kill_restart(
        g1, lambda: httpx.get(f"{g1.url}/readyz", timeout=2).status_code == 200, "gateway 1 (SIGKILL, restarted)"
    )

    assert c.valkey is not None
    t0 = time.monotonic()
    c.valkey.child.kill()  # its supervisor restarts it from the append-only file
    back = wait_until(lambda: all(httpx.get(f"{g.url}/readyz", timeout=2).status_code == 200 for g in (g1, g2)), 120)
    time.sleep(max(0.0, window - (time.monotonic() - t0)))
    out.append(summarize("Valkey (SIGKILL, restarted from its AOF)", load, t0, time.monotonic(), back))

    for name, proxy in (("PostgreSQL", c.pg_proxy), ("Valkey", c.redis_proxy)):
        assert proxy is not None
        t0 = time.monotonic()
        proxy.cut(cut_s)
        time.sleep(cut_s)
        ended = time.monotonic()
        # serving again: both gateways ready, and a vote acknowledged after the cut stored in PostgreSQL (under
        # steady load the queue is seldom empty at the instant it is looked at, so its length says little)
        seen: dict[str, Any] = {}

        def serving(ended: float = ended, seen: dict[str, Any] = seen) -> bool:
            seen["readyz"] = [httpx.get(f"{g.url}/readyz", timeout=2).status_code for g in (g1, g2)]
            seen["acked since"], seen["stored of those"] = stored_since(c.pg_url, load, ended)
            seen["votes waiting for the voter"] = len(load.pending)
            return seen["readyz"] == [200, 200] and seen["stored of those"] > 0

        back = wait_until(serving, 120)
        print(f"{name} cut: last look {seen}", flush=True)
        time.sleep(max(0.0, window - (time.monotonic() - t0)))
        note = "serving again: from the end of the cut"
        out.append(summarize(f"network to {name} cut for {cut_s:g} s", load, t0, time.monotonic(), back, note))
    return out


def keep_log(host: Host) -> None:
    """A host that did not come back: its log kept past the run (the run's directory is removed)."""
    kept = Path(tempfile.gettempdir()) / f"chaos-{host.name}.log"
    kept.write_bytes((host.dir / "host.log").read_bytes())
    print(f"{host.name} did not come back; its log: {kept}", flush=True)


def queue_state(c: ChaosCluster) -> dict[str, int]:
    """Where the feedback queue's jobs are: waiting, running, waiting for a retry, failed for good."""
    import redis
    from rq import Queue

    from feedback.settings import FeedbackSettings

    assert c.valkey is not None
    client = redis.Redis.from_url(c.valkey.url)
    try:
        q = Queue(FeedbackSettings.model_fields["queue_name"].default, connection=client)
        return {
            "queued": q.count,
            "started": q.started_job_registry.count,
            "scheduled_retries": q.scheduled_job_registry.count,
            "failed": q.failed_job_registry.count,
        }
    finally:
        client.close()


def stored_since(pg_url: str, load: Load, t: float) -> tuple[int, int]:
    """(votes acknowledged after `t`, how many of those are in PostgreSQL)."""
    acked = load.acked_since(t)
    return len(acked), stored(pg_url, acked)[0] if acked else 0


def stored(pg_url: str, ids: list[str]) -> tuple[int, int]:
    """(acknowledged ids found, rows stored more than once for one id)."""
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT count(DISTINCT id) FROM feedback WHERE id = ANY(:ids)"), {"ids": ids})
            twice = conn.execute(text("SELECT count(*) - count(DISTINCT id) FROM feedback"))
            return int(found.scalar() or 0), int(twice.scalar() or 0)
    finally:
        engine.dispose()


def process_stats(host: Host) -> tuple[float, int]:
    """(resident MB, open file descriptors) of a host's processes together."""
    assert host.proc is not None
    procs = [psutil.Process(host.proc.pid), *psutil.Process(host.proc.pid).children(recursive=True)]
    rss = fds = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            rss += p.memory_info().rss
            fds += p.num_fds()
    return rss / 2**20, fds


# -- the loop soak -------------------------------------------------------------------------------------------


def service_defaults(keys: list[str]) -> dict[str, str]:
    """The service's own values of these PAIRLOOP_ settings (the cluster's trainer otherwise runs the tests' ones)."""
    from trainer.settings import TrainerSettings

    settings = TrainerSettings()
    out = {}
    for key in keys:
        name = key.removeprefix("PAIRLOOP_").lower()
        outer, _, inner = name.partition("__")
        value = getattr(getattr(settings, outer), inner) if inner else getattr(settings, name)
        out[key] = str(value)
    return out


def loop_figures(pg_url: str, round_every: int) -> dict[str, Any]:
    """The backlog (as the check counts it) and the rounds by status."""
    from sqlalchemy.orm import Session

    from trainer.data import count_new
    from trainer.settings import TrainerSettings

    settings = TrainerSettings(database_url=pg_url, min_new_examples=round_every)
    engine = create_engine(pg_url)
    try:
        with Session(engine) as session:
            backlog = count_new(session, settings)
        by_status = Counter(status for _, status, _ in rounds(pg_url))
        return {"backlog": backlog, "rounds": dict(by_status)}
    finally:
        engine.dispose()


def redis_memory(url: str) -> dict[str, float]:
    """Valkey's used memory (MB), its records, and the mean size of a few of them (bytes, MEMORY USAGE)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(itertools.islice(client.scan_iter("pairloop:completion:*", count=1000), 50))
        sizes = [client.memory_usage(k) or 0 for k in keys]
        return {
            "used_mb": round(int(client.info("memory")["used_memory"]) / 2**20, 1),  # type: ignore[index]
            "keys": int(client.dbsize()),
            "record_bytes": round(sum(sizes) / len(sizes)) if sizes else 0,
        }
    finally:
        client.close()


def round_log(pg_url: str) -> list[dict[str, Any]]:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT r.id, r.status, r.started_at, r.finished_at, r.new_examples, r.data_until, r.adapter, "
                    "a.metrics FROM training_rounds r LEFT JOIN adapters a ON a.name = r.adapter ORDER BY r.id"
                )
            ).all()
    finally:
        engine.dispose()
    out = []
    for rid, status, started, finished, new, until, adapter, metrics in rows:
        metrics = metrics if isinstance(metrics, dict) else json.loads(metrics or "{}")
        served = status in ("challenger", "promoted")
        out.append(
            {
                "id": rid,
                "status": status,
                "started": started.timestamp(),
                "finished": finished.timestamp() if finished else None,
                "seconds": round((finished - started).total_seconds(), 1) if finished else None,
                "new_examples": new,
                "train_rows": metrics.get("train_rows"),
                "replayed": metrics.get("replayed"),
                "backlog_left": metrics.get("backlog"),
                # from the newest vote the round used to its adapter serving (as challenger or champion)
                "freshness_s": round((finished - until).total_seconds(), 1) if served and until and finished else None,
                "adapter": adapter,
            }
        )
    return out


def throughput(load: Load, spans: list[tuple[float, float]], t0: float, t1: float) -> dict[str, Any]:
    """Chat requests answered 200 per second while a round trains and outside rounds, in [t0, t1): over the whole
    run, and round by round against the stretches of the same length just before and after it (outside any round),
    which cancels the drift of a long run (adapters that answer shorter make chats faster as the run goes on)."""
    with load.lock:
        done = sorted(o.ended for o in load.outcomes if o.status == 200 and t0 <= o.ended < t1)
    clipped = [(max(a, t0), min(b, t1)) for a, b in spans if b > t0 and a < t1]

    def in_rounds(t: float) -> bool:
        return any(a <= t < b for a, b in clipped)

    def rate(a: float, b: float) -> float:
        return sum(a <= t < b for t in done) / (b - a)

    inside_s = sum(b - a for a, b in clipped)
    inside = sum(in_rounds(t) for t in done)
    outside_s = (t1 - t0) - inside_s
    during = inside / inside_s if inside_s else 0.0
    outside = (len(done) - inside) / outside_s if outside_s else 0.0
    local = []
    for a, b in clipped:
        length = b - a
        around = [
            rate(x, y)
            for x, y in ((a - length, a), (b, b + length))
            if x >= t0 and y <= t1 and not any(c < y and x < d for c, d in clipped)
        ]
        if around:
            local.append(round(rate(a, b) / statistics.mean(around), 3))
    return {
        "during_rounds_per_s": round(during, 2),
        "outside_rounds_per_s": round(outside, 2),
        "ratio": round(during / outside, 3) if outside else 0.0,
        "seconds_in_rounds": round(inside_s),
        "seconds_outside": round(outside_s),
        "ratio_per_round": local,
        "ratio_per_round_median": statistics.median(local) if local else None,
    }


def run_loop_soak(c: ChaosCluster, load: Load, hosts: dict[str, Host], minutes: float, round_every: int) -> dict:
    import psutil as ps

    assert c.valkey is not None and c.valkey.child.pid is not None
    wall0, mono0 = time.time(), time.monotonic()
    end = mono0 + minutes * 60
    samples: list[dict[str, Any]] = []
    while True:
        now = time.monotonic()
        mb = {n: round(process_stats(h)[0]) for n, h in hosts.items()}
        with contextlib.suppress(ps.Error):
            mb["valkey"] = round(ps.Process(c.valkey.child.pid).memory_info().rss / 2**20)
        sample = {"s": round(now - mono0), "chats": len(load.outcomes), "votes_acknowledged": len(load.acked)}
        sample |= loop_figures(c.pg_url, round_every) | {"mb": mb, "redis": redis_memory(c.valkey.url)}
        samples.append(sample)
        print(json.dumps(sample), flush=True)
        if now >= end:
            break
        time.sleep(min(60.0, end - now))
    log = round_log(c.pg_url)
    to_mono = lambda t: t - wall0 + mono0  # noqa: E731
    spans = [(to_mono(r["started"]), to_mono(r["finished"] or time.time())) for r in log]
    figures = {
        "minutes": minutes,
        "round_every": round_every,
        "chats": len(load.outcomes),
        "chats_failed": sum(o.status != 200 for o in load.outcomes),
        # 429: the per-key chat limit (20/s by default; every client here shares one key)
        "chats_failed_by_status": dict(Counter(str(o.status) for o in load.outcomes if o.status != 200)),
        "hung": sum(o.hung for o in load.outcomes),
        "votes_acknowledged": len(load.acked),
        "rounds": log,
        "throughput": throughput(load, spans, mono0, time.monotonic()),
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "samples"}, default=str), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=20.0, help="seconds watched after each fault")
    parser.add_argument("--cut", type=float, default=10.0, help="seconds each network cut lasts")
    parser.add_argument("--soak", type=int, default=0, help="a soak run of this many chat requests instead")
    parser.add_argument("--loop-soak", type=float, default=0, help="the loop under steady traffic, for MINUTES")
    parser.add_argument("--round-every", type=int, default=200, help="loop soak: usable votes that make a round due")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/chaos.py needs root (the gateways' own /etc/hosts in mount namespaces)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on the way out
    model = ensure_built(default_model_dir(ROOT / ".cache"))
    with postgres_database(f"pairloop_chaos_{os.getpid()}") as pg_url:
        run(model, pg_url, args)


def run(model: Path, pg_url: str, args: argparse.Namespace) -> None:
    """The topology on `pg_url`'s database, the load, and the faults (or the soak) `args` ask for."""
    root = Path(tempfile.mkdtemp(prefix="pairloop-chaos-"))
    c = ChaosCluster(root, model, pg_url)
    results: dict[str, Any] = {"command": " ".join(["bench/chaos.py", *sys.argv[1:]])}
    load: Load | None = None
    try:
        c.start_services()
        assert c.valkey is not None
        c.pg_proxy = FaultProxy(make_url(pg_url).port or 5432)
        c.redis_proxy = FaultProxy(c.valkey.port)
        v1, v2 = c.add_vllm(1), c.add_vllm(2)
        c.pool = [vllm_address(1), vllm_address(2)]
        g1, g2 = c.add_gateway(1), c.add_gateway(2)
        hosts = {h.name: h for h in (v1, v2, g1, g2)}
        loop_env = {"PAIRLOOP_CHECK_INTERVAL_S": "3600", "PAIRLOOP_MIN_NEW_EXAMPLES": "4"}
        if args.loop_soak:  # the service's own learning settings, a check every 30 s, a round every few hundred
            loop_env = service_defaults(list(LEARNING_ENV)) | {
                "PAIRLOOP_CHECK_INTERVAL_S": "30",
                "PAIRLOOP_MIN_NEW_EXAMPLES": str(args.round_every),
                # the voters prefer shorter answers: a preference about length, which the default bound (1.5)
                # rejects as a side effect (as `pairloop simulate` does for its length preferences)
                "PAIRLOOP_GATE_MAX_LENGTH_RATIO": "4",
            }
        for name, service in (("worker-1", "worker"), ("worker-2", "worker"), ("trainer", None), ("cron", None)):
            hosts[name] = c.add_worker(name, service, **loop_env)
        for g in (g1, g2):
            c.wait_http(g, "/readyz", timeout_s=600)
        wait_until(lambda: ready(g1) and ready(g2), 300)
        load = Load([g1.url, g2.url], prefer_shorter=bool(args.loop_soak), max_tokens=32 if args.loop_soak else 12)
        threads = [threading.Thread(target=load.chat_client, args=(i, i == 2), daemon=True) for i in range(3)]
        threads.append(threading.Thread(target=load.voter, daemon=True))
        for t in threads:
            t.start()
        time.sleep(10)
        if args.loop_soak:
            results["loop_soak"] = run_loop_soak(c, load, hosts, args.loop_soak, args.round_every)
        elif args.soak:
            watched = {n: hosts[n] for n in ("gateway-1", "gateway-2", "worker-1", "worker-2", "trainer", "cron")}
            t0 = time.monotonic()
            samples: list[dict[str, Any]] = []  # every tenth of the run: requests so far, (MB, fds) per host
            for tenth in range(11):
                while len(load.outcomes) < args.soak * tenth // 10:
                    time.sleep(2)
                stats = {n: process_stats(h) for n, h in watched.items()}
                samples.append(
                    {"requests": len(load.outcomes), "s": round(time.monotonic() - t0)}
                    | {n: [round(mb), fds] for n, (mb, fds) in stats.items()}
                )
                print(json.dumps(samples[-1]), flush=True)
                if tenth < 10:  # a round now and then, as the loop runs: ten in all
                    with contextlib.suppress(httpx.HTTPError):
                        httpx.post(f"{g1.url}/admin/train", headers=AUTH, timeout=30)
            results["soak"] = {
                "requests": len(load.outcomes),
                "seconds": round(time.monotonic() - t0),
                "failed": sum(o.status != 200 for o in load.outcomes),
                "hung": sum(o.hung for o in load.outcomes),
                "votes_acknowledged": len(load.acked),
                "rounds": [status for _, status, _ in rounds(c.pg_url)],
                "samples": samples,
            }
            print(json.dumps(results["soak"]), flush=True)
        else:
            results["faults"] = run_faults(c, load, hosts, args.window, args.cut)
        load.stop.set()
        for t in threads:
            t.join(CLIENT_TIMEOUT_S + 10)
        # Every job done: none waiting, running or waiting for a retry (retries come 0, 5, 30, 120 s apart).
        drained = wait_until(lambda: not any(v for k, v in queue_state(c).items() if k != "failed"), 300, 1.0)
        results["queue_at_end"] = queue_state(c) | {"drained_after_s": drained}
        print(json.dumps(results["queue_at_end"]), flush=True)
        time.sleep(2)
        ids = list(load.acked)
        found, twice = stored(pg_url, ids)
        results["votes"] = {
            "sent": load.votes_sent,
            "acknowledged": len(ids),
            "lost": len(ids) - found,
            "stored_twice": twice,
        }
        print(json.dumps(results["votes"]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    finally:
        if load:
            load.stop.set()
        c.stop()


if __name__ == "__main__":
    main()
