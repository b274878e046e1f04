# fastse developer targets. `make setup` builds .venv; every other target uses it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CI and the dev machines have these two on local disk; override to use another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test lint bench demo

setup: $(VENV)/.done

$(VENV)/.done: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	@# DALI build matching the installed torch's CUDA major (CPU-only torch: the CUDA 13 build, used in CPU mode)
	cuda=$$($(PY) -c "import torch; print((torch.version.cuda or '13').split('.')[0])"); \
	extra=$$([ "$$cuda" = 12 ] && echo cu12 || echo cu13); \
	$(PY) -m pip install -q -e ".[$$extra,dev]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check fastse pipelines cli tests benchmarks

bench: setup  # needs a CUDA GPU; results go in docs/BENCHMARKS.md
	$(PY) benchmarks/teacher_update.py
	$(PY) benchmarks/pipelines.py --decode both

# BYOL+STS pretraining on CIFAR-10, then the teacher's kNN top-1. DATA: cifar10 (downloaded by
# torchvision), a class-folder tree or the JPEG archive. On a GPU: EPOCHS epochs (compiled, bf16);
# without one, a tiny run: 1,024 images of each split, one epoch of 16 steps at batch 64.
DATA     ?= cifar10
EPOCHS   ?= 10
DEMO_OUT ?= runs/demo

demo: setup
	rm -rf $(DEMO_OUT)
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(VENV)/bin/fastse pretrain --preset byol-cifar10 --data $(DATA) --epochs $(EPOCHS) --knn-every 5 \
	    --out $(DEMO_OUT) --wandb disabled; \
	else \
	  $(VENV)/bin/fastse pretrain --preset byol-cifar10 --data $(DATA) --limit 1024 --batch-size 64 --epochs 1 \
	    --log-every 4 --out $(DEMO_OUT) --wandb disabled; \
	fi
