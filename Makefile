# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev,export]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/codetr demo

test: $(STAMP)
	$(PY) -m pytest -q
