"""The periodic check and a round's selection on stores of growing size: their cost should follow the new data
and the round's size, not the store's.

    .venv/bin/python bench/round_growth.py                           # 1k, 10k, 100k, 1M votes; SQLite and PostgreSQL
    .venv/bin/python bench/round_growth.py --sizes 1000,10000 --backends sqlite    # a quick look

Each store holds N pairwise votes on distinct two-choice completions from 50 judges, of which all but the newest
100 were taken by earlier rounds (as in a running service), migrated by the project's own migrations. Per store:
`trainer.data.count_new` (what the cron check runs every 30 s) and `trainer.data.select_round` with the default
settings (the newest pending examples, a replay sample, evaluation rows), each the median of several runs, and
the Python memory a selection allocates at its peak (tracemalloc). It prints one line per store and, per backend,
the ratio of the largest store's times to the smallest's. PostgreSQL: a database of its own on the machine's
server (PAIRLOOP_TEST_POSTGRES_URL, as the tests), dropped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.migrations import upgrade  # noqa: E402
from feedback.store import Completion, Feedback, make_engine  # noqa: E402
from tests.postgres import postgres_database  # noqa: E402
from trainer.data import count_new, select_round  # noqa: E402
from trainer.settings import TrainerSettings  # noqa: E402

PENDING = 100
BATCH = 20_000


def spread(completion_id: str) -> float:
    """A split value as uniform as `feedback.store.split_of`'s, without building a record per row."""
    return int.from_bytes(hashlib.sha256(completion_id.encode()).digest()[:8], "big") / 2**64


def fill(url: str, n: int) -> None:
    """`n` votes, the newest PENDING of them not yet taken by a round."""
    engine = make_engine(url)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    try:
        for start in range(0, n, BATCH):
            completions, feedback = [], []
            for i in range(start, min(n, start + BATCH)):
                cid = f"chatcmpl-{uuid.uuid4().hex}"
                at = t0 + dt.timedelta(seconds=i)
                completions.append(
                    {
                        "id": cid,
                        "model": "pairloop-tiny",
                        "messages": [{"role": "user", "content": f"Tell me about tea, {i}."}],
                        "sampling": {"n": 2, "temperature": 1.0},
                        "text_a": f"Tea is a drink, {i}.",
                        "text_b": f"Thank you for asking: tea is a fine drink, {i}.",
                        "adapter_a": "pairloop-tiny",
                        "adapter_b": "pairloop-tiny",
                        "finish_a": "stop",
                        "finish_b": "stop",
                        "key_id": "bench",
                        "user": f"judge-{i % 50}",
                        "created_at": at,
                        "finished_at": at,
                    }
                )
                feedback.append(
                    {
                        "id": str(uuid.uuid4()),
                        "completion_id": cid,
                        "kind": "pairwise",
                        "judge_key_id": "bench",
                        "judge_user": f"judge-{i % 50}",
                        "preference": str(i % 2),
                        "user_written": False,
                        "received_at": at,
                        "stored_at": at,
                        "split": spread(cid),
                        "round_id": None if i >= n - PENDING else 1 + i // 512,
                    }
                )
            with engine.begin() as conn:
                conn.execute(insert(Completion), completions)
                conn.execute(insert(Feedback), feedback)
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    finally:
        engine.dispose()


def timed(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(url: str, settings: TrainerSettings, runs: int) -> dict[str, float]:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            assert count_new(session, settings) > 0
            check = timed(lambda: count_new(session, settings), runs)
            select = timed(lambda: select_round(session, settings, salt=1), runs)
            tracemalloc.start()
            data = select_round(session, settings, salt=2)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return {"check_s": check, "select_s": select, "peak_mib": peak / 2**20, "train_rows": len(data.train)}
    finally:
        engine.dispose()


def run_backend(backend: str, sizes: list[int], settings: TrainerSettings, runs: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        started = time.perf_counter()
        if backend == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                url = f"sqlite:///{Path(tmp) / 'store.db'}"
                upgrade(url)
                fill(url, n)
                built = time.perf_counter() - started
                figures = measure(url, settings, runs)
        else:
            with postgres_database(f"pairloop_growth_{os.getpid()}_{n}") as url:
                upgrade(url)
                fill(url, n)
                built = time.perf_counter() - started
                figures = measure(url, settings, runs)
        row = {"backend": backend, "votes": n, **figures, "built_s": built}
        print(
            f"{backend:<10} {n:>9,} votes   check {figures['check_s'] * 1000:8.2f} ms   "
            f"select {figures['select_s'] * 1000:8.2f} ms   peak {figures['peak_mib']:6.1f} MiB   "
            f"({figures['train_rows']} train rows; store built in {built:.0f} s)",
            flush=True,
        )
        rows.append(row)
    first, last = rows[0], rows[-1]
    print(
        f"{backend:<10} {last['votes']:,} / {first['votes']:,} votes: check x{last['check_s'] / first['check_s']:.2f}, "
        f"select x{last['select_s'] / first['select_s']:.2f}",
        flush=True,
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated store sizes")
    parser.add_argument("--backends", default="sqlite,postgres", help="sqlite, postgres or both")
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (the median is printed)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    settings = TrainerSettings(max_user_share=1.0)  # the defaults, but no judge cap (50 judges would shrink it)
    print(
        f"check: trainer.data.count_new; select: trainer.data.select_round (max_round_examples "
        f"{settings.max_round_examples}, replay {settings.replay_fraction}, eval {settings.max_eval_examples}); "
        f"{PENDING} votes pending in each store; median of {args.runs}",
        flush=True,
    )
    for backend in args.backends.split(","):
        run_backend(backend, sizes, settings, args.runs)


if __name__ == "__main__":
    main()
