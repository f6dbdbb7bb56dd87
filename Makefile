# Set-up on a fresh machine is part of every target: the virtual environment is
# created and filled on first use (CPU torch pinned: a bare `torch` pulls CUDA).
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := torch==2.13.0 "numpy<2.4" triton==3.6.0 tqdm pytest pytest-benchmark transformers accelerate lightning peft==0.21.2 scikit-learn matplotlib ruff ninja setuptools wheel
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint build clean gpu-check

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	touch $@

build: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(VENV)/bin/mas-local compare

test: build
	$(PY) -m ruff check .
	PYTHON=$(PY) bash csrc/check_cuda_compile.sh
	$(PY) -m pytest -q -ra

bench: build
	$(PY) -m pytest -q bench --benchmark-only

# On the GPU machine (nothing to install there): build, GPU tests and the table under one
# deadline; logs and the table in $OUT (default /tmp/out). See bench/gpu_check.sh.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build *.egg-info mas_local/_C*.so .pytest_cache
