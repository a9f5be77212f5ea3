# `make demo` and `make test` are the two commands of the README. Both create .venv on first
# use; `demo` installs cxrtune with its runtime dependencies only, `test` adds the dev tools.
# Later runs reuse .venv.
PYTHON ?= python3
VENV := .venv
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
CHROMIUM := /usr/bin/chromium

.PHONY: demo test lint browser install clean

demo: $(RUNTIME_STAMP)
	$(VENV)/bin/cxrtune sweep sweeps/quickstart.yaml

test: $(DEV_STAMP) browser lint
	$(VENV)/bin/python -m pytest

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy search trainables spaces analysis

# The report's browser tests drive Debian's Chromium. Installed here when missing and this
# user may install packages; otherwise `make test` stops and says how, unless
# CXRTUNE_ALLOW_NO_BROWSER=1 lets those tests skip (pytest then says so in its summary).
browser:
	@test -x $(CHROMIUM) || [ "$$CXRTUNE_ALLOW_NO_BROWSER" = 1 ] || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	{ sudo -n true 2>/dev/null && sudo apt-get update -qq && \
	  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	{ echo "make test: the report's browser tests need Chromium: run 'sudo apt-get install chromium', or set CXRTUNE_ALLOW_NO_BROWSER=1 to skip them"; exit 1; }

install: $(DEV_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e .
	touch $(RUNTIME_STAMP)

$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(RUNTIME_STAMP) $(DEV_STAMP)

clean:
	rm -rf $(VENV) results
