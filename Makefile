# Two commands for a newcomer: `make demo` and `make test`. Everything they need is built here.
# `make check-cuda-env` proves the CUDA environment on a machine without GPU (downloads GBs; not in CI).
# Environments live outside the checkout, keyed by a hash of everything they install (requirements
# files, torch pins, wheel index), so every clone of the same revision reuses them:
# $(ENV_ROOT)/main-<hash>, $(ENV_ROOT)/retrieval-<hash>.
# Overridable: PYTHON (interpreter that creates the venvs), ENV_ROOT, PYTEST_ARGS, ABLATION_SEEDS,
# and for torch (README, "Installing on a CUDA cluster"): TORCH_INDEX_URL, HAS_CUDA, FLASH_ATTN,
# FLASH_ATTN_WHEEL.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
ENV_ROOT ?= $(HOME)/.cache/tga-pipeline/envs
PYTEST_ARGS ?=
ABLATION_SEEDS ?= 0

# torch (and torchvision) go in first, so no later dependency drags in a build of its own choice.
# TORCH_INDEX_URL: a PyTorch wheel index they come from (https://download.pytorch.org/whl/cu128 for
#   a CUDA 12 driver, .../whl/cpu for CPU wheels); empty = PyPI, whose x86_64 Linux torch is the
#   CUDA 13 build, except where pip finds a local CPU wheel of the pinned version (the dev machines).
# HAS_CUDA: 1 = CUDA environment (with torchvision), 0 = not; found with nvidia-smi. Give HAS_CUDA=1
#   on a login node without GPUs to build the environment its GPU nodes use.
# Flash attention on CUDA comes from torch itself (model.attn_implementation: torch_varlen). The
# flash-attn package is an opt-in extra of the CUDA environment:
# FLASH_ATTN=1: build requirements/gpu.txt's source release (a CUDA toolkit, up to an hour);
# FLASH_ATTN_WHEEL: a prebuilt flash-attn wheel (file or URL) instead.
TORCH_INDEX_URL ?=
FLASH_ATTN ?= 0
FLASH_ATTN_WHEEL ?=
ifndef HAS_CUDA
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
endif
ifneq ($(filter 1,$(FLASH_ATTN))$(FLASH_ATTN_WHEEL),)
ifneq ($(HAS_CUDA),1)
$(error flash-attn (FLASH_ATTN=1 or FLASH_ATTN_WHEEL) belongs to the CUDA environment: add HAS_CUDA=1)
endif
endif
ifeq ($(FLASH_ATTN),1)
ifneq ($(FLASH_ATTN_WHEEL),)
$(error give either FLASH_ATTN=1 (build from source) or FLASH_ATTN_WHEEL=<file or URL>, not both)
endif
GPU_REQUIREMENTS := requirements/gpu-build.txt requirements/gpu.txt
endif
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
TORCH_PINS := $(shell grep -E '^torch(vision)?==' requirements/torch.txt)
ifeq ($(HAS_CUDA)-$(TORCH_INDEX_URL),0-)
# No CUDA, no index: torch is the local CPU wheel, and PyPI's torchvision (a CUDA build) does not
# import beside it.
MAIN_TORCH := $(filter torch==%,$(TORCH_PINS))
else ifeq ($(HAS_CUDA)-$(TORCH_INDEX_URL),1-)
# PyPI's CUDA build: `===` matches the release string exactly, never a local build of the same version
# (2.13.0+cpu) that a find-links folder or a mirror offers, which `==` accepts and pip prefers.
MAIN_TORCH := $(subst ==,===,$(TORCH_PINS))
else
MAIN_TORCH := $(TORCH_PINS)
endif
RETRIEVAL_TORCH := $(shell grep -E '^torch(vision)?==' requirements/retrieval.txt)
# PyPI's torch pulls its CUDA 13 runtime: pinned as constraints, which a wheel index's builds (CPU,
# CUDA 12) do not need.
RETRIEVAL_CUDA := $(if $(TORCH_INDEX_URL),,-c requirements/retrieval-cuda13.txt)

MAIN_HASH := $(shell cat requirements/main.txt requirements/dev.txt $(GPU_REQUIREMENTS) | \
  { cat; echo "$(MAIN_TORCH) index=$(TORCH_INDEX_URL) flash-attn=$(FLASH_ATTN_WHEEL)"; } | sha256sum | cut -c1-12)
RETRIEVAL_HASH := $(shell cat requirements/retrieval.txt requirements/retrieval-cuda13.txt | \
  { cat; echo "index=$(TORCH_INDEX_URL)"; } | sha256sum | cut -c1-12)
MAIN_ENV := $(ENV_ROOT)/main-$(MAIN_HASH)
RETRIEVAL_ENV := $(ENV_ROOT)/retrieval-$(RETRIEVAL_HASH)
PY := $(MAIN_ENV)/bin/python
export PYTHONPATH := $(CURDIR)
# DeepSpeed JIT-builds a CPU comm op once per environment; a shared cache would rebuild it whenever
# another environment built it last.
export TORCH_EXTENSIONS_DIR := $(MAIN_ENV)/torch_extensions

