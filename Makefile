# Two entry points: `make train` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second, minimal environment with transformers 4.x: parity_tests/test_hf4_compat.py loads our exports in it.
HF4_VENV := .venv-hf4
HF4_STAMP := $(HF4_VENV)/.installed

.PHONY: install train test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.cfg constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(HF4_STAMP): constraints-hf4.txt
	test -x $(HF4_VENV)/bin/python || $(PYTHON) -m venv $(HF4_VENV)
	$(HF4_VENV)/bin/python -m pip install --quiet -c constraints-hf4.txt torch transformers safetensors tokenizers numpy
	touch $(HF4_STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m launch.train $(ARGS)

# Tests run in TEST_WORKERS processes (pytest-xdist), a whole file per worker so module fixtures are built once.
TEST_WORKERS ?= 2

test: $(STAMP) $(HF4_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests parity_tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m launch.bench $(ARGS)

clean:
	rm -rf $(VENV) $(HF4_VENV) *.egg-info
