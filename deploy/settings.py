"""Every `PAIRLOOP_*` variable any part reads, the start-up check that names the ones nobody reads, and the
generated table of them all (docs/SETTINGS.md: `python -m deploy.settings > docs/SETTINGS.md`).

pydantic-settings ignores environment variables it does not know, so a misspelled `PAIRLOOP_AB_MIN_VOTE`
would silently leave the default in force. Every `pairloop` command checks the environment first and warns,
by name, with the closest known name.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings

from deploy.local.settings import LocalSettings
from feedback.settings import FeedbackSettings
from serving.settings import ENV_PREFIX, PLACEHOLDER, ServingSettings
from trainer.settings import TrainConfig, TrainerSettings
from workers.settings import WorkerSettings

SETTINGS: tuple[type[BaseSettings], ...] = (
    ServingSettings,
    LocalSettings,
    FeedbackSettings,
    WorkerSettings,
    TrainerSettings,
)
"""Each part's settings (each extends `serving.settings.PairloopSettings`)."""

READERS: dict[type[BaseSettings], str] = {
    ServingSettings: "gateway",
    LocalSettings: "launcher",
    FeedbackSettings: "feedback API",
    WorkerSettings: "feedback worker",
    TrainerSettings: "trainer",
}
"""Who reads each part's settings: the gateway (its app), the launcher (`pairloop up`, `pairloop vllm` and `pairloop
gateway`: the processes they start and how they stop them), the gateway's feedback API, the workers
that drain the feedback queue (`pairloop worker`), and the learning loop (the training worker, `pairloop cron`,
the admin routes and `pairloop adapters`/`train`)."""

SECRET_VARIABLES = frozenset(
    {
        "PAIRLOOP_SECRET",
        "PAIRLOOP_SECRET_PREVIOUS",
        "PAIRLOOP_API_KEYS",
        "PAIRLOOP_VLLM_API_KEY",
        "PAIRLOOP_REDIS_URL",
        "PAIRLOOP_DATABASE_URL",
        "PAIRLOOP_ADAPTER_STORE_OPTIONS",
    }
)
"""The settings that hold a secret: keys, the token secret, and the URLs and options that carry a password."""

_REDIS, _STORE = "PAIRLOOP_REDIS_URL", "PAIRLOOP_DATABASE_URL"
ROLE_SECRETS: dict[str, frozenset[str]] = {
    "gateway": frozenset(
        {"PAIRLOOP_SECRET", "PAIRLOOP_SECRET_PREVIOUS", "PAIRLOOP_API_KEYS", "PAIRLOOP_VLLM_API_KEY", _REDIS, _STORE}
    ),
    "vllm": frozenset({"PAIRLOOP_VLLM_API_KEY"}),
    "adapter-sync": frozenset({_REDIS, "PAIRLOOP_ADAPTER_STORE_OPTIONS"}),
    "worker": frozenset({_REDIS, _STORE}),
    "trainer": frozenset({_REDIS, _STORE, "PAIRLOOP_ADAPTER_STORE_OPTIONS", "PAIRLOOP_VLLM_API_KEY"}),
    "cron": frozenset({_REDIS}),
    "migrate": frozenset({_STORE}),
    "model": frozenset(),
}
"""The secrets each role of a deployment across hosts may hold (docs/SECURITY.md, "Who holds what"): the gateway
signs tokens, checks keys and calls vLLM; vLLM holds its own key only; a sidecar reads Redis and the adapter store
(with a read-only identity); a feedback worker writes the store; the trainer also publishes adapters and swaps
them; cron only queues checks; the migration only touches the store. tests/test_shipping.py checks compose and
every Kubernetes overlay against it."""


def role_of(args: list[str]) -> str:
    """The role a `pairloop ARGS` command plays (`ROLE_SECRETS`' keys)."""
    if args[0] == "worker":
        return "trainer" if "--training" in args else "worker"
    return {"db": "migrate"}.get(args[0], args[0])


