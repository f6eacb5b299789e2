# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs torch==2.13.0 first (the CPU build on local disk), then the
# package in editable mode with its extras (building the C++ extension), then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pysparse-installed
SRCS   := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/*.inc)

export HF_HUB_OFFLINE := 1

.PHONY: install demo test clean

$(STAMP): $(SRCS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel ninja pybind11
	$(BIN)/python -m pip install -q torch==2.13.0
	PYSPARSE_STRICT_BUILD=1 $(BIN)/python -m pip install -q --no-build-isolation -e ".[demo,gpu,dev]"
	$(BIN)/python -c "import pysparse.ops.backends.cpu as c; assert c._C is not None, c._LOAD_ERROR"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pysparse demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info pysparse/_C*.so pysparse-demo
