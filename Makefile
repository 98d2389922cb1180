# The documented commands. Each creates .venv with the project installed on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: help tune train test test-fast ui serve servers benchmark clean

help:  ## list the targets and what they do
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:[^#]*## /\t/' | expand -t 12

tune: $(VENV)/installed  ## run the Optuna study (50 trials), tracked in MLflow
	$(PY) scripts/tune.py --n-trials 50

train: $(VENV)/installed  ## train the default configuration once
	$(PY) scripts/train.py

test: $(VENV)/installed  ## the whole test suite, real-MNIST tests included
	$(PY) -m pytest

test-fast: $(VENV)/installed  ## the tests on tiny synthetic data only
	$(PY) -m pytest -m "not slow"

# MLflow 3's server starts job-queue consumers for its GenAI features that take about a core
# even when idle; nothing here needs them, and a study running beside the UI wants that core.
ui: $(VENV)/installed  ## mlflow ui on http://127.0.0.1:5000, showing every run of this folder
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui

# mlflow models serve starts uvicorn from PATH: this environment's.
serve: $(VENV)/installed  ## serve models:/mnist-classifier@champion over HTTP on port 5001
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/mlflow models serve \
		-m models:/mnist-classifier@champion --env-manager local --port 5001

servers: $(VENV)/installed  ## PostgreSQL and an mlflow server in servers/, to try many machines on one
	$(PY) scripts/servers.py

benchmark: $(VENV)/installed  ## time an epoch and a study (see README, Performance)
	$(PY) scripts/benchmark.py

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[dev]"
	touch $@

clean:  ## remove the environment (data and stores stay)
	rm -rf $(VENV)