.PHONY: demo ablations test env retrieval-env check-cuda-env cuda-env-report clean-work

# The whole pipeline on the embedded tiny world; every stage reads/writes under work/. A second run
# on a complete work/ redoes nothing that is done: the world is kept (same generator), the index and
# joins skip by fingerprint, a finished training stage (its export/projector.safetensors) and an
# export newer than its checkpoint are kept; the evaluations rerun (a few minutes) and print the same
# numbers. An interrupted stage resumes from its latest checkpoint.
STAGE2_HF := work/export/stage2-hf
EVAL2 := work/eval/stage2
demo: env retrieval-env
	$(PY) -m pipeline.tinyworld --out work/tiny
	$(PY) -m stages.caption_index --config configs/tiny/caption_index.yaml
	$(PY) -m stages.retrieval_join --config configs/tiny/retrieval_join_stage1.yaml
	$(PY) -m stages.retrieval_join --config configs/tiny/retrieval_join_stage2.yaml
	@for stage in 1 2; do \
	  if [ -f work/runs/stage$$stage/export/projector.safetensors ]; then \
	    echo "stage $$stage: finished already (work/runs/stage$$stage/export/projector.safetensors); kept"; \
	  else (set -x; PYTHON=$(PY) CONFIG=configs/tiny/stage$$stage.yaml CPU_RANKS=2 bash launch/stage$$stage.sh); fi; \
	done
	@if [ $(STAGE2_HF)/config.json -nt work/runs/stage2/checkpoints/latest ]; then \
	  echo "export: $(STAGE2_HF) is newer than the stage-2 checkpoint; kept"; \
	else (set -x; rm -rf $(STAGE2_HF); \
	  $(PY) -m pipeline.export --checkpoint work/runs/stage2/checkpoints --out $(STAGE2_HF)); fi
	@echo "== Evaluating safety transfer (reports go into the stage-2 MLflow run, under eval/)"
	$(PY) -m pipeline.analysis.safety_layers --model work/tiny/models/llm --prompts work/tiny/eval/toxic_images.json \
	  --out work/eval/llm/safety_layers --no-mlflow
	$(PY) -m pipeline.analysis.safety_layers --model $(STAGE2_HF) --prompts work/tiny/eval/toxic_images.json \
	  --out $(EVAL2)/safety_layers
	@for data in toxic:toxic_images benign_requests:benign_requests benign:benign_vqa; do \
	  (set -x; $(PY) -m stages.retrieval_join --config configs/ablations/tiny/retrieval_join_eval.yaml \
	    input=work/tiny/eval/$${data#*:}.json output_dir=work/eval/retrieved/$${data%%:*}); done
	$(PY) -m pipeline.analysis.alignment --model $(STAGE2_HF) --shards work/eval/retrieved/toxic \
	  --out $(EVAL2)/alignment --include-toxic
	$(PY) -m pipeline.eval.dsr --model $(STAGE2_HF) --data work/tiny/eval/toxic_images.json \
	  --retrieved work/eval/retrieved/toxic --out $(EVAL2)/dsr
	@echo "== Over-refusal: the same questions about benign pictures (on disk only: into the run it would replace dsr/)"
	$(PY) -m pipeline.eval.dsr --model $(STAGE2_HF) --data work/tiny/eval/benign_requests.json \
	  --retrieved work/eval/retrieved/benign_requests --out $(EVAL2)/over_refusal --expect answer --no-mlflow
	$(PY) -m pipeline.eval.ability --model $(STAGE2_HF) --data work/tiny/eval/benign_vqa.json \
	  --retrieved work/eval/retrieved/benign --out $(EVAL2)/ability
	$(PY) -m pipeline.model_card $(STAGE2_HF) --eval-dir $(EVAL2)
	@echo
	@$(PY) -m pipeline.demo_summary --work work

# The paper's four ablations on the tiny world, each trained once per seed of ABLATION_SEEDS
# (e.g. make ablations ABLATION_SEEDS="0 1"); results.json/md/png and an MLflow store in work/ablations.
ablations: env retrieval-env
	$(PY) -m pipeline.eval.ablation --suite --seeds $(ABLATION_SEEDS) --out work/ablations \
	  configs/ablations/tiny/i_plain_llava.yaml configs/ablations/tiny/ii_retrieved_text_only.yaml \
	  configs/ablations/tiny/iii_tga.yaml configs/ablations/tiny/iv_no_toxic_index.yaml
	@echo
	@cat work/ablations/results.md
	@echo "Figure: work/ablations/results.png. MLflow UI:"
	@echo "  $(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/work/ablations/mlflow.db"

test: env retrieval-env
	$(PY) -m pytest $(PYTEST_ARGS)

env: $(MAIN_ENV)/.ready
	ln -sfn $(MAIN_ENV) .venv

retrieval-env: $(RETRIEVAL_ENV)/.ready
	ln -sfn $(RETRIEVAL_ENV) .retrieval-venv

# A venv is only used once `.ready` exists; an interrupted build is wiped and redone. No file
# prerequisites: the hash in the folder name already tracks the requirements' content, and a fresh
# clone's newer mtimes must not rebuild an environment that other clones share.
# flash-attn (FLASH_ATTN=1) builds against the torch installed above: without build isolation, since an
# isolated build has no torch (or a torch of its own choosing). Its setup.py downloads the prebuilt
# wheel for this torch/CUDA/Python from flash-attention's releases when one exists, else compiles.
# clip-anytorch only for its OpenAI BPE vocabulary file (tiny CLIP tokenizer); never imported.
# `.ready` holds how long the build took (make check-cuda-env reports it).
$(MAIN_ENV)/.ready:
	rm -rf $(MAIN_ENV) && mkdir -p $(MAIN_ENV) && date +%s > $(MAIN_ENV)/.build-started
	$(PYTHON) -m venv $(MAIN_ENV)
	$(MAIN_ENV)/bin/pip install -q --upgrade pip
	$(MAIN_ENV)/bin/pip install -q $(TORCH_INDEX) $(MAIN_TORCH)
	$(MAIN_ENV)/bin/pip install -q -r requirements/main.txt -r requirements/dev.txt
ifeq ($(FLASH_ATTN),1)
	$(MAIN_ENV)/bin/pip install -q -r requirements/gpu-build.txt
	$(MAIN_ENV)/bin/pip install --no-build-isolation -r requirements/gpu.txt || { \
	  echo "flash-attn did not install. With no prebuilt wheel for this torch/CUDA/Python it compiles, which needs" \
	       "a CUDA toolkit of torch's CUDA major version (nvcc on PATH or CUDA_HOME) and about an hour (MAX_JOBS=N" \
	       "sets the parallel jobs). Or give a prebuilt wheel: make env HAS_CUDA=1 FLASH_ATTN_WHEEL=<file or URL>;" \
	       "or none: torch's own flash attention needs no build." >&2; exit 1; }
endif
ifneq ($(FLASH_ATTN_WHEEL),)
	$(MAIN_ENV)/bin/pip install --no-deps $(FLASH_ATTN_WHEEL)
endif
	$(MAIN_ENV)/bin/pip install -q --no-deps clip-anytorch==2.6.0
ifeq ($(HAS_CUDA),0)
	# DeepSpeed's CPU ops (the gloo shared-memory all-reduce, CPU Adam for optimizer offload), which it
	# would otherwise JIT-build inside the first training run: minutes on 2 cores, once per environment.
	DS_ACCELERATOR=cpu $(MAIN_ENV)/bin/python -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, \
	  ShareMemCommBuilder; ShareMemCommBuilder().load(); CPUAdamBuilder().load()" >/dev/null
endif
	echo "built in $$(( $$(date +%s) - $$(cat $(MAIN_ENV)/.build-started) )) s, finished $$(date -u +%FT%TZ)" > $@

# Proof, on a machine without GPU, that the CUDA environment (`make env HAS_CUDA=1`: PyPI's CUDA torch
# unless TORCH_INDEX_URL names an index) resolves, installs and imports every module of the product.
# Built under ENV_ROOT like `make env HAS_CUDA=1` (which then reuses it); .venv is left alone.
# Downloads several GB: not part of `make test` or CI.
check-cuda-env:
	$(MAKE) --no-print-directory HAS_CUDA=1 cuda-env-report

cuda-env-report: $(MAIN_ENV)/.ready
	@echo "== CUDA environment $(MAIN_ENV): $$(cat $<)"
	@echo "size: $$(du -sh $(MAIN_ENV) | cut -f1) in all; of which torch $$(du -shc $(MAIN_ENV)/lib/python*/site-packages/torch \
	  | tail -1 | cut -f1), the CUDA runtime (nvidia-*, triton) $$(du -shc $(MAIN_ENV)/lib/python*/site-packages/{nvidia,triton} \
	  2>/dev/null | tail -1 | cut -f1)"
	$(PY) bench/import_check.py

$(RETRIEVAL_ENV)/.ready:
	rm -rf $(RETRIEVAL_ENV) && mkdir -p $(ENV_ROOT)
	$(PYTHON) -m venv $(RETRIEVAL_ENV)
	$(RETRIEVAL_ENV)/bin/pip install -q --upgrade pip
	$(RETRIEVAL_ENV)/bin/pip install -q $(TORCH_INDEX) $(RETRIEVAL_CUDA) $(RETRIEVAL_TORCH)
	$(RETRIEVAL_ENV)/bin/pip install -q $(RETRIEVAL_CUDA) -r requirements/retrieval.txt
	touch $@

clean-work:
	rm -rf work
