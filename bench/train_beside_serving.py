"""Chat throughput while a training round runs on the same machine, against none, side by side in one run.

    .venv/bin/python bench/train_beside_serving.py [--phase-s 40] [--repeats 2] [--clients 4]

Starts vLLM (the CPU build) on the tiny model and `pairloop up` in front of it (no workers, no training of its own),
then keeps `--clients` chat clients busy (max_tokens 16) and alternates phases of `--phase-s` seconds:
  idle       nothing else runs
  trainer    a training worker as the service runs it (PAIRLOOP_TRAIN_PRIORITY, PAIRLOOP_TRAIN_THREADS: the defaults)
  10:1       nice 10, one thread (what a nice value gives)
  unbounded  the same rounds at full priority on every core (nice 0, torch's default threads): how the service
             trained before those settings
Each training phase runs `trainer.round.run_round` on 96 preference pairs, round after round, in a process of its
own (as the training worker is). Prints chat requests per second in each phase, the ratio of each training phase to
the idle phases around it (target: at least 0.8 with the defaults), and the rounds' training speed in each, which is
what serving's share costs the loop.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway import engine_and_gateway  # noqa: E402
from bench.pairs import pick_model  # noqa: E402
from trainer.settings import TrainerSettings  # noqa: E402
from workers.runner import lower_priority  # noqa: E402

NAME = "pairloop-tiny"
DEFAULTS = TrainerSettings.model_fields


def trainer_main(model: str, priority: str, threads: int, out: Path) -> None:
    """The training phase's process: its priority set as the training worker sets it, rounds until SIGTERM, their
    figures to `out`."""
    lower_priority(priority if priority == "idle" else int(priority))
    from bench.train import make_rows
    from trainer.data import RoundData
    from trainer.round import run_round

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rows = make_rows(128)
    tmp = Path(tempfile.mkdtemp(prefix="pairloop-bench-trainer-"))
    settings = TrainerSettings.model_validate(
        {"data_dir": tmp, "model": model, "train_threads": threads, "gate_length_prompts": 4}
    )
    version = 0
    while not stop.is_set():
        version += 1
        data = RoundData("dpo", rows[:96], rows[96:], 96, 0, 0, None)
        result = run_round(data, None, version, settings)
        with out.open("a") as handle:
            handle.write(json.dumps({"t": time.time(), "examples_per_second": result.metrics["examples_per_second"]}))
            handle.write("\n")


class Load:
    def __init__(self, url: str, key: str, clients: int) -> None:
        self.url = url
        self.auth = {"Authorization": f"Bearer {key}"}
        self.done: list[float] = []
        self.failed = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]

    def client(self, i: int) -> None:
        n = 0
        with httpx.Client(timeout=120, headers=self.auth) as client:
            while not self.stop.is_set():
                n += 1
                body = {"messages": [{"role": "user", "content": f"Tell me about tea, {i}-{n}."}], "max_tokens": 16}
                r = client.post(f"{self.url}/v1/chat/completions", json=body)
                with self.lock:
                    if r.status_code == 200:
                        self.done.append(time.monotonic())
                    else:
                        self.failed += 1

    def rate(self, t0: float, t1: float) -> float:
        with self.lock:
            return sum(t0 <= t < t1 for t in self.done) / (t1 - t0)


def run_phase(kind: str, load: Load, model: str, phase_s: float, tmp: Path) -> dict[str, Any]:
    """`idle`, `trainer` (the defaults), `unbounded` (nice 0, every core), or `NICE:THREADS` (NICE `idle`: the
    SCHED_IDLE policy)."""
    proc = None
    figures = tmp / f"{kind.replace(':', '-')}-{time.monotonic():.0f}.jsonl"
    if kind != "idle":
        nice, threads = "0", 0  # unbounded
        if kind == "trainer":
            nice, threads = str(DEFAULTS["train_priority"].default), DEFAULTS["train_threads"].default
        elif ":" in kind:
            nice, threads = kind.split(":")[0], int(kind.split(":")[1])
        cmd = [sys.executable, __file__, "--trainer", model, str(nice), str(threads), str(figures)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(min(10.0, phase_s / 4))  # the model loaded and training: measure a round at work, not its start
    t0 = time.monotonic()
    time.sleep(phase_s)
    t1 = time.monotonic()
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    speeds = (
        [json.loads(line)["examples_per_second"] for line in figures.read_text().splitlines()]
        if figures.exists()
        else []
    )
    row = {"phase": kind, "chats_per_s": load.rate(t0, t1), "rounds": len(speeds), "examples_per_s": speeds}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--trainer":
        model, nice, threads, out = sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
        trainer_main(model, nice, threads, out)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--compare",
        default="trainer,10:1,unbounded",
        help="training phases, each after an idle one: trainer, unbounded, or NICE:THREADS (NICE `idle`: SCHED_IDLE)",
    )
    args = parser.parse_args()
    kinds = args.compare.split(",")

    model = pick_model(None)
    tmp = Path(tempfile.mkdtemp(prefix="pairloop-bench-beside-"))
    with engine_and_gateway(model, tmp, NAME, args=("--workers", "0", "--no-training")) as (_, url, key):
        load = Load(url, key, args.clients)
        for t in load.threads:
            t.start()
        time.sleep(10)  # warm-up
        rows = []
        for _ in range(args.repeats):
            for kind in kinds:
                rows.append(run_phase("idle", load, model, args.phase_s, tmp))
                rows.append(run_phase(kind, load, model, args.phase_s, tmp))
        rows.append(run_phase("idle", load, model, args.phase_s, tmp))
        load.stop.set()
        for t in load.threads:
            t.join(130)
        print(
            f"\n{args.clients} clients, phases of {args.phase_s:g} s, defaults: PAIRLOOP_TRAIN_PRIORITY "
            f"{DEFAULTS['train_priority'].default}, PAIRLOOP_TRAIN_THREADS {DEFAULTS['train_threads'].default}; "
            f"{load.failed} chats failed"
        )
        for kind in kinds:
            ratios, speeds = [], []
            for i, row in enumerate(rows):
                if row["phase"] == kind:
                    around = statistics.mean([rows[i - 1]["chats_per_s"], rows[i + 1]["chats_per_s"]])
                    ratios.append(row["chats_per_s"] / around)
                    speeds += row["examples_per_s"]
            speed = f"{statistics.median(speeds):.1f} examples/s" if speeds else "no round finished"
            print(
                f"{kind:<10} chat throughput / idle around it: {', '.join(f'{r:.2f}' for r in ratios)} "
                f"(mean {statistics.mean(ratios):.2f}); training: {speed}"
            )


if __name__ == "__main__":
    main()
