"""Can this base model be served and trained here? Checked before `pairloop up` (or `pairloop vllm`) starts anything,
so that a model that cannot be loaded is one clear line and a non-zero exit, not vLLM's tracebacks in a restart loop.

What is checked, cheaply (no weights are read, vLLM is not imported):
  - a local path: the directory exists and holds a `config.json`;
  - a Hugging Face id: it is in the local cache, or else the Hub answers for it (a missing or gated model, an
    unreachable Hub or `HF_HUB_OFFLINE=1` each get their own sentence);
  - its architecture: one the installed vLLM generates text with (read from vLLM's model registry source) and one
    transformers loads with `AutoModelForCausalLM` (the trainer).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
GENERATION_TABLES = ("_TEXT_GENERATION_MODELS", "_MULTIMODAL_MODELS")
"""The tables of vLLM's model registry (`vllm/model_executor/models/registry.py`) whose models generate text."""


class ModelUnavailable(Exception):
    """The base model cannot be served or trained here; the message says why in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@functools.cache
def vllm_generation_architectures() -> frozenset[str]:
    """Architectures the installed vLLM generates text with, read from its registry's source (importing vLLM
    takes seconds and imports torch; `tests/test_models.py` checks the two agree)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    source = Path(next(iter(spec.submodule_search_locations))) / "model_executor" / "models" / "registry.py"
    tree = ast.parse(source.read_text())
    names: set[str] = set()
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(node, ast.AnnAssign):
            target = node.target
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and target.id in GENERATION_TABLES and isinstance(value, ast.Dict):
            names |= {k.value for k in value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return frozenset(names)


@functools.cache
def causal_lm_model_types() -> frozenset[str]:
    """The `model_type`s transformers loads with AutoModelForCausalLM (the trainer), read from the source of its
    mapping: importing `transformers.models.auto.modeling_auto` imports torch, which the gateway should not hold."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    source = Path(next(iter(spec.submodule_search_locations))) / "models" / "auto" / "modeling_auto.py"
    for node in ast.parse(source.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES" for t in node.targets)
            and isinstance(node.value, ast.Call)
            and node.value.args
            and isinstance(node.value.args[0], ast.List)
        ):
            return frozenset(
                e.elts[0].value
                for e in node.value.args[0].elts
                if isinstance(e, ast.Tuple) and isinstance(e.elts[0], ast.Constant) and isinstance(e.elts[0].value, str)
            )
    return frozenset()


def _first_line(exc: BaseException) -> str:
    """The first sentence of an error (transformers' run to paragraphs of advice)."""
    text = " ".join(str(exc).split())
    end = text.find(". ")
    return text[: end + 1] if end > 0 else text


def _load_config(model: str, **kwargs: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model, **kwargs)


def _hub_config(model: str) -> Any:
    """The config of a Hub model that is not in the local cache, or ModelUnavailable saying why not."""
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelUnavailable(
            f"model {model} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it first "
            "(or give a local directory in PAIRLOOP_MODEL)"
        )
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = httpx.get(f"{endpoint}/api/models/{model}", headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        raise ModelUnavailable(
            f"model {model} is not in the local Hugging Face cache and the Hub ({endpoint}) cannot be reached "
            f"({exc.__class__.__name__}: {exc}): download it where the Hub is reachable and give its directory in "
            "PAIRLOOP_MODEL"
        ) from None
    if resp.status_code in (401, 403, 404):
        raise ModelUnavailable(
            f"model {model}: the Hub ({endpoint}) has no such model, or it is gated or private (HTTP "
            f"{resp.status_code}; set HF_TOKEN for a gated one)"
        )
    if resp.status_code != 200:
        raise ModelUnavailable(f"model {model}: the Hub ({endpoint}) answered HTTP {resp.status_code}")
    try:
        return _load_config(model)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(
            f"model {model}: its config.json from the Hub cannot be read: {_first_line(exc)}"
        ) from None


def check_model(model: str) -> str:
    """Raise ModelUnavailable unless `model` (a directory or a Hugging Face id) can be served by vLLM and trained
    here; its architecture."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model directory {path} has no config.json: it is not a Hugging Face model")
        try:
            config = _load_config(str(path))
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(
                f"model directory {path}: its config.json cannot be read: {_first_line(exc)}"
            ) from None
    elif path.exists() or model.startswith(("/", ".", "~")) or not HUB_ID.match(model):
        raise ModelUnavailable(
            f"model {model}: no such directory (PAIRLOOP_MODEL takes a model directory or a Hugging Face id)"
        )
    else:
        try:
            config = _load_config(model, local_files_only=True)
        except (OSError, ValueError):
            config = _hub_config(model)
    return check_architecture(model, config)


def check_architecture(model: str, config: Any) -> str:
    """The architecture of `config` if both vLLM and the trainer take it, else ModelUnavailable."""
    architectures = list(getattr(config, "architectures", None) or [])
    served = vllm_generation_architectures()
    if served and not any(a in served for a in architectures):
        raise ModelUnavailable(
            f"model {model}: architecture {', '.join(architectures) or '(none in config.json)'} is not one the "
            "installed vLLM generates text with"
        )
    model_type = getattr(config, "model_type", None)
    trainable = causal_lm_model_types()
    if trainable and model_type not in trainable:
        raise ModelUnavailable(
            f"model {model}: transformers has no causal language model for model_type {model_type!r}, so the "
            "trainer cannot load it"
        )
    return architectures[0]
