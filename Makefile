# The two commands of the README: `make demo` and `make test`. Each sets everything up by itself
# (a .venv, torch only if missing, then this package with its test extras) and is quick when
# already set up. `PYTHON=python3 make test` uses an existing interpreter instead of the venv.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PYTHON ?= $(VENV)/bin/python
STAMP := $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/.fastmask-installed,.fastmask-installed)
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

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
	$(PYTHON) -m pytest bench -o python_files='bench_*.py' -o python_functions='bench_*' -s $(PYTEST_ARGS)
	$(PYTHON) bench/table.py

clean:
	rm -rf $(VENV) .fastmask-installed build *.egg-info .pytest_cache
