# Two commands a user needs: `make demo` and `make test`. Both create (or reuse) .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Which torch to install when the virtual environment has none. Empty = decided by tools/install_torch.py:
# a machine with an NVIDIA driver gets PyPI's default (CUDA) build, any other machine torch==2.13.0 (CPU).
TORCH ?=

.PHONY: demo test bench install clean

$(VENV)/.installed: pyproject.toml tools/install_torch.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) tools/install_torch.py $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lightning-interp demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs lightning_logs *.egg-info
