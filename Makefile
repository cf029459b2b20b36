# Two entry points on a fresh machine: `make lab` and `make test`.
# Both create .venv with python3 and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: lab test install

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt -r requirements-dev.txt -e .
	touch $@

install: $(VENV)/.installed

# Jupyter refuses to run as root (containers, some cloud machines) unless told to.
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

lab: install
	$(BIN)/jupyter lab $(LAB_FLAGS) notebooks/

# Unit and property tests, then every notebook under nbval.
test: install
	$(BIN)/python -m pytest tests
	$(BIN)/python -m pytest --nbval --nbval-current-env --sanitize-with nbval_sanitize.cfg notebooks
