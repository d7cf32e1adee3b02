# Two commands for a newcomer: `make demo` and `make test`. Everything they need is built here.
# Environments live outside the checkout, keyed by a hash of their pinned requirements, so every
# clone of the same revision reuses them:  $(ENV_ROOT)/main-<hash>, $(ENV_ROOT)/retrieval-<hash>.
# Overridable: PYTHON (interpreter that creates the venvs), ENV_ROOT, PYTEST_ARGS.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
ENV_ROOT ?= $(HOME)/.cache/tga-pipeline/envs
PYTEST_ARGS ?=

# CUDA machines take the default (CUDA) torch wheel and flash-attn; others the CPU wheel, installed
# before anything else so no dependency drags in a multi-GB CUDA build.
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(HAS_CUDA),1)
TORCH_SPEC := torch
EXTRA_SPEC := flash-attn
else
TORCH_SPEC := torch==2.13.0
EXTRA_SPEC :=
endif
MAIN_HASH := $(shell cat requirements/main.txt requirements/dev.txt | { cat; echo "$(TORCH_SPEC) $(EXTRA_SPEC)"; } | sha256sum | cut -c1-12)
RETRIEVAL_HASH := $(shell sha256sum requirements/retrieval.txt | cut -c1-12)
MAIN_ENV := $(ENV_ROOT)/main-$(MAIN_HASH)
RETRIEVAL_ENV := $(ENV_ROOT)/retrieval-$(RETRIEVAL_HASH)
PY := $(MAIN_ENV)/bin/python
export PYTHONPATH := $(CURDIR)
# DeepSpeed JIT-builds a CPU comm op once per environment; a shared cache would rebuild it whenever
# another environment built it last.
export TORCH_EXTENSIONS_DIR := $(MAIN_ENV)/torch_extensions

.PHONY: demo test env retrieval-env clean-work

# The whole pipeline on the embedded tiny world; every stage reads/writes under work/.
demo: env retrieval-env
	$(PY) -m pipeline.tinyworld --out work/tiny
	$(PY) -m stages.caption_index --config configs/tiny/caption_index.yaml
	$(PY) -m stages.retrieval_join --config configs/tiny/retrieval_join_stage1.yaml
	$(PY) -m stages.retrieval_join --config configs/tiny/retrieval_join_stage2.yaml
	PYTHON=$(PY) CONFIG=configs/tiny/stage1.yaml CPU_RANKS=2 bash launch/stage1.sh
	PYTHON=$(PY) CONFIG=configs/tiny/stage2.yaml CPU_RANKS=2 bash launch/stage2.sh
	rm -rf work/export/stage2-hf
	$(PY) -m pipeline.export --checkpoint work/runs/stage2/checkpoints --out work/export/stage2-hf
	@echo
	@echo "Results under work/: tiny world, index/, shards/, runs/ (checkpoints, metrics.jsonl), export/stage2-hf"
	@echo "(a transformers Llava folder: AutoModelForImageTextToText / AutoProcessor load it)."
	@echo "MLflow UI (stage 1; stage 2 likewise in work/runs/stage2):"
	@echo "  $(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/work/runs/stage1/mlflow.db"

test: env retrieval-env
	$(PY) -m pytest $(PYTEST_ARGS)

env: $(MAIN_ENV)/.ready
	ln -sfn $(MAIN_ENV) .venv

retrieval-env: $(RETRIEVAL_ENV)/.ready
	ln -sfn $(RETRIEVAL_ENV) .retrieval-venv

# A venv is only used once `.ready` exists; an interrupted build is wiped and redone. No file
# prerequisites: the hash in the folder name already tracks the requirements' content, and a fresh
# clone's newer mtimes must not rebuild an environment that other clones share.
$(MAIN_ENV)/.ready:
	rm -rf $(MAIN_ENV) && mkdir -p $(ENV_ROOT)
	$(PYTHON) -m venv $(MAIN_ENV)
	$(MAIN_ENV)/bin/pip install -q --upgrade pip
	$(MAIN_ENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(MAIN_ENV)/bin/pip install -q -r requirements/main.txt -r requirements/dev.txt $(EXTRA_SPEC)
	# clip-anytorch only for its OpenAI BPE vocabulary file (tiny CLIP tokenizer); never imported.
	$(MAIN_ENV)/bin/pip install -q --no-deps clip-anytorch==2.6.0
	touch $@

$(RETRIEVAL_ENV)/.ready:
	rm -rf $(RETRIEVAL_ENV) && mkdir -p $(ENV_ROOT)
	$(PYTHON) -m venv $(RETRIEVAL_ENV)
	$(RETRIEVAL_ENV)/bin/pip install -q --upgrade pip
	$(RETRIEVAL_ENV)/bin/pip install -q -r requirements/retrieval.txt
	touch $@

clean-work:
	rm -rf work
