# Two commands for a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup system-deps docs bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the pinned CPU build lies on this machine's disk; a bare `torch` would pull CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[engine,dev]'
	touch $(STAMP)

setup: $(STAMP)

# redis-server for the remote-tier tests (Debian package).
system-deps:
	@command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
	    else echo "redis-server missing and not root: remote-tier tests will skip"; fi; }

demo: setup
	$(PY) -m kvplane demo

lint: setup
	$(VENV)/bin/ruff format --check kvplane tests benchmarks
	$(VENV)/bin/ruff check kvplane tests benchmarks
	$(VENV)/bin/mypy kvplane

test: setup system-deps lint
	$(PY) -m kvplane.docs --check
	$(PY) -m pytest -q -p no:cacheprovider tests

docs: setup
	$(PY) -m kvplane.docs --write

bench: setup
	$(PY) benchmarks/transfer.py
	$(PY) benchmarks/storage.py

clean:
	rm -rf $(VENV)
