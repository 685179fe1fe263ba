# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, unless another torch is asked for (make TORCH="torch==2.5.1" test).
TORCH ?= torch==2.13.0
EXTRAS ?= dev,triton,onnx

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/llmdeploy demo

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) -m benchmarks.run --suite quick

clean:
	rm -rf $(VENV) build dist *.egg-info
