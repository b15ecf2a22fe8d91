# The two commands of the README: `make demo` and `make test`. Each sets everything up by itself
# (a .venv, torch only if missing, then this package with its test extras) and is quick when
# already set up. `PYTHON=python3 make test` uses an existing interpreter instead of the venv.
# The benchmarks: `make bench` (this device's cases, measured), `make bench-headline` (the headline
# cases only), `make bench-smoke` (tiny, untimed: does the code run), `make gpu-session` (the GPU
# window's one command: bench/gpu_session.py; set-up of its own, without a package index).
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PYTHON ?= $(VENV)/bin/python
STAMP := $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/.fastmask-installed,.fastmask-installed)
PYTEST_ARGS ?=
SESSION_ARGS ?=
BENCH_PYTEST := -o python_files='bench_*.py' -o python_functions='bench_*' -s
# gpu-session runs on a fresh machine: the venv's python if there is one, else python3.
SESSION_PYTHON := $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(if $(wildcard $(VENV)/bin/python),$(PYTHON),python3),$(PYTHON))

.PHONY: setup demo test bench bench-headline bench-smoke gpu-session clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@if [ "$(PYTHON)" = "$(VENV)/bin/python" ] && [ ! -x $(VENV)/bin/python ]; then python3 -m venv $(VENV); fi
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	@# Offline machines (a GPU box) already have the dependencies: fall back to no-deps there.
	@$(PYTHON) -m pip install -q -e ".[test]" || $(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

demo: setup
	$(PYTHON) -m fastmask run --out runs/demo

test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PYTHON) -m pytest bench $(BENCH_PYTEST) $(PYTEST_ARGS)
	$(PYTHON) bench/table.py

bench-headline: setup
	$(PYTHON) -m pytest bench $(BENCH_PYTEST) -m headline $(PYTEST_ARGS)
	$(PYTHON) bench/table.py

bench-smoke: setup
	FASTMASK_BENCH=smoke $(PYTHON) -m pytest bench $(BENCH_PYTEST) $(PYTEST_ARGS)

# Never fails (the leading -): its summary says what did.
gpu-session:
	-$(SESSION_PYTHON) -m bench.gpu_session $(SESSION_ARGS)

clean:
	rm -rf $(VENV) .fastmask-installed build *.egg-info .pytest_cache
