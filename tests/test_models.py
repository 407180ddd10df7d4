"""A base model that cannot be loaded is one clear line and a non-zero exit, before anything starts
(deploy/local/models.py); a vLLM that fails at every start is given up on, not restarted forever."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.models import ModelUnavailable, check_model, vllm_generation_architectures
from deploy.local.process import free_port


def model_dir(tmp_path: Path, architectures: list[str], model_type: str = "llama") -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": architectures, "model_type": model_type}))
    return d


@pytest.fixture
def no_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture
def hub_404() -> Iterator[str]:
    """A Hub endpoint that knows no model."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_model_directory_vllm_and_the_trainer_take_passes(tmp_path: Path) -> None:
    assert check_model(str(model_dir(tmp_path, ["LlamaForCausalLM"]))) == "LlamaForCausalLM"


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("/no/such/model", "no such directory"),
        ("./relative/model", "no such directory"),
        ("not a valid id!", "no such directory"),
    ],
)
def test_a_path_that_is_not_there(model: str, says: str) -> None:
    with pytest.raises(ModelUnavailable, match=says):
        check_model(model)


def test_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match=r"no config\.json"):
        check_model(str(tmp_path))


def test_an_architecture_vllm_does_not_generate_with(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="BertModel is not one the installed vLLM generates text with"):
        check_model(str(model_dir(tmp_path, ["BertModel"], "bert")))


def test_a_model_type_transformers_does_not_know(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="model type `nonesuch` but Transformers does not recognize") as info:
        check_model(str(model_dir(tmp_path, ["LlamaForCausalLM"], "nonesuch")))
    assert "\n" not in info.value.message and len(info.value.message) < 300, "one line"


def test_an_architecture_the_trainer_cannot_load(tmp_path: Path) -> None:
    """A config transformers reads, of a type with no causal language model (an encoder-decoder)."""
    from transformers import T5Config

    config = T5Config(architectures=["LlamaForCausalLM"])  # vLLM would take the name; the trainer cannot
    from deploy.local.models import check_architecture

    with pytest.raises(ModelUnavailable, match="no causal language model for model_type 't5'"):
        check_architecture("t5-like", config)


def test_an_id_neither_cached_nor_reachable(no_hub_cache: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ModelUnavailable, match=r"not in the local Hugging Face cache and the Hub .* cannot be reached"):
        check_model("Qwen/Qwen2.5-0.5B-Instruct")


def test_an_id_the_hub_does_not_know(no_hub_cache: None, hub_404: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub_404)
    with pytest.raises(ModelUnavailable, match="has no such model, or it is gated or private"):
        check_model("nobody/no-such-model")


def test_an_id_not_cached_while_offline(no_hub_cache: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE is set"):
        check_model("Qwen/Qwen2.5-0.5B-Instruct")


def test_pairloop_up_says_it_in_one_line_and_starts_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}
    env |= {"PAIRLOOP_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "deploy", "up", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--port", str(free_port())],
        env=env | {"HF_HOME": str(tmp_path / "hf")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("pairloop up: model Qwen/Qwen2.5-0.5B-Instruct is not in the local Hugging Face cache")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "data" / "redis").exists(), "nothing was started"
    assert time.monotonic() - started < 60


def test_the_causal_lm_types_read_from_source_are_transformers(tmp_path: Path) -> None:
    """The same table as transformers' own (importing it imports torch, hence the reading of its source)."""
    from deploy.local.models import causal_lm_model_types

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M; "
            "print(json.dumps(sorted(M)))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert causal_lm_model_types() == set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert {"llama", "qwen2"} <= causal_lm_model_types()


@pytest.mark.slow
def test_the_registry_read_from_source_is_vllms() -> None:
    """vLLM's own registry (imported: seconds) serves every architecture read from its source."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from vllm.model_executor.models import ModelRegistry as R; "
            "print(json.dumps(sorted(R.get_supported_archs())))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    supported = set(json.loads(out.stdout.strip().splitlines()[-1]))
    ours = vllm_generation_architectures()
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM"} <= ours
    assert ours <= supported
    assert "BertModel" in supported - ours, "embedding models are not generation models"


@pytest.mark.slow
def test_a_vllm_that_fails_at_every_start_stops_pairloop_up(tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])  # config and tokenizer fine, weights cut short
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIRLOOP_")}
    env |= {"PAIRLOOP_DATA_DIR": str(tmp_path / "data"), "PAIRLOOP_MODEL": str(broken)}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "deploy", "up", "--workers", "0", "--no-training", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    took = time.monotonic() - started
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("pairloop up: vLLM exited with status"), lines[-5:]  # the last thing it says
    assert "at each of its last 3 starts" in lines[-1]
    assert out.stderr.count("restarting it in") == 2, "two restarts, then it gives up"
    print(f"gave up after {took:.1f} s")
