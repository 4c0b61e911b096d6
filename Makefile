# All set-up happens here: `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench bench-accuracy install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision are resolved together from the registry (never a pinned CPU-only torch)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(PY) -m lightning_gf.app.demo

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run_all

# plain backprop vs gradient filtering, paper's convention vs stride correction; writes docs/accuracy.md
bench-accuracy: $(VENV)/.installed
	$(PY) -m benchmarks.accuracy --docs docs

clean:
	rm -rf $(VENV) outputs lightning_logs
