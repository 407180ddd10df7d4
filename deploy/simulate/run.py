"""`pairloop simulate`: simulated users with a declared preference vote through the public API, and the
loop's own rounds (cron check, training worker, gate, live A/B test, hot swap) learn it.

One simulation runs against one service: by default a fresh `pairloop up` started here in its own data dir
(so that its votes are the only ones), or a running service given by `--url`. Per round it

1. sends prompts from the voting set (`n: 2`, as simulated users `sim-0`..) and votes on each pair by the
   preference, until the cron check starts a training round;
2. waits for the round (users pause: training and generation share the CPU);
3. while the new adapter is the challenger, keeps voting: those votes decide the live A/B test;
4. samples the champion on the held-out prompts (pinned with `model: <name>@<adapter>`) and judges it
   against the base model's answers to the same prompts with the same seeds (`<name>@base`).
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from deploy.local.process import free_port, spawn, terminate
from deploy.simulate.preferences import Matchup, Preference
from trainer.tiny.corpus import PROMPTS, TOPICS, words


class SimulationError(Exception):
    """The service did not behave as the simulation needs (not ready, an API error, no round)."""


def prompt_sets() -> tuple[list[str], list[str]]:
    """(voting prompts, held-out prompts): every topic-template pair, one in five held out."""
    voting: list[str] = []
    held_out: list[str] = []
    for i, topic in enumerate(TOPICS):
        for j, template in enumerate(PROMPTS):
            (held_out if (i + j) % 5 == 0 else voting).append(template.format(t=topic))
    return voting, held_out


@dataclass
class SimConfig:
    preference: Preference
    rounds: int = 5
    examples_per_round: int = 64
    eval_prompts: int = 80
    users: int = 16
    concurrency: int = 8
    max_tokens: int = 96
    time_limit_s: float = 900.0
    check_interval_s: int = 2
    ab_min_votes: int = 20
    ab_fraction: float = 0.5
    learning_rate: float = 2e-3
    epochs: float = 3.0
    sft_weight: float = 1.0
    target: float | None = 0.75
    seed: int = 0


@dataclass
class RoundFigures:
    round: int
    champion: str
    elapsed_s: float
    votes: int
    property_rate: float
    base_property_rate: float
    mean_words: float
    wins: int
    losses: int
    ties: int
    win_rate: float | None
    win_rate_ties_half: float | None
    training_round: dict[str, Any] = field(default_factory=dict)


class Api:
    """The service's public HTTP API, as any client uses it; waits out 429 and 503 with their Retry-After."""

    def __init__(self, url: str, key: str, model: str) -> None:
        self.model = model
        self.client = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=300
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        for _ in range(120):
            try:
                resp = await self.client.request(method, path, json=body)
            except httpx.TransportError as exc:
                raise SimulationError(f"{method} {self.client.base_url}{path} failed: {exc!r}") from exc
            if resp.status_code in (429, 503):
                await asyncio.sleep(min(float(resp.headers.get("Retry-After", "1")), 5.0))
                continue
            if resp.status_code >= 400:
                raise SimulationError(f"{method} {path} answered {resp.status_code}: {resp.text[:300]}")
            return resp.json()
        raise SimulationError(f"{method} {path}: still throttled or unavailable after 120 tries")

    async def chat(
        self,
        prompt: str,
        *,
        n: int,
        max_tokens: int,
        user: str | None = None,
        pin: str | None = None,
        seed: int | None = None,
    ) -> Any:
        body: dict[str, Any] = {
            "model": f"{self.model}@{pin}" if pin else self.model,
            "messages": [{"role": "user", "content": prompt}],
            "n": n,
            "max_tokens": max_tokens,
        }
        if user:
            body["user"] = user
        if seed is not None:
            body["seed"] = seed
        return await self.call("POST", "/v1/chat/completions", body)


