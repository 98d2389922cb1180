# The documented commands. Each creates .venv with the project installed on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA ?= mnist
# make ui PORT=5050, make serve PORT=8000: another port than each one's usual.
PORT ?=

.PHONY: help taste tune train test test-fast lint lock ui dashboard serve servers loadtest benchmark compare clean

help:  ## list the targets and what they do
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:[^#]*## /\t/' | expand -t 12

taste: $(VENV)/installed  ## a study of 4 short trials, to see it all in a minute
	$(PY) scripts/tune.py --n-trials 4 --max-epochs 2 --study-name taste

tune: $(VENV)/installed  ## the study: 50 trials, tracked in MLflow (again: the rest of the 50, after an interruption)
	$(PY) scripts/tune.py --until 50

train: $(VENV)/installed  ## train the default configuration once
	$(PY) scripts/train.py

# A test process per core (at most 4: each holds torch, Lightning and MLflow, and many start
# processes of their own); while one test waits on a process, a server or a lock, another runs.
TESTS_AT_ONCE := --numprocesses auto --maxprocesses 4

test: $(VENV)/installed  ## every test: faults, servers, browser and the real MNIST included
	$(PY) -m pytest $(TESTS_AT_ONCE)

test-fast: $(VENV)/installed  ## the tests that start no script in a process of its own, no server, no browser
	$(PY) -m pytest $(TESTS_AT_ONCE) -m "not slow"

lint: $(VENV)/installed  ## ruff: the lint rules and the format of pyproject.toml, checked (CI runs it first)
	$(VENV)/bin/ruff check src scripts tests
	$(VENV)/bin/ruff format --check src scripts tests

# The newest versions pyproject.toml allows, in an environment of their own: only if the whole
# suite passes with them does constraints.txt take their versions, for every later install.
LOCK_VENV := .venv-lock
lock:  ## try the newest dependencies: a new environment, the whole suite, and constraints.txt if it passes
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -e ".[dev]"
	$(LOCK_VENV)/bin/python -m pytest $(TESTS_AT_ONCE)
	$(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | sed '1i # The versions the whole suite last passed with: make lock writes it, make installs with it.' > constraints.txt
	rm -rf $(LOCK_VENV)
	@echo "constraints.txt: the versions the suite passed with; make clean, then any target, installs them"

# MLflow 3's server starts job-queue consumers for its GenAI features that take about a core
# even when idle; nothing here needs them, and a study running beside the UI wants that core.
# A folder that moved has its store's artifact locations follow it first (machinery/tracking/moved_store.py).
ui: $(VENV)/installed  ## mlflow ui on http://127.0.0.1:5000 (PORT=...): the runs, their curves, the models
	$(PY) -m tunetrack.machinery.tracking.moved_store mlflow.db
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --port $(or $(PORT),5000)

dashboard: $(VENV)/installed  ## optuna-dashboard on http://127.0.0.1:8080: the studies of optuna.db
	$(PY) scripts/dashboard.py

# mlflow models serve starts uvicorn from PATH: this environment's.
serve: $(VENV)/installed  ## serve the champion of DATA (default: mnist) over HTTP on port 5001 (PORT=...): make serve DATA=flowers
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/mlflow models serve \
		-m "models:/$(DATA)-classifier@champion" --env-manager local --port $(or $(PORT),5001)

servers: $(VENV)/installed  ## PostgreSQL and an mlflow server in servers/, to try many machines on one
	$(PY) scripts/servers.py

loadtest: $(VENV)/installed  ## load-test PostgreSQL and an mlflow server with 1 to 128 workers (docs/many-machines.md)
	$(PY) scripts/loadtest.py

benchmark: $(VENV)/installed  ## time an epoch and a study (docs/performance.md)
	$(PY) scripts/benchmark.py

compare: $(VENV)/installed  ## compare samplers and pruners, 5 seeds of 3-minute studies (docs/search.md)
	$(PY) scripts/compare_search.py

$(VENV)/installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[dev]" --constraint constraints.txt
	touch $@

clean:  ## remove the environment (data and stores stay)
	rm -rf $(VENV)
