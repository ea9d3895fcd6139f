# Two commands do all the set-up: `make demo` runs the whole job on synthetic data,
# `make test` runs the test suite. Both create .venv and install the project first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUTPUT ?= runs/demo

.PHONY: demo tune-demo sweep test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/aisd-ray demo --output $(DEMO_OUTPUT)

tune-demo: $(BIN)/.installed
	$(BIN)/aisd-ray tune --data $(DEMO_OUTPUT)/shards --output runs/tune-demo

sweep: $(BIN)/.installed
	$(BIN)/aisd-ray sweep --output runs/sweep

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --durations=10

clean:
	rm -rf runs .pytest_cache
