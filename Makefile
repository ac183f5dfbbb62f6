# fla_cuda: make test | make demo | make bench | make gpu-check OUT=dir | make wheel
# Each target sets up what it needs on a fresh machine (.venv, torch, CUTLASS headers, ninja).
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
MAX_JOBS    ?= $(shell nproc)
OUT         ?= out/gpu-check
CUDA_HOME   ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME MAX_JOBS

.PHONY: venv build test demo bench gpu-check wheel clean

venv: $(VENV)/.ready
$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC) nvidia-cutlass ninja pytest numpy setuptools wheel
	touch $@

# Compiles the CUDA extension in place (fla_cuda/_C.abi3.so) when nvcc is present;
# ninja rebuilds only what changed.
build: venv
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m fla_cuda.demo

bench: build
	$(PY) bench/bench.py --out out/bench --update-results

# On the GPU host, with the extension built elsewhere and carried in the tree.
gpu-check:
	bash scripts/gpu_check.sh $(OUT)

wheel: venv
	$(PY) -m pip wheel -q --no-build-isolation --no-deps . -w dist

clean:
	rm -rf build dist fla_cuda/_C*.so fla_cuda/_build_info.py
