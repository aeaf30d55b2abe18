# Two commands a user needs: `make quickstart` and `make test`. Both create .venv when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install quickstart test test-fast lint bench reproduce clean

$(STAMP): pyproject.toml constraints.txt scripts/install.sh
	PY=$(PY) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/align-distill quickstart $(QUICKSTART_ARGS)

test: $(STAMP)
	$(BIN)/ruff check align_distill tests bench scripts examples
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not vllm and not distributed" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check align_distill tests bench scripts examples
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

# Every reproduction (wall time: see docs/results.md), then docs/results.md and the README tables from its JSON.
reproduce: $(STAMP)
	$(BIN)/python -m bench.reproduce all
	$(BIN)/python -m bench.render_results

clean:
	rm -rf $(VENV) runs .pytest_cache
