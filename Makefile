# Entry points: `make test` (CI) and `make demo`; both build .venv first via `make install`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install browser postgres test test-slow lint proto proto-check demo clean

install: $(STAMP)

# torch is pinned first so the project's looser `torch>=` requirement is already met by the CPU
# wheel and pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

# The dashboard/report browser tests drive Debian's headless chromium; install it where we can
# (root + apt). Where it cannot be installed those two tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1)) ; } || \
	  echo "chromium not installed: browser tests will be skipped"

# The storage tests start a throwaway PostgreSQL cluster (tests/pg.py): install the server where we can
# (root + apt; Debian puts initdb in /usr/lib/postgresql/*/bin). Where it cannot be installed those
# tests skip and say why; SQLite, the default, needs nothing.
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && export DEBIAN_FRONTEND=noninteractive && \
	    (apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1)) ; } || \
	  echo "PostgreSQL not installed: PostgreSQL tests will be skipped"

test: install lint browser postgres
	$(PY) -m pytest -m "not slow" -q

test-slow: install
	$(PY) -m pytest -m slow -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

proto: install
	$(PY) tools/gen_proto.py

proto-check: install
	$(PY) tools/gen_proto.py --check

# DEMO_ARGS: your own labelled data, e.g. make demo DEMO_ARGS="--train examples/data/intents-unicode.csv
#   --public common/datasets/builtin/public.txt --tasks 2 --clients 2" (see docs/data.md)
DEMO_ARGS ?=
demo: install
	$(PY) -m benchmarks.demo --out demo-output $(DEMO_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
