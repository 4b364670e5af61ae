# `make demo` and `make test` set up the virtual environment themselves on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build this project's machines carry on disk; override for another platform.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo_out

.PHONY: setup test test-slow lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,timm,hf,slurm]"
	touch $@

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(PY) -m pytest -q -rs

test-slow: setup
	$(PY) -m pytest -q -rs -m slow

demo: setup
	$(VENV)/bin/opendino demo --out $(DEMO_OUT)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
