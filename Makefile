# The two quick-start commands: `make train` and `make test`. Both set up .venv/ first.
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/dlrm.yaml
ARGS ?=

.PHONY: setup train test lint format proto bench clean

setup:
	@bash scripts/setup_env.sh

train: setup
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(VENV)/bin/ndp-train --config $(CONFIG) $(ARGS)

# the import-layer contracts (pyproject.toml [tool.importlinter], under a second) before the tests
test: setup
	$(VENV)/bin/lint-imports
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(PY) -m pytest $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

proto: setup
	$(PY) -m protos.generate

bench: setup
	$(VENV)/bin/ndp-bench train --quick

clean:
	rm -rf runs/ .pytest_cache .import_linter_cache
