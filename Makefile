# Two commands do everything on a fresh machine:
#   make demo   - the main job: the offline demo on the bundled CML emulator
#   make test   - lint and the whole test suite (what CI runs)
# Both create .venv and install the project into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/ray-cml demo

lint: install
	$(BIN)/ruff check ray_cml_provider tests bench
	$(BIN)/ruff format --check ray_cml_provider tests bench

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
