# Set-up and test commands. `make test` works on a fresh machine: it builds .venv, installs the
# locally provided CPU build of torch (never the CUDA build) and moekit with its test extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install lint test demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -n 2 --dist worksteal tests

DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)

demo: install
	$(VENV)/bin/moekit train --name $(DEMO_RUN)
	$(VENV)/bin/moekit inspect --run runs/$(DEMO_RUN)

bench: install
	$(PY) benchmarks/layer.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