TEST_PREFIX = ENV_PREFIX + "TEST_"
"""Read by the test suite only (tests/conftest.py), never by the service."""


def known_variables() -> set[str]:
    """The names of every variable some part reads."""
    names = {f"{ENV_PREFIX}{name.upper()}" for cls in SETTINGS for name in cls.model_fields}
    names |= {f"{ENV_PREFIX}TRAIN__{name.upper()}" for name in TrainConfig.help()}
    return names


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """`PAIRLOOP_*` variables in `environ` (default: this process's) that no part reads, each with the closest
    known name (None when nothing is close)."""
    env = os.environ if environ is None else environ
    known = known_variables()
    out = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in known or name.startswith(TEST_PREFIX):
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        out.append((name, close[0] if close else None))
    return out


def example_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The `PAIRLOOP_*` variables in `environ` that still hold one of deploy/'s example values (`replace-me…`):
    every command refuses to start with one, whichever settings it reads (the settings' own check covers the
    fields a part reads; this one covers a process that reads none of them)."""
    env = os.environ if environ is None else environ
    return sorted(name for name, value in env.items() if name.startswith(ENV_PREFIX) and PLACEHOLDER in value)


def warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per unknown variable, for the operator."""
    return [
        f"warning: {name} is not a pairloop setting and is ignored"
        + (f"; did you mean {close}?" if close else " (docs/SETTINGS.md lists them all)")
        for name, close in unknown_variables(environ)
    ]


def _shown(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "unset"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _default(cls: type[BaseSettings], name: str) -> str:
    info = cls.model_fields[name]
    if info.default_factory is not None:
        made = info.default_factory()  # type: ignore[call-arg]
        return "`$XDG_DATA_HOME/pairloop` or `~/.local/share/pairloop`" if name == "data_dir" else _shown(made)
    return "required" if info.is_required() else _shown(info.default)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def settings_doc() -> str:
    """docs/SETTINGS.md: every variable, its default, the parts that read it and what it does."""
    rows: dict[str, tuple[str, list[str], str]] = {}
    for cls in SETTINGS:
        for name, info in cls.model_fields.items():
            variable = f"{ENV_PREFIX}{name.upper()}"
            default, readers, text = rows.get(variable, (_default(cls, name), [], info.description or ""))
            rows[variable] = (default, [*readers, READERS[cls]], text)
    defaults = TrainConfig()
    for name, text in TrainConfig.help().items():
        rows[f"{ENV_PREFIX}TRAIN__{name.upper()}"] = (_shown(getattr(defaults, name)), ["trainer"], text)
    lines = [
        "# Settings",
        "",
        "Every variable a pairloop part reads, generated from the code (`python -m deploy.settings >",
        "docs/SETTINGS.md`; `tests/test_docs.py` fails when this file and the code differ). *Read by*: `gateway`",
        "(the gateway's app), `launcher` (`pairloop up`, `pairloop vllm`, `pairloop gateway`: the processes they",
        "start and how they stop), `feedback API` (the gateway's /v1/feedback), `feedback worker`",
        "(`pairloop worker`), `trainer` (the training worker, `pairloop cron`, the admin routes, `pairloop adapters`",
        "and `pairloop train`). A variable every part reads sets the data dir, the store, Redis, the model and the",
        "adapter store alike for all of them. `(secret)`: a value never shown in a log or a repr.",
        "",
        "| variable | default | read by | meaning |",
        "|---|---|---|---|",
    ]
    for variable in sorted(rows, key=lambda v: (v.startswith(f"{ENV_PREFIX}TRAIN__"), v)):
        default, readers, text = rows[variable]
        everyone = len(readers) == len(SETTINGS)
        lines.append(
            f"| `{variable}` | {_cell(default)} | {'every part' if everyone else ', '.join(readers)} | {_cell(text)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_doc(), end="")
