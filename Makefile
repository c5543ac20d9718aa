# Two entry points: `make train` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.cfg constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m launch.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests parity_tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
