# Two commands do all the set-up: `make demo` runs the whole job on synthetic data,
# `make test` runs the test suite. Both create .venv and install the project first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUTPUT ?= runs/demo

.PHONY: demo tune-demo sweep normal-head test install constraints gpu-wheels clean

# constraints.txt: the exact versions the suite was run with (regenerate with `make constraints`)
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' -c constraints.txt
	touch $@

constraints: $(BIN)/.installed
	( echo "# pip freeze of a passing .venv (make constraints); make installs with it"; \
	  $(BIN)/python -m pip freeze --exclude-editable ) > constraints.txt

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/aisd-ray demo --output $(DEMO_OUTPUT)

tune-demo: $(BIN)/.installed
	$(BIN)/aisd-ray tune --data $(DEMO_OUTPUT)/shards --output runs/tune-demo

# The demo over seeds on both backends, then the accuracy pieces side by side (sweep --variants) at
# the size the README's table was measured at: several hours on 2 CPU cores, resumable.
VARIANTS_SET ?= --set model.image_width=96 --set model.image_height=96 --set synthetic.num_cases=24 \
	--set train.epochs=14 --set train.learning_rate=0.002 --set train.batch_size=8
sweep: $(BIN)/.installed
	$(BIN)/aisd-ray sweep --output runs/sweep
	$(BIN)/aisd-ray sweep --variants --output runs/variants $(VARIANTS_SET)

# The false-positive check on a real normal head (Debian's invesalius-examples, installed by apt-get
# as root when missing; docs/data.md): an export's lesion mL on a head CT with no acute lesion.
MODEL ?= $(DEMO_OUTPUT)/export
normal-head: $(BIN)/.installed
	$(BIN)/python -m aisd_ray.bench.normal_head --model $(MODEL) --output runs/normal-head

# Two test processes, each given whole modules (one Ray cluster per module) in the order
# tests/conftest.py gives them, the slow ones first (--no-loadscope-reorder: else pytest-xdist starts
# the modules with the most tests first, and the slow ones, with few tests each, run last): on 2 cores
# one computes while the other waits on Ray. A test process that dies (a crash, or pytest-timeout
# ending a test past 15 minutes) is not replaced: it ends the run with that test named. pytest-xdist
# 3.8 can deadlock when it replaces a dead process under --dist loadfile (both processes idle for
# ever: pytest-dev/pytest-xdist#1378), which is how CI reached its time limit at 07818a3.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart=0 --durations=10

# The GPU probe on a machine with JAX but no TensorFlow (and no internet): Keras and its
# pure-Python dependencies as wheels, at the tested versions, for that machine's Python.
PROBE_PYTHON ?= 3.11
gpu-wheels: $(BIN)/.installed
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --dest .gpu-wheels \
	    --python-version $(PROBE_PYTHON) --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	    --platform manylinux_2_17_x86_64 -c constraints.txt \
	    keras namex optree rich markdown-it-py mdurl pygments absl-py h5py tomli-w packaging

clean:
	rm -rf runs .pytest_cache
