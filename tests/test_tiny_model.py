"""The embedded default model: deterministic corpus, a template that matches it, reproducible builds, readable text."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from tests.gateway_helpers import KEYS, MODEL_NAME
from trainer.tiny import corpus
from trainer.tiny.build import TinyModelConfig, build, render_chat


def test_corpus_is_deterministic_and_varied() -> None:
    a = list(corpus.generate(2000, seed=1))
    assert a == list(corpus.generate(2000, seed=1))
    assert a != list(corpus.generate(2000, seed=2))
    polite = sum(e.polite for e in a) / len(a)
    greeting = sum(e.greeting for e in a) / len(a)
    spiced = sum(e.spice is not None for e in a) / len(a)
    lengths = {e.n_facts for e in a}
    assert 0.25 < polite < 0.45 and 0.2 < greeting < 0.4 and 0.1 < spiced < 0.3
    assert lengths == {1, 2, 3, 4, 5, 6}
    vocab = corpus.vocabulary()
    assert all(w in vocab for e in a for w in corpus.words(e.answer))


def test_chat_template_renders_like_the_corpus(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is tea?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render_chat(msgs, True)
    full = [*msgs, {"role": "assistant", "content": "Tea is warm."}]
    assert tok.apply_chat_template(full, tokenize=False) == render_chat(full)
    assert tok.eos_token == "<|end|>"


def test_default_build_records_its_recipe_and_time(tiny_model: Path) -> None:
    # Its duration is recorded, not asserted: the same build took 3 min on a quiet machine and 7 min 50 s beside
    # a pip install (speed is measured in bench/ and docs, never in tests).
    info = json.loads((tiny_model / "pairloop-build.json").read_text())
    assert info["build_seconds"] > 0
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == 64


def test_build_is_reproducible_with_a_seed(tmp_path: Path) -> None:
    small = {"conversations": 400, "steps": 3, "batch_size": 4, "vocab_size": 400}

    def digest(out: Path) -> str:
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    build(tmp_path / "a", TinyModelConfig(seed=5, **small))
    build(tmp_path / "b", TinyModelConfig(seed=5, **small))
    build(tmp_path / "c", TinyModelConfig(seed=6, **small))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_answers_are_readable_at_temperature_one(gateway: str) -> None:
    """At least 90% of generated words are words of the corpus, over 50 prompts (100 sampled answers)."""
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEYS["full"].key.get_secret_value(), max_retries=0)
    rng = random.Random(1234)
    vocab = corpus.vocabulary()
    known = total = 0
    for _ in range(50):
        prompt = corpus.make_prompt(rng)
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], temperature=1.0, max_tokens=120
        )
        for choice in resp.choices:
            words = corpus.words(choice.message.content or "")
            known += sum(w in vocab for w in words)
            total += len(words)
    print(f"corpus words: {known}/{total} = {known / total:.1%}")  # shown with pytest -s
    assert total > 500
    assert known / total >= 0.9, f"only {known / total:.1%} of {total} words are corpus words"
