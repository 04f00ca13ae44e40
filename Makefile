# Two commands do all the set-up: `make demo` and `make test` create the environment if missing.
# The environment is the committed lock (uv.lock) installed into .venv by uv, bytecode compiled at install:
# where PYTHONDONTWRITEBYTECODE is set (it is on the machine this was built on), every process
# would otherwise compile torch, prefect and mlflow from source on import (20 s -> 8 s measured).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xmodal-installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK ?= true

.PHONY: env demo test test-slow bench clean prefect-server deploy worker ui

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

# The suite in two parts (README, Two commands): `make test` leaves out the tests marked slow (over 30 s) or server
# (real servers on loopback ports), `make test-slow` runs exactly those; CI (.ci/run) runs both.
test: env
	$(PY) -m pytest -m "not slow and not server"

test-slow: env
	$(PY) -m pytest -m "slow or server"

bench: env
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/align.py

clean:
	rm -rf runs mlflow.db mlartifacts data/generated

# The servers, as a user starts them (README, Operations), each in its own terminal. `prefect server` and
# `mlflow server` never import xmodal, so flows/_env.py cannot switch their telemetry off: each recipe puts the
# libraries' own switches in the server's environment (MLflow 3.17 reads MLFLOW_DISABLE_TELEMETRY and
# DO_NOT_TRACK; Prefect's server PREFECT_SERVER_ANALYTICS_ENABLED). Without them, offline, the Prefect server
# looks up sens-o-matic.prefect.io and logs a telemetry ERROR every 10 minutes, and MLflow looks up
# config.mlflow-telemetry.io. tests/test_servers_as_documented.py starts these targets and audits every lookup.
# Ports and stores are variables: `make ui MLFLOW_PORT=5050 MLFLOW_DB=sqlite:///other.db`.
HOST ?= 127.0.0.1
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
MLFLOW_DB ?= sqlite:///mlflow.db
POOL ?= xmodal-process
QUIET := PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true HF_HUB_DISABLE_TELEMETRY=1
# the UI in the browser calls PREFECT_UI_API_URL; workers and CLIs call PREFECT_API_URL: both name this port
PREFECT_API := http://$(HOST):$(PREFECT_PORT)/api
ON_PREFECT := $(QUIET) PREFECT_API_URL=$(PREFECT_API) PREFECT_UI_API_URL=$(PREFECT_API)

prefect-server: env
	$(ON_PREFECT) exec $(VENV)/bin/prefect server start --host $(HOST) --port $(PREFECT_PORT)

# `prefect work-pool create --type process` asks the server for Prefect's collection registry, which the server
# fetches from raw.githubusercontent.com (falling back to its bundled copy; seen by tests/test_servers_as_documented.py). The pool
# is created through the API instead, with the process worker's own default job template (what the CLI sends).
define CREATE_POOL
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists
from prefect.workers.process import ProcessWorker
with get_client(sync_client=True) as client:
    try:
        client.create_work_pool(WorkPoolCreate(name="$(POOL)", type="process",
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
        print("created work pool $(POOL)")
    except ObjectAlreadyExists:
        print("work pool $(POOL) exists")
endef
export CREATE_POOL

deploy: env
	$(ON_PREFECT) $(PY) -c "$$CREATE_POOL"
	$(ON_PREFECT) $(VENV)/bin/prefect --no-prompt deploy --all

worker: env
	$(ON_PREFECT) exec $(VENV)/bin/prefect worker start --pool $(POOL)

# MLflow 3.17's UI opens an experiment on the GenAI overview unless the URL says workflowType=machine_learning
# (the browser's stored choice, default GenAI, decides otherwise; the experiment's tag does not): open this URL.
ui: env
	@echo "MLflow UI: http://$(HOST):$(MLFLOW_PORT)/#/experiments?workflowType=machine_learning"
	$(QUIET) exec $(VENV)/bin/mlflow server --host $(HOST) --port $(MLFLOW_PORT) --backend-store-uri $(MLFLOW_DB) --workers 1
