# Front door: `make demo` (set up + train + evaluate on the embedded digits set), `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lossbench-installed
# The CUDA kernels of the extension are compiled wherever nvcc is found (no GPU needed to build).
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null)))
export CUDA_HOME

.PHONY: install ext demo test test-fast bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Build (or find in the cache) the C++/CUDA extension of cut cross-entropy.
ext: install
	$(PY) -m lossbench.cce.build

demo: install
	$(PY) train.py -c configs/demo.yaml --resume
	$(PY) eval.py --run runs/demo

test: install ext
	LOSSBENCH_REQUIRE_EXT=1 $(PY) -m pytest -q

# The unit tests alone (no end-to-end / subprocess / torchrun test).
test-fast: install ext
	LOSSBENCH_REQUIRE_EXT=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs build *.egg-info
