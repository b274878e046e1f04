# fastse developer targets. `make setup` builds .venv; every other target uses it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CI and the dev machines have these two on local disk; override to use another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test lint bench

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
