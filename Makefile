# Two entry points for a fresh machine: `make demo` and `make test`.
# Both install from test-constraints.txt, the versions the suite was last green on, so a new
# release of a dependency cannot break a fresh clone. `make test-latest` tries the newest ones.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := test-constraints.txt
LATEST := .venv-latest

.PHONY: demo test test-fast setup test-latest lock

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,export]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/codetr demo

test: $(STAMP)
	$(PY) -m pytest -q

# The inner loop of development: everything but the end-to-end runs marked slow (under two minutes).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The newest release of every dependency (not run by CI): drift is seen on purpose. When it passes,
# `make lock` records that environment as the new pins.
test-latest:
	test -x $(LATEST)/bin/python || python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,export]"
	$(LATEST)/bin/python -m pip freeze --exclude-editable | diff $(CONSTRAINTS) - | grep '^[<>]' || true
	$(LATEST)/bin/python -m pytest -q

lock:
	test -x $(LATEST)/bin/python || { echo "run make test-latest first"; exit 2; }
	{ sed -n '/^#/p' $(CONSTRAINTS); $(LATEST)/bin/python -m pip freeze --exclude-editable; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
