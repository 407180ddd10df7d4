"""A deterministic chat corpus whose answers vary in style.

The embedded default model learns from this corpus, so whatever a simulated user may later prefer
(politeness, length, a greeting, a given word) must already be present in the model's own samples:
DPO can only reweight behaviour the model has. Every answer is a random mix of independent style
choices, drawn with a seeded `random.Random`, so the same seed always yields the same corpus.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

TOPICS: dict[str, tuple[str, str]] = {
    # topic -> two adjectives that fit it
    "coffee": ("warm", "bitter"),
    "tea": ("calm", "warm"),
    "the ocean": ("deep", "blue"),
    "the moon": ("bright", "distant"),
    "a garden": ("green", "quiet"),
    "bread": ("fresh", "simple"),
    "music": ("lively", "old"),
    "rain": ("cold", "soft"),
    "mountains": ("tall", "quiet"),
    "a library": ("quiet", "large"),
    "bicycles": ("fast", "simple"),
    "sleep": ("important", "calm"),
    "cooking": ("fun", "useful"),
    "running": ("healthy", "hard"),
    "chess": ("old", "hard"),
    "painting": ("colorful", "slow"),
    "birds": ("small", "lively"),
    "trees": ("tall", "green"),
    "snow": ("cold", "white"),
    "the sun": ("bright", "warm"),
    "a river": ("long", "cold"),
    "cats": ("curious", "soft"),
    "dogs": ("loyal", "friendly"),
    "books": ("useful", "old"),
    "a city": ("busy", "large"),
    "a forest": ("dark", "quiet"),
    "photography": ("creative", "modern"),
    "swimming": ("healthy", "fun"),
    "gardening": ("calm", "useful"),
    "the stars": ("distant", "bright"),
    "history": ("long", "rich"),
    "math": ("useful", "hard"),
    "walking": ("simple", "healthy"),
    "soup": ("warm", "simple"),
    "trains": ("fast", "long"),
    "the wind": ("cold", "strong"),
    "islands": ("small", "distant"),
    "writing": ("creative", "slow"),
    "friendship": ("important", "rich"),
    "a market": ("busy", "colorful"),
}

PROMPTS = (
    "What is {t}?",
    "Tell me about {t}.",
    "Why do people like {t}?",
    "How can I learn about {t}?",
    "Give me a tip about {t}.",
    "Can you explain {t}?",
    "I have a question about {t}.",
    "What should I know about {t}?",
    "Is {t} good?",
    "Describe {t} for me.",
)

SYSTEM_PROMPTS = ("You are a helpful assistant.", "You answer questions about everyday things.")

FACTS = (
    "{T} is often {a} and {b}.",
    "Many people find {t} {a}.",
    "A good way to start with {t} is to take it slowly.",
    "You can learn a lot about {t} from a book or a friend.",
    "{T} has a long history.",
    "Some people think {t} is {b}, and they are right.",
    "It helps to spend a little time with {t} every day.",
    "The best part of {t} is that it can be {a}.",
    "Most people first notice {t} when they are young.",
    "There is always something new to find in {t}.",
    "If you like {a} things, you will like {t}.",
    "{T} can be {b} at times, but that is part of the fun.",
    "People all over the world talk about {t}.",
    "You do not need much to enjoy {t}.",
)

GREETINGS = ("Hello!", "Hi there!", "Hey.", "Good day!")
POLITE_OPENERS = (
    "Sure, I would be glad to help.",
    "Thank you for your question.",
    "What a great question.",
    "Of course, happy to help.",
)
POLITE_CLOSERS = (
    "I hope this helps!",
    "Please let me know if you have any other questions.",
    "Thanks for asking.",
    "Have a wonderful day!",
)
CURT_OPENERS = ("Okay.", "Short answer:", "Fine.")
CURT_CLOSERS = ("That is all.", "Done.", "Next question.")

#: Words that mark an answer as polite; a simulated user that prefers polite answers looks for these.
POLITE_MARKERS = ("thank", "thanks", "please", "glad", "happy", "hope", "wonderful", "great question")

#: Words that appear in a minority of answers, so a preference for "answers containing word W" is learnable.
SPICE_WORDS = ("indeed", "truly", "honestly")


@dataclass(frozen=True)
class Example:
    """One single-turn conversation and the style choices that produced its answer."""

    system: str | None
    prompt: str
    answer: str
    polite: bool
    greeting: bool
    n_facts: int
    spice: str | None

    def messages(self) -> list[dict[str, str]]:
        """The conversation as OpenAI-style chat messages."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": self.prompt})
        msgs.append({"role": "assistant", "content": self.answer})
        return msgs


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def make_prompt(rng: random.Random, topic: str | None = None) -> str:
    """A user question about `topic` (or a random topic)."""
    topic = topic or rng.choice(list(TOPICS))
    return rng.choice(PROMPTS).format(t=topic)


def make_example(rng: random.Random) -> Example:
    """Draw one conversation; each style choice is independent of the others."""
    topic = rng.choice(list(TOPICS))
    a, b = TOPICS[topic]
    prompt = make_prompt(rng, topic)
    polite = rng.random() < 0.35
    greeting = rng.random() < 0.3
    # lengths from one to six facts, skewed short, so "shorter" and "longer" are both learnable
    n_facts = rng.choice((1, 1, 1, 2, 2, 3, 4, 5, 6))
    spice = rng.choice(SPICE_WORDS) if rng.random() < 0.2 else None

    parts: list[str] = []
    if greeting:
        parts.append(rng.choice(GREETINGS))
    if polite:
        parts.append(rng.choice(POLITE_OPENERS))
    elif rng.random() < 0.5:
        parts.append(rng.choice(CURT_OPENERS))
    facts = [f.format(t=topic, T=_cap(topic), a=a, b=b) for f in rng.sample(FACTS, n_facts)]
    if spice:
        i = rng.randrange(len(facts))
        facts[i] = _cap(f"{spice}, {facts[i][0].lower()}{facts[i][1:]}")
    parts.extend(facts)
    if polite:
        parts.append(rng.choice(POLITE_CLOSERS))
    elif rng.random() < 0.3:
        parts.append(rng.choice(CURT_CLOSERS))
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.1 else None
    return Example(system, prompt, " ".join(parts), polite, greeting, n_facts, spice)


def generate(n: int, seed: int) -> Iterator[Example]:
    """`n` conversations, the same ones for the same seed."""
    rng = random.Random(seed)
    for _ in range(n):
        yield make_example(rng)


_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    """The whitespace-separated words of `text`, lower-cased, with surrounding punctuation stripped."""
    out = []
    for token in text.split():
        m = _WORD.search(token.lower())
        if m:
            out.append(m.group(0))
    return out


def vocabulary() -> frozenset[str]:
    """Every word that can appear in an answer of the corpus, whatever the seed."""
    fixed = (*GREETINGS, *POLITE_OPENERS, *POLITE_CLOSERS, *CURT_OPENERS, *CURT_CLOSERS, *SPICE_WORDS)
    vocab = set(words(" ".join(fixed)))
    for topic, (a, b) in TOPICS.items():
        for fact in FACTS:
            vocab.update(words(fact.format(t=topic, T=_cap(topic), a=a, b=b)))
    return frozenset(vocab)
