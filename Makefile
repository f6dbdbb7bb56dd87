# Set-up on a fresh machine is part of every target: the virtual environment is
# created and filled on first use (CPU torch pinned: a bare `torch` pulls CUDA).
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := torch==2.13.0 "numpy<2.4" triton==3.6.0 tqdm pytest pytest-benchmark transformers accelerate lightning peft==0.21.2 scikit-learn matplotlib ruff ninja setuptools wheel
STAMP := $(VENV)/.installed
# The Avalanche plugin's tests (tests_avalanche/) run in a second venv: avalanche-lib 0.6 needs a torchvision
# that loads only beside torch 2.14.1 (a CUDA build; it runs on the CPU). mas-local comes from the checkout on
# PYTHONPATH, not installed there, so the main venv's in-tree mas_local/_C.so (built for torch 2.13) is neither
# rebuilt nor used: that suite runs the torch backend (tests_avalanche/conftest.py).
AVA_VENV ?= .venv-avalanche
AVA_PY := $(AVA_VENV)/bin/python
AVA_DEPS := torch==2.14.1 torchvision==0.29.1 "numpy<2.4"
AVA_STAMP := $(AVA_VENV)/.installed
AVA_NEEDS_GB ?= 8

.PHONY: demo test test-avalanche bench lint build clean gpu-check

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	touch $@

# The venv takes about 6 GB (torch 2.14.1 brings its CUDA libraries): check the disk first, so that a full
# disk says so before pip starts, and keep no second copy of the wheels in pip's cache.
$(AVA_STAMP): Makefile
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(AVA_NEEDS_GB) ]; then \
		echo "make: $(AVA_VENV) needs about $(AVA_NEEDS_GB) GB free here; $$free GB are (df -h .)" >&2; exit 1; fi
	test -x $(AVA_PY) || python3 -m venv $(AVA_VENV)
	$(AVA_PY) -m pip install -q --no-cache-dir $(AVA_DEPS)
	$(AVA_PY) -m pip install -q --no-cache-dir avalanche-lib==0.6.0 pytest scikit-learn tqdm
	touch $@

build: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(VENV)/bin/mas-local compare

test: build
	$(PY) -m ruff check .
	PYTHON=$(PY) bash csrc/check_cuda_compile.sh
	$(PY) -m pytest -q -ra
	$(MAKE) test-avalanche

test-avalanche: $(AVA_STAMP)
	PYTHONPATH="$(CURDIR)" $(AVA_PY) -m pytest -q -ra -p no:cacheprovider tests_avalanche

bench: build
	$(PY) -m pytest -q bench --benchmark-only

# On the GPU machine (nothing to install there): build, GPU tests and the table under one
# deadline; logs and the table in $OUT (default /tmp/out). See bench/gpu_check.sh.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build *.egg-info mas_local/_C*.so .pytest_cache
