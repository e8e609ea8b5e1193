# Each target does its own set-up on a fresh machine: a .venv with pinned dependencies, then the
# build of rlhfkern._C against the installed torch (no build isolation: same torch, same ABI).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is pinned in the same command as the rest: anything else pulls a 5 GB CUDA build.
DEPS := torch==2.13.0 triton==3.9.0 numpy pytest pytest-benchmark ninja pybind11 setuptools wheel \
        verl==0.9.1
BENCH_ARGS ?=

.PHONY: deps build test bench info cuda-check clean

$(BIN)/.deps-installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(DEPS)
	touch $@

deps: $(BIN)/.deps-installed

build: deps
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .

test: build
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

bench: build
	$(BIN)/python -m pytest bench -q -p no:cacheprovider $(BENCH_ARGS)

info: build
	$(BIN)/python -m rlhfkern info

# The torch-free CUDA kernels with plain nvcc (also run by tests/test_build.py).
cuda-check:
	cmake -S . -B build/cuda-check -DCMAKE_CUDA_COMPILER=$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
	cmake --build build/cuda-check

clean:
	rm -rf build rlhfkern/_C*.so *.egg-info
