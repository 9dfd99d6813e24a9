# Quickstart: `make demo` runs the whole pipeline on the embedded defaults; `make test` runs the tests.
PYTHON ?= python3.11
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv

.PHONY: install demo test lint format clean

# uv itself lives in its own small venv so that `uv sync` never removes it from .venv.
$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.installed: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --all-extras --python $(PYTHON)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/eob demo

test: install
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check pipeline dags tests benchmarks
	$(VENV)/bin/ruff format --check pipeline dags tests benchmarks
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format pipeline dags tests benchmarks
	$(VENV)/bin/ruff check --fix pipeline dags tests benchmarks

clean:
	rm -rf $(VENV) $(TOOLS) var
