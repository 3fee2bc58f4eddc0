# Front door: `make demo` (set up + train + evaluate on the embedded digits set), `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lossbench-installed
DOCS_STAMP := $(VENV)/.lossbench-docs-installed
# nvcc's toolkit, if any: `make test` (CI) compiles the extension's CUDA kernels with it (no GPU needed).
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null)))
export CUDA_HOME

.PHONY: install ext ext-cpu ext-cuda demo test test-fast docs bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Build (or find in the cache) the C++/CUDA extension of cut cross-entropy: the CPU kernels, plus the
# CUDA kernels where a GPU is present or LOSSBENCH_BUILD_CUDA=1 (minutes of nvcc).
ext: install
	$(PY) -m lossbench.cce.build

# The CPU kernels only.
ext-cpu: install
	$(PY) -m lossbench.cce.build --cpu-only

# The CUDA kernels too whenever nvcc is found, with or without a GPU: CI's check that they compile.
ext-cuda: install
	$(PY) -m lossbench.cce.build $(if $(CUDA_HOME),--cuda,--cpu-only)

demo: install
	$(PY) train.py -c configs/demo.yaml --resume
	$(PY) eval.py --run runs/demo

# The tests load the build ext-cuda made (the one with the CUDA kernels where nvcc is found).
test: install ext-cuda
	LOSSBENCH_REQUIRE_EXT=1 LOSSBENCH_BUILD_CUDA=$(if $(CUDA_HOME),1,0) $(PY) -m pytest -q

# The unit tests alone (no end-to-end / subprocess / torchrun test), on the CPU-only build.
test-fast: install ext-cpu
	LOSSBENCH_REQUIRE_EXT=1 LOSSBENCH_BUILD_CUDA=0 $(PY) -m pytest -q -m "not slow"

# The documentation: the pages in docs/ and the API reference from the docstrings (Sphinx + MyST),
# into docs/_build/html; every warning is an error (-W), and -E re-reads every page and docstring.
docs: $(DOCS_STAMP)
	$(PY) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

clean:
	rm -rf runs build *.egg-info docs/_build
