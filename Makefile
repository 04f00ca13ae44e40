# Two commands do all the set-up: `make demo` and `make test` create the environment if missing.
# The environment is the committed lock (uv.lock) installed into .venv by uv, bytecode compiled at install:
# where PYTHONDONTWRITEBYTECODE is set (it is on the machine this was built on), every process
# would otherwise compile torch, prefect and mlflow from source on import (20 s -> 8 s measured).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xmodal-installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK ?= true

.PHONY: env demo test bench clean

env: $(STAMP)

UV_DIR := .uv
UV := $(UV_DIR)/bin/uv

$(UV):
	python3 -m pip install -q --disable-pip-version-check --target $(UV_DIR) uv==0.13.8

$(STAMP): pyproject.toml uv.lock | $(UV)
	PYTHONPATH=$(UV_DIR) $(UV) sync --frozen --compile-bytecode
	touch $(STAMP)

demo: env
	$(PY) -m flows.cli demo

test: env
	$(PY) -m pytest

bench: env
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/align.py

clean:
	rm -rf runs mlflow.db mlartifacts data/generated