@dataclass
class Service:
    """A `pairloop up` child in its own data dir, for one simulation."""

    data_dir: Path
    model_dir: str
    env: dict[str, str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        env = {
            **os.environ,
            "PAIRLOOP_DATA_DIR": str(self.data_dir),
            "PAIRLOOP_MODEL": self.model_dir,
            "PAIRLOOP_SERVED_MODEL_NAME": "pairloop-tiny",
            "PAIRLOOP_PORT": str(self.port),
            **self.env,
        }
        for name in ("PAIRLOOP_REDIS_URL", "PAIRLOOP_DATABASE_URL", "PAIRLOOP_VLLM_URLS", "PAIRLOOP_API_KEYS"):
            env.pop(name, None)  # its own embedded Redis, SQLite store, vLLM child and development key
        # spawn: its own process group, and SIGTERM when this process dies, however it dies
        self.proc = spawn([sys.executable, "-m", "deploy", "up"], env=env, log_path=self.data_dir / "service.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def key(self) -> str:
        return (self.data_dir / "secrets" / "dev-api-key").read_text().strip()

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise SimulationError(f"`pairloop up` exited ({self.proc.returncode}); see {self.data_dir}/service.log")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise SimulationError(f"the service was not ready after {timeout_s:.0f} s; see {self.data_dir}/service.log")

    def stop(self) -> None:
        if self.proc:
            terminate(self.proc, 60.0)  # `pairloop up` stops its children, then exits


def service_env(config: SimConfig) -> dict[str, str]:
    """The loop's settings for a simulation: rounds of `examples_per_round`, a check every few seconds."""
    env = {
        "PAIRLOOP_MIN_NEW_EXAMPLES": str(config.examples_per_round),
        "PAIRLOOP_CHECK_INTERVAL_S": str(config.check_interval_s),
        "PAIRLOOP_AB_MIN_VOTES": str(config.ab_min_votes),
        "PAIRLOOP_AB_FRACTION": str(config.ab_fraction),
        "PAIRLOOP_TRAIN__SEED": str(config.seed),
        "PAIRLOOP_TRAIN__LEARNING_RATE": str(config.learning_rate),
        "PAIRLOOP_TRAIN__EPOCHS": str(config.epochs),
        "PAIRLOOP_TRAIN__SFT_WEIGHT": str(config.sft_weight),
    }
    # The gate's length check guards against answers drifting in length when nobody asked for it. Here users ask
    # for it (shorter, longer; polite answers are longer by nature), and on a round of about 50 votes the check sees
    # about ten held-out prompts: the base model's greedy mean length came out 13.6 and 26.9 tokens in two runs.
    env["PAIRLOOP_GATE_MAX_LENGTH_RATIO"] = "4.0"
    return env


class Simulation:
    def __init__(self, api: Api, config: SimConfig, out: Path) -> None:
        self.api = api
        self.config = config
        self.out = out
        self.rng = random.Random(config.seed)
        self.voting, held_out = prompt_sets()
        self.held_out = random.Random(config.seed + 1).sample(held_out, min(config.eval_prompts, len(held_out)))
        self.base_texts: list[str] = []
        self.votes = 0
        self.started = time.monotonic()
        self.figures: list[RoundFigures] = []
        self.bar: tqdm[Any] | None = None

    # -- users -------------------------------------------------------------------------------------

    async def _one_vote(self) -> None:
        # Drawn before the first await, in the order gather starts the users: the same seed, the same requests.
        user = f"sim-{self.rng.randrange(self.config.users)}"
        prompt, seed = self.rng.choice(self.voting), self.rng.randrange(2**31)
        data = await self.api.chat(prompt, n=2, max_tokens=self.config.max_tokens, user=user, seed=seed)
        a, b = (c["message"]["content"] or "" for c in data["choices"])
        verdict = self.config.preference.compare(a, b)
        await self.api.call(
            "POST",
            "/v1/feedback",
            {
                "completion_id": data["id"],
                "feedback_token": data["pairloop"]["feedback_token"],
                "feedback_id": str(uuid.uuid4()),
                "kind": "pairwise",
                "preference": {1: 0, -1: 1, 0: "tie"}[verdict],
                "user": user,
            },
        )
        self.votes += 1
        if self.bar is not None:
            self.bar.update(1)

    async def vote_batch(self) -> None:
        await asyncio.gather(*(self._one_vote() for _ in range(self.config.concurrency)))

    # -- the loop, seen from outside ---------------------------------------------------------------

    async def latest_round(self) -> dict[str, Any] | None:
        rounds = (await self.api.call("GET", "/admin/train"))["rounds"]
        return rounds[0] if rounds else None

    async def routing(self) -> dict[str, Any]:
        routing: dict[str, Any] = (await self.api.call("GET", "/admin/adapters"))["routing"]
        return routing

    def _phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def _out_of_time(self) -> bool:
        return time.monotonic() - self.started > self.config.time_limit_s

    async def next_round(self, after: int) -> dict[str, Any] | None:
        """Vote until the cron check starts a round after round `after`, then wait for it to finish."""
        self._phase("voting")
        while True:
            latest = await self.latest_round()
            if latest and latest["id"] > after:
                break
            if self._out_of_time():
                return None
            await self.vote_batch()
        self._phase(f"training round {latest['id']}")
        while latest["status"] == "running":
            await asyncio.sleep(1.0)
            latest = await self.latest_round()
            assert latest is not None
        if latest["status"] == "challenger":
            self._phase(f"A/B test of {latest['adapter']}")
            while (await self.routing()).get("challenger") == latest["adapter"] and not self._out_of_time():
                current = await self.latest_round()
                if current and current["id"] > latest["id"]:
                    break  # a round started by hand (the cron check waits for the trial) will supersede it
                await self.vote_batch()
        return latest

    # -- measuring ---------------------------------------------------------------------------------

    async def wait_served(self, pin: str, timeout_s: float = 60.0) -> None:
        """Until the gateway serves `pin`: it follows a swap made by the training worker within its poll interval,
        which a loaded machine stretches, and a pin it does not serve yet is a 404."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.api.chat("ping", n=1, max_tokens=1, pin=pin)
                return
            except SimulationError as exc:
                if "answered 404" not in str(exc) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.5)

    async def sample(self, pin: str) -> list[str]:
        """One answer per held-out prompt from `pin` (`base` or an adapter), each prompt with its own seed."""
        await self.wait_served(pin)
        sem = asyncio.Semaphore(self.config.concurrency * 2)

        async def one(i: int, prompt: str) -> str:
            async with sem:
                data = await self.api.chat(prompt, n=1, max_tokens=self.config.max_tokens, pin=pin, seed=1000 + i)
            return str(data["choices"][0]["message"]["content"] or "")

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(self.held_out))))

    async def evaluate(self, number: int, champion: str | None, training_round: dict[str, Any]) -> RoundFigures:
        self._phase("evaluating")
        texts = await self.sample(champion or "base")
        pref = self.config.preference
        matchup = Matchup.judge(pref, texts, self.base_texts)
        base_rate = sum(map(pref.has, self.base_texts)) / len(self.base_texts)
        return RoundFigures(
            round=number,
            champion=champion or "base",
            elapsed_s=round(time.monotonic() - self.started, 1),
            votes=self.votes,
            property_rate=round(sum(map(pref.has, texts)) / len(texts), 4),
            base_property_rate=round(base_rate, 4),
            mean_words=round(statistics.fmean(len(words(t)) for t in texts), 2),
            wins=matchup.wins,
            losses=matchup.losses,
            ties=matchup.ties,
            win_rate=_round(matchup.win_rate),
            win_rate_ties_half=_round(matchup.win_rate_ties_half),
            training_round={
                k: training_round[k] for k in ("id", "status", "adapter", "new_examples") if k in training_round
            },
        )

    async def run(self) -> list[RoundFigures]:
        cfg = self.config
        models = (await self.api.call("GET", "/v1/models"))["data"]
        self.api.model = models[0]["id"]
        self.base_texts = await self.sample("base")
        if cfg.preference.kind in ("shorter", "longer"):
            median = int(statistics.median(len(words(t)) for t in self.base_texts))
            cfg.preference = Preference(cfg.preference.kind, cfg.preference.word, median)
        routing = await self.routing()
        start = await self.latest_round()
        first = await self.evaluate(0, routing.get("champion"), {})
        self.record(first)
        after = start["id"] if start else 0
        with tqdm(desc=cfg.preference.label, unit="vote", dynamic_ncols=True, file=sys.stderr) as self.bar:
            for number in range(1, cfg.rounds + 1):
                done = await self.next_round(after)
                if done is None:
                    tqdm.write(f"time limit ({cfg.time_limit_s:.0f} s) reached after {number - 1} round(s)")
                    break
                after = done["id"]
                routing = await self.routing()
                row = await self.evaluate(number, routing.get("champion"), done)
                self.record(row)
                if cfg.target is not None and (row.win_rate or 0) >= cfg.target:
                    tqdm.write(f"[{cfg.preference.kind}] win rate {row.win_rate:.2f} reached the target {cfg.target}")
                    break
        self.bar = None
        return self.figures

    def record(self, row: RoundFigures) -> None:
        self.figures.append(row)
        tr = row.training_round
        what = f"round {tr['id']} {tr['status']}" if tr else "before training"
        tqdm.write(
            f"[{self.config.preference.kind}] round {row.round} ({what}, {row.elapsed_s:.0f} s, {row.votes} votes): "
            f"champion {row.champion}: {self.config.preference.property_label} {row.property_rate:.2f} "
            f"(base {row.base_property_rate:.2f}), {row.mean_words:.1f} words; vs base: "
            f"{row.wins}-{row.losses}-{row.ties} (win-loss-tie), win rate {_fmt(row.win_rate)} "
            f"(ties as half: {_fmt(row.win_rate_ties_half)})"
        )
        self.write()

    def write(self) -> None:
        """results.json and results.csv in `out`, rewritten after every round."""
        self.out.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in self.figures]
        meta = {
            "preference": self.config.preference.kind,
            "label": self.config.preference.label,
            "property": self.config.preference.property_label,
            "config": {k: v for k, v in asdict(self.config).items() if k != "preference"},
        }
        (self.out / "results.json").write_text(json.dumps({**meta, "rounds": rows}, indent=2))
        with (self.out / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "training_round"])
            writer.writeheader()
            for r in rows:
                writer.writerow({k: v for k, v in r.items() if k != "training_round"})


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def load_results(out: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(out.glob("*/results.json")):
        yield json.loads(path.read_text())


def _plotted_win_rate(row: dict[str, Any]) -> float:
    """The base against itself (same seeds, so all ties) is drawn at 0.5; no decisive comparison otherwise: a gap."""
    if row["win_rate"] is not None:
        return float(row["win_rate"])
    return 0.5 if row["champion"] == "base" else float("nan")


def plot(results: list[dict[str, Any]], path: Path, target: float = 0.75) -> None:
    """One PNG: per preference, the property rate (left) and the win rate against the base (right) by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for res in results:
        rounds = [r["round"] for r in res["rounds"]]
        (line,) = left.plot(rounds, [r["property_rate"] for r in res["rounds"]], marker="o", label=res["label"])
        right.plot(
            rounds,
            [_plotted_win_rate(r) for r in res["rounds"]],
            marker="o",
            color=line.get_color(),
            label=res["label"],
        )
    left.set(title="Champion: rate of the preferred property (held-out prompts)", xlabel="round", ylim=(0, 1.02))
    right.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}")
    right.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    right.set(title="Champion vs base model: win rate (ties left out)", xlabel="round", ylim=(0, 1.02))
    last = max((r["round"] for res in results for r in res["rounds"]), default=1)
    for ax in (left, right):
        ax.set_xlim(-0.2, last + 0.2)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def simulate(api: Api, config: SimConfig, out: Path) -> list[RoundFigures]:
    sim = Simulation(api, config, out)
    try:
        return await sim.run()
    finally:
        await api.close()


def run_one(
    config: SimConfig, out: Path, *, model_dir: str | None, url: str | None, key: str | None
) -> list[RoundFigures]:
    """One preference: against `url`, or against a fresh service started (and stopped) here."""
    if url:
        if not key:
            raise SimulationError("--url needs --api-key (scopes chat, feedback and admin)")
        return asyncio.run(simulate(Api(url, key, ""), config, out))
    assert model_dir is not None
    # SIGTERM as Ctrl-C: unwind, so that the service started here is stopped with its children
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    service = Service(out / "service", model_dir, service_env(config))
    service.start()
    try:
        tqdm.write(f"[{config.preference.kind}] starting `pairloop up` in {service.data_dir} (log: service.log)")
        service.wait_ready()
        return asyncio.run(simulate(Api(service.url, service.key(), ""), config, out))
    finally:
        service.stop()
