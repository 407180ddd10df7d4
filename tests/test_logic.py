"""The pure decisions, without an engine: routing transitions, choosing and pinning the two sides, request
planning, the feedback conflict rules, the gate, the A/B rule, the per-judge cap, tokens, the error shape,
and the check for misspelled settings."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from deploy import cli
from deploy import settings as deploy_settings
from feedback.errors import FeedbackConflict, InvalidFeedback, TokenRejected
from feedback.schema import PairwiseFeedback, RatingFeedback, claim_value, fingerprint
from feedback.service import FeedbackService
from feedback.settings import FeedbackSettings
from serving import tokens
from serving.adapters.router import AdapterRouter
from serving.adapters.routing import HISTORY_LIMIT, Routing, challenging, promoting, rolling_back, unchallenged
from serving.chat import ChatService
from serving.errors import AdapterError, InvalidRequest, ModelNotFound, install_handlers
from serving.protocol import ChatCompletionRequest, CompletionRecord, SamplingParams, ServedChoice
from serving.settings import PairloopSettings, ServingSettings
from tests.store_helpers import record
from trainer.ab import decide
from trainer.data import _cap, held_out
from trainer.leaderboard import ELO, leaderboard
from trainer.round import Scores, gate
from trainer.settings import TrainerSettings

# -- routing transitions ----------------------------------------------------------------------------


def test_promote_rollback_challenge_retire() -> None:
    r = promoting("v1", "/a/v1")(Routing())
    assert (r.champion, r.history, r.paths) == ("v1", [None], {"v1": "/a/v1"})
    r = challenging("v2", "/a/v2", 0.5)(r)
    assert (r.champion, r.challenger, r.ab_fraction) == ("v1", "v2", 0.5)
    assert r.served() == ["v1", "v2"]
    # promoting the challenger ends its trial; the old champion is kept for rollback
    r = promoting("v2", "/a/v2")(r)
    assert (r.champion, r.challenger, r.history) == ("v2", None, [None, "v1"])
    assert set(r.paths) == {"v1", "v2"}
    r = rolling_back(r)
    assert (r.champion, r.challenger, r.history) == ("v1", None, [None])
    r = rolling_back(r)
    assert r.champion is None and r.served() == []
    with pytest.raises(AdapterError, match="no earlier champion") as caught:
        rolling_back(r)
    assert caught.value.status_code == 409


def test_transitions_refuse_what_makes_no_sense_and_bound_the_history() -> None:
    r = promoting("v1", "/a/v1")(Routing())
    with pytest.raises(AdapterError, match="champion already"):
        promoting("v1", "/a/v1")(r)
    with pytest.raises(AdapterError, match="champion already"):
        challenging("v1", "/a/v1", 0.5)(r)
    r = unchallenged(challenging("v2", "/a/v2", 0.5)(r))
    assert r.challenger is None and r.champion == "v1"
    for i in range(2, 30):
        r = promoting(f"v{i}", f"/a/v{i}")(r)
    assert len(r.history) == HISTORY_LIMIT and r.previous() == "v28"
    assert set(r.paths) == {*r.history} - {None} | {"v29"}, "paths of versions that can no longer serve go"


# -- choosing and pinning the two sides ---------------------------------------------------------------


class FakePool:
    backends: list[Any] = []  # noqa: RUF012

    def base_model(self) -> str:
        return "base-model"


def router(routing: Routing, seed: int = 0) -> AdapterRouter:
    r = AdapterRouter(None, FakePool(), None, rng=random.Random(seed))  # type: ignore[arg-type]
    r.routing = routing
    return r


def chat_service(routing: Routing | None = None, **settings: Any) -> ChatService:
    values: dict[str, Any] = {"served_model_name": "pairloop-tiny", "max_tokens_limit": 100, **settings}
    follower = router(routing) if routing is not None else None
    return ChatService(ServingSettings(**values), FakePool(), None, None, None, b"s" * 32, router=follower)  # type: ignore[arg-type]


def test_choices_are_the_champion_or_champion_against_challenger_on_random_sides() -> None:
    assert router(Routing()).choose(2, "base") == ["base", "base"]
    assert router(Routing(champion="v1")).choose(1, "base") == ["v1"]
    on_trial = Routing(champion="v1", challenger="v2", ab_fraction=0.5)
    follower = router(on_trial, seed=7)
    pairs = Counter(tuple(follower.choose(2, "base")) for _ in range(2000))
    assert set(pairs) == {("v1", "v1"), ("v1", "v2"), ("v2", "v1")}
    played = pairs[("v1", "v2")] + pairs[("v2", "v1")]
    assert 900 < played < 1100, pairs  # ab_fraction 0.5 of 2000
    assert abs(pairs[("v1", "v2")] - pairs[("v2", "v1")]) < 150, "the challenger's side is random"
    assert router(on_trial).choose(1, "base") == ["v1"], "a single choice never plays the challenger"
    same_seed = [router(on_trial, seed=3).choose(2, "b") for _ in range(20)]
    assert all(p == same_seed[0] for p in same_seed), "a seeded router draws the same sides"


def test_pinning_a_version() -> None:
    service = chat_service(Routing(champion="v1", challenger="v2", ab_fraction=0.5))
    assert service.pinned(None, "pairloop-tiny") is None
    assert service.pinned("pairloop-tiny", "pairloop-tiny") is None
    assert service.pinned("pairloop-tiny@base", "pairloop-tiny") == "base-model"
    assert service.pinned("pairloop-tiny@v2", "pairloop-tiny") == "v2"
    with pytest.raises(ModelNotFound, match="'pairloop-tiny@base' or 'pairloop-tiny@v1', 'pairloop-tiny@v2'"):
        service.pinned("pairloop-tiny@v0", "pairloop-tiny")
    with pytest.raises(ModelNotFound, match="serves 'pairloop-tiny'"):
        service.pinned("gpt-4", "pairloop-tiny")


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **fields})


def test_request_planning() -> None:
    service = chat_service(Routing(champion="v1"))
    plan = service.plan(request(max_tokens=20, temperature=0.7, stop="\n", seed=5))
    assert plan.adapters == ["v1", "v1"] and plan.groups() == {"v1": [0, 1]}
    assert plan.sampling.n == 2 and plan.sampling.stop == ["\n"] and plan.sampling.seed == 5
    assert "n" not in plan.body and "model" not in plan.body and plan.body["max_tokens"] == 20
    assert service.plan(request(n=1)).adapters == ["v1"]
    assert service.plan(request(model="pairloop-tiny@base")).adapters == ["base-model", "base-model"]
    assert service.plan(request(max_completion_tokens=9)).body["max_tokens"] == 9
    refused = [
        (request(n=3), "n"),
        (request(temperature=0), "temperature"),
        (request(temperature=1e-9), "temperature"),
        (request(temperature=0.009), "temperature"),
        (request(top_p=1e-9), "top_p"),
        (request(max_tokens=101), "max_tokens"),
        (request(max_tokens=5, max_completion_tokens=5), "max_tokens"),
    ]
    for req, param in refused:
        with pytest.raises(InvalidRequest) as caught:
            service.plan(req)
        assert caught.value.param == param and caught.value.status_code == 400
    assert service.plan(request(n=1, temperature=0)).sampling.temperature == 0
    assert service.plan(request(temperature=0.01, top_p=1e-5)).sampling.temperature == 0.01
    assert service.plan(request()).body["max_tokens"] == 100, "no max_tokens: the default, capped by the limit"
    assert chat_service(max_tokens_limit=300).plan(request()).body["max_tokens"] == 256
    assert chat_service(responses_per_request=1).plan(request()).adapters == ["base-model"]


# -- feedback rules -----------------------------------------------------------------------------------


def feedback_service() -> FeedbackService:
    return FeedbackService(FeedbackSettings(), None, None, None, b"s" * 32, CollectorRegistry())  # type: ignore[arg-type]


def completion(user: str | None = "alice", choices: int = 2) -> CompletionRecord:
    now = time.time()
    return CompletionRecord(
        id="chatcmpl-1",
        model="m",
        messages=[],
        sampling=SamplingParams(n=choices, temperature=1.0),
        choices=[ServedChoice(index=i, text=f"t{i}", finish_reason="stop", adapter="m") for i in range(choices)],
        key_id="k",
        user=user,
        stream=False,
        created_at=now,
        finished_at=now,
        expires_at=now + 60,
    )


def pairwise(preference: Any = 0, **fields: Any) -> PairwiseFeedback:
    return PairwiseFeedback(
        kind="pairwise", completion_id="chatcmpl-1", feedback_token="t", preference=preference, **fields
    )


def test_a_taken_claim_is_a_retry_or_a_conflict() -> None:
    service = feedback_service()
    first = {"id": "f1", "completion_id": "chatcmpl-1"}
    vote = pairwise(0, feedback_id=uuid.uuid4())
    by_id = json.dumps({"fp": fingerprint(vote), "answer": first})
    # the same feedback_id with the same body: the first answer again
    assert service._answer_taken(vote, {"id": by_id, "claim": None}, "id", "claim") == first
    # the same feedback_id with another body: 409
    with pytest.raises(FeedbackConflict) as caught:
        service._answer_taken(pairwise(1, feedback_id=vote.feedback_id), {"id": by_id, "claim": None}, "id", "claim")
    assert caught.value.param == "feedback_id"
    # a new id, the same judge: the same verdict is a retry, another one a conflict (the first stands)
    claim = json.dumps({"value": claim_value(pairwise(0)), "answer": first})
    assert service._answer_taken(pairwise(0), {"id": None, "claim": claim}, "id", "claim") == first
    with pytest.raises(FeedbackConflict, match="already gave a different pairwise vote"):
        service._answer_taken(pairwise("tie"), {"id": None, "claim": claim}, "id", "claim")


def test_who_judges_and_which_choice() -> None:
    assert FeedbackService._judge(pairwise(), completion("alice")) == "alice"
    assert FeedbackService._judge(pairwise(user="alice"), completion("alice")) == "alice"
    assert FeedbackService._judge(pairwise(), completion(None)) == "", "served without user: the key judges"
    with pytest.raises(TokenRejected, match="served without a `user`") as caught:
        FeedbackService._judge(pairwise(user="bob"), completion(None))  # an invented name is not a new judge
    assert caught.value.param == "user"
    with pytest.raises(TokenRejected, match="another user"):
        FeedbackService._judge(pairwise(user="mallory"), completion("alice"))
    with pytest.raises(InvalidFeedback, match="one choice"):
        FeedbackService._check_choice(pairwise(), completion(choices=1))
    rating = RatingFeedback(kind="rating", completion_id="chatcmpl-1", feedback_token="t", choice=1, rating="up")
    FeedbackService._check_choice(rating, completion())
    with pytest.raises(InvalidFeedback, match="out of range") as caught:
        FeedbackService._check_choice(rating, completion(choices=1))
    assert caught.value.param == "choice"


# -- the gate, the A/B rule, the data split -------------------------------------------------------------


def test_the_gate() -> None:
    s = TrainerSettings(gate_min_accuracy=0.6, gate_max_length_ratio=1.5)
    champion = Scores(accuracy=0.7, margin=0.2, mean_length=20)
    assert gate(Scores(0.8, 0.5, 22), champion, 0.4, s, 10).passed
    assert "below the champion" in gate(Scores(0.65, 0.5, 22), champion, 0.4, s, 10).reasons[0]
    assert "below the floor" in gate(Scores(0.55, 0.5, 22), Scores(0.5, 0.1, 20), 0.4, s, 10).reasons[0]
    assert "not positive" in gate(Scores(0.8, -0.1, 22), champion, 0.4, s, 10).reasons[0]
    assert "length" in gate(Scores(0.8, 0.5, 40), champion, 0.4, s, 10).reasons[0]
    assert "length" in gate(Scores(0.8, 0.5, 10), champion, 0.4, s, 10).reasons[0]
    assert "not finite" in gate(Scores(0.8, 0.5, 22), champion, float("inf"), s, 10).reasons[0]
    assert "no held-out" in gate(Scores(0.8, 0.5, 22), champion, 0.4, s, 0).reasons[0]


def test_the_ab_rule() -> None:
    assert decide(25, 5, min_votes=30, alpha=0.05).decision == "promote"
    assert decide(20, 4, min_votes=30, alpha=0.05).decision == "wait", "a clear lead short of the minimum"
    assert decide(3, 20, min_votes=30, alpha=0.05).decision == "retire"
    assert decide(150, 150, min_votes=30, alpha=0.05, max_votes=300).decision == "retire"
    assert decide(15, 14, min_votes=30, alpha=0.05, max_votes=300).decision == "wait"
    assert decide(0, 0, min_votes=0, alpha=0.05).evidence == pytest.approx(1.0), "no votes, no evidence"
    result = decide(25, 5, min_votes=30, alpha=0.05)
    assert result.evidence >= result.threshold == pytest.approx(20) and "25-5" in result.reason
    # the mixture likelihood ratio against a direct numerical integral of its definition
    wins, losses = 17, 5
    steps = 200_000
    integral = sum(
        2 * ((0.5 + (i + 0.5) / (2 * steps)) ** wins) * ((0.5 - (i + 0.5) / (2 * steps)) ** losses) / (2 * steps)
        for i in range(steps)
    )
    assert decide(wins, losses, 0, 0.05).evidence == pytest.approx(integral * 2 ** (wins + losses), rel=1e-6)


def _trials(p: float, runs: int, seed: int, max_votes: int = 300, min_votes: int = 30) -> Counter[str]:
    """Seeded trials of the rule as the service calls it, evaluated after every vote."""
    rng = random.Random(seed)
    out: Counter[str] = Counter()
    for _ in range(runs):
        wins = losses = 0
        decision = "wait"
        while decision == "wait":
            if rng.random() < p:
                wins += 1
            else:
                losses += 1
            decision = decide(wins, losses, min_votes, 0.05, max_votes).decision
        out[decision] += 1
    return out


def test_the_ab_rule_holds_its_level_however_often_it_looks() -> None:
    runs = 2000
    null = _trials(0.5, runs, seed=1)
    false_promotions = null["promote"] / runs
    se = (0.05 * 0.95 / runs) ** 0.5
    assert false_promotions <= 0.05 + 3 * se, f"{false_promotions:.4f} promoted with no real difference"
    strong = _trials(0.7, 500, seed=2)
    assert strong["promote"] / 500 >= 0.95, "a challenger that wins 70% of votes is promoted within 300"


def test_the_split_is_stable_and_one_judge_is_capped() -> None:
    pairs = [record(f"Answer {i}.", f"Other {i}.") for i in range(2000)]
    share = sum(held_out(c, 0.2) for c in pairs) / len(pairs)
    assert 0.17 < share < 0.23 and [held_out(c, 0.2) for c in pairs] == [held_out(c, 0.2) for c in pairs]
    # the side follows what was asked and answered, not the random id nor the order of the answers
    again = [record(f"Other {i}.", f"Answer {i}.") for i in range(2000)]
    assert [held_out(c, 0.2) for c in again] == [held_out(c, 0.2) for c in pairs]
    many = [{"judge": "key:spammer"} for _ in range(50)] + [{"judge": f"key:u{i}"} for i in range(50)]
    kept, dropped = _cap(many, 0.1)
    assert sum(r["judge"] == "key:spammer" for r in kept) == 10 and dropped == 40
    assert _cap(many, 1.0) == (many, 0)
    # a key that invents a user per vote dodges the judge cap, not the key cap
    invented = [{"judge": f"bot:user-{i}"} for i in range(80)] + [{"judge": f"team:u{i % 5}"} for i in range(20)]
    kept, dropped = _cap(invented, 0.1, 0.5)
    assert sum(r["judge"].startswith("bot:") for r in kept) == 50 and dropped == 30
    assert sum(r["judge"].startswith("team:") for r in kept) == 20
    alone = [{"judge": f"dev:user-{i}"} for i in range(80)]
    assert _cap(alone, 0.1, 0.5) == (alone, 0), "one key alone (pairloop up's dev key) keeps all its rows"


# -- tokens, errors, settings ---------------------------------------------------------------------------


def test_a_token_with_a_foreign_signature_is_refused_not_a_crash() -> None:
    exp = int(time.time()) + 60
    v, payload, _ = tokens.issue(b"s" * 32, "chatcmpl-a", "k1", exp).split(".")
    for signature in ("é" * 43, "\x00", ""):
        with pytest.raises(tokens.TokenError, match="signature"):
            tokens.verify(b"s" * 32, f"{v}.{payload}.{signature}", completion_id="chatcmpl-a", key_id="k1")


def test_every_error_has_openais_shape_and_the_unexpected_ones_say_nothing_inside() -> None:
    app = FastAPI()
    install_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("password=hunter2 at /srv/secret")

    @app.get("/swap")
    async def swap() -> None:
        raise AdapterError("no adapter named pl-v0009-00000000", 404)

    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/boom")
    assert r.status_code == 500
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert "hunter2" not in r.text and "/srv" not in r.text
    r = client.get("/swap")
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "no adapter named pl-v0009-00000000",
        "type": "invalid_request_error",
        "param": None,
        "code": "adapter_not_found",
    }
    r = client.get("/nowhere")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_misspelled_setting_is_named_with_the_closest_known_one() -> None:
    env = {
        "PAIRLOOP_AB_MIN_VOTE": "10",  # AB_MIN_VOTES
        "PAIRLOOP_TRAIN__LEARNIG_RATE": "1e-3",  # TRAIN__LEARNING_RATE
        "PAIRLOOP_PORT": "8001",
        "PAIRLOOP_TRAIN__BETA": "0.2",
        "PAIRLOOP_TEST_CACHE": "/tmp/x",
        "PAIRLOOP_ZZZZZZZZZZZZZZZZ": "1",
        "HOME": "/root",
    }
    assert deploy_settings.unknown_variables(env) == [
        ("PAIRLOOP_AB_MIN_VOTE", "PAIRLOOP_AB_MIN_VOTES"),
        ("PAIRLOOP_TRAIN__LEARNIG_RATE", "PAIRLOOP_TRAIN__LEARNING_RATE"),
        ("PAIRLOOP_ZZZZZZZZZZZZZZZZ", None),
    ]
    lines = deploy_settings.warnings(env)
    assert "PAIRLOOP_AB_MIN_VOTE is not a pairloop setting" in lines[0] and "PAIRLOOP_AB_MIN_VOTES?" in lines[0]
    assert "PAIRLOOP_DATA_DIR" in deploy_settings.known_variables()


def test_every_command_warns_about_a_misspelled_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIRLOOP_MAX_USER_SHAR", "0.5")
    result = CliRunner().invoke(cli.app, ["db", "upgrade", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "PAIRLOOP_MAX_USER_SHAR is not a pairloop setting and is ignored; did you mean PAIRLOOP_MAX_USER_SHARE?" in (
        result.stderr
    )


def test_simulate_without_its_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = CliRunner().invoke(cli.app, ["simulate", "--url", "http://127.0.0.1:9", "--api-key", "k"])
    assert result.exit_code == 1
    assert "needs matplotlib" in result.stderr and "pip install 'pairloop[simulate]'" in result.stderr


def test_every_setting_is_declared_once_on_one_base() -> None:
    declared = Counter(name for cls in deploy_settings.SETTINGS for name in cls.__annotations__)
    declared.update(PairloopSettings.__annotations__.keys())
    assert [name for name, n in declared.items() if n > 1] == []
    assert all(issubclass(cls, PairloopSettings) for cls in deploy_settings.SETTINGS)


def test_the_leaderboard_recovers_known_strengths_whatever_side_they_were_shown_on() -> None:
    truth = {"base": 0.0, "pl-v0001": 0.6, "pl-v0002": 1.2, "pl-v0003": -0.4}  # natural units
    h = 0.4  # the first answer is preferred more often than it deserves
    rng = random.Random(11)
    names = list(truth)
    votes: list[tuple[str, str, float]] = []
    for _ in range(6000):
        a, b = rng.sample(names, 2)
        if "pl-v0002" in (a, b) and rng.random() < 0.8:  # the best variant is shown first most of the time
            a, b = ("pl-v0002", b if a == "pl-v0002" else a)
        p = 1 / (1 + math.exp(-(truth[a] - truth[b] + h)))
        votes.append((a, b, 1.0 if rng.random() < p else 0.0))
    board = leaderboard(votes, base="base", bootstrap=100, seed=3)
    assert [v["name"] for v in board["variants"]] == ["pl-v0002", "pl-v0001", "base", "pl-v0003"]
    by_name = {v["name"]: v for v in board["variants"]}
    for name, strength in truth.items():
        expected = 1000 + ELO * strength
        got = by_name[name]
        assert abs(got["rating"] - expected) < 40, (name, got, expected)
        assert got["lower"] - 10 <= expected <= got["upper"] + 10, (name, got, expected)
    assert by_name["base"]["rating"] == 1000
    assert 0.56 < board["position_effect"] < 0.64  # sigma(0.4) = 0.599
    assert leaderboard(votes, base="base", bootstrap=100, seed=3) == board, "seeded: the same table again"
    assert leaderboard([], base="base")["variants"] == []
    # a tie (or both_bad) is half a win for each side: two variants that only ever tie are equal
    tied = leaderboard([("x", "y", 0.5), ("y", "x", 0.5)] * 20 + [("x", "z", 1.0)] * 5, bootstrap=20)
    ratings = {v["name"]: v for v in tied["variants"]}
    assert abs(ratings["x"]["rating"] - ratings["y"]["rating"]) < 40 and ratings["x"]["ties"] == 40
    assert ratings["z"]["rank"] == 3 and ratings["z"]["losses"] == 5
